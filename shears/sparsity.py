"""Wanda and magnitude pruning of a decoder LM's block linears, unstructured or N:M.

Wanda (Sun et al., 2023) scores each weight of a linear layer by its magnitude times the norm of
the input feature it multiplies,

    S_ij = |W_ij| * ||X_j||_2        (X: every calibration token's input to the layer, column j)

and, within each output row (the paper's per-output comparison group), zeroes the lowest-scoring
floor(in_features * sparsity) weights; for an N:M pattern ("2:4") it zeroes the N lowest of every
M consecutive inputs of a row. "magnitude" is the same with S_ij = |W_ij| (no calibration).
"sparsegpt" (shears.sparsegpt) runs the same calibration passes, accumulates each linear's input
Hessian 2 X X^T instead of ||X_j||^2, and prunes with SparseGPT's OBS updates of the kept weights.

Pruning is sequential, block by block, so block i is scored on the outputs of the already
pruned blocks < i:

  1. capture: one forward per calibration batch, with a pre-hook on every block recording the
     arguments it receives (attention masks, rotary position_embeddings, ... which depend only on
     token positions, and differ per block in models such as Gemma 3 with sliding/global layers),
     plus block 0's hidden states; the last block's hook stops the forward;
  2. per block: run the calibration through it with a hook on each nn.Linear accumulating
     ||X_j||^2 in fp32, score, mask, zero the weights, then run it again so the next block sees
     the pruned outputs.

Memory: beside the weights, pruning holds the calibration's hidden states (nsamples x seqlen x
hidden, each batch's output replacing its input) and, while one matrix is pruned, the scores of a
few of its rows at a time. No whole-model mask is kept: once a block is pruned its zeros are the
mask (`wanda_prune(..., return_masks=True)` still collects them for callers that want them).

Nothing is architecture specific: the blocks come from `models.decoder_layers` and are called
with exactly the arguments the model itself gave them (minus any KV cache). Hidden states live
on `offload_device` (CPU by default); memory grows with nsamples * seqlen, never with the
model's max_position_embeddings.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import hashlib
import json
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .atomic import atomic_folder
from .errors import ShearsError
from .memory import SCORE_CHUNK
from .recipe import PruneMethod, SparsityConfig
from .models import decoder_layers, linear_names
from .precision import autocast, bf16_weights, precision_name
from .progress import progress
from .sparsegpt import InputHessian, sparsegpt_prune

METHODS = typing.get_args(PruneMethod)  # the recipe's Literal: one definition
CALIBRATED = ("wanda", "sparsegpt")  # the methods that run calibration data through the model
SPARSITY_JSON = "sparsity.json"
DEFAULT_CALIBRATION = "builtin:arithmetic"
# Block arguments that carry a KV cache: never replayed, so no block attends to stale keys/values.
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


# --------------------------------------------------------------------------- settings and masks

def parse_pattern(pattern: str, sparsity: float) -> tuple[int, int] | None:
    """Validate (sparsity, pattern); return (N, M) for an N:M pattern, None for unstructured."""
    if not 0.0 <= float(sparsity) < 1.0:
        raise ShearsError(f"sparsity must be in [0, 1), got {sparsity}: pass e.g. --sparsity 0.5")
    if pattern == "unstructured":
        return None
    match = re.fullmatch(r"(\d+):(\d+)", str(pattern))
    if not match or not 0 < int(match[1]) < int(match[2]):
        raise ShearsError(f"bad sparsity pattern {pattern!r}: use 'unstructured' or N:M with 0 < N < M, e.g. 2:4")
    n, m = int(match[1]), int(match[2])
    if abs(float(sparsity) - n / m) > 1e-9:
        raise ShearsError(f"pattern {pattern} prunes {n}/{m} = {n / m:g} of the weights, not {sparsity}: "
                          f"pass --sparsity {n / m:g}")
    return n, m


def keep_mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """True where a weight survives: the lowest scores of each comparison group are pruned.

    Unstructured: the group is an output row, int(in_features * sparsity) pruned per row.
    N:M: the group is M consecutive inputs of a row, N pruned per group. Ties go to the lower index."""
    rows, cols = score.shape
    if nm is None:
        n_pruned = int(cols * sparsity)
        if n_pruned == 0:
            return torch.ones_like(score, dtype=torch.bool)
        # A row's n-th smallest score (a selection, ~2x faster than sorting the row): everything below it
        # is pruned, and of the scores equal to it the lowest-index ones, as many as are still to prune --
        # the same mask a stable sort gives.
        nth = score.kthvalue(n_pruned, dim=-1, keepdim=True).values
        below = score < nth
        tied = score == nth
        room = n_pruned - below.sum(dim=-1, keepdim=True)
        return ~below.logical_or_(tied.logical_and_(tied.cumsum(dim=-1) <= room))
    n_pruned, m = nm
    groups = score.reshape(rows, cols // m, m)
    keep = torch.ones(groups.shape, dtype=torch.bool, device=score.device)
    lowest = groups.argsort(dim=-1, stable=True)[..., :n_pruned]
    keep.scatter_(-1, lowest, False)
    return keep.reshape(rows, cols)


def target_linears(model: nn.Module, exclude: Sequence[str] = ()) -> list[dict[str, nn.Linear]]:
    """Per decoder block, {qualified name: nn.Linear} of the linears to prune.

    `exclude` holds fnmatch (shell-style) patterns matched against the qualified module name,
    e.g. "*.mlp.down_proj" or "model.layers.0.*"; a pattern that matches nothing is an error."""
    layers_name, blocks = decoder_layers(model)
    unused = set(exclude)
    targets: list[dict[str, nn.Linear]] = []
    for index, block in enumerate(blocks):
        chosen = {}
        for name in linear_names(block):
            qualified = f"{layers_name}.{index}.{name}" if layers_name else f"{index}.{name}"
            hits = {p for p in exclude if fnmatch.fnmatchcase(qualified, p)}
            unused -= hits
            if not hits:
                chosen[qualified] = block.get_submodule(name)
        targets.append(chosen)
    if unused:
        raise ShearsError(f"exclude pattern(s) {sorted(unused)} match no linear in the decoder blocks: "
                          f"patterns are fnmatch on qualified names such as '{layers_name}.0.mlp.down_proj'")
    if not any(targets):
        raise ShearsError("every decoder-block linear is excluded: nothing to prune (narrow --exclude)")
    return targets


def _check_divisible(targets: list[dict[str, nn.Linear]], nm: tuple[int, int] | None) -> None:
    if nm is None:
        return
    for block in targets:
        for name, linear in block.items():
            if linear.in_features % nm[1]:
                raise ShearsError(f"pattern {nm[0]}:{nm[1]} needs in_features divisible by {nm[1]}, but {name} has "
                                  f"{linear.in_features}: use another pattern or --exclude it")


def _prune_linear(linear: nn.Linear, column_scale: torch.Tensor | None, sparsity: float, nm,
                  return_mask: bool = False) -> torch.Tensor | None:
    """Zero the pruned weights of `linear`, scoring S = |W| * column_scale (|W| without one) a few rows
    at a time; every comparison group lies within a row, so chunks of rows give the whole matrix's mask.
    Returns the keep mask (on CPU) only when asked: afterwards the zeros are the mask. (The scores, their
    sort and its int64 indices cost ~22 bytes an entry: a whole 11008 x 4096 matrix would add ~1 GB
    beside the weights, SCORE_CHUNK entries ~90 MB.)"""
    weight = linear.weight.data
    rows = max(1, SCORE_CHUNK // max(weight.shape[1], 1))
    kept = []
    for start in range(0, weight.shape[0], rows):
        part = weight[start:start + rows]
        score = part.float().abs()
        if column_scale is not None:
            score.mul_(column_scale.to(score.device).unsqueeze(0))
        mask = keep_mask(score, sparsity, nm)
        part.masked_fill_(~mask, 0)
        if return_mask:
            kept.append(mask.cpu())
    return torch.cat(kept) if return_mask else None


def _reconstruct_linear(linear: nn.Linear, hessian: torch.Tensor, sparsity: float, nm) -> torch.Tensor:
    """SparseGPT on one linear: its weight becomes the pruned, OBS-reconstructed one (in its dtype)."""
    weight, mask = sparsegpt_prune(linear.weight, hessian, sparsity, nm)
    linear.weight.data.copy_(weight.to(linear.weight.dtype).masked_fill_(~mask, 0))
    return mask.cpu()


# --------------------------------------------------------------------------- capturing block inputs

class _StopForward(Exception):
    """Raised by the last block's pre-hook: the capture pass needs nothing after it."""


