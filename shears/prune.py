"""CLI for the sparsification stage: prune a model with Wanda or magnitude, or check a folder.

    python -m shears.prune --model smollm2-135m --sparsity 0.5 --output runs/x/sparse_base
    python -m shears.prune --model M --pattern 2:4 --method wanda --calibration data.json --output DIR
    python -m shears.prune --check DIR        # per-layer and total sparsity of any model folder

The output is an ordinary HF folder (safetensors + tokenizer) plus sparsity.json; see
shears.sparsity for the algorithm. --exclude takes fnmatch patterns on qualified module names.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import ShearsError, cli_errors
from .precision import resolve_bf16
from .sparsity import DEFAULT_CALIBRATION, METHODS, SPARSITY_JSON, prune_to_folder, sparsity_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m shears.prune", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub id, model folder, .gguf file or the alias smollm2-135m")
    parser.add_argument("--sparsity", type=float, help="fraction of weights pruned per row (N:M: defaults to N/M)")
    parser.add_argument("--pattern", default="unstructured", help="unstructured | 2:4 | 4:8 (any N:M)")
    parser.add_argument("--method", default="wanda", choices=METHODS)
    parser.add_argument("--calibration", default=DEFAULT_CALIBRATION,
                        help=f"any data source shears.data reads (default {DEFAULT_CALIBRATION})")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048, help="capped to the model's max_position_embeddings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exclude", nargs="*", default=[], metavar="PATTERN",
                        help="fnmatch patterns on qualified module names to leave dense, e.g. '*.down_proj'")
    parser.add_argument("--batch-size", type=int, default=1, help="calibration samples per block call")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    parser.add_argument("--bf16", default="auto", choices=("auto", "true", "false"),
                        help="calibration forward under bf16 autocast: auto = where the device has native bf16")
    parser.add_argument("--output", help="folder to write (refused if it exists, unless --force)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --output")
    parser.add_argument("--check", metavar="DIR", help="print the sparsity of a model folder and exit")
    return parser.parse_args(argv)


def check(folder: str) -> dict:
    """Print per-layer and total sparsity of the decoder-block linears of a model folder."""
    from .models import load_model

    report = sparsity_report(load_model(folder))
    for layer, fraction in report["layers"].items():
        print(f"layer {layer}: {fraction:.2%}")
    print(f"total: {report['total']:.2%} ({report['zeros']} of {report['params']} decoder-block linear weights are zero)")
    return report


def _sparsity(args: argparse.Namespace) -> float:
    if args.sparsity is not None:
        return args.sparsity
    n, sep, m = args.pattern.partition(":")
    if sep and n.isdigit() and m.isdigit() and int(m) > 0:
        return int(n) / int(m)
    raise ShearsError("--sparsity is required for unstructured pruning: pass e.g. --sparsity 0.5")


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.check:
        check(args.check)
        return
    if not args.model or not args.output:
        raise ShearsError("pass --model and --output (or --check DIR)")
    output = Path(args.output)
    if output.exists() and not args.force:
        raise ShearsError(f"{output} already exists: choose another --output or pass --force")
    records = None
    if args.method == "wanda":
        from .data import load_records

        records = load_records(args.calibration)
    path = prune_to_folder(args.model, output, sparsity=_sparsity(args), pattern=args.pattern, method=args.method,
                           calibration_records=records, calibration_source=args.calibration,
                           nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, exclude=args.exclude,
                           batch_size=args.batch_size, dtype=args.dtype, force=True,
                           bf16=resolve_bf16({"auto": "auto", "true": True, "false": False}[args.bf16], key="--bf16"))
    total = json.loads((path / SPARSITY_JSON).read_text())["total"]
    print(f"wrote {path} (model, tokenizer, {SPARSITY_JSON}): {total:.2%} of decoder-block linear weights pruned")


if __name__ == "__main__":
    main()
