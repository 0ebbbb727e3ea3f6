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
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from . import flags
from .atomic import write_json
from .errors import ShearsError, cli_errors
from .precision import autocast, bf16_weights, float32_logits, output_head, precision_name, resolve_bf16
from .recipe import Task

TASKS = typing.get_args(Task)  # the recipe's Literal: one definition
TOLERANCE = 1e-3  # |prediction - gold| within this counts as correct (LLM-Adapters)
STOP_STRING = "###"  # an untuned model goes on to write the next "### Instruction:" block; cut it there

# --------------------------------------------------------------------------- answer extraction

# A number: optional sign (only when the minus is not part of "5-3"), optional $, then either a
# thousands-grouped integer ("1,234,567"), a plain integer, with optional decimals, or ".5".
_NUMBER = re.compile(r"(?<![\w.])(-)?\$?(\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
# "answer" in any case, but the letter itself a capital (or parenthesised): "the answer is a 12" names no option.
_OPTION_AFTER_ANSWER = re.compile(r"(?i:answer\s*(?:is|:)?\s*:?\s*(?:option\s*)?)(?:\(([A-Ea-e])\)|([A-E])(?![A-Za-z]))")
_OPTION_IN_PARENS = re.compile(r"\(([A-E])\)")
_OPTION_ALONE = re.compile(r"(?<![A-Za-z])([A-E])(?![A-Za-z])")
_SENTENCE_END = re.compile(r"(?<=[.!?\n])(?!\d)")  # a period inside "13.5" ends no sentence


# A completed final-answer line: "The answer is 42." (or "... is (C)") and the newline that ends it.
_FINAL_ANSWER_LINE = re.compile(r"(?i:\bthe answer is\b)[^\n]*?(?:\d|\([A-Ea-e]\)|(?<![A-Za-z])[A-E](?![A-Za-z]))[^\n]*\n")


def truncate_completion(text: str) -> str:
    """The response proper: the text before a hallucinated next "###" block, and at most up to the end
    of the first completed final-answer line ("The answer is 42.\n"): what the model committed to.
    Generation stops there too (`completion_finished`), so nothing after it is generated or scored."""
    text = text.split(STOP_STRING, 1)[0]
    line = _FINAL_ANSWER_LINE.search(text)
    return text[:line.end()] if line else text


def completion_finished(text: str) -> bool:
    """Whether generating more could not change what `truncate_completion` keeps."""
    return STOP_STRING in text or _FINAL_ANSWER_LINE.search(text) is not None


def extract_number(text: str) -> float | None:
    """The last number in `text` ("$1,234.50" -> 1234.5, "-3" -> -3.0), or None when there is none."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    sign, digits = matches[-1]
    value = float(digits.replace(",", ""))
    return -value if sign else value


def extract_option(text: str) -> str | None:
    """The option letter A-E a completion settles on, read from its final answer sentence.

    Order of trust: the last "answer is (X)" / "answer: X"; else the last sentence that names an
    option, where a parenthesised "(X)" beats a bare capital (which may be the article "A")."""
    after_answer = _OPTION_AFTER_ANSWER.findall(text)
    if after_answer:
        return "".join(after_answer[-1]).upper()
    for sentence in reversed([s for s in _SENTENCE_END.split(text) if s.strip()]):
        for pattern in (_OPTION_IN_PARENS, _OPTION_ALONE):
            found = pattern.findall(sentence)
            if found:
                return found[-1]
    return None


def gold_option(answer: str) -> str | None:
    """The letter when the gold answer is an option ("C", "(C)"), else None."""
    match = re.fullmatch(r"\(?\s*([A-E])\s*\)?", str(answer).strip())
    return match.group(1) if match else None


def gold_number(answer: str) -> float | None:
    try:
        return float(str(answer).strip().replace(",", "").lstrip("$"))
    except ValueError:
        return None


def score_math(completion: str, answer: str) -> tuple[Any, bool]:
    """(the prediction extracted from a completion, whether it matches the gold answer)."""
    completion = truncate_completion(completion)
    letter = gold_option(answer)
    if letter is not None:
        predicted = extract_option(completion)
        return predicted, predicted == letter
    gold = gold_number(answer)
    if gold is None:
        raise ShearsError(f"math answer {answer!r} is neither a number nor an option letter A-E: "
                          "fix the data's `answer` field or use --task choice/loss")
    predicted = extract_number(completion)
    return predicted, predicted is not None and abs(predicted - gold) <= TOLERANCE


# --------------------------------------------------------------------------- choice candidates

_ANSWER_FORMAT = re.compile(r"Answer format:\s*([^\s/]+(?:\s*/\s*[^\s/]+)+)", re.IGNORECASE)
_LABEL_FAMILY = re.compile(r"([A-Za-z]+)(\d+)")
# The LLM-Adapters response wording, used only when a record's own `output` does not show it.
RESPONSE_TEMPLATE = "the correct answer is {label}"


def choice_labels(record: dict, choices: Sequence[str] | None = None) -> list[str]:
    """The candidate labels of a record: `choices` when given, else the instruction's
    "Answer format: a/b/c" line, else the family of the gold label ("answer2" -> answer1..answerK,
    K counted from "Answer1:".. in the instruction; "true"/"false")."""
    if choices:
        return list(choices)
    formats = _ANSWER_FORMAT.findall(record.get("instruction") or "")
    if formats:
        return [label.strip().rstrip(".") for label in formats[-1].split("/")]
    answer = str(record.get("answer") or "").strip()
    if answer.lower() in ("true", "false"):
        return ["true", "false"]
    family = _LABEL_FAMILY.fullmatch(answer)
    if family:
        stem = family.group(1)
        numbers = {int(n) for n in re.findall(rf"\b{stem}(\d+)\s*:", record.get("instruction") or "", re.IGNORECASE)}
        count = max(numbers | {int(family.group(2))})
        return [f"{stem}{k}" for k in range(1, count + 1)]
    raise ShearsError(f"cannot tell the candidate answers of the record {str(record.get('instruction'))[:60]!r}: "
                      "pass them with --choices a,b,c (choices=[...])")


def choice_continuations(record: dict, labels: Sequence[str]) -> list[str]:
    """The continuation to score for each label: the record's training response with the label swapped in.

    Why the response text and not the option's own words: a fine-tuned adapter learnt to answer
    "the correct answer is answer3", so the likelihood of exactly that string is what its training
    changed; scoring the option text would measure the base model's prior instead. The shared
    prefix "the correct answer is " adds the same log-prob to every candidate, so the decision rests
    on the label tokens alone, conditioned on the format the adapter was taught."""
    output, answer = str(record.get("output") or ""), str(record.get("answer") or "")
    at = output.rfind(answer) if answer else -1
    if at >= 0:
        template = output[:at].replace("{", "{{").replace("}", "}}") + "{label}" + \
            output[at + len(answer):].replace("{", "{{").replace("}", "}}")
    else:
        template = RESPONSE_TEMPLATE
    return [template.format(label=label) for label in labels]


# --------------------------------------------------------------------------- model plumbing

def unwrap(model_or_supernet):
    """The nn.Module to run: a SuperNet's `.model` (its active config), else the model itself."""
    if hasattr(model_or_supernet, "model") and hasattr(model_or_supernet, "activate"):
        return model_or_supernet.model
    return model_or_supernet


@contextlib.contextmanager
def evaluation_mode(model):
    """eval() + inference_mode for the duration; the caller's train/eval mode comes back after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def _prompt_ids(tokenizer, record: dict) -> list[int]:
    from .data import format_prompt

    # With special tokens (BOS), exactly as data.tokenize_example builds the training prompt.
    return tokenizer(format_prompt(record), add_special_tokens=True)["input_ids"]


@dataclass
class Query:
    """Log-probs wanted from one row: of `targets[j]` given the row up to `positions[j]`."""

    row: int
    positions: list[int]
    targets: list[int]


def gather_logprobs(model, rows: list[list[int]], queries: list[Query], pad_id: int) -> list[torch.Tensor]:
    """One right-padded forward pass over `rows`; per query, the log-probs of its target tokens.

    Right padding keeps every row's positions 0..n-1, so no position ids are needed, and pad tokens
    sit after the real ones where causal attention never lets a real token see them. Only the wanted
    positions reach the output layer (`scored_positions`): a 49k-vocabulary projection of every
    position from the batch's earliest answer on was a third of a loss evaluation of smollm2-135m."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    first = min(min(q.positions) for q in queries)
    device = _device(model)
    row_of = torch.tensor([q.row for q in queries for _ in q.positions], device=device)
    column_of = torch.tensor([p - first for q in queries for p in q.positions], device=device)
    with scored_positions(model, row_of, column_of) as gathered:
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=longest - first).logits
    picked = logits[0] if gathered else logits[row_of, column_of]  # [wanted positions, vocabulary]
    targets = torch.tensor([t for q in queries for t in q.targets], device=device)
    logprobs = picked.float().log_softmax(-1).gather(-1, targets[:, None])[:, 0].cpu()
    return list(logprobs.split([len(q.positions) for q in queries]))