@dataclass
class BlockInputs:
    """What one block receives for one calibration batch, besides the hidden states."""
    args: tuple
    kwargs: dict


class _Interner:
    """Stores each distinct tensor once: every block of every batch usually gets the same mask and
    rotary tables, and keeping a copy per (block, batch) would cost nsamples * layers * seqlen^2."""

    def __init__(self):
        self.seen: dict[tuple, list[torch.Tensor]] = {}

    def __call__(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            value = value.detach()
            bucket = self.seen.setdefault((value.shape, value.dtype, value.device), [])
            for stored in bucket:
                if stored is value or torch.equal(stored, value):
                    return stored
            bucket.append(value)
            return value
        if isinstance(value, (tuple, list)):
            return type(value)(self(v) for v in value)
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        return value


def _without_cache(kwargs: dict) -> dict:
    from transformers import Cache

    kept = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS and not isinstance(v, Cache)}
    if "use_cache" in kept:
        kept["use_cache"] = False
    return kept


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: Sequence[torch.Tensor],
                         offload_device: str | torch.device = "cpu") -> tuple[list[torch.Tensor], list[list[BlockInputs]]]:
    """Block 0's hidden states per batch (on offload_device) and, per block, per batch, the other
    arguments the model passes to that block. One forward per batch, stopped at the last block."""
    hidden: list[torch.Tensor] = []
    received: list[list[BlockInputs]] = [[] for _ in blocks]
    intern = _Interner()

    def recorder(index: int):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            states, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
            if index == 0:
                hidden.append(states.detach().to(offload_device))
            received[index].append(BlockInputs(intern(tuple(rest)), intern(_without_cache(kwargs))))
            if index == len(blocks) - 1:
                raise _StopForward
        return hook

    handles = [block.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, block in enumerate(blocks)]
    device = model.get_input_embeddings().weight.device
    try:
        for ids in progress(batches, desc="capturing block inputs", unit="batch"):
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
            if any(len(r) != len(hidden) for r in received):
                raise ShearsError(f"{type(model).__name__}'s forward did not call every decoder block: "
                                  "shears can only prune models whose forward runs all blocks in order")
    finally:
        for handle in handles:
            handle.remove()
    return hidden, received


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def run_block(block: nn.Module, hidden: list[torch.Tensor], inputs: list[BlockInputs],
              offload_device: str | torch.device = "cpu", keep_outputs: bool = True,
              in_place: bool = False) -> list[torch.Tensor]:
    """The block's output hidden states for every batch (no cache: each batch is a fresh sequence).
    `in_place`: each output replaces its input in `hidden` (returned), so the calibration's hidden
    states are held once, not twice."""
    device = next(block.parameters()).device
    outputs = hidden if in_place else []
    for index, (states, given) in enumerate(zip(hidden, inputs)):
        out = block(states.to(device), *_to(given.args, device), **_to(given.kwargs, device))
        if isinstance(out, (tuple, list)):  # older/other blocks return (hidden_states, ...)
            out = out[0]
        if in_place:
            outputs[index] = out.to(offload_device)
        elif keep_outputs:
            outputs.append(out.to(offload_device))
    return outputs


