"""`evaluate(...)`: the one entry point, which checks its arguments and runs the task's module."""

from __future__ import annotations

import typing
from typing import Sequence

from ..errors import ShearsError
from ..precision import autocast, bf16_weights, float32_logits, precision_name
from ..recipe import Task
from .choice import _evaluate_choice
from .generation import _evaluate_math
from .loss import _evaluate_loss
from .scoring import _device, evaluation_mode, unwrap

TASKS = typing.get_args(Task)  # the recipe's Literal: one definition


def evaluate(model_or_supernet, tokenizer, records: Sequence[dict], task: str, limit: int | None = None,
             batch_size: int = 16, max_new_tokens: int = 256, choices: Sequence[str] | None = None,
             cutoff_len: int = 1024, progress: bool = True, bf16: bool = False) -> dict:
    """Score the model (or the SuperNet's active subnet) on `records` (the first `limit`).

    `bf16` runs the forward passes under bf16 autocast (weights stay as they are; the logits and
    their log-softmax are computed in float32, so close options do not tie); resolve a recipe's `auto` with `shears.precision.resolve_bf16` first.

    Returns {"task", "accuracy", "n", "predictions", "per_record", ...}: choice adds "accuracy_norm"; loss
    gives "loss", "perplexity", "tokens", "per_record_weights" and accuracy None. Predictions are in the
    records' order. `per_record` is each record's value of the score -- 1.0 or 0.0 for a question
    answered right or wrong, a record's mean response-token loss -- so that the score is their mean
    (loss: weighted by `per_record_weights`, the records' response tokens), and its noise can be measured
    (shears.noise)."""
    if task not in TASKS:
        raise ShearsError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ShearsError("batch_size and max_new_tokens must be at least 1")
    if limit is not None and limit < 1:
        raise ShearsError(f"limit must be at least 1, got {limit}: pass a positive --limit or none")
    records = list(records)[:limit] if limit is not None else list(records)
    if not records:
        raise ShearsError("no records to evaluate: check the data file and --limit")
    model = unwrap(model_or_supernet)
    with (evaluation_mode(model), autocast(bf16, _device(model)), float32_logits(model),
          bf16_weights(model, enabled=bf16)):
        if task == "math":
            result = _evaluate_math(model, tokenizer, records, batch_size, max_new_tokens, progress)
        elif task == "choice":
            result = _evaluate_choice(model, tokenizer, records, batch_size, choices, progress)
        else:
            result = _evaluate_loss(model, tokenizer, records, batch_size, cutoff_len, progress)
    return {"task": task, "n": len(records), "precision": precision_name(bf16), **result}


def summary(result: dict) -> str:
    """One line: what was measured and how well."""
    if result["task"] == "loss":
        return f"loss: {result['loss']:.4f}  perplexity: {result['perplexity']:.3f}  " \
               f"({result['tokens']} response tokens, n={result['n']})"
    line = f"{result['task']} accuracy: {result['accuracy']:.4f}"
    if "accuracy_norm" in result:
        line += f"  accuracy_norm: {result['accuracy_norm']:.4f}"
    return f"{line}  (n={result['n']})"
