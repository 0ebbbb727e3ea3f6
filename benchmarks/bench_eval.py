"""Evaluation throughput on smollm2-135m: the batched path against the unbatched one, in one process.

`math` (greedy generation, left-padded batches, KV cache) runs on the first --math-limit records of
math/gsm8k_test.json and `choice` (log-likelihood scoring, candidates sharing rows) on the first
--choice-limit of commonsense/arc-easy_test.json; both print examples/second and the zero-shot
accuracy. The peer is the same code at batch_size=1, timed on the first --peer-limit records against
the batched path on those same records, so the speed-up is a ratio measured on identical work.

    python benchmarks/bench_eval.py [--data-dir ../shared/data/llm-adapters] [--math-limit 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a script run from a checkout: import this shears, installed or not

from shears.data import load_records  # noqa: E402
from shears.evaluate import evaluate  # noqa: E402
from shears.models import load_model, load_tokenizer  # noqa: E402


def timed(model, tokenizer, records, task, batch_size, max_new_tokens):
    start = time.perf_counter()
    result = evaluate(model, tokenizer, records, task, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return result, len(records) / (time.perf_counter() - start)


def same_predictions(a: dict, b: dict) -> int:
    # choice log-probs differ in the last float bits between batch shapes; the picks must not
    fields = ("completion", "prediction") if a["task"] == "math" else ("prediction", "prediction_norm")
    return sum(all(x[f] == y[f] for f in fields) for x, y in zip(a["predictions"], b["predictions"]))


def bench(model, tokenizer, path: Path, task: str, limit: int, peer_limit: int, batch_size: int,
          max_new_tokens: int) -> None:
    records = load_records(path)[:limit]
    result, speed = timed(model, tokenizer, records, task, batch_size, max_new_tokens)
    accuracy = f"accuracy {result['accuracy']:.4f}"
    if task == "choice":
        accuracy += f"  accuracy_norm {result['accuracy_norm']:.4f}"
    budget = f"  max_new_tokens={max_new_tokens}" if task == "math" else ""
    print(f"{task:6s} {path.name:22s} n={len(records):<4d} batch_size={batch_size}{budget}: "
          f"{speed:7.2f} examples/s  {accuracy}")

    subset = records[:peer_limit]
    batched, batched_speed = timed(model, tokenizer, subset, task, batch_size, max_new_tokens)
    single, single_speed = timed(model, tokenizer, subset, task, 1, max_new_tokens)
    print(f"       first {len(subset)}: batch_size={batch_size} {batched_speed:7.2f} examples/s, "
          f"batch_size=1 (peer) {single_speed:7.2f} examples/s -> speed-up x{batched_speed / single_speed:.2f}; "
          f"same predictions {same_predictions(batched, single)}/{len(subset)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "llm-adapters")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--math-limit", type=int, default=64)
    p.add_argument("--choice-limit", type=int, default=256)
    p.add_argument("--peer-limit", type=int, default=16, help="records timed at batch_size=1 (and batched)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, help="torch CPU threads (default torch's); 1 wins on a busy shared CPU")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    params = sum(t.numel() for t in model.parameters()) / 1e6
    print(f"{args.model} ({params:.1f}M params, float32, {torch.get_num_threads()} CPU threads, "
          f"torch {torch.__version__}) on {args.data_dir}")
    bench(model, tokenizer, args.data_dir / "math" / "gsm8k_test.json", "math", args.math_limit,
          args.peer_limit, args.batch_size, args.max_new_tokens)
    bench(model, tokenizer, args.data_dir / "commonsense" / "arc-easy_test.json", "choice", args.choice_limit,
          args.peer_limit, args.batch_size, args.max_new_tokens)


if __name__ == "__main__":
    main()