# --------------------------------------------------------------------------- pruning

class InputSquaredNorms:
    """Forward hook on an nn.Linear: per input column j, sum over every calibration token of X_j^2,
    in fp32. (The Wanda reference keeps the mean instead; a per-layer constant factor does not
    change any row's ranking.)"""

    def __init__(self, linear: nn.Linear):
        self.sum_sq = torch.zeros(linear.in_features, dtype=torch.float32, device=linear.weight.device)

    def __call__(self, module, args, output):
        x = args[0].detach().reshape(-1, module.in_features).float()
        self.sum_sq += x.pow(2).sum(dim=0)


def _check_calibration(ids: torch.Tensor | None, max_positions: int | None = None) -> torch.Tensor:
    if ids is None or not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.numel() == 0:
        shape = None if ids is None else tuple(getattr(ids, "shape", ()))
        raise ShearsError(f"the calibration set is empty or malformed (shape {shape}): Wanda needs a LongTensor "
                          "[nsamples, seqlen] of token ids with nsamples, seqlen > 0")
    if max_positions and ids.shape[1] > max_positions:
        raise ShearsError(f"calibration seqlen {ids.shape[1]} exceeds the model's max_position_embeddings "
                          f"{max_positions}: lower seqlen")
    return ids.long()


def _max_positions(config) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def wanda_prune(model: nn.Module, calibration_input_ids: torch.Tensor | None = None, sparsity: float = 0.5,
                pattern: str = "unstructured", method: str = "wanda", exclude: Sequence[str] = (),
                batch_size: int = 1, offload_device: str | torch.device = "cpu",
                bf16: bool = False, return_masks: bool = True) -> dict[str, torch.Tensor] | None:
    """Prune the decoder-block linears of `model` in place.

    `bf16` runs the calibration forward under bf16 autocast; the activation statistics are still
    accumulated in fp32 and the scores computed from the fp32 weights.

    Returns {qualified module name: BoolTensor mask of weight's shape (on CPU)}, True = weight kept;
    with `return_masks=False`, None: the masks then never outlive their block (one byte per weight
    of the whole model otherwise), and the pruned weights' zeros are the mask.
    `calibration_input_ids` ([nsamples, seqlen]) is needed for methods "wanda" and "sparsegpt", ignored for
    "magnitude"; it runs `batch_size` samples at a time. `exclude`: fnmatch patterns on names."""
    if method not in METHODS:
        raise ShearsError(f"unknown pruning method {method!r}: use one of {', '.join(METHODS)}")
    nm = parse_pattern(pattern, sparsity)
    targets = target_linears(model, exclude)
    _check_divisible(targets, nm)
    masks: dict[str, torch.Tensor] = {}
    if method == "magnitude":
        with torch.no_grad():
            for block in progress(targets, desc="magnitude pruning", unit="block"):
                for name, linear in block.items():
                    masks[name] = _prune_linear(linear, None, sparsity, nm, return_masks)
        return masks if return_masks else None

    ids = _check_calibration(calibration_input_ids, _max_positions(getattr(model, "config", None)))
    _, blocks = decoder_layers(model)
    was_training = model.training
    model.eval()
    device = model.get_input_embeddings().weight.device

    @contextlib.contextmanager
    def in_bf16(module):
        # One autocast region per pass, never one around the pruning: autocast keeps its bf16 copy of a
        # weight that requires grad for the whole region, so a pass after the pruning would still see the
        # unpruned copy. The pass's weights are cast once, explicitly (autocast would re-cast frozen ones
        # on every call), and the pruning then works on the float32 originals.
        with autocast(bf16, device), bf16_weights(module, enabled=bf16, frozen_only=False):
            yield

    try:
        with torch.no_grad():
            with in_bf16(model):
                hidden, received = capture_block_inputs(model, blocks, ids.split(max(1, batch_size)), offload_device)
            statistic = InputHessian if method == "sparsegpt" else InputSquaredNorms
            for index, block in enumerate(progress(blocks, desc=f"{method} pruning", unit="block")):
                linears = targets[index]
                norms = {name: statistic(linear) for name, linear in linears.items()}
                handles = [linear.register_forward_hook(norms[name]) for name, linear in linears.items()]
                try:
                    with in_bf16(block):
                        run_block(block, hidden, received[index], offload_device, keep_outputs=False)
                finally:
                    for handle in handles:
                        handle.remove()
                for name, linear in linears.items():
                    if method == "sparsegpt":
                        mask = _reconstruct_linear(linear, norms.pop(name).hessian(), sparsity, nm)
                    else:
                        mask = _prune_linear(linear, norms[name].sum_sq.sqrt(), sparsity, nm, return_masks)
                    if return_masks:
                        masks[name] = mask
                # The next block must be scored on what this block outputs once pruned.
                with in_bf16(block):
                    run_block(block, hidden, received[index], offload_device, in_place=True)
    finally:
        model.train(was_training)
    return masks if return_masks else None