@contextlib.contextmanager
def scored_positions(model, rows: torch.Tensor, columns: torch.Tensor):
    """For the duration, the model's output layer is given only the hidden states at (rows[j], columns[j])
    (as one batch row, in that order), so it computes the logits that are scored and no others; yields a
    list that is truthy once it has.

    A forward pre-hook (public torch API) on whatever `get_output_embeddings()` returns, so a LoRA or
    float32 wrapper there still sees its usual input, only fewer positions; what a model does to the
    logits afterwards (softcapping, scaling) is element-wise. A model whose output layer is not called
    on [batch, positions, hidden] (or not through that module) leaves the hook idle: the caller then
    picks the positions from the full logits itself."""
    head = output_head(model)
    gathered: list[bool] = []
    if head is None or rows.numel() == 0:
        yield gathered
        return
    shape = (int(rows.max()) + 1, int(columns.max()) + 1)  # what the hidden states must at least span

    def pick(module, args, kwargs):
        hidden = args[0] if args else None
        if gathered or not torch.is_tensor(hidden) or hidden.dim() != 3 or hidden.shape[0] < shape[0] \
                or hidden.shape[1] < shape[1]:
            return None
        gathered.append(True)
        return (hidden[rows, columns][None], *args[1:]), kwargs

    handle = head.register_forward_pre_hook(pick, with_kwargs=True)
    try:
        yield gathered
    finally:
        handle.remove()


