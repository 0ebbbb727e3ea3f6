"""The math task: greedy generation (batched, left padding, KV cache), scored by `answers.score_math`."""

from __future__ import annotations

import torch

from ..errors import ShearsError
from .answers import completion_finished, score_math
from .scoring import _PromptCache, _batches, _device, _pad_id, _progress, _prompt_ids, _shared_prompt

def _left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[b, width - len(row):] = 1
    return ids, mask


def generate_completions(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int,
                         prompt: "_PromptCache | None" = None) -> list[str]:
    """Greedy completions of a batch of prompts: one batched forward per new token on a KV cache.

    Prompts are left-padded so that every row's next token goes in the same column; positions are
    passed explicitly, so padding shifts no real token. A row leaves the batch (and its cache rows
    are dropped) as soon as it is finished: EOS, "###", or a completed final-answer line
    (`completion_finished`); the others go on, up to `max_new_tokens`. `prompt` is the KV cache of
    a prefix every prompt starts with (the template header), run once for a whole evaluation."""
    device, pad_id, eos = _device(model), _pad_id(tokenizer), tokenizer.eos_token_id
    P = prompt.length if prompt is not None else 0
    ids, mask = _left_padded([p[P:] for p in prompt_ids], pad_id)
    mask = torch.cat([torch.ones((len(prompt_ids), P), dtype=torch.long), mask], dim=1).to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, P:]
    out = model(input_ids=ids.to(device), attention_mask=mask, position_ids=positions,
                cache=prompt.for_batch(len(prompt_ids)) if prompt is not None else None,
                use_cache=True, logits_to_keep=1)
    cache, next_position = out.cache, positions[:, -1:] + 1
    token = out.logits[:, -1].argmax(-1)
    new: list[list[int]] = [[] for _ in prompt_ids]
    active = list(range(len(prompt_ids)))  # rows of `new` still in the batch, in batch order
    for step in range(max_new_tokens):
        keep = []
        for j, (b, t) in enumerate(zip(active, token.tolist())):
            new[b].append(t)
            if t != eos and not completion_finished(tokenizer.decode(new[b], skip_special_tokens=True)):
                keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):
            kept = torch.tensor(keep, device=device)
            cache.batch_select_indices(kept)
            mask, next_position, token = mask[kept], next_position[kept], token[kept]
            active = [active[j] for j in keep]
        mask = torch.cat([mask, torch.ones((len(active), 1), dtype=torch.long, device=device)], dim=1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position, cache=cache,
                    use_cache=True)
        cache, next_position = out.cache, next_position + 1
        token = out.logits[:, -1].argmax(-1)
    return tokenizer.batch_decode(new, skip_special_tokens=True)


def _evaluate_math(model, tokenizer, records, batch_size, max_new_tokens, progress) -> dict:
    prompts = [_prompt_ids(tokenizer, r) for r in records]
    for i, r in enumerate(records):
        if r.get("answer") in (None, ""):
            raise ShearsError(f"record {i} has no `answer`: math evaluation compares against the gold answer field")
    # Longest first: similar lengths share a batch (little padding), and memory runs out early if at all.
    order = sorted(range(len(records)), key=lambda i: -len(prompts[i]))
    predictions: list[dict | None] = [None] * len(records)
    correct = done = 0
    prompt = _shared_prompt(model, prompts, max(map(len, prompts)) + max_new_tokens)
    with _progress(len(records), "math", progress) as bar:
        for batch in _batches(order, batch_size):
            completions = generate_completions(model, tokenizer, [prompts[i] for i in batch], max_new_tokens, prompt)
            for i, completion in zip(batch, completions):
                predicted, ok = score_math(completion, records[i]["answer"])
                correct += ok
                predictions[i] = {"index": i, "completion": completion, "prediction": predicted,
                                  "answer": records[i]["answer"], "correct": ok}
            done += len(batch)
            bar.update(len(batch))
            bar.set_postfix(acc=f"{correct / done:.3f}")
    return {"accuracy": correct / len(records), "per_record": [float(p["correct"]) for p in predictions],
            "predictions": predictions}
