"""Squeezing a LoRA update to a lower rank: QR core and randomised SVD against a full SVD.

For dW = s·B·A (B:[out, r], A:[r, in]) the optimal rank-k approximation is the top-k part of dW's
SVD (Eckart–Young). Two ways to get it:

    qr-core    shears.squeeze.squeeze_lora: thin QRs of B and Aᵀ, SVD of the r x r core (never forms dW)
    full-svd   form dW = s·B@A (fp32), torch.linalg.svd, keep k directions (the obvious way)

A SparsePEFT update (s·B·A) ⊙ M is not a product, so shears squeezes it with a randomised SVD:

    rsvd       shears.squeeze.squeeze_dense (torch.svd_lowrank), against full-svd of the masked update

Accuracy is the relative Frobenius error ||dW - dW_k||_F / ||dW||_F of each result, measured in
float64 against the dense update, next to the optimum sqrt(sum_{i>k} σ_i²) / sqrt(sum_i σ_i²). For
the product, σ comes from an independent route: the eigenvalues of s²·Lᵀ(AAᵀ)L with LLᵀ = BᵀB (the
nonzero eigenvalues of dWᵀdW), in float64; for the masked update from the full SVD itself.

Each repetition runs both methods, in alternating order, so load from other processes on the
shared CPU hits both alike; a fast method's time is the median of --inner calls.

    python benchmarks/bench_squeeze.py [--reps 1] [--shapes 4096x4096,11008x4096]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from shears.squeeze import squeeze_dense, squeeze_lora  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4096x4096,11008x4096", help="comma-separated OUTxIN")
    parser.add_argument("--r", type=int, default=32, help="LoRA rank of the update")
    parser.add_argument("--k", type=int, default=16, help="squeezed rank")
    parser.add_argument("--alpha", type=float, default=64.0, help="lora_alpha (scale = alpha / r)")
    parser.add_argument("--mask-density", type=float, default=0.5, help="kept share of the SparsePEFT mask")
    parser.add_argument("--reps", type=int, default=1, help="repetitions (a full SVD takes ~1-3 min here)")
    parser.add_argument("--inner", type=int, default=5, help="calls per repetition of a fast method (median)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default: on a shared, oversubscribed CPU two spinning OpenMP "
                             "threads run ~4x slower than one (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- the methods

Factors = tuple[torch.Tensor, torch.Tensor, float]  # (A':[k, in], B':[out, k], scale), dW_k = scale·B'·A'


def qr_core(A: torch.Tensor, B: torch.Tensor, scale: float, k: int) -> Factors:
    result = squeeze_lora(A, B, scale, rank=k)
    return result.A, result.B, result.scale


def truncated_svd(delta: torch.Tensor, k: int) -> tuple[Factors, torch.Tensor]:
    """Top-k factors of a dense matrix by full SVD, and its whole spectrum."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (vh[:k], u[:, :k] * s[:k], 1.0), s


def full_svd_of_product(A: torch.Tensor, B: torch.Tensor, scale: float, k: int) -> Factors:
    return truncated_svd(scale * (B @ A), k)[0]


def rsvd(delta: torch.Tensor, k: int) -> Factors:
    result = squeeze_dense(delta, rank=k)
    return result.A, result.B, result.scale


# --------------------------------------------------------------------------- accuracy

def product_spectrum(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """σ² of s·B·A, descending, in float64, without an SVD: eig(s²·Lᵀ·(A·Aᵀ)·L), L·Lᵀ = Bᵀ·B."""
    L = torch.linalg.cholesky(B.double().T @ B.double())
    gram = scale ** 2 * (L.T @ (A.double() @ A.double().T) @ L)
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)


def optimal_error(power: torch.Tensor, k: int) -> float:
    """Eckart–Young: the smallest relative error of any rank-k approximation, from σ² (descending)."""
    power = power.double()
    return float((power[k:].sum() / power.sum()).sqrt())


def relative_error(delta64: torch.Tensor, factors: Factors) -> float:
    A, B, scale = factors
    approx = scale * (B.double() @ A.double())
    return float(torch.linalg.matrix_norm(delta64 - approx) / torch.linalg.matrix_norm(delta64))


def mutual_distance(delta64: torch.Tensor, one: Factors, other: Factors) -> float:
    """||dW_k(one) - dW_k(other)||_F / ||dW||_F: whether two methods found the same truncation."""
    a = one[2] * (one[1].double() @ one[0].double())
    b = other[2] * (other[1].double() @ other[0].double())
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(delta64))


# --------------------------------------------------------------------------- timing

@dataclass
class Timing:
    fast_ms: list[float] = field(default_factory=list)  # one median of --inner calls per repetition
    slow_ms: list[float] = field(default_factory=list)
    fast_out: Factors | None = None
    slow_out: Factors | None = None


def timed(fn: Callable[[], Factors]) -> tuple[float, Factors]:
    start = time.perf_counter()
    out = fn()
    return 1e3 * (time.perf_counter() - start), out


