"""LoRA-Squeeze: compress a trained LoRA update to lower, per-module ranks with an SVD of the update.

LoRA-Squeeze (Vulić et al., 2026): training at a high rank and then truncating the update's SVD beats
training at the low rank directly. A LoRA update is dW = s·B·A with B:[out, r], A:[r, in]; its best
rank-k approximation (Eckart–Young) is the top-k part of its SVD. We never form dW (out x in): with
thin QRs B = Q_B·R_B and Aᵀ = Q_A·R_A,

    dW = Q_B · C · Q_Aᵀ,    C = s·R_B·R_Aᵀ  (an r x r core),

so SVD(C) = U·Σ·Vᵀ is dW's SVD, (Q_B·U)·Σ·(Q_A·V)ᵀ, at O((out + in)·r²) cost, and the relative error
of keeping k directions, ||dW - dW_k||_F / ||dW||_F = sqrt(Σ_{i>k} σ_i²) / sqrt(Σ_i σ_i²), comes
from the core's spectrum alone. The rank-k factors fold sqrt(Σ) symmetrically and keep the scale
(s' = s, i.e. alpha' = alpha·k/r), so a squeezed adapter trains on like the original:

    B' = Q_B·U_k·sqrt(Σ_k/s'),   A' = sqrt(Σ_k/s')·V_kᵀ·Q_Aᵀ,   s'·B'·A' = dW_k.

An update that is not a plain product -- a SparsePEFT update (s·B·A) ⊙ M -- can be squeezed from
its dense form with a randomised SVD (torch.svd_lowrank; `squeeze_dense`, a library function the
pipeline does not call: export writes a SparsePEFT subnet's unmasked factors and reproduces the
masked update only by merging). Where shears squeezes: In-Squeeze stages of training
(`squeeze_lora_layer`), export --squeeze (`squeeze_lora` per module) and this module's CLI
(`squeeze_adapter_dir`). The rank is chosen per module by one rule:
  rank=k      keep k directions;
  energy=e    the smallest k whose Σ_{i<=k} σ_i² >= e·Σ_i σ_i² (heterogeneous ranks across modules);
  tol=t       the smallest k whose relative error is <= t: drops only numerically-zero directions
              (export --squeeze uses it).
Ranks are clamped to [1, rank of the factors]: PEFT cannot hold a rank-0 module.

CLI -- squeeze any stock PEFT LoRA folder into a stock PEFT folder whose per-module ranks sit in
rank_pattern/alpha_pattern, optionally followed by N recovery steps at the new ranks ("Cont-Squeeze"):

    python -m shears.squeeze --adapter DIR (--rank K | --energy E | --tol T)
                             [--recover-steps N --data D [--model M]] --output DIR [--force]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file

from . import flags
from .atomic import atomic_folder, refuse_existing
from .errors import ShearsError, cli_errors
from .models import load_safetensors
from .progress import progress

# PEFT's own names for an adapter folder's files and its state-dict key prefix: the one definition shears uses
ADAPTER_CONFIG = CONFIG_NAME
ADAPTER_WEIGHTS = SAFETENSORS_WEIGHTS_NAME
PEFT_PREFIX = "base_model.model."
SQUEEZE_RECORD = "squeeze.json"
# (A suffix, B suffix) of the LoRA factor pairs in a PEFT state dict: Linear layers, then Embedding.
FACTOR_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))
DEFAULT_TOL = 1e-5  # relative error below which dropped directions count as numerically zero (fp32-safe)


@dataclass
class SqueezeResult:
    A: torch.Tensor                # [k, in], dtype and device of the input A (or of delta)
    B: torch.Tensor                # [out, k]
    rank: int                      # k
    singular_values: torch.Tensor  # the update's spectrum, descending (the top q only on the randomised path)
    rel_error: float               # ||dW - scale·B·A||_F / ||dW||_F (0 for a zero update)
    scale: float                   # the scale the new factors are meant for: scale·B·A = dW_k


# --------------------------------------------------------------------------- choosing k

def rank_for_energy(s: torch.Tensor, energy: float, total: float | None = None) -> int:
    """Smallest k with Σ_{i<=k} s_i² >= energy·total, where total defaults to Σ s_i² (pass the true
    ||dW||_F² when s is only the top of the spectrum). At least 1, at most len(s)."""
    if not 0.0 < energy <= 1.0:
        raise ShearsError(f"energy must be in (0, 1], got {energy}")
    power = s.detach().double().cpu() ** 2
    total = float(power.sum()) if total is None else float(total)
    if total <= 0.0:
        return 1
    kept = torch.cumsum(power, 0)
    return max(1, min(int((kept < energy * total).sum()) + 1, len(s)))


def rank_for_tolerance(s: torch.Tensor, tol: float, total: float | None = None) -> int:
    """Smallest k whose relative error sqrt(Σ_{i>k} s_i² / total) is <= tol (keeps dW exact up to tol)."""
    if not 0.0 <= tol < 1.0:
        raise ShearsError(f"tol must be in [0, 1), got {tol}")
    return rank_for_energy(s, 1.0 - tol * tol, total)  # error <= tol  <=>  kept energy >= 1 - tol²


def select_rank(s: torch.Tensor, rank: int | None = None, energy: float | None = None,
                tol: float | None = None, total: float | None = None) -> int:
    """k for a descending spectrum by exactly one of the rules rank / energy / tol, in [1, len(s)]."""
    if sum(rule is not None for rule in (rank, energy, tol)) != 1:
        raise ShearsError("give exactly one of rank=, energy= or tol= to choose the squeezed rank")
    if rank is not None:
        if int(rank) != rank or rank < 1:
            raise ShearsError(f"rank must be a positive integer, got {rank}")
        return max(1, min(int(rank), len(s)))
    if energy is not None:
        return rank_for_energy(s, energy, total)
    return rank_for_tolerance(s, tol, total)


def _check_scale(scale: float) -> float:
    if not scale > 0.0:
        raise ShearsError(f"the LoRA scale must be positive (lora_alpha > 0), got {scale}")
    return float(scale)


def _fold(u_k: torch.Tensor, s_k: torch.Tensor, vh_k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors B = U_k·sqrt(Σ_k/scale), A = sqrt(Σ_k/scale)·V_kᵀ: sqrt(Σ) split evenly between them, so
    neither factor carries the whole magnitude (the balance LoRA's own training tends towards)."""
    root = torch.sqrt(s_k / scale)
    return root[:, None] * vh_k, u_k * root


