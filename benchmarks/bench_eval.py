"""Evaluation throughput on smollm2-135m: shears' evaluation against the method it replaced, in one process.

Peers ("before"), run at batch size 1 in float32 as evaluation ran until issue 11:
  choice  one full row per question (prompt + candidate; candidates differing only in their last token
          share it), no cache (`score_continuations(share_prompt=False)`);
  math    `model.generate` greedy with a KV cache and stop_strings=["###"], one prompt at a time.
  loss    (the search objective; same batches and precision as the arm) the float32 output layer applied to
          every position from the batch's earliest response token on (`logits_to_keep`), on that strided
          slice, as until issue 13's second pass; the arm gives it only the response positions
          (`shears.evaluate.scored_positions`), contiguous.
          Scored on a super-network (Shears space, frozen base, non-zero adapters) as a search scores it,
          on ARC-Easy + OBQA training records in the content answer format (--loss-limit).
Arms ("after"): `shears.evaluate.evaluate` at --batch-size, float32 and bf16 autocast: each prompt run once
with the template header cached once per evaluation, length-sorted batches, and math generation that
drops finished rows. The arms are interleaved per chunk of records so that load from other processes
hits them alike; the ratio is time(peer) / time(arm) on identical records. Predictions are compared
on every record: differing choice picks are listed with their log-prob margins (peer's and arm's),
differing math predictions with both completions. Padded-token share of each layout is printed too.

    python benchmarks/bench_eval.py [--data-dir ../shared/data/llm-adapters] [--choice-limit 64] [--math-limit 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a script run from a checkout: import this shears, installed or not

from shears.data import IGNORE_INDEX, format_prompt, load_records, to_answer_format, tokenize_example  # noqa: E402
from shears.elastic import SuperNet  # noqa: E402
from shears.evaluate import (  # noqa: E402
    STOP_STRING,
    _choice_request,
    _pad_id,
    evaluate,
    evaluation_mode,
    score_continuations,
    score_math,
    truncate_completion,
)
from shears.models import load_model, load_tokenizer  # noqa: E402
from shears.precision import autocast, bf16_weights, native_bf16  # noqa: E402


# --------------------------------------------------------------------------- the peers (before issue 11)

def choice_peer(model, tokenizer, records) -> list[list[float]]:
    requests = [_choice_request(tokenizer, r, None)[2] for r in records]
    with torch.inference_mode():
        scored = score_continuations(model, requests, _pad_id(tokenizer), batch_size=1, share_prompt=False)
    return [[float(lp.sum()) for lp in per] for per in scored]


def math_peer(model, tokenizer, records, max_new_tokens) -> list[str]:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              pad_token_id=_pad_id(tokenizer), eos_token_id=tokenizer.eos_token_id,
                              stop_strings=[STOP_STRING])
    completions = []
    with torch.inference_mode():
        for record in records:
            ids = torch.tensor([tokenizer(format_prompt(record))["input_ids"]])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                 tokenizer=tokenizer)
            completions.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return completions


class StridedFloat32Head(torch.nn.Module):
    """shears.precision's float32 output head as it was before issue 13's second pass: it multiplied the
    strided `logits_to_keep` slice as it came (through bmm, with a weight that needs no grad)."""

    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return torch.nn.functional.linear(hidden.float(), self.head.weight.float())


def loss_peer(net, tokenizer, records, cutoff_len: int, batch_size: int, bf16: bool) -> float:
    """Token-weighted response loss with every position from the batch's earliest response token on
    projected to the vocabulary by the earlier float32 head (the arm's batches, order and precision)."""
    model = net.model
    examples = [tokenize_example(tokenizer, r, cutoff_len) for r in records]
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    total, tokens = 0.0, 0
    head = model.get_output_embeddings()
    model.set_output_embeddings(StridedFloat32Head(head))
    with evaluation_mode(model), autocast(bf16, "cpu"), bf16_weights(model, enabled=bf16):
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start:start + batch_size]]
            longest = max(len(e["input_ids"]) for e in batch)
            ids = torch.full((len(batch), longest), _pad_id(tokenizer))
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            labels = torch.full((len(batch), longest), IGNORE_INDEX)
            for b, e in enumerate(batch):
                ids[b, :len(e["input_ids"])], mask[b, :len(e["input_ids"])] = torch.tensor(e["input_ids"]), 1
                labels[b, :len(e["labels"])] = torch.tensor(e["labels"])
            wanted = labels[:, 1:] != IGNORE_INDEX
            first = int(wanted.any(0).nonzero()[0])
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=longest - first).logits
            keep = wanted[:, first:]  # as before: only the wanted rows of the logits are normalised
            logp = logits[:, :longest - 1 - first][keep].float().log_softmax(-1)
            picked = logp.gather(-1, labels[:, first + 1:][keep][:, None])[:, 0]
            total -= float(picked.sum())
            tokens += picked.numel()
    model.set_output_embeddings(head)
    return total / tokens


