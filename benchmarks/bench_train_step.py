"""Cost of one NLS training step against stock PEFT LoRA, on smollm2-135m.

One AdamW step (forward, backward, optimizer step, zero_grad) on the same 4 x 128-token batches of
builtin:arithmetic for four arms, each on its own copy of the base model:

    peft        stock `get_peft_model` LoRA at r_max over the search space's target modules
    nls         shears SuperNet, a freshly sampled subnet per step (elastic ranks A[:r], B[:, :r])
    nls-max     shears SuperNet at the maximal subnet (same ranks as `peft`: the pure elastic overhead)
    sparsepeft  SuperNet(sparse_adapter=True) on a 50% magnitude-pruned copy, sampled per step
    nls-bf16    `nls` (same initial adapters, same subnets) under bf16 autocast, as training.bf16=auto
                runs it on a CPU with native bf16; adapters and AdamW state stay fp32

`nls` and `sparsepeft` draw the same sequence of subnets (one seeded generator each), so their
ratio compares identical subnets. Each repetition runs every arm once on the same batch, the arm
order rotating per repetition, so load from other processes on the shared CPU hits every arm alike;
ratios are medians of the per-repetition paired ratios. The mean training loss of nls-bf16 over
the run is compared with nls's (target: within 1%). Then the padded-token share of the demo
recipe's training batches (builtin:arithmetic, cutoff 96, batch 8): random order vs length-grouped.

    python benchmarks/bench_train_step.py [--reps 8] [--lora-dropout 0] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

ARMS = ("peft", "nls", "nls-max", "sparsepeft", "nls-bf16")
# (numerator, denominator, target, label)
TARGETS = (("nls", "peft", 1.00, "NLS (sampled subnets) / PEFT"),
           ("nls-max", "peft", 1.05, "NLS maximal / PEFT"),
           ("sparsepeft", "nls", 1.30, "SparsePEFT / NLS (same subnets)"),
           ("nls-bf16", "nls", 0.60, "NLS bf16 autocast / NLS fp32"))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--space", default="llama", help="search space name or YAML path")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--reps", type=int, default=20, help="timed steps per arm (arm order rotates)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per arm first (optimizer state)")
    parser.add_argument("--lora-dropout", type=float, default=None,
                        help="override the space's lora_dropout (SparsePEFT folds the mask only when it is 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default: on a shared, oversubscribed CPU two spinning OpenMP "
                             "threads run ~4x slower than one (0 = torch's default)")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table per arm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", default="all", help="comma list of arms to run (ratios need both of their arms)")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- the arms

@dataclass
class Arm:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    before_step: Callable[[], None] = lambda: None  # picks the subnet of a sampled arm
    bf16: bool = False
    times_ms: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def train_step(arm: Arm, batch: torch.Tensor) -> float:
    from shears.precision import autocast

    arm.before_step()
    with autocast(arm.bf16, "cpu"):
        loss = arm.model(input_ids=batch, labels=batch).loss
    loss.backward()
    arm.optimizer.step()
    arm.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def make_arm(name: str, model: torch.nn.Module, before_step: Callable[[], None] = lambda: None,
             bf16: bool = False) -> Arm:
    model.train()  # LoRA dropout on, as in training
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Arm(name, model, torch.optim.AdamW(trainable, lr=1e-4), before_step, bf16)


def sampler(net, seed: int) -> Callable[[], None]:
    rng = np.random.default_rng(seed)
    return lambda: net.activate(net.sample(rng))


def build_arms(base: torch.nn.Module, args: argparse.Namespace) -> dict[str, Arm]:
    from dataclasses import replace

    from peft import LoraConfig, get_peft_model

    from shears.elastic import SuperNet
    from shears.search_space import load_search_space
    from shears.sparsity import wanda_prune

    space = load_search_space(args.space)
    if args.lora_dropout is not None:
        space = replace(space, lora_dropout=args.lora_dropout)
    stock = LoraConfig(r=space.r_max, lora_alpha=space.lora_alpha, lora_dropout=space.lora_dropout,
                       target_modules=list(space.target_modules), bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(args.seed)
    nls = SuperNet.from_base(copy.deepcopy(base), space)
    torch.manual_seed(args.seed)  # the same initial adapters as `nls`
    nls_bf16 = SuperNet.from_base(copy.deepcopy(base), space)
    nls_max = SuperNet.from_base(copy.deepcopy(base), space)
    sparse_base = copy.deepcopy(base)
    wanda_prune(sparse_base, sparsity=0.5, method="magnitude")  # any 50% pattern times the same
    sparse = SuperNet.from_base(sparse_base, space, sparse_adapter=True)
    return {"peft": make_arm("peft", get_peft_model(copy.deepcopy(base), stock)),
            "nls": make_arm("nls", nls.model, sampler(nls, args.seed)),
            "nls-max": make_arm("nls-max", nls_max.model),  # from_base activates the maximal subnet
            "sparsepeft": make_arm("sparsepeft", sparse.model, sampler(sparse, args.seed)),
            "nls-bf16": make_arm("nls-bf16", nls_bf16.model, sampler(nls_bf16, args.seed), bf16=True)}


def batches(args: argparse.Namespace, count: int) -> list[torch.Tensor]:
    """`count` batches of [batch_size, seqlen] token windows of builtin:arithmetic (no padding)."""
    from shears.data import calibration_input_ids, load_records
    from shears.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    ids = calibration_input_ids(tokenizer, load_records("builtin:arithmetic"), count * args.batch_size,
                                args.seqlen, args.seed)
    return list(ids.split(args.batch_size))


# --------------------------------------------------------------------------- measuring

def run(arms: dict[str, Arm], data: list[torch.Tensor], warmup: int, seed: int = 0) -> None:
    from shears.progress import progress

    for arm in arms.values():
        torch.manual_seed(seed - 1)  # the warm-up steps' dropout masks alike too
        for _ in range(warmup):
            train_step(arm, data[0])
    order = list(arms)
    for rep, batch in enumerate(progress(data, desc="timed steps (all arms)", unit="rep")):
        for name in order[rep % len(order):] + order[:rep % len(order)]:
            # every arm draws the same LoRA dropout masks in a repetition (the global torch RNG would hand
            # each arm other ones, by its place in the rotating order), so that nls and nls-bf16 differ
            # only in precision
            torch.manual_seed(seed + rep)
            start = time.perf_counter()
            loss = train_step(arms[name], batch)
            arms[name].times_ms.append(1e3 * (time.perf_counter() - start))
            arms[name].losses.append(loss)


def paired_ratio(a: Arm, b: Arm) -> float:
    return statistics.median(x / y for x, y in zip(a.times_ms, b.times_ms))


def profile(arms: dict[str, Arm], batch: torch.Tensor) -> None:
    """Self-CPU time per op over one step of each arm: where an arm's extra time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for arm in arms.values():
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(arm, batch)
        print(f"\n--- torch.profiler, one step of {arm.name} (top ops by self CPU time)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))


def print_report(arms: dict[str, Arm], args: argparse.Namespace) -> None:
    print(f"\nmodel {args.model}, search space {args.space}, AdamW step (forward + backward + step + zero_grad) "
          f"on {args.batch_size} x {args.seqlen} tokens of builtin:arithmetic; {args.reps} timed steps per arm, "
          f"order rotating, {torch.get_num_threads()} torch threads")
    print("timings on a shared 2-core CPU (other engineers' jobs run alongside): read ratios, not absolutes")
    header = f"{'arm':<11} {'trainable':>10} {'median ms':>10} {'mean ms':>9} {'min ms':>8}"
    print(header)
    print("-" * len(header))
    for arm in arms.values():
        n = sum(p.numel() for p in arm.model.parameters() if p.requires_grad)
        t = arm.times_ms
        print(f"{arm.name:<11} {n:>10,} {statistics.median(t):>10.0f} {statistics.fmean(t):>9.0f} {min(t):>8.0f}")
    print(f"\n{'ratio':<33} {'paired median':>13} {'of means':>9} {'target':>7}  verdict")
    for num, den, target, label in TARGETS:
        if num not in arms or den not in arms:
            continue
        ratio = paired_ratio(arms[num], arms[den])
        of_means = statistics.fmean(arms[num].times_ms) / statistics.fmean(arms[den].times_ms)
        verdict = "ok" if ratio <= target else "MISSED"
        print(f"{label:<33} {ratio:>13.3f} {of_means:>9.3f} {'<= ' + format(target, '.2f'):>7}  {verdict}")
    if "nls" not in arms or "nls-bf16" not in arms:
        return
    fp32, bf16 = statistics.fmean(arms["nls"].losses), statistics.fmean(arms["nls-bf16"].losses)
    gap = abs(bf16 - fp32) / fp32
    print(f"\nmean training loss over {len(arms['nls'].losses)} steps: nls fp32 {fp32:.4f}, nls bf16 {bf16:.4f} "
          f"(relative gap {gap:.2%}, target <= 1%: {'ok' if gap <= 0.01 else 'MISSED'}); "
          f"per step max |diff| {max(abs(a - b) for a, b in zip(arms['nls'].losses, arms['nls-bf16'].losses)):.4f}")
    print("per step, bf16 / fp32 - 1: " + " ".join(f"{b / a - 1:+.1%}" for a, b in zip(arms["nls"].losses,
                                                                                     arms["nls-bf16"].losses)))


def padding_report(args: argparse.Namespace) -> None:
    """Padded share of the demo recipe's training batches: Trainer's random order vs shears' length grouping."""
    from shears.data import TokenizedDataset, load_records
    from shears.models import load_tokenizer
    from shears.train_supernet import TrainingOrder

    data = TokenizedDataset(load_tokenizer(args.model), load_records("builtin:arithmetic?n=2000&seed=0"), 96)
    lengths = [len(x["input_ids"]) for x in data.examples]
    pad8 = lambda n: -(-n // 8) * 8  # the Collator pads to a multiple of 8
    for name, order in (("random", TrainingOrder(len(lengths), 42, 8)),
                        ("length-grouped", TrainingOrder(len(lengths), 42, 8, lengths=tuple(lengths)))):
        ids = order.epoch_indices(0, 0)
        steps = [ids[i:i + 8] for i in range(0, len(ids), 8)]
        total = sum(pad8(max(lengths[i] for i in s)) * len(s) for s in steps)
        print(f"padded-token share, demo training batches ({name}): {1 - sum(lengths[i] for i in ids) / total:.1%}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from shears.models import load_model

    torch.manual_seed(args.seed)
    base = load_model(args.model)
    arms = build_arms(base, args)
    if args.arms != "all":
        unknown = set(args.arms.split(",")) - set(arms)
        if unknown:
            raise SystemExit(f"unknown arms {sorted(unknown)}: choose from {', '.join(arms)}")
        arms = {name: arm for name, arm in arms.items() if name in args.arms.split(",")}
    del base
    data = batches(args, args.reps)
    run(arms, data, args.warmup, args.seed)
    print_report(arms, args)
    padding_report(args)
    if args.profile:
        profile(arms, data[0])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