def _batches(order: list[int], batch_size: int):
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _progress(total: int, task: str, enabled: bool):
    return tqdm(total=total, desc=f"evaluate {task}", unit="ex", disable=not enabled, dynamic_ncols=True)


# --------------------------------------------------------------------------- math

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


def _shared_prompt(model, prompts: list[list[int]], longest: int) -> "_PromptCache | None":
    """The KV cache of the prefix all `prompts` share (at most all but each one's last token), or None
    when a sliding-window model could see the padding that sits between it and the rest."""
    window = _sliding_window(model)
    if window is not None and 2 * longest >= window:
        return None
    shared = min(_common_prefix_length(prompts), *(len(p) - 1 for p in prompts))
    return _PromptCache(model, prompts[0][:shared])


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
    return {"accuracy": correct / len(records), "predictions": predictions}


# --------------------------------------------------------------------------- continuation scoring

@dataclass
class Continuations:
    """Score every continuation in `continuations` (token ids each) after the same `context` (token ids).

    Context and continuation are tokenised separately and concatenated (as lm-eval does), so a
    continuation's tokens are exactly those after the context's, whatever the tokenizer would merge
    across the boundary."""

    context: list[int]
    continuations: list[list[int]]


def _common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    shortest = min(sequences, key=len)
    for i, token in enumerate(shortest):
        if any(seq[i] != token for seq in sequences):
            return i
    return len(shortest)


def _candidate_rows(request: Continuations) -> tuple[list[list[int]], list[Query]]:
    """The distinct token rows one request needs, and one query per continuation (`row` into them).

    Continuation k needs the logits at positions len(context)-1 .. len(context)+len(k)-2, i.e. a row
    beginning with context + k[:-1]; a continuation whose row is a prefix of another's (e.g. labels
    that differ only in their last token) shares that row."""
    context = request.context
    rows: list[list[int]] = []
    queries: list[Query | None] = [None] * len(request.continuations)
    for k in sorted(range(len(request.continuations)), key=lambda k: -len(request.continuations[k])):
        tokens = request.continuations[k]
        if not tokens:
            raise ShearsError("a continuation tokenises to nothing: give non-empty candidates")
        needed = context + tokens[:-1]
        row = next((r for r, ids in enumerate(rows) if ids[:len(needed)] == needed), None)
        if row is None:
            rows.append(needed)
            row = len(rows) - 1
        queries[k] = Query(row, list(range(len(context) - 1, len(needed))), list(tokens))
    return rows, queries


def _sliding_window(model) -> int | None:
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    return window if isinstance(window, int) and window > 0 else None


class _PromptCache:
    """The KV cache of the prefix every request of one evaluation shares (the prompt template's header),
    computed once; each batch starts from a copy repeated to its size."""

    def __init__(self, model, prefix: list[int]):
        self.length = len(prefix)
        self.cache = None
        if prefix:
            ids = torch.tensor([prefix], device=_device(model))
            self.cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).cache

    def for_batch(self, size: int):
        if self.cache is None:
            return None
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(size)
        return cache


