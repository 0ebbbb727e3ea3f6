"""Peak memory of every stage of a run on a random model of a real shape, beside the plan's estimate.

    python benchmarks/bench_memory.py --shape llama-1b                  # 2.1 GB of bf16 weights, minutes
    flock /work/locks/heavy.lock nice -n 10 python benchmarks/bench_memory.py --shape llama-7b \
        --out benchmarks/results/memory/llama-7b.txt                    # 13.8 GB, ~16 GB of RAM, ~40 min
    python benchmarks/bench_memory.py --shape path/to/config.json      # any HF config
    python benchmarks/bench_memory.py --activations     # the training step's bytes per token, measured

The model is built in bf16 on the meta device from the shape's config (SmolLM2's 49k tokenizer, the
embedded smollm2-135m, sets the vocabulary), materialised with cheap random weights and saved as an HF
folder with that tokenizer. Then the paper's recipe (recipes/llama-7b-math-shears.yaml, dtype bfloat16)
runs with tiny data -- 2 x 128 calibration tokens, 2 steps of batch 1, 2-record evaluations -- every
stage in a process of its own:

    prune           python -m shears.prune (the recipe's sparsity: section)
    train           python -m shears.train_supernet, which prunes into RUN/sparse_base and trains
    search          python -m shears.search --budget 2 --no-warm-start (2 evaluations that really run)
    export          python -m shears.export --subnet heuristic
    export --merge  the same with --merge
    quantize, export --format gguf   when this shears has them (skipped with a message otherwise)

For each, the peak RSS (the child's own rusage, os.wait4), as a ratio to the weights' bytes, its wall
time, and the plan's estimate for these settings (shears.memory, the code behind `train_supernet --plan`)
with estimate / measured. Last, the plan for a real run of the recipe on this model: 128 x 2048 Wanda
calibration tokens, batch 4 x 256 training tokens under gradient checkpointing, evaluation batch 32 x 256
new tokens, on this machine's CPU and on a 24 GiB GPU.

Peaks are RSS: pages of the memory-mapped weights count once touched, and pages never read (embedding
rows of tokens the tiny data never uses) never count, so a stage may measure a little under the weights.
One run per stage: RSS peaks of a deterministic program repeat to within a few MB, so no interval is given.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAPER_RECIPE = REPO / "recipes" / "llama-7b-math-shears.yaml"
TARGET_RATIO = 1.2  # every stage's peak <= 1.2 x the bf16 weights
TARGET_ESTIMATE = 0.15  # the plan within 15% of the measured peak

# Shapes (the vocabulary comes from the tokenizer). llama-1b: Llama 3.2 1B; llama-7b: LLaMA-7B; llama-8b: Llama 3 8B.
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, rope_theta=500000.0),
}

# The recipe's keys the tiny run changes (everything else is the paper's recipe).
TINY = {
    "data.train": "builtin:arithmetic?n=40&seed=0", "data.val_size": 8, "data.cutoff_len": 128,
    "sparsity.nsamples": 2, "sparsity.seqlen": 128,
    "training.max_steps": 2, "training.per_device_train_batch_size": 1, "training.gradient_accumulation_steps": 1,
    "training.warmup_steps": 0, "training.logging_steps": 1, "training.save_steps": 100, "training.val_limit": 2,
    "training.bf16": "auto",
    "evaluation.max_new_tokens": 8, "evaluation.batch_size": 2, "search.eval_limit": 2, "search.budget": 2,
}


@dataclass
class Stage:
    name: str
    argv: list[str]
    module: str  # the shears module the stage needs
    needs_flag: str | None = None  # a flag the module's --help must list (a stage built by later work)


def stages(work: Path, recipe: Path) -> list[Stage]:
    run = str(work / "run")
    export = ["-m", "shears.export", "--run", run, "--subnet", "heuristic"]
    return [
        Stage("prune", ["-m", "shears.prune", "--recipe", str(recipe), "--output", str(work / "pruned")], "shears.prune"),
        Stage("train", ["-m", "shears.train_supernet", "--recipe", str(recipe), "--output", run], "shears.train_supernet"),
        Stage("search", ["-m", "shears.search", "--run", run, "--budget", "2", "--no-warm-start", "--no-progress"],
              "shears.search"),
        Stage("export", [*export, "--output", str(work / "export")], "shears.export"),
        Stage("export --merge", [*export, "--merge", "--output", str(work / "export-merged")], "shears.export"),
        # hooks for stages other work adds: each runs when its module (and flag) exists
        Stage("quantize", ["-m", "shears.quantize", "--model", str(Path(run) / "sparse_base"), "--scheme", "q8_0",
                           "--output", str(work / "quantized")], "shears.quantize"),
        Stage("export --format gguf", [*export, "--format", "gguf", "--output", str(work / "export-gguf")],
              "shears.export", needs_flag="--format"),
    ]


def available(stage: Stage) -> str | None:
    """Why the stage cannot run here (None: it can)."""
    spec = importlib.util.find_spec(stage.module)
    # this checkout's module only: an installed (editable) shears elsewhere may have stages this one lacks
    if spec is None or spec.origin is None or not Path(spec.origin).resolve().is_relative_to(REPO):
        return f"{stage.module} does not exist in this shears"
    if stage.needs_flag:
        help_text = subprocess.run([sys.executable, "-m", stage.module, "--help"], capture_output=True, text=True,
                                   cwd=REPO, env=child_env()).stdout
        if stage.needs_flag not in help_text:
            return f"{stage.module} has no {stage.needs_flag}"
    return None


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_measured(argv: list[str], log: Path) -> tuple[int, float, int]:
    """(peak RSS in bytes, wall seconds, exit status) of `python argv` in its own process."""
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                   env=child_env())
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024, time.perf_counter() - start, process.returncode


# --------------------------------------------------------------------------- the model

def shape_config(shape: str):
    """The HF config of a named shape or a config path, with the embedded tokenizer's vocabulary and ids."""
    from transformers import AutoConfig, LlamaConfig

    from shears.models import SMOLLM2_ALIAS, load_tokenizer

    tokenizer = load_tokenizer(SMOLLM2_ALIAS)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, max_position_embeddings=2048)
    if shape in SHAPES:
        return LlamaConfig(**SHAPES[shape], **ids), tokenizer
    config = AutoConfig.from_pretrained(Path(shape).parent if Path(shape).name == "config.json" else shape)
    for key, value in ids.items():
        setattr(config, key, value)
    return config, tokenizer