# --------------------------------------------------------------------------- the squeeze

@torch.no_grad()
def squeeze_lora(A: torch.Tensor, B: torch.Tensor, scale: float, rank: int | None = None,
                 energy: float | None = None, tol: float | None = None, new_scale: float | None = None,
                 dtype: torch.dtype = torch.float64) -> SqueezeResult:
    """Optimal rank-k truncation of dW = scale·B·A (A:[r, in], B:[out, r]) via the r x r QR core.

    Returns factors for `new_scale` (default: the same scale) in A's dtype, on A's device; the
    arithmetic runs in `dtype` (float64 by default: the core is tiny, and bf16 factors are upcast)."""
    if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ShearsError(f"LoRA factors must be A:[r, in] and B:[out, r], got A{tuple(A.shape)} B{tuple(B.shape)}")
    scale = _check_scale(scale)
    new_scale = scale if new_scale is None else _check_scale(new_scale)
    q_b, r_b = torch.linalg.qr(B.detach().to(dtype))    # B  = Q_B·R_B
    q_a, r_a = torch.linalg.qr(A.detach().to(dtype).T)  # Aᵀ = Q_A·R_A
    u, s, vh = torch.linalg.svd(scale * (r_b @ r_a.T), full_matrices=False)
    k = select_rank(s, rank, energy, tol)
    new_A, new_B = _fold(q_b @ u[:, :k], s[:k], vh[:k] @ q_a.T, new_scale)
    power = s.double() ** 2
    total = float(power.sum())
    rel_error = math.sqrt(float(power[k:].sum()) / total) if total > 0 else 0.0
    return SqueezeResult(new_A.to(A.dtype), new_B.to(B.dtype), k, s, rel_error, new_scale)