def _shared_prompt_logprobs(model, requests: list[Continuations], prompt: _PromptCache,
                            pad_id: int) -> list[list[torch.Tensor]]:
    """Log-probs of every continuation of a batch of requests, each context run once.

    Three stages of one causal sequence per candidate, each stage extending the KV cache of the one
    before: the shared prefix (`prompt`, P tokens, cached once per evaluation); stage 1, the rest of
    each request's context and the part its candidates share, left-padded so that every row ends at
    the same column and stage 2 follows on directly; stage 2, each distinct candidate remainder,
    right-padded. Positions are passed explicitly, so left padding shifts no real token's position."""
    device, P = _device(model), prompt.length
    plans = []  # per request: (stage-1 tokens, rows, queries)
    for request in requests:
        rows, queries = _candidate_rows(request)
        shared = _common_prefix_length(rows)
        plans.append((rows[0][P:shared], rows, queries))
    # --- stage 1
    L1 = max(len(s1) for s1, _, _ in plans)
    ids1 = torch.full((len(plans), L1), pad_id, dtype=torch.long)
    mask1 = torch.zeros((len(plans), L1), dtype=torch.long)
    for b, (s1, _, _) in enumerate(plans):
        ids1[b, L1 - len(s1):] = torch.tensor(s1)
        mask1[b, L1 - len(s1):] = 1
    positions1 = (P + mask1.cumsum(-1) - 1).clamp(min=P)  # real tokens: P, P+1, ...; pads: anything
    first = min(L1 - len(s1) + (q.positions[0] - P) for s1, _, queries in plans for q in queries)  # < L1 always
    full_mask1 = torch.cat([torch.ones((len(plans), P), dtype=torch.long), mask1], dim=1)
    out1 = model(input_ids=ids1.to(device), attention_mask=full_mask1.to(device),
                 position_ids=positions1.to(device), cache=prompt.for_batch(len(plans)),
                 use_cache=True, logits_to_keep=L1 - first)
    logits1 = out1.logits
    # --- stage 2: what each distinct row holds beyond its request's stage-1 tokens
    stage2 = []  # (request b, row r, remainder)
    for b, (s1, rows, _) in enumerate(plans):
        stage2 += [(b, r, row[P + len(s1):]) for r, row in enumerate(rows) if len(row) > P + len(s1)]
    where2 = {(b, r): j for j, (b, r, _) in enumerate(stage2)}
    if stage2:
        L2 = max(len(rest) for _, _, rest in stage2)
        ids2 = torch.full((len(stage2), L2), pad_id, dtype=torch.long)
        mask2 = torch.zeros((len(stage2), L2), dtype=torch.long)
        for j, (_, _, rest) in enumerate(stage2):
            ids2[j, :len(rest)] = torch.tensor(rest)
            mask2[j, :len(rest)] = 1
        owner = torch.tensor([b for b, _, _ in stage2])
        starts = torch.tensor([P + len(plans[b][0]) for b, _, _ in stage2])
        cache = out1.cache
        cache.batch_select_indices(owner.to(device))
        full_mask2 = torch.cat([torch.ones((len(stage2), P), dtype=torch.long), mask1[owner], mask2], dim=1)
        logits2 = model(input_ids=ids2.to(device), attention_mask=full_mask2.to(device),
                        position_ids=(starts[:, None] + torch.arange(L2)).to(device),
                        cache=cache, use_cache=True).logits
    results = []
    for b, (s1, _, queries) in enumerate(plans):
        scored = []
        for q in queries:
            picked = []
            for p in q.positions:  # positions rise: stage-1 ones first, then the row's stage-2 ones
                if p < P + len(s1):
                    picked.append(logits1[b, L1 - len(s1) + (p - P) - first])
                else:
                    picked.append(logits2[where2[(b, q.row)], p - P - len(s1)])
            logprobs = torch.stack(picked).float().log_softmax(-1)
            scored.append(logprobs.gather(-1, torch.tensor(q.targets, device=device)[:, None])[:, 0].cpu())
        results.append(scored)
    return results


def _plain_logprobs(model, requests: list[Continuations], pad_id: int) -> list[list[torch.Tensor]]:
    """The same log-probs from one right-padded forward over every request's full rows (no cache)."""
    rows, queries, counts = [], [], []
    for request in requests:
        own_rows, own_queries = _candidate_rows(request)
        queries += [Query(len(rows) + q.row, q.positions, q.targets) for q in own_queries]
        rows += own_rows
        counts.append(len(own_queries))
    logprobs = iter(gather_logprobs(model, rows, queries, pad_id))
    return [[next(logprobs) for _ in range(count)] for count in counts]


