"""The command-line flags the stages share, each defined once.

Every `python -m shears.<stage>` that has one of these concepts adds it through this module, so a
flag has one name, one type and one meaning everywhere: --model, --recipe (+ key=value overrides),
--run, --data, --output, --force, --dtype, --bf16, --seed, --batch-size. A stage adds only its own
default or purpose (`note`, `what`). docs/CLI.md tabulates which stage has which; tests/test_cli.py
checks every stage's parser against these definitions.
"""

from __future__ import annotations

import argparse
from typing import Union

# auto | true | false -> shears.precision's setting (resolved against the device there)
BF16_VALUES: dict[str, Union[bool, str]] = {"auto": "auto", "true": True, "false": False}
OVERRIDES_EPILOG = ("Any recipe key can be overridden: training.max_steps=50 or --training.max_steps 50 "
                    "(key=value, the value read as YAML).")


# What a shared flag means, the same words in every stage's --help (a stage adds its default or purpose)
MEANINGS = {
    "--model": "hub id, model folder, .gguf file or the alias smollm2-135m",
    "--recipe": "recipe YAML, or the name of a shipped one (default: recipes/default.yaml); key=value arguments "
                "override its keys",
    "--run": "run directory (recipe.yaml + supernet/)",
    "--data": "a .json/.jsonl/.csv file, builtin:arithmetic[?n=N] or hub:NAME[:split]",
    "--dtype": "weights' dtype: float32, bfloat16 or float16",
    "--bf16": "bf16 autocast: auto = where the device has native bf16",
}


def bf16_setting(text: str) -> Union[bool, str]:
    """argparse type of --bf16: the precision setting `auto`, True or False."""
    try:
        return BF16_VALUES[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"use {', '.join(BF16_VALUES)}") from None


def add_model(parser, note: str, **kwargs) -> argparse.Action:
    return parser.add_argument("--model", **kwargs,
                               help=f"model: {MEANINGS['--model']} ({note})")


def add_recipe(parser) -> argparse.Action:
    return parser.add_argument("--recipe", help=MEANINGS["--recipe"])


def recipe_section_parser(module: str, doc: str, model_note: str) -> argparse.ArgumentParser:
    """The parser of a stage that takes one section of a recipe (prune, quantize): --recipe with its
    key=value overrides, and --model; the stage adds the flags that override its section's keys."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0],
                                     epilog=OVERRIDES_EPILOG)
    add_recipe(parser)
    add_model(parser, model_note)
    return parser


def add_run(parser, **kwargs) -> argparse.Action:
    return parser.add_argument("--run", **kwargs, help=MEANINGS["--run"])


def add_data(parser, what: str, *aliases: str, **kwargs) -> argparse.Action:
    return parser.add_argument("--data", *aliases, **kwargs,
                               help=f"{what}: {MEANINGS['--data']}")


def add_output(parser, what: str, **kwargs) -> argparse.Action:
    return parser.add_argument("--output", **kwargs, help=what)


def add_force(parser, what: str, *aliases: str) -> argparse.Action:
    return parser.add_argument("--force", *aliases, dest="force", action="store_true", help=what)


def add_dtype(parser, note: str) -> argparse.Action:
    # checked where it is used (shears.models.as_dtype, which owns the names), with a one-line error
    return parser.add_argument("--dtype", help=f"{MEANINGS['--dtype']} ({note})")


def add_bf16(parser, note: str) -> argparse.Action:
    return parser.add_argument("--bf16", type=bf16_setting, metavar="{auto,true,false}",
                               help=f"{MEANINGS['--bf16']} ({note})")


def add_seed(parser, what: str, **kwargs) -> argparse.Action:
    return parser.add_argument("--seed", type=int, **kwargs, help=f"seed of {what}")


def add_batch_size(parser, what: str, **kwargs) -> argparse.Action:
    return parser.add_argument("--batch-size", type=int, **kwargs, help=what)


def given(value, default):
    """A flag's value when it was passed (0 and False included), else `default` (the recipe's, say)."""
    return default if value is None else value
