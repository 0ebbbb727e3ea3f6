"""The loss task: mean response-token cross-entropy (and perplexity), the cheap proxy a search may use."""

from __future__ import annotations

import math

from ..errors import ShearsError
from .scoring import Query, _batches, _pad_id, _progress, gather_logprobs

def _evaluate_loss(model, tokenizer, records, batch_size, cutoff_len, progress) -> dict:
    """Token-weighted mean cross-entropy of the response tokens (EOS included), as training sees them."""
    from ..data import IGNORE_INDEX, tokenize_example

    examples = [tokenize_example(tokenizer, r, cutoff_len, train_on_inputs=False) for r in records]
    order = sorted(range(len(records)), key=lambda i: -len(examples[i]["input_ids"]))
    predictions: list[dict | None] = [None] * len(records)
    total, tokens = 0.0, 0
    with _progress(len(records), "loss", progress) as bar:
        for batch in _batches(order, batch_size):
            scored = [i for i in batch if any(l != IGNORE_INDEX for l in examples[i]["labels"][1:])]
            queries = []
            for row, i in enumerate(scored):
                labels = examples[i]["labels"]
                wanted = [t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX]
                queries.append(Query(row, [t - 1 for t in wanted], [labels[t] for t in wanted]))
            logprobs = gather_logprobs(model, [examples[i]["input_ids"] for i in scored], queries,
                                       _pad_id(tokenizer)) if scored else []
            for i in batch:
                predictions[i] = {"index": i, "loss": None, "tokens": 0}
            for i, lp in zip(scored, logprobs):
                total -= float(lp.sum())
                tokens += len(lp)
                predictions[i] = {"index": i, "loss": float(-lp.mean()), "tokens": len(lp)}
            bar.update(len(batch))
            if tokens:
                bar.set_postfix(loss=f"{total / tokens:.4f}")
    if tokens == 0:
        raise ShearsError("no response tokens to score: the records' outputs are empty or cut off by cutoff_len")
    loss = total / tokens
    # each record's mean loss, weighted by its response tokens: their weighted mean is `loss` exactly
    return {"accuracy": None, "loss": loss, "perplexity": math.exp(loss), "tokens": tokens,
            "per_record": [p["loss"] if p["loss"] is not None else 0.0 for p in predictions],
            "per_record_weights": [p["tokens"] for p in predictions], "predictions": predictions}
