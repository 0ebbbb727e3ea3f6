"""Does the search earn its budget? Each search backend against random search: on a toy space with an
exhaustive ground truth, and on the real per-layer space of smollm2-135m, re-scored on held-out records.

    python benchmarks/bench_search.py --space toy  [--seeds 5] [--train-steps 80]
    python benchmarks/bench_search.py --space real [--supernet compression] [--bf16]   # hours of CPU; resumable
    python benchmarks/bench_search.py --space real --supernet tiny --search-records 16 --rescore-records 32 \
        --budgets 4,8 --stop-k 2,3 --run /tmp/bst/run                                   # its machinery, in minutes

Arms: optuna:random (the peer), optuna:tpe, optuna:nsga2, pymoo:nsga2, and the new ones --
mf:tpe (TPE with multi-fidelity screening: rungs on slices of the evaluation set) and surrogate (a
ridge predictor proposes, NSGA-II on it refines; surrogate+mf screens its proposals too). Budgets are
*full-set-equivalent* evaluations: a candidate scored on n of N records costs n / N.

Every objective is validation loss (token-weighted, response tokens) and adapter parameters. Scores
are deterministic, so each record's loss under a config is computed once and cached by canonical
config: a slice's score is the token-weighted loss of its first n records, and arms that meet the
same config share the work (legitimate: the same config on the same records gives the same loss).
Each score hands the search its per-record losses, so every history line carries the search's own
verdict on it (front moved: yes / within the paired noise / no; shears.search.history).

toy: a tiny random-initialised Llama (hidden 64, 2 layers, SmolLM2 tokenizer) trained by NLS on the
built-in arithmetic task, Shears groups q,k,v / up / down per layer, ranks 32/24/16: 3^6 = 729
subnets, every one scored on 16 fixed records, so the exhaustive front is exact. Printed: the
hypervolume after 10/20/40% of the space as a fraction of the exhaustive front's.

real: a super-network trained once into --run (default runs/bench-search-SUPERNET; see supernet_recipe:
the 50% Wanda one of experiment_compression.py by default), over the full Shears space (3 groups x 30
layers = 90 keys, 3^90 subnets). Arms random, TPE and mf:tpe, 2 seeds, budgets 10/20/40 by default; each
searches the first --search-records (256) validation records, and the front it returned at each budget is
re-scored on the next --rescore-records (512), so nobody wins by overfitting the search set. Printed:
the held-out hypervolume (mean and range over seeds), whether the best arm at half the budget reaches
random search at the full one, Kendall tau between search-set and held-out losses, the paired-noise
floor between neighbouring front points, and what the stop rule (--stop-k K values) would have saved,
replayed on each search's verdicts. Resumable: per-record losses are cached in RUN/bench_search_cache/DIGEST
(DIGEST names the search and held-out records, in order), the searches' histories live there, and each
arm's results are written to .../arms/<arm>.json the moment its seeds are searched and re-scored (a re-run
skips finished arms).
"""

from __future__ import annotations

import argparse
import hashlib
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

from shears.atomic import write_json  # noqa: E402
from shears.evaluate import evaluate  # noqa: E402
from shears.noise import Difference, PerRecord, paired  # noqa: E402
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
REAL_BUDGETS = (10, 20, 40)  # real budgets, full-set-equivalent evaluations
REAL_ARMS = ("optuna:random", "optuna:tpe", "mf:tpe")  # mf:tpe: the better of the multi-fidelity and predictor arms
                                                       # on the earlier real table (0.2125 vs surrogate's 0.2120 at 20)
STOP_K = (5, 10)  # stop-rule settings replayed on every search
COMPRESSION_RECIPE = REPO / "benchmarks" / "results" / "compression" / "recipes" / "nls_s50.yaml"
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
# response is the option's text, as experiment_compression.py and bench_width.py) halves each record (49 tokens
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

    @property
    def n(self) -> int:
        return len(self.records)

    def per_record(self, config: dict, n: int | None = None) -> PerRecord:
        """Each of the first n records' mean loss, weighted by its tokens (as shears.evaluate returns them)."""
        n = len(self.records) if n is None else n
        self.loss(config, n)
        rows = self.rows[canonical(config)][:n]
        return PerRecord(tuple(s / t if t else 0.0 for s, t in rows), tuple(float(t) for _, t in rows))


