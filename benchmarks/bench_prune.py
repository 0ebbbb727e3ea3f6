"""Wanda vs magnitude vs SparseGPT pruning on smollm2-135m: wall time and peak resident memory.

Wanda (50% unstructured by default) needs a calibration pass: every block runs the calibration
tokens twice (once to accumulate ||X_j||^2 for its linears, once more after masking so the next
block sees pruned outputs), and block 0's hidden states for every sample are kept in memory.
Magnitude pruning needs no data at all. This measures what that costs, and what bf16 autocast of
the calibration forward (`wanda-bf16`, as training.bf16=auto runs it on a CPU with native bf16;
the statistics still accumulate in fp32) saves: its time against fp32 Wanda, and per matrix the
share of mask entries on which the two agree.

`--diagnose` explains that agreement. Sequential Wanda is chaotic at the threshold: a weight whose
score sits next to its row's cut flips for a tiny change of its input norm, and every flip changes
what the later blocks see. So it also prints (1) the *local* agreement: bf16 and fp32 statistics
computed on the same fp32 inputs, block by block, which is what bf16 itself changes; (2) the noise
floor: fp64 sequential Wanda against fp32, i.e. how far fp32's own rounding already moves the masks;
(3) what matters to a user: the held-out loss of the model pruned with each set of masks.

`sparsegpt` runs the same two calibration passes per block as Wanda but accumulates each linear's
input Hessian 2 X X^T (in_features^2 floats: 1536^2 for down_proj) and then prunes column block by
column block with OBS updates of the kept weights (one Cholesky per linear, a rank-one update per
column). Every worker also reports the pruned model's held-out loss (8 other windows of the data),
which is what the extra time buys.

Peak RSS is a per-process high-water mark (`resource.getrusage(...).ru_maxrss`; tracemalloc does not
see torch's allocations), so every (method, repetition) runs in a fresh subprocess of this script.
Repetitions alternate the order (W M, M W, ...) so that load from other processes on the shared CPU
hits both methods alike; medians are reported.

    python benchmarks/bench_prune.py                       # 16 x 512-token samples, 1 repetition
    python benchmarks/bench_prune.py --nsamples 128 --reps 3 --data /path/to/train.json
    python benchmarks/bench_prune.py --diagnose            # + why bf16 and fp32 masks differ
    python benchmarks/bench_prune.py --methods wanda,sparsegpt --reps 2   # SparseGPT against Wanda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

METHODS = ("wanda", "magnitude", "wanda-bf16", "sparsegpt")
CALIBRATED = ("wanda", "sparsegpt")  # worker names that need calibration tokens
RESULT_TAG = "BENCH_RESULT "  # prefix of the worker's one JSON line on stdout


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="builtin:arithmetic", help="calibration records (shears.data source)")
    parser.add_argument("--nsamples", type=int, default=16,
                        help="calibration samples (the paper uses 128; here 128 x 512 takes >15 min per Wanda run)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=1, help="calibration samples per block call (CLI default)")
    parser.add_argument("--reps", type=int, default=1, help="subprocess runs per method, order alternating")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default: on a shared, oversubscribed CPU two spinning OpenMP "
                             "threads run ~4x slower than one (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--diagnose", action="store_true",
                        help="also: local bf16 agreement, the fp64 noise floor, held-out loss per mask set (~6 min)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of methods to run")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--masks-dir", help=argparse.SUPPRESS)  # where a Wanda worker leaves its masks
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- one method, one process

def run_worker(args: argparse.Namespace) -> dict:
    """Load, (tokenise calibration,) prune; time and RSS of each phase. Runs in its own process."""
    import torch

    from shears.data import calibration_input_ids, load_records
    from shears.models import load_model, load_tokenizer
    from shears.sparsity import sparsity_report, wanda_prune

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load_model(args.model)
    load_s = time.perf_counter() - start
    # Weights may still be lazily mapped from the safetensors file: read every page in, so that the
    # "loaded" RSS holds the whole model and "peak - loaded" is what pruning itself adds.
    checksum = sum(float(p.detach().abs().sum()) for p in model.parameters())
    rss_loaded = peak_rss_mib()
    ids = None
    tokenizer = load_tokenizer(args.model)
    if args.worker.startswith(CALIBRATED):  # calibration tokens are an input, not part of the pruning time
        ids = calibration_input_ids(tokenizer, load_records(args.data), args.nsamples, args.seqlen, args.seed)
    rss_before = peak_rss_mib()
    start = time.perf_counter()
    masks = wanda_prune(model, ids, sparsity=args.sparsity, method=args.worker.removesuffix("-bf16"),
                        batch_size=args.batch_size, bf16=args.worker.endswith("-bf16"))
    prune_s = time.perf_counter() - start
    held_out = calibration_input_ids(tokenizer, load_records(args.data), 8, args.seqlen, args.seed + 1)
    loss = held_out_loss(model, {}, held_out)
    if args.masks_dir and ids is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in masks.items()}, str(Path(args.masks_dir) / f"{args.worker}.safetensors"))
    return {"method": args.worker, "load_s": load_s, "prune_s": prune_s, "rss_loaded_mib": rss_loaded,
            "rss_before_mib": rss_before, "rss_peak_mib": peak_rss_mib(),
            "sparsity": sparsity_report(model)["total"], "checksum": checksum, "held_out_loss": loss,
            "calibration": None if ids is None else list(ids.shape)}


def spawn(method: str, argv: list[str], masks_dir: str) -> dict:
    """Run this script as a worker for `method` in a fresh interpreter; its tqdm bars go to our stderr."""
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", method, "--masks-dir", masks_dir]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
    return json.loads(lines[-1][len(RESULT_TAG):])


# --------------------------------------------------------------------------- report

def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def print_table(runs: dict[str, list[dict]], args: argparse.Namespace) -> None:
    print(f"\nmodel {args.model}, {args.sparsity:.0%} unstructured, Wanda calibration {args.nsamples} x "
          f"{args.seqlen} tokens of {args.data} (batch {args.batch_size}); medians of {args.reps} fresh "
          f"process(es) per method, {args.threads or 'default'} torch thread(s)")
    print("timings on a shared 2-core CPU (other engineers' jobs run alongside): read ratios, not absolutes")
    header = f"{'method':<10} {'prune s':>9} {'load s':>7} {'RSS loaded MiB':>15} {'peak RSS MiB':>13} " \
             f"{'peak - loaded':>14} {'sparsity':>9} {'held-out loss':>14}"
    print(header)
    print("-" * len(header))
    for method in runs:
        r = runs[method]
        extra = median(r, "rss_peak_mib") - median(r, "rss_loaded_mib")
        print(f"{method:<10} {median(r, 'prune_s'):>9.2f} {median(r, 'load_s'):>7.2f} "
              f"{median(r, 'rss_loaded_mib'):>15.0f} {median(r, 'rss_peak_mib'):>13.0f} {extra:>14.0f} "
              f"{median(r, 'sparsity'):>9.2%} {median(r, 'held_out_loss'):>14.4f}")
    if "wanda" in runs and "sparsegpt" in runs:
        w, g = runs["wanda"], runs["sparsegpt"]
        print(f"\nsparsegpt / wanda prune wall time {median(g, 'prune_s') / median(w, 'prune_s'):6.2f}x, "
              f"held-out loss {median(g, 'held_out_loss'):.4f} vs {median(w, 'held_out_loss'):.4f}, "
              f"RSS added by pruning {median(g, 'rss_peak_mib') - median(g, 'rss_loaded_mib'):.0f} vs "
              f"{median(w, 'rss_peak_mib') - median(w, 'rss_loaded_mib'):.0f} MiB")
    if not {"wanda", "magnitude", "wanda-bf16"} <= set(runs):
        return
    w, m = runs["wanda"], runs["magnitude"]
    print("\nratios (wanda / magnitude; one process per run, order alternating per repetition):")
    print(f"  prune wall time   {median(w, 'prune_s') / median(m, 'prune_s'):8.1f}x")
    print(f"  peak RSS          {median(w, 'rss_peak_mib') / median(m, 'rss_peak_mib'):8.2f}x")
    extra_w = median(w, "rss_peak_mib") - median(w, "rss_loaded_mib")
    extra_m = median(m, "rss_peak_mib") - median(m, "rss_loaded_mib")
    print(f"  RSS added by pruning (peak - loaded model): wanda +{extra_w:.0f} MiB, magnitude +{extra_m:.0f} MiB")
    b = runs["wanda-bf16"]
    print(f"  wanda-bf16 / wanda prune time {median(b, 'prune_s') / median(w, 'prune_s'):6.2f}x  (target <= 0.60)")


def mask_agreement(masks_dir: str) -> None:
    from safetensors.torch import load_file

    fp32 = load_file(str(Path(masks_dir) / "wanda.safetensors"))
    bf16 = load_file(str(Path(masks_dir) / "wanda-bf16.safetensors"))
    agree = {name: float((bf16[name] == keep).float().mean()) for name, keep in fp32.items()}
    worst = min(agree, key=agree.get)
    print(f"  mask agreement bf16 vs fp32 per matrix ({len(agree)} matrices): min {agree[worst]:.4%} ({worst}), "
          f"median {statistics.median(agree.values()):.4%}; matrices >= 99.5%: "
          f"{sum(a >= 0.995 for a in agree.values())}/{len(agree)}")


# --------------------------------------------------------------------------- why the masks differ

def agreement_line(name: str, masks: dict, reference: dict) -> str:
    agree = {k: float((masks[k] == keep).float().mean()) for k, keep in reference.items()}
    worst = min(agree, key=agree.get)
    return (f"  {name:<44} min {agree[worst]:.4%} ({worst}), median {statistics.median(agree.values()):.4%}, "
            f">= 99.5%: {sum(a >= 0.995 for a in agree.values())}/{len(agree)}")


def local_masks(model, ids, sparsity: float) -> tuple[dict, dict]:
    """Per block, masks from fp32 and from bf16 statistics of the *same* fp32 inputs; the model is pruned
    with the fp32 masks and propagated in fp32, so no difference carries from one block to the next."""
    import torch

    from shears.models import decoder_layers
    from shears.precision import autocast, bf16_weights
    from shears.sparsity import InputSquaredNorms, capture_block_inputs, keep_mask, run_block, target_linears

    targets, (_, blocks) = target_linears(model), decoder_layers(model)
    fp32, bf16 = {}, {}
    model.eval()
    with torch.no_grad():
        hidden, received = capture_block_inputs(model, blocks, ids.split(1))
        for index, block in enumerate(blocks):
            stats = {}
            for half in (False, True):
                hooks = {name: InputSquaredNorms(linear) for name, linear in targets[index].items()}
                handles = [linear.register_forward_hook(hooks[name]) for name, linear in targets[index].items()]
                with autocast(half, "cpu"), bf16_weights(block, enabled=half, frozen_only=False):
                    run_block(block, hidden, received[index], keep_outputs=False)
                for handle in handles:
                    handle.remove()
                stats[half] = {name: hook.sum_sq for name, hook in hooks.items()}
            for name, linear in targets[index].items():
                weight = linear.weight.detach().float().abs()
                fp32[name] = keep_mask(weight * stats[False][name].sqrt().unsqueeze(0), sparsity, None)
                bf16[name] = keep_mask(weight * stats[True][name].sqrt().unsqueeze(0), sparsity, None)
                linear.weight.data.masked_fill_(~fp32[name], 0)
            hidden = run_block(block, hidden, received[index])
    return fp32, bf16


def held_out_loss(model, masks: dict, ids) -> float:
    """Mean next-token loss (fp32) of `model` with `masks` applied, on held-out windows."""
    import torch

    with torch.no_grad():
        saved = {}
        modules = dict(model.named_modules())
        for name, keep in masks.items():
            weight = modules[name].weight
            saved[name] = weight.detach().clone()
            weight.data.masked_fill_(~keep.to(weight.device), 0)
        try:
            losses = [float(model(input_ids=window.unsqueeze(0), labels=window.unsqueeze(0)).loss) for window in ids]
        finally:
            for name, weight in saved.items():
                modules[name].weight.data.copy_(weight)
    return sum(losses) / len(losses)


def diagnose(args: argparse.Namespace, masks_dir: str) -> None:
    import copy

    import torch
    from safetensors.torch import load_file

    from shears.data import calibration_input_ids, load_records
    from shears.models import load_model, load_tokenizer
    from shears.sparsity import wanda_prune

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    records = load_records(args.data)
    ids = calibration_input_ids(tokenizer, records, args.nsamples, args.seqlen, args.seed)
    held_out = calibration_input_ids(tokenizer, records, 8, args.seqlen, args.seed + 1)
    masks = {name: load_file(str(Path(masks_dir) / f"{name}.safetensors")) for name in ("wanda", "wanda-bf16")}
    local_fp32, local_bf16 = local_masks(copy.deepcopy(model), ids, args.sparsity)
    masks["wanda-fp64"] = wanda_prune(copy.deepcopy(model).double(), ids, sparsity=args.sparsity,
                                      batch_size=args.batch_size)
    print("\nwhy the masks differ (--diagnose; per matrix, share of mask entries that agree):")
    print(agreement_line("bf16 vs fp32, sequential (as above)", masks["wanda-bf16"], masks["wanda"]))
    print(agreement_line("bf16 vs fp32, local (same fp32 inputs)", local_bf16, local_fp32))
    print(agreement_line("fp32 vs fp64, sequential (fp32's noise floor)", masks["wanda"], masks["wanda-fp64"]))
    print(agreement_line("bf16 vs fp64, sequential", masks["wanda-bf16"], masks["wanda-fp64"]))
    print(f"held-out loss (fp32 forward, 8 x {args.seqlen} other windows of {args.data}, seed {args.seed + 1}):")
    losses = {name: held_out_loss(model, m, held_out) for name, m in masks.items()}
    dense = held_out_loss(model, {}, held_out)
    print(f"  dense {dense:.4f}; " + "; ".join(f"{name} masks {loss:.4f}" for name, loss in losses.items()))
    print(f"  bf16 masks vs fp32 masks: {losses['wanda-bf16'] / losses['wanda'] - 1:+.3%}; "
          f"fp32 masks vs fp64 masks: {losses['wanda'] / losses['wanda-fp64'] - 1:+.3%}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(run_worker(args)), flush=True)
        return
    passthrough = sys.argv[1:] if argv is None else list(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown --methods {sorted(unknown)}: choose from {', '.join(METHODS)}")
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    import tempfile

    masks_dir = tempfile.mkdtemp(prefix="bench_prune_masks_")
    for rep in range(args.reps):
        order = methods if rep % 2 == 0 else methods[::-1]
        for method in order:
            print(f"[rep {rep + 1}/{args.reps}] {method} ...", file=sys.stderr, flush=True)
            result = spawn(method, passthrough, masks_dir)
            runs[method].append(result)
            print(f"[rep {rep + 1}/{args.reps}] {method}: prune {result['prune_s']:.2f} s, "
                  f"peak RSS {result['rss_peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
    print_table(runs, args)
    if {"wanda", "wanda-bf16"} <= set(runs):
        mask_agreement(masks_dir)
    if args.diagnose:
        diagnose(args, masks_dir)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
