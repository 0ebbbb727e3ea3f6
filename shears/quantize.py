"""Quantize a (pruned) base to llama.cpp's Q8_0 or Q4_0: the stage after pruning, and its CLI.

    python -m shears.quantize --model RUN/sparse_base --scheme q4_0 --output RUN/quantized_base
    python -m shears.quantize --model smollm2-135m --scheme q8_0 --no-embeddings --output DIR
    python -m shears.quantize --recipe recipes/X.yaml quantization.scheme=q4_0 --model M --output DIR
    python -m shears.quantize --check DIR        # what a quantized folder holds, and its bytes

Settings come from the recipe's `quantization:` section (--recipe, default recipes/default.yaml, with
key=value overrides); --scheme, --embeddings/--no-embeddings and --exclude override its keys. The input
is any model folder: the dense model, RUN/sparse_base, or a width-pruned export (merged/).

What is quantized, explicitly (and recorded in quantization.json, shears.qformat's format):
  - every nn.Linear of the decoder blocks, except those matching `exclude` (fnmatch on module names);
    a chosen linear whose input size is not a multiple of 32 is refused (exclude it to keep it);
  - with `embeddings` (the default) the token embedding and the output layer -- one tensor when tied,
    as llama.cpp's pure Q8_0/Q4_0 files hold them; without, both are kept at the base's precision;
  - everything else (norm scales, biases) is kept as it is: 1-D, a few KB, which llama.cpp keeps in float32 too.
Each weight is round-to-nearest on its own blocks (shears.qformat, byte-identical to the `gguf` package),
so a pruned zero stays exactly zero and the dequantized weights are exactly llama.cpp's. The output is
an HF folder (config, tokenizer, model.safetensors of blocks + kept tensors, quantization.json), written
atomically; `shears.models.load_model` loads it with the weights dequantized.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from .progress import progress

from . import flags
from .atomic import atomic_folder, refuse_existing
from .errors import ShearsError, cli_errors
from .models import (WIDTH_FILE, decoder_layers, linear_names, load_model, load_tokenizer, resolve_model_path,
                     save_config)
from .qformat import (BLOCK_SIZE, QUANT_FILE, SCHEMES, QuantizedState, QuantizedTensor, check_scheme,
                      is_quantized_folder, load_quantized_state, read_quantization_record, requantize,
                      save_quantized_folder)
from .recipe import QuantizationConfig, load_recipe

COPIED = (WIDTH_FILE, "sparsity.json")  # the source's records that still describe the quantized folder




@dataclasses.dataclass
class Plan:
    """Which of a model's parameters are quantized, which are kept (and why), which are tied to another."""

    quantize: list[str]
    kept: dict[str, str]  # name -> why
    tied: dict[str, str]  # name -> the name of the one tensor it shares (stored once, under that name)


def _linear_weights(model: nn.Module, exclude: list[str]) -> tuple[dict[str, str | None], set[str]]:
    """{weight name of every decoder-block linear: the exclude pattern matching its module, else None}, and
    the names of their biases. A pattern that matches nothing is an error (a typo would quantize silently)."""
    layers_name, blocks = decoder_layers(model)
    weights: dict[str, str | None] = {}
    biases: set[str] = set()
    unused = set(exclude)
    for index, block in enumerate(blocks):
        for name in linear_names(block):
            module = f"{layers_name}.{index}.{name}" if layers_name else f"{index}.{name}"
            hit = next((p for p in exclude if fnmatch.fnmatchcase(module, p)), None)
            unused -= {p for p in exclude if fnmatch.fnmatchcase(module, p)}
            weights[f"{module}.weight"] = hit
            biases.add(f"{module}.bias")
    if unused:
        raise ShearsError(f"quantization.exclude pattern(s) {sorted(unused)} match no decoder-block linear: patterns "
                          f"are fnmatch on module names such as '{layers_name}.0.mlp.down_proj'")
    return weights, biases


def quantization_plan(model: nn.Module, config: QuantizationConfig) -> Plan:
    """The explicit choice of what is quantized (see the module docstring); refuses a chosen weight that
    cannot be (input size not a multiple of 32) with the setting that keeps it."""
    linears, biases = _linear_weights(model, list(config.exclude))
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings()
    embedding_ids = {id(m.weight): label for m, label in ((output, "the output layer"), (embedding, "the token embedding"))
                     if m is not None}
    first: dict[int, str] = {}
    plan = Plan([], {}, {})
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            plan.tied[name] = first[id(param)]
            continue
        first[id(param)] = name
        if name in linears:
            if linears[name] is not None:
                plan.kept[name] = f"excluded by quantization.exclude {linears[name]!r}"
            elif param.shape[1] % BLOCK_SIZE:
                module = name.removesuffix(".weight")
                raise ShearsError(f"{module} has {param.shape[1]} inputs, not a multiple of {BLOCK_SIZE}, so it cannot "
                                  f"be quantized: keep it with quantization.exclude=['{module}'] (--exclude '{module}')")
            else:
                plan.quantize.append(name)
        elif id(param) in embedding_ids:
            what = embedding_ids[id(param)]
            if not config.embeddings:
                plan.kept[name] = f"{what}: quantization.embeddings is false"
            elif param.dim() != 2 or param.shape[1] % BLOCK_SIZE:
                raise ShearsError(f"{what} ({name}, shape {tuple(param.shape)}) cannot be quantized in blocks of "
                                  f"{BLOCK_SIZE}: keep it with quantization.embeddings=false (--no-embeddings)")
            else:
                plan.quantize.append(name)
        elif name in biases or param.dim() == 1:
            plan.kept[name] = "1-D (a norm's scale or a bias): a few KB, kept as llama.cpp keeps them, unquantized"
        else:
            plan.kept[name] = "neither a decoder-block linear nor an embedding: left as it is"
    return plan