# --------------------------------------------------------------------------- reporting and saving

def sparsity_report(model: nn.Module) -> dict:
    """Fraction of exactly-zero weights in every decoder-block linear, per module, per layer, total."""
    layers_name, blocks = decoder_layers(model)
    modules: dict[str, float] = {}
    layers: dict[str, float] = {}
    zeros_all = params_all = 0
    for index, block in enumerate(blocks):
        zeros_block = params_block = 0
        for name in linear_names(block):
            weight = block.get_submodule(name).weight
            zeros, params = int((weight == 0).sum()), weight.numel()
            modules[f"{layers_name}.{index}.{name}"] = zeros / params
            zeros_block, params_block = zeros_block + zeros, params_block + params
        layers[str(index)] = zeros_block / max(params_block, 1)
        zeros_all, params_all = zeros_all + zeros_block, params_all + params_block
    return {"total": zeros_all / max(params_all, 1), "zeros": zeros_all, "params": params_all,
            "layers": layers, "modules": modules}


def save_pruned(model: nn.Module, tokenizer, output_dir: str | os.PathLike, info: dict, force: bool = False) -> Path:
    """Write `model` (safetensors) + `tokenizer` + sparsity.json (`info` plus the measured sparsity)
    as an ordinary HF folder, atomically."""
    out = Path(output_dir)
    with atomic_folder(out, force, hint="choose another output or pass --force") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record = {**info, **sparsity_report(model)}
        (tmp / SPARSITY_JSON).write_text(json.dumps(record, indent=2) + "\n")
    return out