def iter_continuation_logprobs(model, requests: Sequence[Continuations], pad_id: int, batch_size: int = 16,
                               share_prompt: bool = True):
    """Yield (index, [log-probs of each continuation's tokens]) for every request, a batch at a time.

    Requests go longest first (similar lengths share a batch: little padding; memory runs out early
    if at all), so indices arrive out of order. With `share_prompt` (the default) every context is
    run once however many continuations it has, and the prefix common to all requests (the prompt
    template) once per call: see `_shared_prompt_logprobs`. `share_prompt=False` is the plain
    computation (one full row per distinct candidate), used when a sliding-window model could see
    the padding the cached layout leaves between stages."""
    requests = list(requests)
    if not requests:
        return
    with torch.inference_mode():
        yield from _iter_continuation_logprobs(model, requests, pad_id, batch_size, share_prompt)


def _iter_continuation_logprobs(model, requests, pad_id, batch_size, share_prompt):
    order = sorted(range(len(requests)),
                   key=lambda i: -(len(requests[i].context) + max(map(len, requests[i].continuations))))
    longest = max(len(r.context) + max(map(len, r.continuations)) for r in requests)
    # the logits at each context's last token are always wanted, so the shared prefix stops before it
    prompt = _shared_prompt(model, [r.context for r in requests], longest) if share_prompt else None
    for batch in _batches(order, batch_size):
        chunk = [requests[i] for i in batch]
        if prompt is not None:
            scored = _shared_prompt_logprobs(model, chunk, prompt, pad_id)
        else:
            scored = _plain_logprobs(model, chunk, pad_id)
        yield from zip(batch, scored)


def score_continuations(model, requests: Sequence[Continuations], pad_id: int, batch_size: int = 16,
                        share_prompt: bool = True) -> list[list[torch.Tensor]]:
    """Per request, per continuation: the log-probs of its tokens given the context (in request order)."""
    results: list = [None] * len(requests)
    for i, scored in iter_continuation_logprobs(model, requests, pad_id, batch_size, share_prompt):
        results[i] = scored
    return results


# --------------------------------------------------------------------------- choice

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
            "predictions": predictions}


# --------------------------------------------------------------------------- loss

def _evaluate_loss(model, tokenizer, records, batch_size, cutoff_len, progress) -> dict:
    """Token-weighted mean cross-entropy of the response tokens (EOS included), as training sees them."""
    from .data import IGNORE_INDEX, tokenize_example

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
    return {"accuracy": None, "loss": loss, "perplexity": math.exp(loss), "tokens": tokens,
            "predictions": predictions}


# --------------------------------------------------------------------------- public entry point

def evaluate(model_or_supernet, tokenizer, records: Sequence[dict], task: str, limit: int | None = None,
             batch_size: int = 16, max_new_tokens: int = 256, choices: Sequence[str] | None = None,
             cutoff_len: int = 1024, progress: bool = True, bf16: bool = False) -> dict:
    """Score the model (or the SuperNet's active subnet) on `records` (the first `limit`).

    `bf16` runs the forward passes under bf16 autocast (weights stay as they are; the logits and
    their log-softmax are computed in float32, so close options do not tie); resolve a recipe's `auto` with `shears.precision.resolve_bf16` first.

    Returns {"task", "accuracy", "n", "predictions", ...}: choice adds "accuracy_norm"; loss gives
    "loss", "perplexity", "tokens" and accuracy None. Predictions are in the records' order."""
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


# --------------------------------------------------------------------------- CLI

RECIPE_SECTIONS = ("evaluation",)  # what key=value arguments may override of a --run's recipe


def load_for_run(run: str | os.PathLike, subnet: str, dtype: str | None = None, overrides: list[str] | None = None):
    """(SuperNet with `subnet` active, tokenizer, recipe) of a run directory; `overrides`: key=value
    arguments over its recipe's evaluation: section."""
    from .run import load_run, load_run_recipe, subnet_config

    loaded = load_run(run, dtype=dtype, recipe=load_run_recipe(run, overrides, RECIPE_SECTIONS))
    loaded.supernet.activate(subnet_config(loaded.supernet, subnet))
    return loaded.supernet, loaded.tokenizer, loaded.recipe


def check_adapter_base(adapter: Path, model, model_name: str) -> None:
    """Refuse, in one line, a damaged adapter or a shears export made for a base other than `model`."""
    from .models import load_safetensors, model_fingerprint
    from .rundir import SHEARS_RECORD

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
    from .models import load_model, load_tokenizer

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
    from .data import ANSWER_FORMATS, load_records, to_answer_format

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


if __name__ == "__main__":
    main(sys.argv[1:])
