"""What distillation costs per training step, whether caching the teacher would pay, and its memory.

On smollm2-135m, 50% pruned (magnitude: any 50% pattern times the same), SparsePEFT adapters of the
`llama` space, real NLSTrainer training steps (forward, backward, AdamW step) on the same batches of
builtin:arithmetic (response tokens labelled, as training labels them), for the methods of the
compression experiment, each timed against plain NLS in the same process:

    nls                 uniform sampling, CE                       (the reference: ratio 1)
    kd_logit            + KL to the dense teacher, T=2, labelled positions
    kd_squarehead       + SquareHead (per-block normalised MSE to the dense teacher)
    kd_both             + both
    sandwich            max + min + random subnet per step, CE
    sandwich_inplace    the same, min and random learning from the max's soft labels
    sandwich_kd_logit   sandwich + teacher logit KL (one teacher forward serves the three subnets)

Every arm trains the same super-network (only the loss and the sampling differ), so their memory is
shared and the arm order rotates per repetition; ratios are medians of per-repetition paired ratios.

Cache or recompute: the teacher's forward on a micro-batch is timed against reading the same targets
back from a safetensors file (what a once-per-example cache would do), and the cache's size per
example is printed with the break-even: a cache pays only for records seen more than once.

Memory: the teacher's own tensors (the dense copies of the pruned matrices; everything else is the
student's) against the model's size, and the process's peak RSS before and after building it (the
build loads the dense model once, briefly).

    python benchmarks/bench_distill.py [--reps 6] [--batch-size 4] [--cutoff 256]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

ARMS = ("nls", "kd_logit", "kd_squarehead", "kd_both", "sandwich", "sandwich_inplace", "sandwich_kd_logit")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--space", default="llama")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--reps", type=int, default=6, help="timed steps per arm (arm order rotates)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--records", type=int, default=6696,
                        help="training records of the run, for the cache break-even (the compression experiment: ARC-E + OBQA "
                             "train, 7208, less 512 for validation)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of the run, for the break-even")
    parser.add_argument("--examples-per-step", type=int, default=16)
    return parser.parse_args(argv)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def settings(arm: str):
    """(strategy, DistillConfig, inplace) of an arm."""
    from shears.recipe import DistillConfig

    kd = {"kd_logit": DistillConfig(logit_weight=1.0, temperature=2.0),
          "kd_squarehead": DistillConfig(squarehead_weight=1.0),
          "kd_both": DistillConfig(logit_weight=1.0, temperature=2.0, squarehead_weight=1.0),
          "sandwich_kd_logit": DistillConfig(logit_weight=1.0, temperature=2.0)}.get(arm, DistillConfig())
    return ("sandwich" if arm.startswith("sandwich") else "uniform"), kd, arm == "sandwich_inplace"


def main(argv=None) -> None:
    from transformers import TrainingArguments

    from shears.data import Collator, TokenizedDataset, load_records
    from shears.distill import DenseTeacher, Distillation
    from shears.elastic import SuperNet
    from shears.models import load_model, load_tokenizer
    from shears.search_space import load_search_space
    from shears.sparsity import wanda_prune
    from shears.train_supernet import NLSTrainer, SubnetSampler, TrainingOrder

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = [a for a in args.arms.split(",") if a]
    tokenizer = load_tokenizer(args.model)
    base = load_model(args.model)
    model_mib = sum(p.numel() * p.element_size() for p in base.parameters()) / 2**20
    wanda_prune(base, sparsity=0.5, method="magnitude")
    net = SuperNet.from_base(base, load_search_space(args.space), sparse_adapter=True)
    rss_student = peak_rss_mib()
    start = time.perf_counter()
    teacher = DenseTeacher.build(net, args.model, tokenizer)
    build_s = time.perf_counter() - start
    rss_teacher = peak_rss_mib()

    records = load_records("builtin:arithmetic?n=400&seed=0")
    data = TokenizedDataset(tokenizer, records, args.cutoff)
    collate = Collator(tokenizer)
    batches = [collate([data[i * args.batch_size + j] for j in range(args.batch_size)])
               for i in range(args.reps + 1)]
    trainer = NLSTrainer(model=net.model, args=TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[],
                                                                 use_cpu=True, disable_tqdm=True),
                         train_dataset=data, data_collator=collate, supernet=net,
                         sampler=SubnetSampler(net.space, "uniform", seed=0), order=TrainingOrder(len(data), 0, 4))
    trainer.current_gradient_accumulation_steps = 1
    optimizer = torch.optim.AdamW([p for p in net.model.parameters() if p.requires_grad], lr=1e-5)
    net.model.train()

    def step(arm: str, batch: dict, index: int) -> float:
        strategy, kd, inplace = settings(arm)
        trainer.sampler = SubnetSampler(net.space, strategy, seed=0)
        trainer.distillation = Distillation(kd, teacher if kd.enabled else None, inplace) \
            if kd.enabled or inplace else None
        trainer.state.global_step = index  # the same subnets for every arm at a repetition
        start = time.perf_counter()
        trainer.training_step(net.model, dict(batch))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for arm in arms:  # warm-up: AdamW state, allocator
        step(arm, batches[0], 0)
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for rep in range(args.reps):
        order = arms[rep % len(arms):] + arms[:rep % len(arms)]
        for arm in order:
            times[arm].append(step(arm, batches[rep + 1], rep + 1))
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{a} {times[a][-1] * 1e3:.0f} ms" for a in arms),
              file=sys.stderr, flush=True)

    print(f"\nmodel {args.model}, 50% magnitude-pruned, SparsePEFT, space {args.space}; batch {args.batch_size} x "
          f"<= {args.cutoff} tokens of builtin:arithmetic; {args.reps} interleaved repetitions, {args.threads} "
          "thread(s); shared 2-core CPU: read the ratios")
    print(f"{'arm':<20} {'median ms':>10} {'ratio to nls':>13} {'min..max ratio':>16}")
    for arm in arms:
        ratios = [t / n for t, n in zip(times[arm], times["nls"])] if "nls" in times else [float("nan")]
        print(f"{arm:<20} {statistics.median(times[arm]) * 1e3:>10.0f} {statistics.median(ratios):>13.2f} "
              f"{min(ratios):>7.2f}..{max(ratios):<7.2f}")

    # ---- cache or recompute
    from safetensors.torch import load_file, save_file

    distillation = Distillation(settings("kd_both")[1], teacher)
    forward_s, load_s, sizes = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        for i, batch in enumerate(batches[1:]):
            rows, columns = (batch["labels"][:, 1:] != -100).nonzero(as_tuple=True)
            start = time.perf_counter()
            distillation.prepare(batch, rows, columns)
            forward_s.append(time.perf_counter() - start)
            t = distillation.targets
            cached = {"logits": t.logits.to(torch.bfloat16),
                      **{f"block{b}": h[t.tokens].to(torch.bfloat16) for b, h in enumerate(t.blocks)}}
            path = Path(folder) / f"{i}.safetensors"
            save_file({k: v.contiguous() for k, v in cached.items()}, str(path))
            sizes.append(path.stat().st_size / args.batch_size)
            descriptor = os.open(path, os.O_RDONLY)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)  # read it from disk, not the page cache
            os.close(descriptor)
            start = time.perf_counter()
            load_file(str(path))
            load_s.append(time.perf_counter() - start)
    per_example = statistics.median(sizes)
    seen = args.steps * args.examples_per_step / args.records
    print(f"\nteacher forward (logits at labelled positions + every block's output), no_grad: "
          f"{statistics.median(forward_s) * 1e3:.0f} ms per batch of {args.batch_size}; reading the same targets "
          f"from a bf16 safetensors cache: {statistics.median(load_s) * 1e3:.0f} ms; cache size "
          f"{per_example / 2**20:.1f} MiB per example ({per_example * args.records / 2**30:.1f} GiB for "
          f"{args.records} records)")
    print(f"a run of {args.steps} x {args.examples_per_step} examples over {args.records} records sees each record "
          f"{seen:.2f} times: a cache computes the teacher once per record anyway, so it saves forwards only on "
          f"repeats ({max(seen - 1, 0):.2f} per record) -> " + ("recompute in the step" if seen <= 1 or
                                                                per_example * args.records > 2**33 else "cache"))
    print(f"\nmemory: model {model_mib:.0f} MiB (fp32); the teacher holds {teacher.held_bytes / 2**20:.0f} MiB of its "
          f"own ({len(teacher.held)} dense copies of pruned matrices) and shares {teacher.shared} tensors "
          f"(embeddings/lm_head, norms); peak RSS {rss_student:.0f} MiB with the student, {rss_teacher:.0f} MiB after "
          f"building the teacher ({build_s:.1f} s; the dense model is loaded once during the build)")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