def _top_singular(delta: torch.Tensor, q: int, niter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vᵀ) of the top q directions: randomised when q is well below min(out, in), exact otherwise
    (where a randomised SVD costs as much and is less accurate)."""
    if 2 * q >= min(delta.shape):
        return torch.linalg.svd(delta, full_matrices=False)
    u, s, v = torch.svd_lowrank(delta, q=q, niter=niter)
    return u, s, v.T


def _captured(s: torch.Tensor, energy: float | None, tol: float | None, total: float) -> bool:
    """Whether the sketched top of the spectrum already holds the energy the rule asks for."""
    target = energy if energy is not None else 1.0 - tol * tol
    return float(s.double().square().sum()) >= target * total


@torch.no_grad()
def squeeze_dense(delta: torch.Tensor, rank: int | None = None, energy: float | None = None,
                  tol: float | None = None, scale: float = 1.0, niter: int = 4, oversample: int = 8,
                  dtype: torch.dtype = torch.float32) -> SqueezeResult:
    """Rank-k truncation of a dense update (e.g. a SparsePEFT-masked (s·B·A) ⊙ M) by randomised SVD.

    Returns factors with scale·B·A ~= delta_k. For energy/tol the true ||delta||_F² is the total, and
    the sketch widens (q doubles) until the kept energy is reached inside it. tol is only as fine as
    `dtype` resolves energies (float32: ~1e-3; pass float64 for smaller tol)."""
    if delta.ndim != 2:
        raise ShearsError(f"a dense update must be 2-D [out, in], got shape {tuple(delta.shape)}")
    scale = _check_scale(scale)
    work = delta.detach().to(dtype)
    total = float(torch.linalg.vector_norm(work, dtype=torch.float64)) ** 2
    full = min(work.shape)
    q = min(full, (rank if rank is not None else oversample) + oversample)
    while True:
        u, s, vh = _top_singular(work, q, niter)
        k = select_rank(s, rank, energy, tol, total)
        if rank is not None or q >= full or _captured(s, energy, tol, total):
            break
        q = min(full, 2 * q)
    new_A, new_B = _fold(u[:, :k], s[:k], vh[:k], scale)
    residual = work - scale * (new_B @ new_A)  # the sketch's own tail estimate cancels catastrophically: measure
    rel_error = float(torch.linalg.vector_norm(residual, dtype=torch.float64)) / math.sqrt(total) if total > 0 else 0.0
    return SqueezeResult(new_A.to(delta.dtype), new_B.to(delta.dtype), k, s, rel_error, scale)


@torch.no_grad()
def squeeze_lora_layer(layer, rank: int | None = None, energy: float | None = None, tol: float | None = None,
                       adapter_name: str = "default") -> SqueezeResult:
    """Squeeze one PEFT LoRA layer's adapter ("In-Squeeze" rank annealing): the new A:[k, in] and B:[out, k]
    are in the layer's dtype and device and keep its current scaling; the caller installs them."""
    A = layer.lora_A[adapter_name].weight
    B = layer.lora_B[adapter_name].weight
    return squeeze_lora(A, B, layer.scaling[adapter_name], rank=rank, energy=energy, tol=tol)


# --------------------------------------------------------------------------- stock PEFT adapter folders

@dataclass
class ModuleSqueeze:
    module: str          # full module path in the base model, e.g. model.layers.0.self_attn.q_proj
    rank_before: int
    rank_after: int
    alpha_before: float
    alpha_after: float
    rel_error: float