def race(fast: Callable[[], Factors], slow: Callable[[], Factors], reps: int, inner: int, label: str) -> Timing:
    """Alternate fast/slow per repetition; the fast side's time per repetition is a median of `inner` calls."""
    from shears.progress import progress

    timing = Timing()
    fast()  # first-call set-up (LAPACK workspaces, thread pools) is not the method's cost
    for rep in progress(range(reps), desc=label, unit="rep"):
        for side in (("fast", "slow") if rep % 2 == 0 else ("slow", "fast")):
            if side == "fast":
                calls = [timed(fast) for _ in range(inner)]
                timing.fast_ms.append(statistics.median(ms for ms, _ in calls))
                timing.fast_out = calls[-1][1]
            else:
                ms, timing.slow_out = timed(slow)
                timing.slow_ms.append(ms)
    return timing


# --------------------------------------------------------------------------- the cases

def lora_factors(out: int, inp: int, r: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Trained-looking fp32 factors: a decaying spectrum, so truncation error is neither 0 nor ~1."""
    A = torch.randn(r, inp, generator=gen) / inp ** 0.5
    B = torch.randn(out, r, generator=gen) * (0.85 ** torch.arange(r, dtype=torch.float32)) / r ** 0.5
    return A, B


def bench_shape(out: int, inp: int, args: argparse.Namespace) -> list[dict]:
    gen = torch.Generator().manual_seed(args.seed)
    A, B = lora_factors(out, inp, args.r, gen)
    scale = args.alpha / args.r
    k = args.k
    delta64 = scale * (B.double() @ A.double())

    product = race(lambda: qr_core(A, B, scale, k), lambda: full_svd_of_product(A, B, scale, k),
                   args.reps, args.inner, f"{out}x{inp} product")
    optimum = optimal_error(product_spectrum(A, B, scale), k)
    rows = [{"shape": f"{out}x{inp}", "update": "s*B@A", "fast": "qr-core", "timing": product, "optimum": optimum,
             "fast_err": relative_error(delta64, product.fast_out),
             "slow_err": relative_error(delta64, product.slow_out),
             "agree": mutual_distance(delta64, product.fast_out, product.slow_out)}]
    del delta64

    mask = torch.rand(out, inp, generator=gen) < args.mask_density
    masked = (scale * (B @ A)) * mask
    spectrum: list[torch.Tensor] = []

    def full_svd_masked() -> Factors:
        factors, s = truncated_svd(masked, k)
        spectrum[:] = [s]
        return factors

    sparse = race(lambda: rsvd(masked, k), full_svd_masked, args.reps, args.inner, f"{out}x{inp} masked")
    masked64 = masked.double()
    rows.append({"shape": f"{out}x{inp}", "update": "(s*B@A)*M", "fast": "rsvd", "timing": sparse,
                 "optimum": optimal_error(spectrum[0].double() ** 2, k),
                 "fast_err": relative_error(masked64, sparse.fast_out),
                 "slow_err": relative_error(masked64, sparse.slow_out),
                 "agree": mutual_distance(masked64, sparse.fast_out, sparse.slow_out)})
    return rows


# --------------------------------------------------------------------------- report

def print_report(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\nsqueeze r={args.r} -> k={args.k}, scale = {args.alpha:g}/{args.r}; mask density {args.mask_density:g}; "
          f"{args.reps} repetition(s), fast methods median of {args.inner} calls each; "
          f"{torch.get_num_threads()} torch threads")
    print("timings on a shared 2-core CPU (other engineers' jobs run alongside): read ratios, not absolutes")
    header = (f"{'shape':<11} {'update':<10} {'method':<9} {'median ms':>11} {'rel. error':>12} "
              f"{'- optimum':>10} {'full-svd ms':>12} {'rel. error':>12} {'- optimum':>10} {'|dW_k diff|':>11}")
    print(header)
    print("-" * len(header))
    for row in rows:
        t, opt = row["timing"], row["optimum"]
        print(f"{row['shape']:<11} {row['update']:<10} {row['fast']:<9} {statistics.median(t.fast_ms):>11.2f} "
              f"{row['fast_err']:>12.8f} {row['fast_err'] - opt:>10.1e} {statistics.median(t.slow_ms):>12.0f} "
              f"{row['slow_err']:>12.8f} {row['slow_err'] - opt:>10.1e} {row['agree']:>11.1e}")
    print("  optimum = Eckart-Young sqrt(sum_{i>k} s_i^2 / sum_i s_i^2); |dW_k diff| = distance between the two "
          "methods' rank-k updates / ||dW||_F")
    print("\nspeed-up vs full SVD of the dense update (full-svd ms / method ms, medians):")
    for row in rows:
        t = row["timing"]
        ratio = statistics.median(t.slow_ms) / statistics.median(t.fast_ms)
        print(f"  {row['shape']:<11} {row['update']:<10} {row['fast']:<8} {ratio:>10.1f}x")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(n) for n in s.lower().split("x")) for s in args.shapes.split(",")]
    rows = [row for out, inp in shapes for row in bench_shape(out, inp, args)]
    print_report(rows, args)


if __name__ == "__main__":
    main()
