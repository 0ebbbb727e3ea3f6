"""The choice task: multiple choice by log-likelihood, as lm-eval scores it.

Every candidate continuation is scored after the prompt (`scoring.score_continuations`), the
highest sum of log-probs wins (`accuracy`), and the highest sum per character of the continuation
(`accuracy_norm`, lm-eval's len(choice) normalisation). A record in the content answer format
(data.to_answer_format) has `choices`: each option's own text is its continuation; otherwise (label
format) the continuation is the record's response with each label swapped in.
"""

from __future__ import annotations

from typing import Sequence

from ..errors import ShearsError
from .answers import choice_continuations, choice_labels
from .scoring import Continuations, _pad_id, _progress, _prompt_ids, iter_continuation_logprobs, score_continuations

def _choice_request(tokenizer, record: dict, choices: Sequence[str] | None) -> tuple[list[str], list[str], Continuations]:
    """(labels, continuation texts, the token request) of one record."""
    if record.get("choices"):  # content format: the option's text itself is the continuation
        labels = continuations = list(record["choices"])
    else:
        labels = choice_labels(record, choices)
        continuations = choice_continuations(record, labels)
    tokens = []
    for label, text in zip(labels, continuations):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ShearsError(f"the candidate {label!r} tokenises to nothing: give non-empty choices")
        tokens.append(ids)
    return labels, continuations, Continuations(_prompt_ids(tokenizer, record), tokens)


def score_choices(model, tokenizer, records, choices=None, batch_size: int = 16) -> list[dict]:
    """Sum of log-probs of every candidate continuation of every record."""
    built = [_choice_request(tokenizer, r, choices) for r in records]
    scored = score_continuations(model, [request for _, _, request in built], _pad_id(tokenizer), batch_size)
    return [{"labels": labels, "continuations": texts, "logprobs": [float(lp.sum()) for lp in logprobs]}
            for (labels, texts, _), logprobs in zip(built, scored)]


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda k: values[k])


def _evaluate_choice(model, tokenizer, records, batch_size, choices, progress) -> dict:
    built = [_choice_request(tokenizer, r, choices) for r in records]
    for i, (labels, _, _) in enumerate(built):
        gold = str(records[i].get("answer") or "").strip()
        if gold not in labels:  # before any forward pass: bad data fails in a second
            raise ShearsError(f"record {i}: gold answer {gold!r} is not among the candidates "
                              f"{labels}: fix the data or --choices")
    predictions: list[dict | None] = [None] * len(records)
    correct = correct_norm = done = 0
    requests = [request for _, _, request in built]
    with _progress(len(records), "choice", progress) as bar:
        for i, token_logprobs in iter_continuation_logprobs(model, requests, _pad_id(tokenizer), batch_size):
            labels, texts, _ = built[i]
            gold = str(records[i].get("answer") or "").strip()
            logprobs = [float(lp.sum()) for lp in token_logprobs]
            # acc_norm as lm-eval: log-likelihood per character of the continuation.
            per_char = [lp / len(c) for lp, c in zip(logprobs, texts)]
            pick, pick_norm = labels[_argmax(logprobs)], labels[_argmax(per_char)]
            correct += pick == gold
            correct_norm += pick_norm == gold
            predictions[i] = {"index": i, "choices": labels, "logprobs": logprobs,
                              "prediction": pick, "prediction_norm": pick_norm, "answer": gold,
                              "correct": pick == gold, "correct_norm": pick_norm == gold}
            done += 1
            bar.update(1)
            bar.set_postfix(acc=f"{correct / done:.3f}", acc_norm=f"{correct_norm / done:.3f}", refresh=False)
    return {"accuracy": correct / len(records), "accuracy_norm": correct_norm / len(records),
            "per_record": [float(p["correct"]) for p in predictions], "predictions": predictions}