# --------------------------------------------------------------------------- the stage entry point

def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:16]


_SETTINGS = ("base_model", "method", "pattern", "sparsity", "exclude", "calibration", "precision", "dtype")


def _dtype_name(dtype: str | torch.dtype | None) -> str:
    from .models import as_dtype

    return str(as_dtype(dtype) or "auto").removeprefix("torch.")


def _recorded_settings(folder: Path) -> dict | None:
    """The settings a folder's sparsity.json records (None if it has none). A record from before the dtype
    was recorded has the dtype its weights were written in (config.json's)."""
    try:
        record = json.loads((folder / SPARSITY_JSON).read_text())
        if isinstance(record, dict) and "dtype" not in record:
            config = json.loads((folder / "config.json").read_text())
            record["dtype"] = config.get("dtype") or config.get("torch_dtype")
    except (OSError, ValueError):
        return None
    return {key: record.get(key) for key in _SETTINGS} if isinstance(record, dict) else None


def prune_to_folder(model_name_or_path: str | os.PathLike, output_dir: str | os.PathLike, config: SparsityConfig, *,
                    calibration_records: Iterable[dict] | None = None,
                    calibration_input_ids: torch.Tensor | None = None, calibration_source: str | None = None,
                    dtype: str = "float32", bf16: bool = False, force: bool = False) -> Path:
    """Load a model, prune it as the recipe's `sparsity:` section says, write a RUN/sparse_base-style
    folder; reuse a folder pruned alike.

    Calibration (methods "wanda" and "sparsegpt"): `calibration_input_ids` if given, else `config.nsamples` windows
    of min(config.seqlen, max_position_embeddings) tokens from `calibration_records` (default: the records
    of builtin:arithmetic). `calibration_source` names the records in sparsity.json. `bf16`: the
    calibration forward under bf16 autocast (resolved by shears.precision). `dtype`: what the weights
    are loaded, pruned and written in (the recipe's dtype; the Wanda scores read these weights)."""
    from transformers import AutoConfig

    from . import data
    from .models import load_model, load_tokenizer, resolve_model_path

    c = config
    if c.method not in METHODS:
        raise ShearsError(f"unknown pruning method {c.method!r}: use one of {', '.join(METHODS)}")
    parse_pattern(c.pattern, c.sparsity)
    out = Path(output_dir)
    calibration = None
    records = None
    if c.method in CALIBRATED:
        if calibration_input_ids is not None:
            ids = _check_calibration(calibration_input_ids)
            calibration = {"source": calibration_source or "input_ids", "nsamples": ids.shape[0],
                           "seqlen": ids.shape[1], "seed": None, "sha256": _sha256(ids.numpy().tobytes())}
        else:
            if calibration_records is None:
                calibration_source = calibration_source or DEFAULT_CALIBRATION
                calibration_records = data.load_records(DEFAULT_CALIBRATION)
            records = list(calibration_records)
            limit = _max_positions(AutoConfig.from_pretrained(resolve_model_path(model_name_or_path)))
            calibration = {"source": calibration_source or "records", "nsamples": int(c.nsamples),
                           "seqlen": int(min(c.seqlen, limit) if limit else c.seqlen), "seed": int(c.seed),
                           "sha256": _sha256(json.dumps(records, sort_keys=True, default=str).encode())}
    settings = {"base_model": str(model_name_or_path), "method": c.method, "pattern": c.pattern,
                "sparsity": float(c.sparsity), "exclude": list(c.exclude), "calibration": calibration,
                "precision": precision_name(bf16) if c.method in CALIBRATED else None, "dtype": _dtype_name(dtype)}
    if out.exists() and not force:
        if _recorded_settings(out) == settings:
            return out
        raise ShearsError(f"{out} exists but was not pruned with these settings: remove it, choose another "
                          "output, or pass force")

    model = load_model(model_name_or_path, dtype=dtype)
    tokenizer = load_tokenizer(model_name_or_path)
    ids = calibration_input_ids
    if records is not None:
        ids = data.calibration_input_ids(tokenizer, records, calibration["nsamples"], calibration["seqlen"], c.seed)
    wanda_prune(model, ids, sparsity=c.sparsity, pattern=c.pattern, method=c.method, exclude=c.exclude,
                batch_size=c.batch_size, bf16=bf16, return_masks=False)
    written = save_pruned(model, tokenizer, out, settings, force=True)
    del model  # the caller loads the written folder next: never two copies of the weights at once
    gc.collect()
    return written
