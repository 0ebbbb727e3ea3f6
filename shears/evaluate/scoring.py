"""Scoring: the log-probs of token continuations, computed once per shared prefix.

Every candidate continuation is scored after its context; each context is run once however many
candidates it has (KV cache), and the prompt template's header once per evaluation:
`score_continuations` scores any (context, [continuations]) this way.

The output layer (a 49k-262k vocabulary: the largest matmul of a small model) is given only the
positions whose logits are read (`scored_positions`, which training's loss uses too).

Also the plumbing every task shares: the module to run, eval mode, padding id, batches, progress.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import ShearsError
from ..precision import output_head
from ..progress import progress as progress_bar

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
    from ..data import format_prompt

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
    return progress_bar(total=total, desc=f"evaluate {task}", unit="ex", disable=not enabled)


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


def _shared_prompt(model, prompts: list[list[int]], longest: int) -> "_PromptCache | None":
    """The KV cache of the prefix all `prompts` share (at most all but each one's last token), or None
    when a sliding-window model could see the padding that sits between it and the rest."""
    window = _sliding_window(model)
    if window is not None and 2 * longest >= window:
        return None
    shared = min(_common_prefix_length(prompts), *(len(p) - 1 for p in prompts))
    return _PromptCache(model, prompts[0][:shared])


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