@dataclass
class SqueezedAdapter:
    config: dict                     # adapter_config.json contents, per-module ranks in rank_pattern/alpha_pattern
    tensors: dict[str, torch.Tensor]  # the state dict to save
    modules: list[ModuleSqueeze]
    recovery_loss: float | None = None  # final training loss of the recovery steps, when there were any


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the FIRST key matching the module path's tail wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def pattern_key(module: str) -> str:
    """A pattern key that matches exactly one full module path (and nothing it is a suffix of)."""
    return "^" + re.escape(module)


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def alpha_for_scale(scale: float, r: int, use_rslora: bool) -> float:
    """The lora_alpha that gives rank r the scale `scale` (alpha·k/r for plain LoRA, alpha·sqrt(k/r) for rsLoRA)."""
    return scale * math.sqrt(r) if use_rslora else scale * r


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the safetensors state dict of a stock PEFT LoRA folder."""
    folder = Path(adapter_dir)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise ShearsError(f"{folder} is not a PEFT adapter folder (no {ADAPTER_CONFIG}): pass the folder "
                          "that save_pretrained wrote")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise ShearsError(f"{folder} has no {ADAPTER_WEIGHTS}: re-save the adapter with safe_serialization=True")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise ShearsError(f"{folder} holds a {config.get('peft_type')} adapter: squeeze needs a LoRA adapter")
    if config.get("use_dora"):
        raise ShearsError(f"{folder} is a DoRA adapter (its magnitudes depend on the full update): "
                          "squeeze needs plain LoRA")
    return config, load_safetensors(folder / ADAPTER_WEIGHTS)


def lora_factor_keys(tensors: dict[str, torch.Tensor]) -> list[tuple[str, str, str]]:
    """(module path, A key, B key) of every LoRA pair; module path = key less 'base_model.model.' and suffix."""
    pairs = []
    for key in sorted(tensors):
        for a_suffix, b_suffix in FACTOR_SUFFIXES:
            if key.endswith(a_suffix):
                prefix = key[: -len(a_suffix)]
                b_key = prefix + b_suffix
                if b_key not in tensors or tensors[key].ndim != 2:
                    raise ShearsError(f"{key} has no 2-D LoRA partner {b_key}: only Linear/Embedding LoRA can "
                                      "be squeezed")
                module = prefix[len(PEFT_PREFIX):] if prefix.startswith(PEFT_PREFIX) else prefix
                pairs.append((module, key, b_key))
    if not pairs:
        raise ShearsError("the adapter has no lora_A/lora_B tensors: pass a LoRA adapter folder")
    return pairs


def squeeze_adapter(adapter_dir: str | os.PathLike, rank: int | None = None, energy: float | None = None,
                    tol: float | None = None) -> SqueezedAdapter:
    """Squeeze every LoRA module of a PEFT folder (in memory) by one rule, keeping each module's scale."""
    select_rank(torch.ones(1), rank, energy, tol)  # validate the rule before reading any weights
    config, tensors = read_adapter(adapter_dir)
    use_rslora = bool(config.get("use_rslora", False))
    alpha_pattern = config.get("alpha_pattern") or {}
    out = dict(tensors)
    modules, ranks, alphas = [], {}, {}
    for module, a_key, b_key in progress(lora_factor_keys(tensors), desc="squeeze", unit="module"):
        r = tensors[a_key].shape[0]
        alpha = float(pattern_value(alpha_pattern, module, config["lora_alpha"]))
        scale = lora_scale(alpha, r, use_rslora)
        result = squeeze_lora(tensors[a_key], tensors[b_key], scale, rank=rank, energy=energy, tol=tol)
        out[a_key], out[b_key] = result.A.contiguous(), result.B.contiguous()
        new_alpha = alpha_for_scale(scale, result.rank, use_rslora)
        ranks[pattern_key(module)], alphas[pattern_key(module)] = result.rank, new_alpha
        modules.append(ModuleSqueeze(module, r, result.rank, alpha, new_alpha, result.rel_error))
    # Every module is pinned by its own anchored key; r / lora_alpha are only defaults, kept on the old scale.
    default_r = max(ranks.values())
    default_alpha = alpha_for_scale(lora_scale(config["lora_alpha"], config["r"], use_rslora), default_r, use_rslora)
    new_config = {**config, "r": default_r, "lora_alpha": default_alpha, "rank_pattern": ranks, "alpha_pattern": alphas}
    return SqueezedAdapter(new_config, out, modules)