def records_digest(records: list[dict]) -> str:
    """A short hash of `records`, in their order."""
    return hashlib.sha1(json.dumps(records, sort_keys=True).encode()).hexdigest()[:10]


def loss_problem(space, losses: RecordLosses) -> SearchProblem:
    """validation loss (on slices too) and adapter params over `space`, scored through `losses`."""
    sizes = [space.adapter_params(space.minimal()), space.adapter_params(space.maximal())]
    objectives = (Objective("loss", False), Objective("adapter_params", False, float(min(sizes)), float(max(sizes))))

    def objective(config, n_examples=None):
        return {"loss": losses.loss(config, n_examples), "adapter_params": float(space.adapter_params(config)),
                "per_record": {"loss": losses.per_record(config, n_examples)}}

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


def supernet_recipe(kind: str, steps: int | None, root: Path) -> dict:
    """The recipe of the super-network a real-space benchmark searches (trained once, then reused).

    compression: the 50% Wanda super-network of experiment_compression.py (its committed recipe,
                 benchmarks/results/compression/recipes/nls_s50.yaml: 300 steps x 16, lr 3e-4, cutoff 160,
                 bf16), with 768 validation records carved out of the training files instead of 512 (256
                 searched + 512 re-scored), scored by the answer-span loss
    dense150:    the earlier table's smollm2-135m on its dense base, 150 steps x 8 (REAL_RECIPE)
    tiny:        the same protocol at toy size, to check the machinery: a random-initialised 2-layer Llama,
                 50% Wanda, the built-in arithmetic task, the toy space (3^6 subnets)"""
    if kind == "dense150":
        recipe = dict(REAL_RECIPE)
    elif kind == "compression":
        recipe = yaml.safe_load(COMPRESSION_RECIPE.read_text())
        recipe["data"] |= {"val_size": 768, "data_dir": str(REPO.parent / "shared" / "data" / "llm-adapters")}
        recipe["evaluation"] |= {"task": "loss", "batch_size": 8}
        recipe["search"] |= {"objectives": ["loss", "adapter_params"]}
    else:
        recipe = {"model": str(tiny_model_dir(root)), "search_space": SPACE,
                  "data": {"train": "builtin:arithmetic?n=800&seed=0", "val_size": 96, "cutoff_len": 96},
                  "sparsity": {"sparsity": 0.5, "nsamples": 8, "seqlen": 64},
                  "training": {"max_steps": 40, "per_device_train_batch_size": 8, "learning_rate": 3e-3,
                               "logging_steps": 10, "save_steps": 20, "val_limit": 16},
                  "evaluation": {"task": "loss"}, "search": {"objectives": ["loss", "adapter_params"]}}
    if steps:
        recipe["training"] = dict(recipe["training"], max_steps=steps)
    return recipe


def trained_run(args):
    """The benchmark's super-network run: trained on first use (a killed training resumes), then loaded."""
    run_dir = Path(args.run)
    if not (run_dir / "supernet" / "adapter_config.json").is_file():
        recipe = supernet_recipe(args.supernet, args.train_steps, run_dir.parent)
        path = run_dir.parent / f"{run_dir.name}-recipe.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(recipe))
        train_supernet(load_recipe(path), run_dir, resume=(run_dir / "recipe.yaml").is_file())
    return load_run(run_dir, device=default_device())  # a GPU when there is one (training picks it by itself)


def flat_stops(records: list[dict], k: int) -> float | None:
    """Full-set-equivalent evaluations spent when the stop rule with this `k` would have ended the search
    that wrote `records` (their front_moved verdicts, in file order), or None if it never fires."""
    flat, spent = 0, 0.0
    for record in records:
        spent += fidelity(record)
        if fidelity(record) >= 1.0:
            flat = flat + 1 if record.get("front_moved") in ("no", "noise") else 0
            if flat >= k:
                return spent
    return None


def noise_floor(fronts: list[list[dict]], losses: RecordLosses) -> list[Difference]:
    """Paired differences between neighbouring points of each front, on `losses`' records."""
    out = []
    for front in fronts:
        points = sorted(front, key=lambda r: r["objectives"]["adapter_params"])
        for smaller, larger in zip(points, points[1:]):
            difference = paired(losses.per_record(smaller["config"]), losses.per_record(larger["config"]))
            if difference is not None:
                out.append(difference)
    return out


