"""Evaluation: the number the search optimises, measured correctly, fast, on any active subnet.

`python -m shears.evaluate --model M [--adapter A] | --run RUN [--subnet S] --data D --task T`: the CLI,
and the model loading it needs (a plain model with an optional stock-PEFT adapter, or a run's subnet).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from .. import flags
from ..atomic import write_json
from ..errors import ShearsError, cli_errors
from ..precision import resolve_bf16
from .runner import TASKS, evaluate, summary
from .scoring import _device, unwrap

RECIPE_SECTIONS = ("evaluation",)  # what key=value arguments may override of a --run's recipe


def load_for_run(run: str | os.PathLike, subnet: str, dtype: str | None = None, overrides: list[str] | None = None):
    """(SuperNet with `subnet` active, tokenizer, recipe) of a run directory; `overrides`: key=value
    arguments over its recipe's evaluation: section."""
    from ..run import load_run, load_run_recipe, subnet_config

    loaded = load_run(run, dtype=dtype, recipe=load_run_recipe(run, overrides, RECIPE_SECTIONS))
    loaded.supernet.activate(subnet_config(loaded.supernet, subnet))
    return loaded.supernet, loaded.tokenizer, loaded.recipe


def check_adapter_base(adapter: Path, model, model_name: str) -> None:
    """Refuse, in one line, a damaged adapter or a shears export made for a base other than `model`."""
    from ..models import load_safetensors, model_fingerprint
    from ..rundir import SHEARS_RECORD

    if (adapter / "adapter_model.safetensors").is_file():
        load_safetensors(adapter / "adapter_model.safetensors")  # a torn file fails here, not deep in PEFT
    record = adapter / SHEARS_RECORD
    if record.is_file():
        base = json.loads(record.read_text()).get("base_model") or {}
        expected, found = base.get("fingerprint"), model_fingerprint(model)
        if expected and expected != found:
            raise ShearsError(f"{adapter} was exported for the base {base.get('source')!r} (fingerprint {expected}), "
                              f"not {model_name} ({found}): pass --model {base.get('source')}")


def _load_plain(model_name: str, adapter: str | None, dtype: str):
    from ..models import load_model, load_tokenizer

    model = load_model(model_name, dtype=dtype)
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ShearsError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
        check_adapter_base(Path(adapter), model, model_name)
        try:
            model = PeftModel.from_pretrained(model, adapter)
        except RuntimeError as err:  # PEFT's state-dict loading: the shapes of another base
            if "size mismatch" not in str(err):
                raise
            raise ShearsError(f"{adapter} does not fit {model_name}: its shapes are another base model's; pass the "
                              "--model it was trained on") from None
    return model, load_tokenizer(model_name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shears.evaluate", description=__doc__.split("\n\n")[0],
                                epilog="With --run, key=value arguments override its recipe's evaluation.* keys, "
                                       "e.g. evaluation.max_new_tokens=64.")
    source = p.add_mutually_exclusive_group(required=True)
    flags.add_model(source, "scored plain, or with --adapter")
    flags.add_run(source)
    p.add_argument("--adapter", help="stock-PEFT adapter folder to load on --model")
    p.add_argument("--subnet", default="maximal",
                   help="with --run: maximal | heuristic | minimal | a JSON config | a .json file (default maximal)")
    flags.add_data(p, "the records to score", required=True)
    # validated by evaluate(), not argparse: a bad --task then gets the one-line error of every other bad input
    p.add_argument("--task", help=f"{' | '.join(TASKS)} (default: the run's recipe evaluation.task, else math)")
    p.add_argument("--limit", type=int, help="evaluate only the first N records")
    flags.add_batch_size(p, "records per forward/generate call (default recipe, else 16)")
    p.add_argument("--max-new-tokens", type=int, help="math generation budget (default recipe, else 256)")
    p.add_argument("--choices", help="choice task: comma-separated candidate labels for every record")
    p.add_argument("--answer-format", help="label | content: how multiple-choice records are scored "
                                           "(default: the run's recipe data.answer_format, else label)")
    p.add_argument("--cutoff-len", type=int, help="loss task: token cut-off (default recipe data.cutoff_len, else 1024)")
    flags.add_dtype(p, "default: the run's recipe, else float32")
    flags.add_bf16(p, "default: the run's evaluation.bf16, else auto")
    flags.add_output(p, "write the result with per-example predictions to this JSON file")
    flags.add_force(p, "replace an existing --output", "--overwrite")  # --overwrite: its old name
    return p


@cli_errors
def main(argv: list[str] | None = None) -> None:
    from ..data import ANSWER_FORMATS, load_records, to_answer_format

    args, overrides = build_parser().parse_known_args(argv)
    if overrides and not args.run:
        raise ShearsError(f"cannot read {' '.join(overrides)}: key=value overrides go with --run (its recipe's "
                          "evaluation.* keys)")
    if args.answer_format is not None and args.answer_format not in ANSWER_FORMATS:
        raise ShearsError(f"unknown --answer-format {args.answer_format!r}: use {' or '.join(ANSWER_FORMATS)}")
    output = Path(args.output) if args.output else None
    if output is not None and output.exists() and not args.force:
        raise ShearsError(f"{output} exists: pass --force or choose another --output")
    if args.task is not None and args.task not in TASKS:
        raise ShearsError(f"unknown task {args.task!r}: use --task {' | '.join(TASKS)}")
    if args.limit is not None and args.limit < 1:
        raise ShearsError(f"--limit must be at least 1, got {args.limit}")
    records = load_records(args.data)  # before the model: a bad data path fails in a second, not after a load
    if args.answer_format:
        records = to_answer_format(records, args.answer_format)
    if args.run:
        if args.adapter:
            raise ShearsError("--adapter goes with --model; a --run evaluates its own super-network")
        model, tokenizer, recipe = load_for_run(args.run, args.subnet, args.dtype, overrides)
        ev = recipe.evaluation
        task, batch_size, max_new_tokens, cutoff_len = ev.task, ev.batch_size, ev.max_new_tokens, recipe.data.cutoff_len
        if not args.answer_format:  # score in the format the run trained in
            records = to_answer_format(records, recipe.data.answer_format)
        bf16_setting = recipe.evaluation_bf16()
        described = f"{args.run} subnet {args.subnet}"
    else:
        model, tokenizer = _load_plain(args.model, args.adapter, args.dtype or "float32")
        task, batch_size, max_new_tokens, cutoff_len = "math", 16, 256, 1024
        bf16_setting = "auto"
        described = args.model + (f" + {args.adapter}" if args.adapter else "")
    if torch.cuda.is_available():
        unwrap(model).to("cuda")
    bf16 = resolve_bf16(flags.given(args.bf16, bf16_setting), _device(unwrap(model)),
                        key="--bf16" if args.bf16 is not None else "evaluation.bf16")
    result = evaluate(model, tokenizer, records, args.task or task, limit=args.limit, bf16=bf16,
                      batch_size=flags.given(args.batch_size, batch_size),
                      max_new_tokens=flags.given(args.max_new_tokens, max_new_tokens),
                      choices=args.choices.split(",") if args.choices else None,
                      cutoff_len=flags.given(args.cutoff_len, cutoff_len))
    result = {"model": described, "data": args.data, **result}
    print(f"{described} on {args.data}: {summary(result)}")
    if output is not None:
        write_json(output, result, force=args.force, hint="pass --force or choose another --output")
        print(f"wrote {len(result['predictions'])} predictions to {output}")
    else:
        print("wrote nothing (pass --output FILE to keep the per-example predictions)")
