"""How fast each search backend approaches the Pareto front: on a toy space with an exhaustive ground
truth, and on the real per-layer space of smollm2-135m, against random search.

    python benchmarks/bench_search.py --space toy  [--seeds 5] [--train-steps 80]
    python benchmarks/bench_search.py --space real --run DIR [--search-records 64 --rescore-records 128]

Arms: optuna:random (the peer), optuna:tpe, optuna:nsga2, pymoo:nsga2, and the new ones --
mf:tpe (TPE with multi-fidelity screening: rungs on slices of the evaluation set) and surrogate (a
ridge predictor proposes, NSGA-II on it refines; surrogate+mf screens its proposals too). Budgets are
*full-set-equivalent* evaluations: a candidate scored on n of N records costs n / N.

Every objective is validation loss (token-weighted, response tokens) and adapter parameters. Scores
are deterministic, so each record's loss under a config is computed once and cached by canonical
config: a slice's score is the token-weighted loss of its first n records, and arms that meet the
same config share the work (legitimate: the same config on the same records gives the same loss).

toy: a tiny random-initialised Llama (hidden 64, 2 layers, SmolLM2 tokenizer) trained by NLS on the
built-in arithmetic task, Shears groups q,k,v / up / down per layer, ranks 32/24/16: 3^6 = 729
subnets, every one scored on 16 fixed records, so the exhaustive front is exact. Printed: the
hypervolume after 10/20/40% of the space as a fraction of the exhaustive front's.

real: a smollm2-135m super-network trained over the full Shears space (3 groups x 30 layers = 90
keys, 3^90 subnets) on LLM-Adapters commonsense data; each arm searches on --search-records
validation records, and the front it returns at each budget is re-scored on a separate set of
--rescore-records validation records, so nobody wins by overfitting the search set. Printed: the
hypervolume of the re-scored front, mean and standard error over seeds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shears.evaluate import evaluate  # noqa: E402
from shears.models import resolve_model_path  # noqa: E402
from shears.precision import default_device  # noqa: E402
from shears.progress import progress  # noqa: E402
from shears.recipe import load_recipe  # noqa: E402
from shears.run import load_run  # noqa: E402
from shears.search import OptunaBackend, PymooBackend, Rungs, SearchProblem, SurrogateBackend, search  # noqa: E402
from shears.search.history import dominates, fidelity, hypervolume_2d  # noqa: E402
from shears.search.objectives import Objective  # noqa: E402
from shears.search_space import canonical  # noqa: E402
from shears.train_supernet import train_supernet  # noqa: E402

FRACTIONS = (0.10, 0.20, 0.40)  # toy budgets, as shares of the 729-subnet space
REAL_BUDGETS = (20, 40, 80)  # real budgets, full-set-equivalent evaluations
ARMS = ("optuna:random", "optuna:tpe", "optuna:nsga2", "pymoo:nsga2", "mf:tpe", "surrogate", "surrogate+mf")
PEER = "optuna:random"
NEW = ("mf:tpe", "surrogate", "surrogate+mf")
SPACE = {"target_modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], "r_max": 32, "lora_alpha": 64,
         "lora_dropout": 0.0,
         "groups": [{"name": "qkv", "modules": ["q_proj", "k_proj", "v_proj"], "choices": [32, 24, 16]},
                    {"name": "up", "modules": ["up_proj"], "choices": [32, 24, 16]},
                    {"name": "down", "modules": ["down_proj"], "choices": [32, 24, 16]}]}
# The real super-network: smollm2-135m (dense base: pruning changes nothing a search comparison needs),
# the shipped Shears space over all 30 layers, NLS-trained on ARC-Easy + OpenBookQA training questions
# long enough that subnets differ (150 steps x 8, as the other benchmarks); 768 validation
# records = the 256 searched + the 512 the fronts are re-scored on. The content answer format (the
# response is the option's text, as paper_medium.py and bench_width.py) halves each record (49 tokens
# on average instead of 103) and makes the loss the loss of the answer, not of template words.
REAL_RECIPE = {
    "model": "smollm2-135m", "search_space": "llama",
    "data": {"train": ["{data_dir}/commonsense/arc-easy_train.json", "{data_dir}/commonsense/openbookqa_train.json"],
             "train_limit": None, "val_size": 768, "val_seed": 0, "cutoff_len": 128, "answer_format": "content"},
    "training": {"max_steps": 150, "per_device_train_batch_size": 8, "learning_rate": 3.0e-4, "warmup_steps": 8,
                 "logging_steps": 10, "save_steps": 50, "val_limit": 64},
    "evaluation": {"task": "loss", "batch_size": 32}, "search": {"objectives": ["loss", "adapter_params"]}}


# ----------------------------------------------------------------------------- per-record losses, cached


class RecordLosses:
    """Each record's (summed loss, tokens) under each config, computed once: the loss of the first n
    records is their token-weighted mean, exactly what shears.evaluate reports for them. With `path`
    the rows are appended to a JSON-lines file and read back, so a killed benchmark resumes."""

    def __init__(self, supernet, tokenizer, records, cutoff_len: int, bf16: bool = False, path: Path | None = None,
                 batch_size: int = 8):
        self.supernet, self.tokenizer, self.records = supernet, tokenizer, records
        self.cutoff_len, self.bf16, self.path, self.batch_size = cutoff_len, bf16, path, batch_size
        self.rows: dict[str, list[tuple[float, int]]] = {}
        self.computed = 0  # records scored by this process
        self.seconds = 0.0
        if path is not None and path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    item = json.loads(line)
                    have = self.rows.setdefault(item["config"], [])
                    if item["start"] == len(have):
                        have.extend(tuple(r) for r in item["rows"])

    def loss(self, config: dict, n: int | None = None) -> float:
        n = len(self.records) if n is None else n
        key = canonical(config)
        have = self.rows.setdefault(key, [])
        if len(have) < n:
            start = time.perf_counter()
            self.supernet.activate(config)
            out = evaluate(self.supernet, self.tokenizer, self.records[len(have):n], "loss", batch_size=self.batch_size,
                           cutoff_len=self.cutoff_len, progress=False, bf16=self.bf16)
            new = [((p["loss"] or 0.0) * p["tokens"], p["tokens"]) for p in out["predictions"]]
            if self.path is not None:
                with open(self.path, "a") as f:
                    f.write(json.dumps({"config": key, "start": len(have), "rows": new}) + "\n")
            have.extend(new)
            self.computed += len(new)
            self.seconds += time.perf_counter() - start
        rows = have[:n]
        return sum(r[0] for r in rows) / sum(r[1] for r in rows)


def loss_problem(space, losses: RecordLosses) -> SearchProblem:
    """validation loss (on slices too) and adapter params over `space`, scored through `losses`."""
    sizes = [space.adapter_params(space.minimal()), space.adapter_params(space.maximal())]
    objectives = (Objective("loss", False), Objective("adapter_params", False, float(min(sizes)), float(max(sizes))))

    def objective(config, n_examples=None):
        return {"loss": losses.loss(config, n_examples), "adapter_params": float(space.adapter_params(config))}

    return SearchProblem.from_space(space, objectives, objective, examples=len(losses.records),
                                    sizes=lambda c: {"adapter_params": float(space.adapter_params(c))})


def make_arm(name: str, seed: int, folder: Path, rungs: Rungs):
    """(backend, rungs or None) of an arm."""
    screened = rungs if name.endswith("mf") or name.startswith("mf:") else None
    if name == "pymoo:nsga2":
        return PymooBackend(seed=seed), None
    if name.startswith("surrogate"):
        return SurrogateBackend(seed=seed), screened
    sampler = name.split(":")[1]
    return OptunaBackend(sampler, storage=f"journal:{folder / 'study.log'}", seed=seed), screened


def returned_front(records: list[dict]) -> list[dict]:
    """The front a search returns from `records`: those no other record dominates on the search set's
    (loss, adapter params), both minimised."""
    points = [(r["objectives"]["loss"], r["objectives"]["adapter_params"]) for r in records]
    return [r for r, p in zip(records, points) if not any(dominates(q, p) for q in points)]


def evaluated_by_budget(records: list[dict], budgets) -> list[list[dict]]:
    """The full-fidelity records evaluated before each budget (in full-set equivalents) was spent."""
    out, spent = [], 0.0
    marks = []
    for record in records:
        spent += fidelity(record)
        marks.append(spent)
    for budget in budgets:
        out.append([r for r, mark in zip(records, marks) if mark <= budget + 1e-9 and fidelity(r) >= 1.0])
    return out


def run_arms(problem_for, arms, seeds: int, budget: int, root: Path, rungs: Rungs, desc: str):
    """{arm: [history records of each seed]}, each arm searched `seeds` times up to `budget`."""
    out, seconds = {}, {}
    with progress(total=len(arms) * seeds, desc=desc, unit="search") as bar:
        for name in arms:
            out[name] = []
            started = time.perf_counter()
            for seed in range(seeds):
                folder = root / name.replace(":", "-").replace("+", "-") / str(seed)
                backend, screened = make_arm(name, seed, folder, rungs)
                result = search(problem_for(), folder, budget, backend, progress=False, plot=False, rungs=screened)
                out[name].append(result.history.records)
                bar.update()
            seconds[name] = (time.perf_counter() - started) / seeds
    return out, seconds


# ----------------------------------------------------------------------------- the toy space


def tiny_model_dir(root: Path) -> Path:
    """A random-initialised 2-layer Llama with the SmolLM2 tokenizer, saved as an HF folder."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    folder = root / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_tiny_supernet(root: Path, steps: int) -> Path:
    recipe = {"model": str(tiny_model_dir(root)), "search_space": SPACE,
              "data": {"train": "builtin:arithmetic?n=800&seed=0", "val_size": 32, "cutoff_len": 96},
              "training": {"max_steps": steps, "per_device_train_batch_size": 8, "learning_rate": 3e-3,
                           "logging_steps": max(1, steps // 4), "save_steps": steps, "val_limit": 32}}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = root / "run"
    train_supernet(load_recipe(path), run)
    return run


def toy(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        run = load_run(train_tiny_supernet(root, args.train_steps or 80))
        space = run.supernet.space
        losses = RecordLosses(run.supernet, run.tokenizer, run.validation_records[:16], run.recipe.data.cutoff_len)
        configs = [dict(zip(space.keys, ranks)) for ranks in itertools.product(*(space.choices[k] for k in space.keys))]
        table = {canonical(c): {"loss": losses.loss(c), "adapter_params": float(space.adapter_params(c))}
                 for c in progress(configs, desc="exhaustive evaluation", unit="subnet")}
        setup_s = time.perf_counter() - start
        lo = {k: min(v[k] for v in table.values()) for k in ("loss", "adapter_params")}
        hi = {k: max(v[k] for v in table.values()) for k in ("loss", "adapter_params")}

        def norm(v):  # min-max over the whole space, so the exhaustive front spans [0, 1]
            return tuple((v[k] - lo[k]) / (hi[k] - lo[k]) for k in ("loss", "adapter_params"))

        true_hv = hypervolume_2d([norm(v) for v in table.values()])
        budgets = [max(3, round(f * len(table))) for f in FRACTIONS]
        rungs = Rungs(tuple(int(f * 16) for f in args.rungs), args.keep)
        histories, seconds = run_arms(lambda: loss_problem(space, losses), args.arms, args.seeds, budgets[-1],
                                      root / "search", rungs, "toy searches")
    rows = {name: np.mean([[hypervolume_2d([norm(table[canonical(r["config"])]) for r in done]) / true_hv
                            for done in evaluated_by_budget(records, budgets)] for records in runs], axis=0)
            for name, runs in histories.items()}
    losses_all = [v["loss"] for v in table.values()]
    print(f"\nspace: {len(table)} subnets (Shears groups q,k,v / up / down x 2 layers, ranks 32/24/16) of a tiny "
          f"NLS-trained Llama; objective: validation loss on 16 fixed examples "
          f"(range {min(losses_all):.4f}-{max(losses_all):.4f}) and adapter params; set-up {setup_s:.0f} s; "
          f"rungs {list(rungs.examples)} of 16 records, keep {rungs.keep:.2f}")
    print(f"hypervolume reached / exhaustive front's hypervolume, mean of {args.seeds} seeds "
          f"(budgets {budgets} full-set-equivalent evaluations):\n")
    print(f"{'backend':<16}" + "".join(f"{f'{int(f * 100)}% ({b})':>14}" for f, b in zip(FRACTIONS, budgets))
          + f"{'s / search':>12}")
    for name, values in rows.items():
        print(f"{name:<16}" + "".join(f"{v:>14.4f}" for v in values) + f"{seconds[name]:>12.1f}")
    if PEER in rows:
        print("\nratio to random search (same budget):")
        for name, values in rows.items():
            if name != PEER:
                print(f"{name:<16}" + "".join(f"{v / r:>14.3f}" for v, r in zip(values, rows[PEER])))


# ----------------------------------------------------------------------------- the real space


def real(args) -> None:
    run_dir = Path(args.run)
    if not (run_dir / "supernet" / "adapter_config.json").is_file():
        steps = args.train_steps or REAL_RECIPE["training"]["max_steps"]
        recipe = dict(REAL_RECIPE, training=dict(REAL_RECIPE["training"], max_steps=steps))
        path = run_dir.parent / f"{run_dir.name}-recipe.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(recipe))
        train_supernet(load_recipe(path), run_dir, resume=(run_dir / "recipe.yaml").is_file())
    run = load_run(run_dir, device=default_device())  # a GPU when there is one (training picks it by itself)
    space, cutoff = run.supernet.space, run.recipe.data.cutoff_len
    records = run.validation_records
    if len(records) < args.search_records + args.rescore_records:
        raise SystemExit(f"{run_dir} has {len(records)} validation records; need search + rescore records")
    search_set = records[: args.search_records]
    rescore_set = records[args.search_records: args.search_records + args.rescore_records]
    cache = Path(args.cache or run_dir / "bench_search_cache")
    cache.mkdir(parents=True, exist_ok=True)
    searched = RecordLosses(run.supernet, run.tokenizer, search_set, cutoff, args.bf16, cache / "search.jsonl",
                            args.eval_batch)
    rescored = RecordLosses(run.supernet, run.tokenizer, rescore_set, cutoff, args.bf16, cache / "rescore.jsonl",
                            args.eval_batch)
    # what one full-set evaluation costs, measured on a config nobody searches (a fresh random one)
    probe = space.sample(np.random.default_rng(12345))
    probe_losses = RecordLosses(run.supernet, run.tokenizer, search_set, cutoff, args.bf16, batch_size=args.eval_batch)
    probe_losses.loss(probe)
    full_eval_s = probe_losses.seconds
    print(f"one full-set evaluation ({len(search_set)} records, cutoff {cutoff}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}): {full_eval_s:.1f} s")
    budgets = sorted(args.budgets)
    rungs = Rungs(tuple(max(1, int(f * len(search_set))) for f in args.rungs), args.keep)
    with tempfile.TemporaryDirectory() as tmp:
        histories, seconds = run_arms(lambda: loss_problem(space, searched), args.arms, args.seeds, budgets[-1],
                                      Path(tmp), rungs, "real searches")
    size = loss_problem(space, searched).objectives[1]

    def rescored_hv(front: list[dict]) -> float:
        points = [(1 - math.exp(-rescored.loss(r["config"])), size.normalised(r["objectives"]["adapter_params"]))
                  for r in front]
        return hypervolume_2d(points)

    # only the returned front is re-scored: the hypervolume of every evaluated config re-scored would
    # credit a search with points its own scores had discarded
    results = {name: np.array([[rescored_hv(returned_front(done)) for done in evaluated_by_budget(records, budgets)]
                               for records in progress(runs, desc=f"re-score {name}", unit="seed", leave=False)])
               for name, runs in histories.items()}
    losses = [v for rows in searched.rows.values() if len(rows) == len(search_set)
              for v in [sum(r[0] for r in rows) / sum(r[1] for r in rows)]]
    print(f"\nspace: {len(space.keys)} keys (Shears q,k,v / up / down x {space.num_layers} layers, ranks "
          f"{'/'.join(map(str, sorted(space.choices[space.keys[0]], reverse=True)))}), 3^{len(space.keys)} subnets "
          f"of smollm2-135m ({run.base_source}); search set {len(search_set)} validation records, re-scored on "
          f"{len(rescore_set)} others; rungs {list(rungs.examples)} keep {rungs.keep:.2f}; full-set search losses "
          f"seen {min(losses):.4f}-{max(losses):.4f}; records scored {searched.computed + rescored.computed:,} "
          f"({searched.seconds + rescored.seconds:.0f} s; the rest came from the cache)")
    print(f"hypervolume of the returned front re-scored on the separate set (loss -> 1 - exp(-loss), adapter "
          f"params min-max, reference 1.1), mean +- standard error over {args.seeds} seeds; budgets in "
          f"full-set-equivalent evaluations:\n")
    print(f"{'backend':<16}" + "".join(f"{b:>20}" for b in budgets) + f"{'s / search':>12}")
    for name, values in results.items():
        mean, se = values.mean(0), values.std(0, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0 * values[0]
        print(f"{name:<16}" + "".join(f"{m:>12.4f} +- {e:.4f}" for m, e in zip(mean, se)) + f"{seconds[name]:>12.1f}")
    if PEER in results:
        print("\nratio to random search (same budget):")
        for name, values in results.items():
            if name != PEER:
                print(f"{name:<16}" + "".join(f"{m / r:>20.4f}" for m, r in zip(values.mean(0), results[PEER].mean(0))))
    if "optuna:tpe" in results and any(n in results for n in NEW):
        tpe_top = results["optuna:tpe"].mean(0)[-1]
        best = max((n for n in NEW if n in results), key=lambda n: results[n].mean(0)[0])
        print(f"\ntarget: best new arm at {budgets[0]} ({best}: {results[best].mean(0)[0]:.4f}) vs optuna:tpe at "
              f"{budgets[-1]} ({tpe_top:.4f}): {'reached' if results[best].mean(0)[0] >= tpe_top else 'not reached'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", choices=("toy", "real"), default="toy")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--train-steps", type=int, help="NLS steps (default: toy 80; real REAL_RECIPE's 150)")
    # optuna:gp is selectable but not default: its cost grows cubically with trials (~3 s/trial at 90
    # trials on 2 CPU cores), so 40% of this space takes it tens of minutes per seed.
    parser.add_argument("--arms", type=lambda s: s.split(","), default=list(ARMS))
    parser.add_argument("--rungs", type=lambda s: [float(x) for x in s.split(",")], default=[0.125, 0.375],
                        help="multi-fidelity rungs as shares of the search set")
    parser.add_argument("--keep", type=float, default=0.34)
    parser.add_argument("--run", default="runs/bench-search-smollm2", help="real: the trained run (made if absent)")
    parser.add_argument("--search-records", type=int, default=256)
    parser.add_argument("--rescore-records", type=int, default=512)
    parser.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=list(REAL_BUDGETS))
    parser.add_argument("--bf16", action="store_true", help="real: score under bf16 autocast")
    # Small loss batches: on a CPU a batch of 8 length-sorted records runs at the same tokens/s as one of
    # 32, pads far less, and needs the logits of fewer positions (measured on smollm2: 64 records in
    # 4.4-5.4 s at batch 8, 6.9-8.7 s at 32). The cache is only valid for the batch size that filled it.
    parser.add_argument("--eval-batch", type=int, default=8, help="real: records per loss batch")
    parser.add_argument("--cache", help="real: folder of the per-record loss cache (default RUN/bench_search_cache)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    toy(args) if args.space == "toy" else real(args)


if __name__ == "__main__":
    main()
