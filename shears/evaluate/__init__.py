"""Evaluation: the number the search optimises, measured correctly, fast, on any active subnet.

Three tasks, all on LLM-Adapters records {instruction, input, output, answer} prompted with the
Alpaca template of `shears.data.format_prompt`:

  math    greedy generation (batched, left padding, KV cache), answer = the last number of the
          completion, correct within 1e-3 of the gold number (the LLM-Adapters convention). When the
          gold is an option letter (AQuA), the letter comes from the final answer sentence, not from the
          first A-E anywhere in the text, which would be the article "A" half of the time.
  choice  multiple choice by log-likelihood, as lm-eval scores it: every candidate continuation is
          scored after the prompt, the highest sum of log-probs wins (`accuracy`), and the highest sum
          per character of the continuation (`accuracy_norm`, lm-eval's len(choice) normalisation).
          Each question's prompt is run once however many candidates it has (KV cache), and the
          prompt template's header once per evaluation: `score_continuations` scores any (context,
          [continuations]) this way.
          A record in the content answer format (data.to_answer_format) has `choices`: each option's
          own text is its continuation; otherwise (label format) the continuation is the record's
          response with each label swapped in.
  loss    mean response-token cross-entropy (and perplexity), the cheap proxy a search may use.

The output layer (a 49k-262k vocabulary: the largest matmul of a small model) is given only the
positions whose logits are read (`scored_positions`, which training's loss uses too).

`evaluate(...)` takes a model, a PeftModel or a SuperNet (duck-typed: `.model` and `.activate`);
for a SuperNet it measures whatever config is active, so a search never reloads anything.

Where each part lives:

    answers.py     answer parsing, gold labels and options, truncation of a completion (text only)
    scoring.py     continuation scoring with KV-cache prompt sharing, the output-layer position
                   gather (`scored_positions`, `gather_logprobs`), and the plumbing the tasks share
    generation.py  the math task: batched greedy generation
    choice.py      the choice task: candidates scored by `scoring`
    loss.py        the loss task: the answer-span cross-entropy
    runner.py      `evaluate(...)`, the one entry point, and `summary`
    cli.py         `python -m shears.evaluate` and the model loading it needs
"""

from __future__ import annotations

from .answers import (
    RESPONSE_TEMPLATE,
    STOP_STRING,
    TOLERANCE,
    choice_continuations,
    choice_labels,
    completion_finished,
    extract_number,
    extract_option,
    gold_number,
    gold_option,
    score_math,
    truncate_completion,
)
from .choice import _choice_request, score_choices
from .cli import RECIPE_SECTIONS, build_parser, check_adapter_base, load_for_run, main
from .generation import generate_completions
from .runner import TASKS, evaluate, summary
from .scoring import (
    Continuations,
    Query,
    _candidate_rows,
    _pad_id,
    _shared_prompt,
    evaluation_mode,
    gather_logprobs,
    iter_continuation_logprobs,
    score_continuations,
    scored_positions,
    unwrap,
)

__all__ = ["evaluate", "summary", "main", "build_parser", "TASKS", "TOLERANCE", "STOP_STRING", "RESPONSE_TEMPLATE",
           "truncate_completion", "completion_finished", "extract_number", "extract_option", "gold_option",
           "gold_number", "score_math", "choice_labels", "choice_continuations", "score_choices", "Continuations",
           "Query", "score_continuations", "iter_continuation_logprobs", "gather_logprobs", "scored_positions",
           "generate_completions", "unwrap", "evaluation_mode", "load_for_run", "check_adapter_base",
           "RECIPE_SECTIONS"]
