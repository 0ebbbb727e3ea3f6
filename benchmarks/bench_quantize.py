"""What a quantized base costs and saves, on smollm2-135m: stage time, training step time, deployed bytes.

1. Stage time: `quantize_to_folder` (Q4_0, load + quantize + write) against Wanda's own pass,
   `prune_to_folder` (50% unstructured, load + calibrate + prune + write), run alternately in this
   process, `--reps` times each; plus the quantization compute alone (every weight to blocks).
2. Step time: one AdamW step of QA-NLS (the super-network on the dequantized Q4_0 base) against plain NLS
   (the same super-network on the fp32 sparse base), and of QA-SparsePEFT (masked update merged onto the
   frozen grid, straight-through) against SparsePEFT; the arms draw the same subnets, on the same batches,
   in rotating order (benchmarks/bench_train_step.py's harness). Ratios are medians of per-step ratios.
3. Deployed bytes: the quantized folder's weights file plus the heuristic subnet's adapter (fp32, as
   `python -m shears.export` writes it) against the fp32 sparse base folder's weights file; and what each
   scheme keeps at higher precision, and why (quantization.json).

    flock /work/locks/heavy.lock nice -n 10 python benchmarks/bench_quantize.py [--reps 3] [--steps 12]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))  # bench_train_step's step harness

TARGETS = {"stage": 1.10, "qa-nls": 1.05, "q8_0": 0.28, "q4_0": 0.18}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--space", default="llama")
    parser.add_argument("--reps", type=int, default=3, help="alternating runs of each stage")
    parser.add_argument("--nsamples", type=int, default=16, help="Wanda calibration windows (bench_prune's default)")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12, help="timed training steps per arm")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--step-seqlen", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def stage_times(args: argparse.Namespace, work: Path) -> dict:
    from shears.qformat import QuantizedTensor
    from shears.quantize import quantization_plan, quantize_to_folder
    from shears.recipe import QuantizationConfig, SparsityConfig
    from shears.sparsity import prune_to_folder
    from shears.models import load_model

    sparsity = SparsityConfig(sparsity=0.5, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    config = QuantizationConfig(scheme="q4_0")
    sparse = work / "sparse_base"
    times: dict[str, list[float]] = {"wanda": [], "quantize": [], "quantize compute": []}
    for rep in range(args.reps):
        order = ("wanda", "quantize") if rep % 2 == 0 else ("quantize", "wanda")
        for arm in order:
            if arm == "quantize" and not sparse.exists():  # the first rep must prune first
                prune_to_folder(args.model, sparse, sparsity, force=True)
            start = time.perf_counter()
            if arm == "wanda":
                prune_to_folder(args.model, sparse, sparsity, force=True)
            else:
                quantize_to_folder(sparse, work / "quantized_base", config, force=True)
            times[arm].append(time.perf_counter() - start)
        model = load_model(sparse)
        plan, params = quantization_plan(model, config), dict(model.named_parameters())
        start = time.perf_counter()
        for name in plan.quantize:
            QuantizedTensor.from_weight(params[name].detach(), "q4_0")
        times["quantize compute"].append(time.perf_counter() - start)
    return times


def step_times(args: argparse.Namespace, work: Path) -> dict:
    from bench_train_step import batches, make_arm, paired_ratio, run, sampler

    from shears.elastic import SuperNet
    from shears.models import load_model
    from shears.qformat import load_quantized_state
    from shears.search_space import load_search_space

    space = load_search_space(args.space)
    sparse, quantized = load_model(work / "sparse_base"), load_model(work / "quantized_base")
    blocks = load_quantized_state(work / "quantized_base").quantized
    nets = {}
    for name, base, kwargs in (("nls", sparse, {}), ("qa-nls", quantized, {}),
                               ("sparsepeft", sparse, {"sparse_adapter": True}),
                               ("qa-sparsepeft", quantized, {"quantized": blocks})):
        torch.manual_seed(args.seed)  # the same initial adapters in every arm
        nets[name] = SuperNet.from_base(copy.deepcopy(base), space, **kwargs)
    arms = {name: make_arm(name, net.model, sampler(net, args.seed)) for name, net in nets.items()}
    step_args = argparse.Namespace(model=args.model, batch_size=args.batch_size, seqlen=args.step_seqlen,
                                   seed=args.seed)
    run(arms, batches(step_args, args.steps), warmup=1, seed=args.seed)
    return {"median_ms": {name: statistics.median(arm.times_ms) for name, arm in arms.items()},
            "qa-nls / nls": paired_ratio(arms["qa-nls"], arms["nls"]),
            "qa-sparsepeft / sparsepeft": paired_ratio(arms["qa-sparsepeft"], arms["sparsepeft"]),
            "adapter_params_heuristic": nets["nls"].adapter_params(nets["nls"].heuristic())}


def deployed_bytes(args: argparse.Namespace, work: Path, adapter_params: int) -> dict:
    from shears.qformat import QUANT_FILE, WEIGHTS_FILE
    from shears.quantize import quantize_to_folder
    from shears.recipe import QuantizationConfig

    fp32 = (work / "sparse_base" / "model.safetensors").stat().st_size
    adapter = 4 * adapter_params  # the exported heuristic adapter, fp32 (its safetensors header aside)
    out = {"fp32_folder": fp32, "adapter": adapter}
    for scheme in ("q8_0", "q4_0"):
        for embeddings in (True, False):
            folder = quantize_to_folder(work / "sparse_base", work / f"{scheme}-{embeddings}",
                                        QuantizationConfig(scheme=scheme, embeddings=embeddings), force=True)
            record = json.loads((folder / QUANT_FILE).read_text())
            reasons: dict[str, int] = {}
            for why in record["kept"].values():
                reasons[why] = reasons.get(why, 0) + 1
            size = (folder / WEIGHTS_FILE).stat().st_size
            out[f"{scheme}, embeddings {'quantized' if embeddings else 'kept'}"] = {
                "base": size, "deployed": size + adapter, "kept": reasons, "tied": record["tied"],
                "kept_bytes": record["report"]["kept_bytes"]}
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_quantize.") as tmp:
        work = Path(tmp)
        stages = stage_times(args, work)
        steps = step_times(args, work)
        sizes = deployed_bytes(args, work, steps["adapter_params_heuristic"])
    print(f"\nmodel {args.model}, {torch.get_num_threads()} torch thread(s); timings on a shared 2-core CPU under the "
          "heavy lock: read ratios, not absolutes")
    print(f"\n1. stage time, {args.reps} alternating runs each (load + compute + write), seconds:")
    for arm, values in stages.items():
        print(f"  {arm:<17} median {statistics.median(values):7.2f}   runs {' '.join(f'{v:.2f}' for v in values)}")
    ratio = statistics.median(stages["quantize"]) / statistics.median(stages["wanda"])
    print(f"  quantize (q4_0) / Wanda 50% ({args.nsamples} x {args.seqlen} calibration): {ratio:.3f} "
          f"(target <= {TARGETS['stage']}: {'ok' if ratio <= TARGETS['stage'] else 'MISSED'})")
    print(f"\n2. training step ({args.steps} timed AdamW steps per arm, {args.batch_size} x {args.step_seqlen} tokens, "
          f"same subnets, rotating order), median ms:")
    for arm, ms in steps["median_ms"].items():
        print(f"  {arm:<14} {ms:8.0f}")
    for key in ("qa-nls / nls", "qa-sparsepeft / sparsepeft"):
        target = TARGETS["qa-nls"] if key.startswith("qa-nls") else None
        verdict = f" (target <= {target}: {'ok' if steps[key] <= target else 'MISSED'})" if target else " (no target)"
        print(f"  {key:<27} paired median {steps[key]:.3f}{verdict}")
    print(f"\n3. deployed bytes: quantized base + heuristic adapter ({steps['adapter_params_heuristic']:,} params, fp32 "
          f"{sizes['adapter'] / 2**20:.1f} MiB) against the fp32 sparse base folder ({sizes['fp32_folder'] / 2**20:.1f} MiB)")
    for key, row in sizes.items():
        if not isinstance(row, dict):
            continue
        scheme = key.split(",")[0]
        r_base, r_deployed = row["base"] / sizes["fp32_folder"], row["deployed"] / sizes["fp32_folder"]
        verdict = f"target <= {TARGETS[scheme]}: {'ok' if r_deployed <= TARGETS[scheme] else 'MISSED'}"
        print(f"  {key:<30} base {row['base'] / 2**20:6.1f} MiB ({r_base:.3f}x)  base + adapter "
              f"{row['deployed'] / 2**20:6.1f} MiB ({r_deployed:.3f}x, {verdict}); kept {row['kept_bytes'] / 2**10:.0f} KiB")
        for why, count in row["kept"].items():
            print(f"      kept x{count}: {why}")
        for name, other in row["tied"].items():
            print(f"      {name}: tied to {other}, stored once")


if __name__ == "__main__":
    main(sys.argv[1:])