def _source_signature(folder: Path) -> str:
    """Which weights a folder holds, cheaply: its safetensors files' names, sizes and modification times (a
    re-pruned RUN/sparse_base changes it, so a quantized base made from the old one is not reused)."""
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def _settings(source: str, config: QuantizationConfig) -> dict:
    folder = Path(resolve_model_path(source))
    return {"base_model": str(source), "source_weights": _source_signature(folder) if folder.is_dir() else None,
            "scheme": config.scheme, "embeddings": bool(config.embeddings), "exclude": list(config.exclude)}


def _recorded_settings(folder: Path) -> dict | None:
    try:
        return read_quantization_record(folder).get("settings")
    except ShearsError:
        return None


def write_quantized_folder(folder: Path, model: nn.Module, quantized: dict[str, QuantizedTensor],
                           why: dict[str, str], tied: dict[str, str], tokenizer=None, source: Path | None = None,
                           extra: dict | None = None) -> None:
    """An HF folder of `model` with `quantized` weights as blocks and the tensors named in `why` kept as they
    are, into the existing (temporary) `folder`: config, generation config, tokenizer, the records of the
    source folder that still hold (its widths, its sparsity), model.safetensors and quantization.json."""
    folder.mkdir(parents=True, exist_ok=True)
    save_config(model, folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    for name in COPIED:
        if source is not None and (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    state = dict(model.named_parameters())
    kept = {name: state[name].detach() for name in why}
    save_quantized_folder(folder, quantized, kept, why, tied, extra=extra)


def _report(model: nn.Module, quantized: dict[str, QuantizedTensor], why: dict[str, str]) -> dict:
    """Sizes and zeros: the quantized weights' bytes against float32, and proof that every zero stayed zero."""
    params = dict(model.named_parameters())
    zeros_before = zeros_after = revived = 0
    for name, q in quantized.items():
        before = params[name].detach() == 0
        after = q.dequantize() == 0
        zeros_before += int(before.sum())
        zeros_after += int(after.sum())
        revived += int((before & ~after).sum())
    if revived:  # qformat maps a zero to code 0; anything else is a bug, never a setting
        raise ShearsError(f"{revived} zero weights came back non-zero from quantization: report this bug")
    blocks = sum(q.blocks.numel() for q in quantized.values())
    kept = sum(params[name].numel() * params[name].element_size() for name in why)
    return {"quantized_params": sum(q.shape[0] * q.shape[1] for q in quantized.values()),
            "kept_params": sum(params[name].numel() for name in why), "block_bytes": blocks, "kept_bytes": kept,
            "float32_bytes": 4 * sum(p.numel() for p in params.values()),
            "zeros_before": zeros_before, "zeros_after": zeros_after}


def quantize_to_folder(model_name_or_path: str | os.PathLike, output_dir: str | os.PathLike,
                       config: QuantizationConfig, *, force: bool = False) -> Path:
    """Quantize a model as the recipe's `quantization:` section says into an HF folder (atomically); reuse
    a folder quantized alike from the same weights. The stage's one entry point."""
    if config.scheme == "none":
        raise ShearsError("quantization.scheme is none: nothing to quantize; pass --scheme q8_0 or q4_0 "
                          "(quantization.scheme=q4_0)")
    check_scheme(config.scheme)
    source = resolve_model_path(model_name_or_path)
    if is_quantized_folder(source):
        scheme = read_quantization_record(source).get("scheme")
        raise ShearsError(f"{model_name_or_path} is already quantized ({scheme}, {QUANT_FILE}): quantize the base it "
                          "came from (e.g. RUN/sparse_base or the model) instead")
    out = Path(output_dir)
    settings = _settings(str(model_name_or_path), config)
    if out.exists() and not force:
        if _recorded_settings(out) == settings:
            return out
        raise ShearsError(f"{out} exists but was not quantized with these settings from these weights: remove it, "
                          "choose another output, or pass --force")
    model = load_model(source, dtype="float32")
    tokenizer = load_tokenizer(source)
    plan = quantization_plan(model, config)
    params = dict(model.named_parameters())
    quantized = {}
    for name in progress(plan.quantize, desc=f"quantize {config.scheme}", unit="weight", leave=False):
        quantized[name] = QuantizedTensor.from_weight(params[name].detach(), config.scheme)
    report = _report(model, quantized, plan.kept)
    with atomic_folder(out, force=True) as tmp:
        write_quantized_folder(tmp, model, quantized, plan.kept, plan.tied, tokenizer, Path(source),
                               extra={"settings": settings, "report": report})
    return out


def write_on_grid(folder: Path, model: nn.Module, base: QuantizedState, tokenizer=None,
                  source: Path | None = None, extra: dict | None = None) -> int:
    """`model` (a merge into the dequantized `base`) as a quantized folder on base's frozen grid, into the
    existing (temporary) `folder`: each weight base quantized is requantized on base's block scales -- its
    blocks copied when it is unchanged -- and every tensor base kept is kept. Returns how many weights
    changed. A weight already on the grid (a QA-SparsePEFT merge) requantizes to exactly itself."""
    params = dict(model.named_parameters())
    quantized, changed = {}, 0
    for name, q in base.quantized.items():
        weight = params[name].detach().to(torch.float32)
        if torch.equal(weight, q.dequantize(torch.float32)):
            quantized[name] = q
        else:
            quantized[name] = QuantizedTensor(q.scheme, q.shape, requantize(weight, q.blocks, q.scheme))
            changed += 1
    write_quantized_folder(folder, model, quantized, dict(base.why), dict(base.tied), tokenizer, source,
                           extra={"settings": base.record.get("settings"), "requantized_on_frozen_scales": changed,
                                  **(extra or {})})
    return changed


# --------------------------------------------------------------------------- CLI

def check(folder: str) -> dict:
    """Print what a quantized folder holds: scheme, what is kept and why, bytes against float32."""
    state = load_quantized_state(folder)
    report = state.record.get("report") or {}
    print(f"{folder}: {len(state.quantized)} weights as {state.scheme}, {len(state.kept)} kept")
    reasons: dict[str, int] = {}
    for why in state.why.values():
        reasons[why] = reasons.get(why, 0) + 1
    for why, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
        print(f"  kept x{count}: {why}")
    for name, other in state.tied.items():
        print(f"  {name} is {other} (tied, stored once)")
    stored = state.nbytes()
    if report.get("float32_bytes"):
        print(f"weights: {stored / 2**20:.1f} MiB = {stored / report['float32_bytes']:.3f} x float32 "
              f"({report['float32_bytes'] / 2**20:.1f} MiB)")
    return {"scheme": state.scheme, "bytes": stored, **report}


def build_parser() -> argparse.ArgumentParser:
    parser = flags.recipe_section_parser("shears.quantize", __doc__, "default: the recipe's model; RUN/sparse_base after pruning")
    # each of these overrides the recipe's quantization.<same name>
    parser.add_argument("--scheme", choices=SCHEMES, help="llama.cpp block format (default: quantization.scheme)")
    parser.add_argument("--embeddings", action=argparse.BooleanOptionalAction,
                        help="also quantize the token embedding and output layer (default: quantization.embeddings)")
    parser.add_argument("--exclude", nargs="*", metavar="PATTERN",
                        help="fnmatch patterns on decoder-block linears to keep unquantized, e.g. '*.down_proj'")
    flags.add_output(parser, "folder to write (refused if it exists, unless --force)")
    flags.add_force(parser, "overwrite an existing --output")
    parser.add_argument("--check", metavar="DIR", help="print what a quantized folder holds and exit")
    return parser


def quantization_settings(section: QuantizationConfig, args: argparse.Namespace) -> QuantizationConfig:
    """The recipe's quantization: section with every flag that was given laid over it."""
    given = {key: getattr(args, key) for key in ("scheme", "embeddings", "exclude") if getattr(args, key) is not None}
    return dataclasses.replace(section, **given)


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args, overrides = build_parser().parse_known_args(argv)
    if args.check:
        check(args.check)
        return
    recipe = load_recipe(args.recipe, overrides)
    settings = quantization_settings(recipe.quantization, args)
    if not args.output:
        raise ShearsError("pass --output DIR (or --check DIR)")
    output = Path(args.output)
    refuse_existing(output, args.force, "choose another --output or pass --force")  # before loading the model
    path = quantize_to_folder(args.model or recipe.model, output, settings, force=True)
    report = json.loads((path / QUANT_FILE).read_text())
    r = report["report"]
    stored = r["block_bytes"] + r["kept_bytes"]
    print(f"wrote {path} (config, tokenizer, model.safetensors, {QUANT_FILE}): {len(report['quantized'])} weights as "
          f"{settings.scheme}, {len(report['kept'])} kept; {stored / 2**20:.1f} MiB of weights = "
          f"{stored / r['float32_bytes']:.3f} x float32; zeros {r['zeros_before']:,} -> {r['zeros_after']:,} (all kept)")


if __name__ == "__main__":
    main()
