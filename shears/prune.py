"""CLI for the sparsification stage: prune a model with Wanda or magnitude, or check a folder.

    python -m shears.prune --model smollm2-135m --sparsity 0.5 --output runs/x/sparse_base
    python -m shears.prune --model M --pattern 2:4 --method wanda --data calib.json --output DIR
    python -m shears.prune --recipe recipes/smollm2-math.yaml sparsity.nsamples=64 --output DIR
    python -m shears.prune --check DIR        # per-layer and total sparsity of any model folder

Settings come from the recipe's `sparsity:` section (--recipe, default recipes/default.yaml, with
key=value overrides), --model/--dtype/--bf16 from its model, dtype and training.bf16; each flag
overrides its key. An N:M --pattern without --sparsity prunes N/M. The output is an ordinary HF
folder (safetensors + tokenizer) plus sparsity.json; see shears.sparsity for the algorithm.
--exclude takes fnmatch patterns on qualified module names.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from . import flags
from .atomic import refuse_existing
from .errors import ShearsError, cli_errors
from .precision import resolve_bf16
from .recipe import SparsityConfig, load_recipe
from .sparsity import CALIBRATED, DEFAULT_CALIBRATION, METHODS, SPARSITY_JSON, prune_to_folder, sparsity_report


def build_parser() -> argparse.ArgumentParser:
    parser = flags.recipe_section_parser("shears.prune", __doc__, "default: the recipe's model")
    # each of these overrides the recipe's sparsity.<same name>
    parser.add_argument("--sparsity", type=float, help="fraction of weights pruned per row (N:M: defaults to N/M)")
    parser.add_argument("--pattern", help="unstructured | 2:4 | 4:8 (any N:M)")
    parser.add_argument("--method", choices=METHODS)
    flags.add_data(parser, f"calibration records (default {DEFAULT_CALIBRATION})", "--calibration",
                   default=DEFAULT_CALIBRATION)
    parser.add_argument("--nsamples", type=int, help="calibration windows")
    parser.add_argument("--seqlen", type=int, help="tokens per window, capped to the model's max_position_embeddings")
    flags.add_seed(parser, "the calibration windows' sampling")
    parser.add_argument("--exclude", nargs="*", metavar="PATTERN",
                        help="fnmatch patterns on qualified module names to leave dense, e.g. '*.down_proj'")
    flags.add_batch_size(parser, "calibration samples per block forward")
    flags.add_dtype(parser, "default: the recipe's dtype")
    flags.add_bf16(parser, "calibration forward; default: the recipe's training.bf16")
    flags.add_output(parser, "folder to write (refused if it exists, unless --force)")
    flags.add_force(parser, "overwrite an existing --output")
    parser.add_argument("--check", metavar="DIR", help="print the sparsity of a model folder and exit")
    return parser


def check(folder: str) -> dict:
    """Print per-layer and total sparsity of the decoder-block linears of a model folder."""
    from .models import load_model

    report = sparsity_report(load_model(folder))
    for layer, fraction in report["layers"].items():
        print(f"layer {layer}: {fraction:.2%}")
    print(f"total: {report['total']:.2%} ({report['zeros']} of {report['params']} decoder-block linear weights are zero)")
    return report


def _implied_sparsity(pattern: str | None) -> float | None:
    """N/M for an N:M pattern, else None."""
    n, sep, m = (pattern or "").partition(":")
    return int(n) / int(m) if sep and n.isdigit() and m.isdigit() and int(m) > 0 else None


def sparsity_settings(section: SparsityConfig, args: argparse.Namespace) -> SparsityConfig:
    """The recipe's sparsity: section with every flag that was given laid over it."""
    given = {key: getattr(args, key) for key in ("sparsity", "pattern", "method", "nsamples", "seqlen", "seed",
                                                  "exclude", "batch_size") if getattr(args, key) is not None}
    if "pattern" in given and "sparsity" not in given:
        implied = _implied_sparsity(given["pattern"])
        if implied is None and given["pattern"] != "unstructured":
            raise ShearsError(f"--sparsity is required with --pattern {given['pattern']} (not N:M): pass e.g. "
                              "--sparsity 0.5, or --pattern 2:4")
        given["sparsity"] = implied if implied is not None else section.sparsity
    settings = dataclasses.replace(section, **given)
    if settings.sparsity == 0:
        raise ShearsError("sparsity 0 prunes nothing: pass e.g. --sparsity 0.5 (or sparsity.sparsity=0.5)")
    return settings


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args, overrides = build_parser().parse_known_args(argv)
    if args.check:
        check(args.check)
        return
    if not args.output:
        raise ShearsError("pass --output DIR (or --check DIR)")
    recipe = load_recipe(args.recipe, overrides)
    settings = sparsity_settings(recipe.sparsity, args)
    output = Path(args.output)
    refuse_existing(output, args.force, "choose another --output or pass --force")  # before loading the model
    records = None
    if settings.method in CALIBRATED:
        from .data import load_records

        records = load_records(args.data)
    bf16 = resolve_bf16(flags.given(args.bf16, recipe.training.bf16),
                        key="--bf16" if args.bf16 is not None else "training.bf16")
    path = prune_to_folder(args.model or recipe.model, output, settings, calibration_records=records,
                           calibration_source=args.data, dtype=args.dtype or recipe.dtype, bf16=bf16, force=True)
    total = json.loads((path / SPARSITY_JSON).read_text())["total"]
    print(f"wrote {path} (model, tokenizer, {SPARSITY_JSON}): {total:.2%} of decoder-block linear weights pruned")


if __name__ == "__main__":
    main()