def write_squeezed(folder: Path, squeezed: SqueezedAdapter, source: Path, rule: dict) -> None:
    """Write the squeezed adapter into `folder` (a fresh temporary folder) plus a squeeze.json record."""
    for extra in source.iterdir():  # README, tokenizer files, ... travel along
        if extra.is_file() and extra.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "adapter_model.bin"):
            shutil.copy2(extra, folder / extra.name)
    save_file(squeezed.tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(squeezed.config, indent=2) + "\n")
    record = {"source": str(source.resolve()), "rule": rule, "modules": [asdict(m) for m in squeezed.modules]}
    (folder / SQUEEZE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def squeeze_adapter_dir(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike, rank: int | None = None,
                        energy: float | None = None, tol: float | None = None, force: bool = False,
                        recovery: "Recovery | None" = None, base_model: str | None = None) -> SqueezedAdapter:
    """Squeeze a stock PEFT LoRA folder into a stock PEFT folder with per-module ranks, written atomically;
    with `recovery`, its steps train the squeezed adapter on `base_model` before the folder appears."""
    adapter_dir = Path(adapter_dir)
    refuse_existing(output_dir, force)
    squeezed = squeeze_adapter(adapter_dir, rank=rank, energy=energy, tol=tol)
    with atomic_folder(output_dir, force) as tmp:
        write_squeezed(tmp, squeezed, adapter_dir, {"rank": rank, "energy": energy, "tol": tol})
        if recovery is not None:
            squeezed.recovery_loss = recover(tmp, base_model, recovery)
    return squeezed


# --------------------------------------------------------------------------- recovery ("Cont-Squeeze")

@dataclass
class Recovery:
    steps: int
    data: str
    model: str | None = None   # base model; default: the adapter's base_model_name_or_path
    lr: float = 1e-4
    batch_size: int = 4
    cutoff_len: int = 256
    seed: int = 0


def recover(adapter_dir: Path, base_model: str, recovery: Recovery) -> float:
    """Train the squeezed adapter in `adapter_dir` for a few steps at its new ranks and save it back there.
    Returns the final training loss."""
    from peft import PeftModel
    from transformers import Trainer, TrainingArguments

    from .data import Collator, load_records, tokenize_example
    from .models import load_model, load_tokenizer

    tokenizer = load_tokenizer(base_model)
    records = load_records(recovery.data)
    if not records:
        raise ShearsError(f"--data {recovery.data} holds no records: pass a non-empty data set")
    examples = [tokenize_example(tokenizer, r, recovery.cutoff_len) for r in progress(records, desc="tokenize", unit="record")]
    examples = [e for e in examples if any(label != -100 for label in e["labels"])]  # else: zero loss, no signal
    if not examples:
        raise ShearsError(f"every response in {recovery.data} is cut off by --cutoff-len {recovery.cutoff_len}: "
                          "raise --cutoff-len")
    model = PeftModel.from_pretrained(load_model(base_model), str(adapter_dir), is_trainable=True)
    with tempfile.TemporaryDirectory(prefix="shears-squeeze-recover-") as work:
        args = TrainingArguments(
            output_dir=work, max_steps=recovery.steps, per_device_train_batch_size=recovery.batch_size,
            learning_rate=recovery.lr, lr_scheduler_type="constant", save_strategy="no", report_to="none",
            logging_steps=max(1, recovery.steps // 10), seed=recovery.seed, remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=Collator(tokenizer))
        loss = trainer.train().training_loss
    model.save_pretrained(str(adapter_dir))
    record_path = adapter_dir / SQUEEZE_RECORD
    record = json.loads(record_path.read_text())
    record["recovery"] = {**asdict(recovery), "model": base_model, "final_loss": loss}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return loss


# --------------------------------------------------------------------------- CLI

def print_report(squeezed: SqueezedAdapter) -> None:
    width = max(len(m.module) for m in squeezed.modules)
    print(f"{'module':<{width}}  rank before -> after  rel. error ||dW-dW'||_F/||dW||_F")
    for m in squeezed.modules:
        print(f"{m.module:<{width}}  {m.rank_before:>11} -> {m.rank_after:<5}  {m.rel_error:.3e}")
    before = sum(m.rank_before for m in squeezed.modules)
    after = sum(m.rank_after for m in squeezed.modules)
    worst = max(m.rel_error for m in squeezed.modules)
    print(f"{len(squeezed.modules)} modules: total rank {before} -> {after} ({after / before:.1%}), "
          f"max rel. error {worst:.3e}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shears.squeeze", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="stock PEFT LoRA adapter folder")
    rule = parser.add_mutually_exclusive_group(required=True)
    rule.add_argument("--rank", type=int, help="keep K directions per module")
    rule.add_argument("--energy", type=float, help="per module, the smallest rank keeping this share of sum(σ²)")
    rule.add_argument("--tol", type=float, help="drop only directions below this relative error (lossless)")
    flags.add_output(parser, "folder for the squeezed adapter", required=True)
    flags.add_force(parser, "overwrite --output if it exists")
    parser.add_argument("--recover-steps", type=int, default=0, help="recovery fine-tuning steps (Cont-Squeeze)")
    flags.add_data(parser, "recovery training records")
    flags.add_model(parser, "the recovery's base; default: the adapter's base_model_name_or_path")
    parser.add_argument("--lr", type=float, default=1e-4)
    flags.add_batch_size(parser, "recovery batch size", default=4)
    parser.add_argument("--cutoff-len", type=int, default=256)
    flags.add_seed(parser, "the recovery's data order", default=0)
    return parser


def _base_model_of(adapter_dir: Path, override: str | None) -> str:
    name = override or json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not name:
        raise ShearsError(f"{adapter_dir / ADAPTER_CONFIG} names no base_model_name_or_path: pass --model")
    return name


@cli_errors
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    adapter_dir, output = Path(args.adapter), Path(args.output)
    refuse_existing(output, args.force)  # before any work
    if args.recover_steps < 0:
        raise ShearsError(f"--recover-steps must be >= 0, got {args.recover_steps}")
    if args.recover_steps and not args.data:
        raise ShearsError("--recover-steps needs --data (the recovery training set)")
    base_model = _base_model_of(adapter_dir, args.model) if args.recover_steps else None
    recovery = Recovery(args.recover_steps, args.data, args.model, args.lr, args.batch_size, args.cutoff_len,
                        args.seed) if args.recover_steps else None
    squeezed = squeeze_adapter_dir(adapter_dir, output, rank=args.rank, energy=args.energy, tol=args.tol,
                                   force=args.force, recovery=recovery, base_model=base_model)
    print_report(squeezed)
    if recovery is not None:
        print(f"recovered {args.recover_steps} steps on {args.data} at the squeezed ranks: "
              f"final loss {squeezed.recovery_loss:.4f}")
    print(f"wrote squeezed adapter ({ADAPTER_CONFIG}, {ADAPTER_WEIGHTS}, {SQUEEZE_RECORD}) to {output}")


if __name__ == "__main__":
    main()