def arm_result(name: str, runs: list[list[dict]], budgets: list[int], rescored: RecordLosses, size, ks) -> dict:
    """One arm's numbers: per seed, the returned front at each budget re-scored on the held-out records,
    and where the stop rule would have ended the search (with the held-out hypervolume it had then)."""
    def held_out_hv(front: list[dict]) -> float:
        return hypervolume_2d([(1 - math.exp(-rescored.loss(r["config"])),
                                size.normalised(r["objectives"]["adapter_params"])) for r in front])

    seeds = []
    for records in progress(runs, desc=f"re-score {name}", unit="seed", leave=False):
        fronts = [returned_front(done) for done in evaluated_by_budget(records, budgets)]
        stops = {}
        for k in ks:
            spent = flat_stops(records, k)
            front = returned_front(evaluated_by_budget(records, [spent])[0]) if spent is not None else None
            stops[str(k)] = {"spent": spent, "held_out_hv": held_out_hv(front) if front else None}
        seeds.append({"held_out_hv": [held_out_hv(f) for f in fronts],
                      "search_hv": [hypervolume_2d([(1 - math.exp(-r["objectives"]["loss"]),
                                                     size.normalised(r["objectives"]["adapter_params"])) for r in f])
                                    for f in fronts],
                      "fronts": [[canonical(r["config"]) for r in f] for f in fronts], "stop_rule": stops,
                      "spent": round(sum(fidelity(r) for r in records), 4)})
    return {"arm": name, "budgets": budgets, "seeds": seeds}


def real(args) -> None:
    run = trained_run(args)
    space, cutoff = run.supernet.space, run.recipe.data.cutoff_len
    records = run.validation_records
    if len(records) < args.search_records + args.rescore_records:
        raise SystemExit(f"{args.run} has {len(records)} validation records; need search + rescore records")
    search_set = records[: args.search_records]
    rescore_set = records[args.search_records: args.search_records + args.rescore_records]
    # Cached losses belong to these records in this order (a slice's score is its first n records'), so
    # the default folder is named for them: records chosen or ordered otherwise start a cache of their own.
    cache = Path(args.cache or Path(args.run) / "bench_search_cache" / records_digest(search_set + rescore_set))
    cache.mkdir(parents=True, exist_ok=True)
    searched = RecordLosses(run.supernet, run.tokenizer, search_set, cutoff, args.bf16, cache / "search.jsonl",
                            args.eval_batch)
    # the held-out records start after the search set's: their cache is named for where they start
    rescored = RecordLosses(run.supernet, run.tokenizer, rescore_set, cutoff, args.bf16,
                            cache / f"rescore-from-{len(search_set)}.jsonl", args.eval_batch)
    # what one full-set evaluation costs, measured on a config nobody searches (a fresh random one)
    probe = space.sample(np.random.default_rng(12345))
    probe_losses = RecordLosses(run.supernet, run.tokenizer, search_set, cutoff, args.bf16, batch_size=args.eval_batch)
    probe_losses.loss(probe)
    print(f"one full-set evaluation ({len(search_set)} records, cutoff {cutoff}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}): {probe_losses.seconds:.1f} s")
    budgets = sorted(args.budgets)
    rungs = Rungs(tuple(max(1, int(f * len(search_set))) for f in args.rungs), args.keep)
    size = loss_problem(space, searched).objectives[1]
    # Each arm lands in ARMS_DIR/<arm>.json the moment its seeds are searched and re-scored; a re-run skips
    # the arms found there, and an arm killed mid-search resumes from its searches' histories.
    arms_dir, results = cache / "arms", {}
    arms_dir.mkdir(exist_ok=True)
    settings = {"search_records": len(search_set), "rescore_records": len(rescore_set), "budgets": budgets,
                "rungs": list(rungs.examples), "keep": rungs.keep, "bf16": args.bf16, "eval_batch": args.eval_batch}
    for name in args.arms:
        path = arms_dir / f"{name.replace(':', '-').replace('+', '-')}-{args.seeds}seeds.json"
        if path.is_file() and json.loads(path.read_text()).get("settings") == settings:
            results[name] = json.loads(path.read_text())
            print(f"{name}: done before ({path})")
            continue
        histories, seconds = run_arms(lambda: loss_problem(space, searched), [name], args.seeds, budgets[-1],
                                      cache / f"searches-{len(search_set)}", rungs, f"real searches {name}")
        results[name] = {**arm_result(name, histories[name], budgets, rescored, size, args.stop_k),
                         "settings": settings, "s_per_search": seconds[name]}
        write_json(path, results[name])
        print(f"{name}: wrote {path}")
    report_real(run, space, search_set, rescore_set, rungs, budgets, results, searched, rescored, args)