def build_model(shape: str, folder: Path) -> None:
    """The shape's model in bf16, built on the meta device, given random weights, saved with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    config, tokenizer = shape_config(shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives every parameter its own storage: a tied output layer shares it again
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:  # norms: identity scale, so activations stay O(1) through the blocks
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def write_recipe(model: Path, work: Path) -> Path:
    import yaml

    recipe = yaml.safe_load(PAPER_RECIPE.read_text())
    recipe["model"] = str(model)
    recipe["output_dir"] = str(work / "run")
    for key, value in TINY.items():
        section, name = key.split(".")
        recipe[section][name] = value
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# --------------------------------------------------------------------------- training activations per token

STEP_TOKENS = (4, 256)  # batch x sequence length of the measured training step
STEP_SHAPES = ((1024, 4096), (2048, 4096), (1024, 8192))  # (hidden, intermediate)
STEP_DEPTHS = (2, 6)


def step_growth(hidden: int, intermediate: int, layers: int, checkpointing: bool) -> int:
    """RSS growth (bytes) of one forward + backward of a random bf16 Llama of this shape under the llama
    space's LoRA and bf16 autocast, beyond what the process held before it (run in a fresh process)."""
    import gc
    import resource

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from shears.elastic import SuperNet
    from shears.search_space import load_search_space

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net = SuperNet.from_base(model, load_search_space("llama"))
    net.model.train()
    ids = torch.randint(0, 512, STEP_TOKENS)

    def step(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net.model(input_ids=batch, labels=batch)
        out.loss.backward()

    step(ids[:1, :8])  # kernels and allocator warmed up on a tiny step
    gc.collect()
    before = max(int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE"),
                 resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    step(ids)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def measure_activations() -> None:
    """Bytes per token per block of a training step, from the growth at two depths (the slope), beside
    shears.memory's constants: under glibc's default malloc (a CPU run's RSS) and with every freed block
    returned at once (MALLOC_MMAP_THRESHOLD_=65536: the tensors themselves, what a GPU holds)."""
    from shears.memory import BLOCK_BYTES_PER_TOKEN, CHECKPOINTED_BYTES_PER_TOKEN

    tokens = STEP_TOKENS[0] * STEP_TOKENS[1]
    print(f"training step of {STEP_TOKENS[0]} x {STEP_TOKENS[1]} tokens, bf16 weights, bf16 autocast, llama space LoRA; "
          f"RSS growth at {STEP_DEPTHS[0]} and {STEP_DEPTHS[1]} blocks; bytes per token per block")
    print(f"{'hidden':>6} {'interm.':>7} {'checkpointing':>13} {'malloc':>8} {'measured':>9} {'shears.memory':>13}")
    for malloc, device, env in (("default", "cpu", {}), ("mmap", "cuda", {"MALLOC_MMAP_THRESHOLD_": "65536"})):
        for hidden, intermediate in STEP_SHAPES:
            for checkpointing in (False, True):
                growth = []
                for layers in STEP_DEPTHS:
                    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--step", str(hidden),
                                          str(intermediate), str(layers), str(int(checkpointing))],
                                         capture_output=True, text=True, cwd=REPO, env={**child_env(), **env},
                                         check=True)
                    growth.append(int(out.stdout.split()[-1]))
                slope = (growth[1] - growth[0]) / (STEP_DEPTHS[1] - STEP_DEPTHS[0]) / tokens
                per_hidden, per_intermediate = BLOCK_BYTES_PER_TOKEN[device]
                model = (CHECKPOINTED_BYTES_PER_TOKEN[device] * hidden if checkpointing
                         else per_hidden * hidden + per_intermediate * intermediate)
                print(f"{hidden:>6} {intermediate:>7} {str(checkpointing):>13} {malloc:>8} {slope:>9,.0f} "
                      f"{model:>9,} ({device})")


