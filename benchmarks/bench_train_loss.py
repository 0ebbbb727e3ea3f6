"""Cost of an NLS training step when only the response is labelled: the output layer on every position
(transformers' causal-LM loss, as NLSTrainer computed it before) against the labelled positions only
(`NLSTrainer.compute_loss`), on smollm2-135m, in one process.

Both arms train their own copy of one super-network (the same initial adapters, the same sampled
subnet at each step, the same batches, AdamW) under bf16 autocast as training.bf16=auto runs on this
CPU; a step is forward, loss, backward, optimizer step. The arms alternate within every repetition,
the first one rotating, and the ratio is the median of the per-repetition paired ratios. The two
arms compute the same loss: printed for the first step, taken from identical weights.

Data: LLM-Adapters ARC-Easy + OBQA training questions in the content answer format (the response is
the option's text: a few tokens after a prompt of ~45), batch 8, cutoff 128, as bench_width and
bench_search train; `--records builtin:arithmetic` for the built-in task when the data is absent.

    python benchmarks/bench_train_loss.py [--data-dir ../shared/data/llm-adapters] [--reps 12] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a script run from a checkout: import this shears, installed or not

from transformers import TrainingArguments  # noqa: E402

from shears.data import IGNORE_INDEX, Collator, TokenizedDataset, load_records, to_answer_format  # noqa: E402
from shears.elastic import SuperNet  # noqa: E402
from shears.models import load_model, load_tokenizer  # noqa: E402
from shears.precision import autocast  # noqa: E402
from shears.train_supernet import NLSTrainer, SubnetSampler, TrainingOrder  # noqa: E402


def records_for(args) -> list[dict]:
    if args.records == "commonsense":
        files = [args.data_dir / "commonsense" / f for f in ("arc-easy_train.json", "openbookqa_train.json")]
        if not all(f.is_file() for f in files):
            raise SystemExit(f"no LLM-Adapters data under {args.data_dir}: pass --data-dir, or --records "
                             "builtin:arithmetic")
        return to_answer_format(load_records(files), "content")
    return load_records(args.records)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--space", default="llama")
    p.add_argument("--records", default="commonsense", help="commonsense (LLM-Adapters, content format) or a source")
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "llm-adapters")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cutoff-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=12)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(args.model)
    data = TokenizedDataset(tokenizer, records_for(args), args.cutoff_len)
    data.drop_unlabelled()
    rng = np.random.default_rng(0)
    collate = Collator(tokenizer)
    batches = [collate([data[int(i)] for i in rng.choice(len(data), args.batch_size, replace=False)])
               for _ in range(args.reps + 1)]
    base = load_model(args.model)
    nets = {}
    for name in ("full", "labelled"):
        torch.manual_seed(0)  # the same initial adapters
        nets[name] = SuperNet.from_base(copy.deepcopy(base), args.space)
    del base
    optimizers = {name: torch.optim.AdamW([q for q in net.model.parameters() if q.requires_grad], lr=1e-3)
                  for name, net in nets.items()}
    subnets = [nets["full"].sample(rng) for _ in batches]
    with tempfile.TemporaryDirectory() as tmp:
        net = nets["labelled"]
        trainer = NLSTrainer(model=net.model, args=TrainingArguments(output_dir=tmp, report_to=[], use_cpu=True),
                             train_dataset=data, data_collator=collate, supernet=net,
                             sampler=SubnetSampler(net.space, "uniform"), order=TrainingOrder(len(data), 0, 8))

    def loss_of(name: str, batch: dict) -> torch.Tensor:
        if name == "full":
            return nets[name].model(**batch).loss
        return trainer.compute_loss(nets[name].model, dict(batch))

    def step(name: str, rep: int) -> float:
        net, batch = nets[name], batches[rep]
        net.model.train()
        net.activate(subnets[rep])
        torch.manual_seed(rep)  # the same LoRA dropout masks in both arms
        with autocast(True, "cpu"):
            loss = loss_of(name, batch)
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return float(loss.detach())

    times = {name: [] for name in nets}
    losses = {name: [] for name in nets}
    first = {name: step(name, 0) for name in nets}  # warm-up (AdamW state, allocator), from identical weights
    order = list(nets)
    for rep in range(1, len(batches)):
        for name in order[rep % 2:] + order[:rep % 2]:
            start = time.perf_counter()
            losses[name].append(step(name, rep))
            times[name].append(time.perf_counter() - start)

    tokens = [int(b["attention_mask"].sum()) for b in batches[1:]]
    labelled = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches[1:]]
    padded = [b["input_ids"].numel() for b in batches[1:]]
    print(f"{args.model}, space {args.space}, {args.records} records, batch {args.batch_size}, cutoff "
          f"{args.cutoff_len}, bf16 autocast, {torch.get_num_threads()} torch threads, {args.reps} steps per arm")
    print(f"per batch: {statistics.fmean(padded):.0f} positions, {statistics.fmean(tokens):.0f} real tokens, "
          f"{statistics.fmean(labelled):.0f} labelled (the positions the output layer now sees)")
    for name, label in (("full", "output layer on every position"), ("labelled", "labelled positions only")):
        print(f"  {name:<9} ({label}): median step {statistics.median(times[name]) * 1e3:.0f} ms")
    ratio = statistics.median(a / b for a, b in zip(times["full"], times["labelled"]))
    gap = max(abs(a - b) / a for a, b in zip(losses["full"], losses["labelled"]))
    print(f"speed-up (paired median of full / labelled): x{ratio:.2f}")
    print(f"training loss: first step (identical weights) {first['full']:.6f} vs {first['labelled']:.6f}; "
          f"later steps differ by up to {gap:.1e} relative (AdamW turns bf16-level gradient differences into "
          f"lr-sized updates)")


if __name__ == "__main__":
    main()