def kendall(a, b) -> tuple[float, float]:
    from scipy.stats import kendalltau

    result = kendalltau(a, b)
    return float(result.statistic), float(result.pvalue)


def report_real(run, space, search_set, rescore_set, rungs, budgets, results, searched, rescored, args) -> None:
    n_search, n_held = len(search_set), len(rescore_set)
    print(f"\nspace: {len(space.keys)} keys, {len(space.choices[space.keys[0]])}^{len(space.keys)} subnets of "
          f"{run.base_source} ({args.supernet} super-network); search set {n_search} validation records, re-scored "
          f"on {n_held} others; rungs {list(rungs.examples)} keep {rungs.keep:.2f}; records scored by this process "
          f"{searched.computed + rescored.computed:,} ({searched.seconds + rescored.seconds:.0f} s; the rest from the cache)")
    print(f"\nheld-out hypervolume of the returned front (loss -> 1 - exp(-loss), adapter params min-max, reference "
          f"1.1): mean [min, max] over {args.seeds} seeds, budgets in full-set-equivalent evaluations\n")
    print(f"{'arm':<16}" + "".join(f"{b:>28}" for b in budgets) + f"{'s / search':>12}")
    table = {}
    for name, result in results.items():
        values = np.array([seed["held_out_hv"] for seed in result["seeds"]])
        table[name] = values
        cells = [f"{m:.4f} [{lo:.4f}, {hi:.4f}]" for m, lo, hi in zip(values.mean(0), values.min(0), values.max(0))]
        print(f"{name:<16}" + "".join(f"{c:>28}" for c in cells) + f"{result.get('s_per_search', 0):>12.1f}")
    if PEER in table:
        print("\nratio to random search (same budget):")
        for name, values in table.items():
            if name != PEER:
                print(f"{name:<16}" + "".join(f"{m / r:>28.4f}" for m, r in zip(values.mean(0), table[PEER].mean(0))))
    # the question: does the best method at half the budget reach random search at the full one?
    if PEER in table and len(budgets) >= 2 and budgets[-1] >= 2 * budgets[0]:
        half = max((b for b in budgets if 2 * b <= budgets[-1]))
        i, best = budgets.index(half), max((n for n in table if n != PEER), key=lambda n: table[n].mean(0)[budgets.index(half)], default=None)
        if best is not None:
            reached = table[best].mean(0)[i] >= table[PEER].mean(0)[-1]
            print(f"\ntarget: best arm at {half} ({best}: {table[best].mean(0)[i]:.4f}) vs random at {budgets[-1]} "
                  f"({table[PEER].mean(0)[-1]:.4f}): {'reached' if reached else 'not reached'} "
                  f"(spread over seeds above; {args.seeds} seeds cannot separate differences inside it)")
    # does the search set predict the held-out loss? every config some returned front held
    configs = sorted({key for result in results.values() for seed in result["seeds"] for front in seed["fronts"]
                      for key in front})
    as_config = [json.loads(key) for key in configs]
    search_losses = [searched.loss(c) for c in as_config]
    held_losses = [rescored.loss(c) for c in as_config]
    if len(configs) >= 3:
        tau, p = kendall(search_losses, held_losses)
        print(f"\nKendall tau between search-set and held-out loss over the {len(configs)} configs of any returned "
              f"front: {tau:+.3f} (p = {p:.2g}); search-set losses {min(search_losses):.4f}-{max(search_losses):.4f}, "
              f"held-out {min(held_losses):.4f}-{max(held_losses):.4f}")
    # the paired-noise floor: neighbouring front points, paired over the same records
    finals = [seed_front for result in results.values() for seed in result["seeds"]
              for seed_front in [[{"config": json.loads(k), "objectives": {"adapter_params": float(
                  space.adapter_params(json.loads(k)))}} for k in seed["fronts"][-1]]]]
    for label, losses in (("search set", searched), ("held out", rescored)):
        floor = noise_floor(finals, losses)
        if floor:
            ses = [d.se for d in floor]
            within = sum(not d.significant() and not Difference(-d.diff, d.se, d.n).significant() for d in floor)
            needed = float(np.median([d.records_needed() for d in floor]))
            print(f"paired-noise floor ({label}, {len(floor)} neighbouring front pairs at {budgets[-1]}): paired SE "
                  f"median {np.median(ses):.4f} (one score's SE median "
                  f"{np.median([losses.per_record(c['config']).se() for f in finals for c in f]):.4f}); |difference| "
                  f"median {np.median([abs(d.diff) for d in floor]):.4f}; {within} of {len(floor)} within 2 paired SE; "
                  f"median records needed to tell them apart ~{needed:,.0f} (n·(2·SE/|Δ|)², n = {losses.n})")
    # the stop rule, replayed on every search's verdicts
    print(f"\nstop rule replayed on each search's history (K full-set evaluations in a row that moved the front by "
          f"no more than 2 paired SE, on the search set), budget {budgets[-1]}:")
    for k in args.stop_k:
        fired, saved, lost = 0, [], []
        for name, result in results.items():
            for seed, values in zip(result["seeds"], table[name]):
                stop = seed["stop_rule"][str(k)]
                if stop["spent"] is not None:
                    fired += 1
                    saved.append(budgets[-1] - stop["spent"])
                    lost.append(values[-1] - stop["held_out_hv"])
        total = sum(len(r["seeds"]) for r in results.values())
        line = f"  K={k}: fired in {fired} of {total} searches"
        if fired:
            line += (f", saving {np.mean(saved):.1f} evaluations on average (of {budgets[-1]}); held-out hypervolume "
                     f"given up {np.mean(lost):+.4f} on average (max {np.max(lost):+.4f})")
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", choices=("toy", "real"), default="toy")
    parser.add_argument("--seeds", type=int, help="searches per arm (default: toy 5, real 2)")
    parser.add_argument("--train-steps", type=int, help="NLS steps (default: toy 80; real: the super-network recipe's)")
    # optuna:gp is selectable but not default: its cost grows cubically with trials (~3 s/trial at 90
    # trials on 2 CPU cores), so 40% of this space takes it tens of minutes per seed.
    parser.add_argument("--arms", type=lambda s: s.split(","),
                        help=f"comma list (default: toy {','.join(ARMS)}; real {','.join(REAL_ARMS)})")
    parser.add_argument("--rungs", type=lambda s: [float(x) for x in s.split(",")], default=[0.125, 0.375],
                        help="multi-fidelity rungs as shares of the search set")
    parser.add_argument("--keep", type=float, default=0.34)
    parser.add_argument("--supernet", choices=("compression", "dense150", "tiny"), default="compression",
                        help="real: which super-network to train (once) and search; see supernet_recipe")
    parser.add_argument("--run", help="real: the trained run (made if absent; default runs/bench-search-SUPERNET)")
    parser.add_argument("--search-records", type=int, default=256)
    parser.add_argument("--rescore-records", type=int, default=512)
    parser.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=list(REAL_BUDGETS))
    parser.add_argument("--stop-k", type=lambda s: [int(x) for x in s.split(",")], default=list(STOP_K),
                        help="real: stop-rule K values replayed on every search")
    parser.add_argument("--bf16", action="store_true", help="real: score under bf16 autocast")
    # Small loss batches: on a CPU a batch of 8 length-sorted records runs at the same tokens/s as one of
    # 32, pads far less, and needs the logits of fewer positions (measured on smollm2: 64 records in
    # 4.4-5.4 s at batch 8, 6.9-8.7 s at 32). The cache is only valid for the batch size that filled it.
    parser.add_argument("--eval-batch", type=int, default=8, help="real: records per loss batch")
    parser.add_argument("--cache", help="real: folder of the per-record loss cache, the searches and each arm's "
                                        "results (default RUN/bench_search_cache/DIGEST, named for the records)")
    args = parser.parse_args()
    toy_space = args.space == "toy"
    args.seeds = args.seeds or (5 if toy_space else 2)
    args.arms = args.arms or list(ARMS if toy_space else REAL_ARMS)
    args.run = args.run or f"runs/bench-search-{args.supernet}"
    torch.set_num_threads(max(1, torch.get_num_threads()))
    toy(args) if toy_space else real(args)


if __name__ == "__main__":
    main()