# --------------------------------------------------------------------------- the report

def estimates(recipe_path: Path, model: Path, tiny: bool = True, train_device: str = "cpu"):
    """{stage: Need} of the tiny run (or, tiny=False, of the paper's recipe on this model); the quantize
    stage's as the bench runs it (q8_0 of RUN/sparse_base) when the recipe does not quantize."""
    from shears.memory import count_model, estimate
    from shears.recipe import load_recipe

    overrides = {} if tiny else {"model": str(model)}
    recipe = load_recipe(recipe_path if tiny else PAPER_RECIPE, overrides)
    count = count_model(recipe)
    needs = {n.stage: n for n in estimate(recipe, count, train_device)}
    if "quantize" not in needs:
        quantized = load_recipe(recipe_path if tiny else PAPER_RECIPE, {**overrides, "quantization.scheme": "q8_0"})
        needs["quantize"] = next(n for n in estimate(quantized, count, train_device) if n.stage == "quantize")
    return needs, count, recipe


def real_run_estimates(say, recipe: Path, model: Path, weights: float) -> None:
    """The plan of the paper's recipe, unchanged but for the model, on this CPU and on a GPU."""
    for device in ("cpu", "cuda"):
        real, _, paper = estimates(recipe, model, tiny=False, train_device=device)
        where = "this CPU (every stage in RAM)" if device == "cpu" else "a GPU (train and search on it, the rest in RAM)"
        say()
        say(f"estimate for a real run of {PAPER_RECIPE.name} on this model, on {where}: calibration "
            f"{paper.sparsity.nsamples} x {paper.sparsity.seqlen}, training batch {paper.training.per_device_train_batch_size}"
            f" x {paper.data.cutoff_len} (gradient checkpointing {paper.training.gradient_checkpointing}), evaluation "
            f"batch {paper.evaluation.batch_size}, {paper.evaluation.max_new_tokens} new tokens")
        for need in real.values():
            terms = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in need.parts.items())
            say(f"  {need.stage:<15} {need.device:<5} {need.total / 1e9:7.2f} GB = {need.total / weights:5.2f}x weights"
                f"   ({terms})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-1b", help=f"{', '.join(SHAPES)} or a path to an HF config")
    parser.add_argument("--work", type=Path, help="working folder (default: a fresh one under /tmp, removed after)")
    parser.add_argument("--stages", help="comma list of stages to run (default: all that exist)")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    parser.add_argument("--estimate-only", action="store_true",
                        help="no model, no stages: the plan of a real run from the shape's config alone")
    args = parser.parse_args(argv)

    work = args.work or Path(f"/tmp/bench_memory-{Path(args.shape).stem}-{os.getpid()}")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / "logs").mkdir()
    model = work / "model"
    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    try:
        if args.estimate_only:
            import torch

            config, _ = shape_config(args.shape)
            config.dtype = torch.bfloat16  # what config.json says the weights are stored in
            config.save_pretrained(model)
            recipe = write_recipe(model, work)
            _, count, _ = estimates(recipe, model)
            say(f"bench_memory --shape {args.shape} --estimate-only: {count.params / 1e9:.2f}B parameters, bf16 "
                f"weights {count.params * 2 / 1e9:.2f} GB ({count.layers} blocks, hidden {count.hidden}, vocab "
                f"{count.vocab}); nothing built or run")
            real_run_estimates(say, recipe, model, count.params * 2)
            return
        build_rss, build_s, status = run_measured([str(Path(__file__).resolve()), "--build", args.shape, str(model)],
                                                  work / "logs" / "build.log")
        if status:
            raise SystemExit(f"building the model failed: see {work / 'logs' / 'build.log'}")
        weights = weights_bytes(model)
        recipe = write_recipe(model, work)
        planned, count, _ = estimates(recipe, model)
        say(f"bench_memory --shape {args.shape}: {count.params / 1e9:.2f}B parameters, bf16 weights "
            f"{weights / 1e9:.2f} GB ({count.layers} blocks, hidden {count.hidden}, vocab {count.vocab}); built in "
            f"{build_s:.0f} s, peak {build_rss / 1e9:.2f} GB")
        say(f"recipe: {PAPER_RECIPE.relative_to(REPO)} with {', '.join(f'{k}={v}' for k, v in TINY.items())}")
        say(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
        say()
        header = (f"{'stage':<21} {'peak RSS':>9} {'x weights':>9} {'estimate':>9} {'est/meas':>8} {'wall':>7}  "
                  f"{'<= ' + str(TARGET_RATIO) + 'x':<8} est within {TARGET_ESTIMATE:.0%}")
        say(header)
        say("-" * len(header))
        wanted = {s.strip() for s in args.stages.split(",")} if args.stages else None
        for stage in stages(work, recipe):
            if wanted is not None and stage.name not in wanted:
                continue
            missing = available(stage)
            if missing:
                say(f"{stage.name:<21} skipped: {missing}")
                continue
            log = work / "logs" / f"{stage.name.replace(' ', '_').replace('-', '')}.log"
            rss, seconds, status = run_measured(stage.argv, log)
            if status:
                say(f"{stage.name:<21} FAILED (exit {status}) after {seconds:.0f} s, peak {rss / 1e9:.2f} GB: see {log}")
                print(log.read_text()[-3000:])
                continue
            need = planned.get(stage.name)
            est = f"{need.total / 1e9:8.2f}G" if need else f"{'-':>9}"
            ratio = need.total / rss if need else float("nan")
            say(f"{stage.name:<21} {rss / 1e9:8.2f}G {rss / weights:8.2f}x {est} {ratio:8.2f} {seconds:6.0f}s  "
                f"{'ok' if rss <= TARGET_RATIO * weights else 'MISSED':<8} "
                f"{'ok' if need and abs(ratio - 1) <= TARGET_ESTIMATE else ('-' if not need else 'MISSED')}")
        say()
        say("terms of each estimate above (GB): " + "; ".join(
            f"{n.stage}: " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in n.parts.items()) for n in planned.values()))
        real_run_estimates(say, recipe, model, weights)
    finally:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("\n".join(lines) + "\n")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--build":
        build_model(sys.argv[2], Path(sys.argv[3]))
    elif len(sys.argv) == 6 and sys.argv[1] == "--step":
        print(step_growth(*map(int, sys.argv[2:5]), checkpointing=sys.argv[5] == "1"))
    elif sys.argv[1:] == ["--activations"]:
        measure_activations()
    else:
        main()