def bench_loss(model, tokenizer, data_dir: Path, limit: int, chunk: int, batch_size: int, arms: list[bool]) -> None:
    records = to_answer_format(load_records([data_dir / "commonsense" / "arc-easy_train.json",
                                             data_dir / "commonsense" / "openbookqa_train.json"]), "content")
    records = records[::max(1, len(records) // limit)][:limit]  # both files, not only ARC-Easy's first
    for p in model.parameters():
        p.requires_grad_(False)
    net = SuperNet.from_base(model, "llama")
    generator = torch.Generator().manual_seed(0)
    for name, p in net.model.named_parameters():
        if "lora_B" in name:  # a trained adapter is non-zero: B starts at 0
            p.data = torch.randn(p.shape, generator=generator) * 0.02
    times = {(who, bf16): 0.0 for who in ("peer", "arm") for bf16 in arms}
    sums = {key: [] for key in times}
    for start in range(0, len(records), chunk):
        part = records[start:start + chunk]
        for bf16 in arms:
            loss, t = timed(lambda: loss_peer(net, tokenizer, part, 128, batch_size, bf16))
            sums[("peer", bf16)].append(loss)
            times[("peer", bf16)] += t
            res, t = timed(lambda: evaluate(net, tokenizer, part, "loss", batch_size=batch_size, cutoff_len=128,
                                            bf16=bf16, progress=False))
            sums[("arm", bf16)].append(res["loss"])
            times[("arm", bf16)] += t
    n = len(records)
    net.unload()
    print(f"loss (content format, ARC-Easy + OBQA train, cutoff 128) n={n}, super-network at its maximal subnet, "
          f"batch {batch_size}, chunks of {chunk}:")
    for bf16 in arms:
        peer, arm = times[("peer", bf16)], times[("arm", bf16)]
        gap = max(abs(a - b) for a, b in zip(sums[("peer", bf16)], sums[("arm", bf16)]))
        print(f"  {'bf16' if bf16 else 'fp32'}: peer (output layer from the earliest response position, strided) "
              f"{n / peer:.2f} ex/s, arm (response positions only) {n / arm:.2f} ex/s  speed-up x{peer / arm:.2f}  "
              f"max |loss difference| per chunk {gap:.1e}")


# --------------------------------------------------------------------------- padding accounting

def padded_share(lengths: list[int], batch_size: int, sort: bool) -> float:
    """Share of pad tokens when `lengths` are batched in order (or longest first) and padded to the longest."""
    order = sorted(lengths, reverse=True) if sort else list(lengths)
    total = sum(max(order[i:i + batch_size]) * len(order[i:i + batch_size]) for i in range(0, len(order), batch_size))
    return 1 - sum(lengths) / total


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_choice(model, tokenizer, path: Path, limit: int, chunk: int, batch_size: int, arms: list[bool]) -> None:
    records = load_records(path)[:limit]
    times = {"peer": 0.0, **{bf16: 0.0 for bf16 in arms}}
    peer_lp, arm_results = [], {bf16: [] for bf16 in arms}
    for start in range(0, len(records), chunk):
        part = records[start:start + chunk]
        lp, t = timed(lambda: choice_peer(model, tokenizer, part))
        peer_lp += lp
        times["peer"] += t
        for bf16 in arms:
            res, t = timed(lambda: evaluate(model, tokenizer, part, "choice", batch_size=batch_size, bf16=bf16,
                                            progress=False))
            arm_results[bf16] += res["predictions"]
            times[bf16] += t
    n = len(records)
    print(f"choice {path.name} n={n}: peer (batch 1, fp32, full rows) {n / times['peer']:.2f} ex/s")
    for bf16 in arms:
        preds = arm_results[bf16]
        differ = [i for i, p in enumerate(preds) if p["choices"][max(range(len(peer_lp[i])), key=peer_lp[i].__getitem__)]
                  != p["prediction"]]
        acc = sum(p["correct"] for p in preds) / n
        print(f"  batch {batch_size} {'bf16' if bf16 else 'fp32'}: {n / times[bf16]:.2f} ex/s  "
              f"speed-up x{times['peer'] / times[bf16]:.2f}  accuracy {acc:.4f}  "
              f"same prediction {n - len(differ)}/{n}")
        for i in differ:
            top = sorted(peer_lp[i], reverse=True)
            ours = sorted(preds[i]["logprobs"], reverse=True)
            print(f"    record {i}: peer margin {top[0] - top[1]:.4f}, arm margin {ours[0] - ours[1]:.4f}")
    # padding: rows of one question (the old layout) in file order vs length-sorted contexts
    lengths = [len(_choice_request(tokenizer, r, None)[2].context) for r in records]
    print(f"  padded-token share at batch {batch_size}: file order {padded_share(lengths, batch_size, False):.1%}, "
          f"length-sorted {padded_share(lengths, batch_size, True):.1%}")


def bench_math(model, tokenizer, path: Path, limit: int, chunk: int, batch_size: int, max_new_tokens: int,
               arms: list[bool]) -> None:
    records = load_records(path)[:limit]
    times = {"peer": 0.0, **{bf16: 0.0 for bf16 in arms}}
    peer, arm_results = [], {bf16: [] for bf16 in arms}
    for start in range(0, len(records), chunk):
        part = records[start:start + chunk]
        out, t = timed(lambda: math_peer(model, tokenizer, part, max_new_tokens))
        peer += out
        times["peer"] += t
        for bf16 in arms:
            res, t = timed(lambda: evaluate(model, tokenizer, part, "math", batch_size=batch_size, bf16=bf16,
                                            max_new_tokens=max_new_tokens, progress=False))
            arm_results[bf16] += res["predictions"]
            times[bf16] += t
    n = len(records)
    peer_scored = [score_math(c, r["answer"]) for c, r in zip(peer, records)]
    print(f"math {path.name} n={n} max_new_tokens={max_new_tokens}: peer (batch 1, fp32, HF generate) "
          f"{n / times['peer']:.3f} ex/s  accuracy {sum(ok for _, ok in peer_scored) / n:.4f}")
    for bf16 in arms:
        preds = arm_results[bf16]
        differ = [i for i, p in enumerate(preds) if p["prediction"] != peer_scored[i][0]]
        acc = sum(p["correct"] for p in preds) / n
        print(f"  batch {batch_size} {'bf16' if bf16 else 'fp32'}: {n / times[bf16]:.3f} ex/s  "
              f"speed-up x{times['peer'] / times[bf16]:.2f}  accuracy {acc:.4f}  "
              f"same prediction {n - len(differ)}/{n}")
        for i in differ:
            print(f"    record {i}: peer {peer_scored[i][0]!r} from {truncate_completion(peer[i])[-60:]!r}; "
                  f"arm {preds[i]['prediction']!r} from {truncate_completion(preds[i]['completion'])[-60:]!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "llm-adapters")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--choice-limit", type=int, default=64)
    p.add_argument("--math-limit", type=int, default=32)
    p.add_argument("--loss-limit", type=int, default=128)
    p.add_argument("--chunk", type=int, default=16, help="records per interleaved round of peer and arms")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--tasks", default="arc-easy,boolq,gsm8k,loss", help="comma-separated; loss last (it freezes the model)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    arms = [False] + ([True] if native_bf16("cpu") else [])
    params = sum(t.numel() for t in model.parameters()) / 1e6
    print(f"{args.model} ({params:.1f}M params, float32 weights, {torch.get_num_threads()} CPU threads, "
          f"native bf16: {native_bf16('cpu')}, torch {torch.__version__}) on {args.data_dir}")
    for task in args.tasks.split(","):
        if task == "loss":
            bench_loss(model, tokenizer, args.data_dir, args.loss_limit, args.chunk, args.batch_size, arms)
        elif task == "gsm8k":
            bench_math(model, tokenizer, args.data_dir / "math" / "gsm8k_test.json", args.math_limit, args.chunk,
                       args.batch_size, args.max_new_tokens, arms)
        else:
            bench_choice(model, tokenizer, args.data_dir / "commonsense" / f"{task}_test.json", args.choice_limit,
                         args.chunk, args.batch_size, arms)


if __name__ == "__main__":
    main()
