"""The Shears / LoRA-Squeeze experiment, CPU-sized: SmolLM2-135M on LLM-Adapters commonsense data.

    python benchmarks/paper_small.py [--steps 12] [--test-limit 32] [--budget 8] [--out runs/paper_small]

Every trained arm gets the same training budget (steps x batch of the same training records, same
seed, lr, schedule); validation is carved from the training data (recipe val_size) and drives the
search; the test files are read only for the final table. The rows:

  dense base           no fine-tuning (floor)
  LoRA r=32            stock PEFT get_peft_model + HF Trainer on the dense base (q,k,v,up,down, alpha 64)
  50% Wanda base       no fine-tuning (floor)
  Shears (heuristic)   python -m shears.train_supernet on the 50% Wanda base, llama search space,
                       then the median-rank subnet
  NLS maximal          the same super-network at r_max everywhere
  front ~100/75/50%    python -m shears.search on validation accuracy; per target size the front
                       point of highest validation accuracy within it
  squeeze r=16         the maximal subnet squeezed to rank 16 (python -m shears.squeeze), then with
                       a few recovery steps -- against
  LoRA r=16 (sparse)   stock PEFT at r=16 trained directly on the same 50% base (LoRA-Squeeze's claim)

Every arm writes OUT/results/<arm>.json when it finishes and is skipped when that file exists, so a
crash costs only the arm it hit. The script ends by printing (and writing OUT/table.md) the table:
accuracy per test set (choice task: log-likelihood of "the correct answer is <label>"), the average
with its binomial standard error, adapter parameters, non-zeros of the base and wall times.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from shears.data import TokenizedDataset, Collator, load_records, split_validation  # noqa: E402
from shears.errors import ShearsError, cli_errors  # noqa: E402
from shears.evaluate import evaluate  # noqa: E402
from shears.models import load_model, load_tokenizer  # noqa: E402
from shears.recipe import load_recipe  # noqa: E402
from shears.search_space import canonical  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from paper_medium import python_module, run_command  # noqa: E402  (one way to run a stage's CLI)

RECIPE = REPO / "recipes" / "smollm2-commonsense.yaml"
TEST_SETS = {"BoolQ": "commonsense/boolq_test.json", "ARC-e": "commonsense/arc-easy_test.json",
             "OBQA": "commonsense/openbookqa_test.json"}
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")  # the llama search space's modules
FRONT_TARGETS = {"front_100": 1.00, "front_75": 0.75, "front_50": 0.50}
SIZE_SLACK = 0.005  # "about" a target size: up to 0.5% above it still counts


@dataclass
class Settings:
    out: str = "runs/paper_small"
    data_dir: str = os.environ.get("SHEARS_DATA_DIR", str(REPO.parent / "shared" / "data" / "llm-adapters"))
    steps: int = 12              # optimizer steps of every trained arm
    batch_size: int = 8          # examples per step (no gradient accumulation)
    learning_rate: float = 3e-4
    cutoff_len: int = 256        # longer than any commonsense training example (max 215 of 900 sampled)
    train_limit: int = 400       # seeded subsample of each of the three training files
    val_size: int = 64           # validation records carved out of the training records
    val_loss_limit: int = 16     # validation records for train_supernet's end-of-training loss report
    test_limit: int = 32         # the first N records of each test file
    budget: int = 8              # search: distinct subnet evaluations
    eval_limit: int = 32         # search: validation records scored per subnet
    recover_steps: int = 4       # squeeze recovery steps (lr 1e-4, constant: shears.squeeze's default)
    nsamples: int = 16           # Wanda calibration windows
    seqlen: int = 256            # ... of this many tokens
    eval_batch_size: int = 32
    threads: int = 2
    seed: int = 42


# --------------------------------------------------------------------------- bookkeeping

def write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def check_settings(out: Path, settings: Settings) -> None:
    """Resuming with other settings would mix incomparable arms in one table: refuse."""
    saved = out / "settings.json"
    current = dataclasses.asdict(settings)
    if saved.is_file():
        previous = json.loads(saved.read_text())
        changed = sorted(k for k in current if previous.get(k) != current[k])
        if changed:
            raise ShearsError(f"{out} was run with other settings ({', '.join(changed)}): pass the same flags "
                              "to resume, or another --out")
    write_json(saved, current)


class Experiment:
    def __init__(self, settings: Settings):
        self.s = settings
        self.out = (REPO / settings.out).resolve() if not Path(settings.out).is_absolute() else Path(settings.out)
        self.run_dir = self.out / "supernet_run"
        self.results = self.out / "results"
        self.overrides = recipe_overrides(settings)
        self.recipe = load_recipe(RECIPE, self.overrides)
        self._tests: dict[str, list[dict]] | None = None
        self._run = None

    def arm(self, name: str, fn) -> dict:
        """Run an arm unless its result exists; the result gets the arm's total wall time."""
        path = self.results / f"{name}.json"
        if path.is_file():
            print(f"== {name}: done before, {path}")
            return json.loads(path.read_text())
        print(f"\n== {name}", flush=True)
        start = time.time()
        result = {"arm": name, **fn()}
        result["wall_s"] = round(time.time() - start, 1)
        write_json(path, result)
        return result

    # ---- data

    def train_records(self) -> list[dict]:
        """The recipe's training split: exactly what train_supernet trains on."""
        d = self.recipe.data
        records = load_records(d.sources(), fields=d.fields or None, limit=d.train_limit, seed=d.val_seed)
        return split_validation(records, d.val_size, d.val_seed)[0]

    def tests(self) -> dict[str, list[dict]]:
        if self._tests is None:
            self._tests = {name: load_records(Path(self.s.data_dir) / rel)[: self.s.test_limit]
                           for name, rel in TEST_SETS.items()}
        return self._tests

    def test_accuracy(self, model, tokenizer) -> dict:
        start = time.time()
        tests = {}
        for name, records in self.tests().items():
            r = evaluate(model, tokenizer, records, "choice", batch_size=self.s.eval_batch_size)
            tests[name] = {"accuracy": r["accuracy"], "accuracy_norm": r["accuracy_norm"], "n": r["n"]}
            print(f"  {name}: accuracy {r['accuracy']:.4f} (n={r['n']})", flush=True)
        return {"tests": tests, "average": sum(t["accuracy"] for t in tests.values()) / len(tests),
                "eval_s": round(time.time() - start, 1)}

    # ---- the super-network run

    def sparse_base(self) -> Path:
        return self.run_dir / "sparse_base"

    def loaded_run(self):
        if self._run is None:
            from shears.run import load_run

            self._run = load_run(self.run_dir)
        return self._run


def recipe_overrides(s: Settings) -> dict:
    """The commonsense recipe, resized for the CPU: one dict for train_supernet and the LoRA arms alike."""
    return {
        "data.data_dir": s.data_dir, "data.train_limit": s.train_limit, "data.val_size": s.val_size,
        "data.cutoff_len": s.cutoff_len,
        "sparsity.nsamples": s.nsamples, "sparsity.seqlen": s.seqlen,
        "training.max_steps": s.steps, "training.per_device_train_batch_size": s.batch_size,
        "training.gradient_accumulation_steps": 1, "training.learning_rate": s.learning_rate,
        "training.seed": s.seed, "training.logging_steps": max(1, s.steps // 10),
        "training.save_steps": max(1, s.steps // 4), "training.val_limit": s.val_loss_limit,
        "evaluation.batch_size": s.eval_batch_size,
        "search.budget": s.budget, "search.eval_limit": s.eval_limit, "search.seed": s.seed,
    }


# --------------------------------------------------------------------------- measurements

def nonzero_params(model) -> int:
    """Non-zero parameters of the base model (LoRA tensors injected into it excluded); a tied embedding
    counts once."""
    return int(sum(torch.count_nonzero(p).item() for name, p in model.named_parameters() if "lora_" not in name))


def peft_folder_params(folder: Path) -> int:
    return int(sum(t.numel() for t in load_file(str(folder / "adapter_model.safetensors")).values()))


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def average_se(tests: dict) -> float:
    """SE of the unweighted mean of independent per-set accuracies."""
    return math.sqrt(sum(binomial_se(t["accuracy"], t["n"]) ** 2 for t in tests.values())) / len(tests)


# --------------------------------------------------------------------------- arms: floors and plain LoRA

def floor_arm(ex: Experiment, source: str, label: str) -> dict:
    model, tokenizer = load_model(source), load_tokenizer(source)
    return {"label": label, "base": source, "base_nonzero": nonzero_params(model), "adapter_params": 0,
            "training": None, **ex.test_accuracy(model, tokenizer)}


def lora_training_arguments(ex: Experiment, output_dir: Path):
    """HF TrainingArguments with the recipe's training settings, as train_supernet builds them."""
    from transformers import TrainingArguments

    t = ex.recipe.training
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=t.max_steps, per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, logging_steps=t.logging_steps, save_strategy="no", seed=t.seed,
        data_seed=t.seed, report_to=[], remove_unused_columns=False, disable_tqdm=False)


def lora_arm(ex: Experiment, source: str, rank: int, label: str, folder: str) -> dict:
    """Stock PEFT LoRA at `rank` (alpha = 2·rank: the super-network's scaling 64/32) on `source`."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, set_seed

    dropout = 0.1  # the llama search space's lora_dropout
    base, tokenizer = load_model(source), load_tokenizer(source)
    base_nonzero = nonzero_params(base)
    set_seed(ex.s.seed)  # the adapters' initial weights
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=list(TARGETS),
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    d = ex.recipe.data
    train_set = TokenizedDataset(tokenizer, ex.train_records(), d.cutoff_len, d.train_on_inputs)
    trainer = Trainer(model=model, args=lora_training_arguments(ex, ex.out / folder / "trainer"),
                      train_dataset=train_set, data_collator=Collator(tokenizer))
    start = time.time()
    loss = trainer.train().training_loss
    train_s = time.time() - start
    adapter_dir = ex.out / folder / "adapter"
    model.save_pretrained(str(adapter_dir))
    return {"label": label, "base": source, "base_nonzero": base_nonzero,
            "adapter_params": peft_folder_params(adapter_dir), "adapter": str(adapter_dir),
            "training": {"steps": ex.s.steps, "batch_size": ex.s.batch_size, "final_loss": loss,
                         "train_s": round(train_s, 1),
                         "lora": {"r": rank, "lora_alpha": 2 * rank, "lora_dropout": dropout,
                                  "target_modules": list(TARGETS)},
                         "command": f"in-process: peft.get_peft_model + transformers.Trainer "
                                    f"(benchmarks/paper_small.py lora_arm, r={rank})"},
            **ex.test_accuracy(model, tokenizer)}


# --------------------------------------------------------------------------- arms: the super-network

def train_supernet_arm(ex: Experiment) -> dict:
    resume = (ex.run_dir / "checkpoints").is_dir() and not (ex.run_dir / "supernet").is_dir()
    command = python_module("shears.train_supernet", "--recipe", RECIPE.relative_to(REPO), "--output", ex.run_dir,
                            *[f"{k}={v}" for k, v in ex.overrides.items()], *(["--resume"] if resume else []))
    if (ex.run_dir / "supernet" / "adapter_config.json").is_file():
        train_s = None  # trained before this script's result was written (a crash in between)
    else:
        train_s = round(run_command(command, ex.s), 1)
    summary = json.loads((ex.run_dir / "train_summary.json").read_text())
    sparsity = json.loads((ex.sparse_base() / "sparsity.json").read_text())
    return {"command": " ".join(command), "train_s": train_s, "steps": summary["steps"],
            "validation_loss": summary["validation"], "sparsity": sparsity}


def subnet_arm(ex: Experiment, config: dict, label: str, extra: dict | None = None) -> dict:
    """A subnet of the trained super-network on the test sets (a config measured before is reused)."""
    key = hashlib.sha1(canonical(config).encode()).hexdigest()[:12]
    for other in ex.results.glob("*.json"):
        previous = json.loads(other.read_text())
        if previous.get("config_sha1") == key and "tests" in previous:
            print(f"  same config as {other.stem}: reusing its test accuracy")
            measured = {k: v for k, v in previous.items() if k not in ("arm", "wall_s")}
            return {**measured, "label": label, "config": config, "reused_from": other.stem, **(extra or {})}
    run = ex.loaded_run()
    run.supernet.activate(config)
    return {"label": label, "base": str(ex.sparse_base()),
            "base_nonzero": nonzero_params(run.supernet.model.get_base_model()), "adapter_params": run.supernet.adapter_params(config), "config": config, "config_sha1": key,
            **(extra or {}), **ex.test_accuracy(run.supernet, run.tokenizer)}


def search_arm(ex: Experiment) -> dict:
    command = python_module("shears.search", "--run", ex.run_dir, "--budget", ex.s.budget,
                            "--eval-limit", ex.s.eval_limit, "--no-progress")
    search_s = round(run_command(command, ex.s), 1)
    front = json.loads((ex.run_dir / "search" / "front.json").read_text())
    return {"command": " ".join(command), "search_s": search_s, "front": front["front"],
            "evaluations": front["evaluations"], "hypervolume": front["hypervolume"]}


def front_pick(front: list[dict], maximal_params: int, fraction: float) -> dict:
    """The front point of highest validation accuracy whose adapter is at most ~fraction of the maximal."""
    within = [p for p in front if p["objectives"]["adapter_params"] <= fraction * maximal_params * (1 + SIZE_SLACK)]
    if not within:
        raise ShearsError(f"no front point within {fraction:.0%} of the maximal adapter: raise --budget")
    return max(within, key=lambda p: (p["objectives"]["accuracy"], -p["objectives"]["adapter_params"]))


# --------------------------------------------------------------------------- arms: squeeze

def squeeze_arm(ex: Experiment, folder: str, label: str, recover_steps: int) -> dict:
    """The maximal subnet (RUN/supernet, stock PEFT at r_max) squeezed to rank 16, optionally recovered."""
    from peft import PeftModel

    out = ex.out / folder / "adapter"
    command = python_module("shears.squeeze", "--adapter", ex.run_dir / "supernet", "--rank", 16, "--output", out,
                            "--force")
    data_file = ex.out / "train_split.json"  # the recovery CLI reads a data source, not a record list
    if recover_steps:
        write_json(data_file, ex.train_records())
        command += ["--recover-steps", str(recover_steps), "--data", str(data_file), "--model", str(ex.sparse_base()),
                    "--batch-size", str(ex.s.batch_size), "--cutoff-len", str(ex.s.cutoff_len),
                    "--seed", str(ex.s.seed)]
    try:
        squeeze_s = round(run_command(command, ex.s), 1)
    finally:
        data_file.unlink(missing_ok=True)  # a derived copy of the shared data: not kept
    base, tokenizer = load_model(ex.sparse_base()), load_tokenizer(ex.sparse_base())
    base_nonzero = nonzero_params(base)
    model = PeftModel.from_pretrained(base, str(out))
    record = json.loads((out / "squeeze.json").read_text())
    return {"label": label, "base": str(ex.sparse_base()), "base_nonzero": base_nonzero,
            "adapter_params": peft_folder_params(out), "adapter": str(out), "command": " ".join(command),
            "squeeze_s": squeeze_s, "max_rel_error": max(m["rel_error"] for m in record["modules"]),
            "recovery": record.get("recovery"), **ex.test_accuracy(model, tokenizer)}


# --------------------------------------------------------------------------- the table

ROWS = [  # (arm, "group") in table order
    ("majority", "reference"),
    ("dense_base", "floor"), ("lora_r32", "LoRA"), ("sparse_base", "floor"), ("shears_heuristic", "Shears"),
    ("nls_maximal", "NLS"), ("front_100", "search"), ("front_75", "search"), ("front_50", "search"),
    ("squeeze16", "squeeze"), ("squeeze16_recovered", "squeeze"), ("lora_r16_sparse", "LoRA-Squeeze peer"),
]


def fmt_acc(t: dict) -> str:
    return f"{100 * t['accuracy']:.1f} ± {100 * binomial_se(t['accuracy'], t['n']):.1f}"


def majority_row(ex: Experiment) -> dict:
    """The no-model reference: always answer the test slice's most frequent gold label."""
    tests = {}
    for name, records in ex.tests().items():
        counts = Counter(str(r["answer"]).strip() for r in records)
        tests[name] = {"accuracy": counts.most_common(1)[0][1] / len(records), "n": len(records)}
    return {"label": "majority label of each test slice (no model)", "tests": tests,
            "average": sum(t["accuracy"] for t in tests.values()) / len(tests)}


def table(results: dict[str, dict]) -> str:
    names = list(TEST_SETS)
    lines = ["| row | base non-zeros | adapter params | " + " | ".join(names) + " | avg | wall (s) |",
             "|---|---:|---:|" + "---:|" * len(names) + "---:|---:|"]
    for arm, _ in ROWS:
        r = results.get(arm)
        if r is None or "tests" not in r:
            lines.append(f"| {arm} | (not run) |" + " |" * (len(names) + 3))
            continue
        accs = " | ".join(fmt_acc(r["tests"][n]) for n in names)
        avg = f"{100 * r['average']:.1f} ± {100 * average_se(r['tests']):.1f}"
        if arm == "majority":
            lines.append(f"| {r['label']} | - | - | {accs} | {avg} | - |")
            continue
        lines.append(f"| {r['label']} | {r['base_nonzero'] / 1e6:.2f}M | {r['adapter_params']:,} | {accs} | {avg} | "
                     f"{r['wall_s']:.0f} |")
    n = next((r["tests"][names[0]]["n"] for r in results.values() if "tests" in r), "?")
    lines.append(f"\nAccuracy in % ± binomial standard error sqrt(p(1-p)/n); n = {n} per test set (the first n "
                 "records of each file); avg = unweighted mean of the three, SE of that mean.")
    return "\n".join(lines)


def stage_table(results: dict[str, dict]) -> str:
    lines = ["| stage | wall (s) | what |", "|---|---:|---|"]
    for arm, r in results.items():
        if arm == "majority":
            continue
        parts = [f"{k}={r[k]}" for k in ("train_s", "search_s", "squeeze_s", "eval_s") if r.get(k) is not None]
        if r.get("training"):
            parts.insert(0, f"train_s={r['training']['train_s']}")
        lines.append(f"| {arm} | {r['wall_s']:.0f} | {', '.join(parts)} |")
    return "\n".join(lines)


def front_table(search: dict, picks: dict[str, dict]) -> str:
    lines = ["| adapter params | validation accuracy | label | picked as |", "|---:|---:|---|---|"]
    for p in search["front"]:
        chosen = ", ".join(name for name, pick in picks.items() if pick["config"] == p["config"])
        lines.append(f"| {int(p['objectives']['adapter_params']):,} | {p['objectives']['accuracy']:.4f} | "
                     f"{p.get('label') or ''} | {chosen} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def parse_args(argv) -> Settings:
    defaults = Settings()
    p = argparse.ArgumentParser(prog="python benchmarks/paper_small.py", description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Settings):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name))
    return Settings(**vars(p.parse_args(argv)))


@cli_errors
def main(argv=None) -> None:
    settings = parse_args(argv)
    if not (Path(settings.data_dir) / TEST_SETS["BoolQ"]).is_file():
        raise ShearsError(f"LLM-Adapters data not found under {settings.data_dir}: pass --data-dir or set SHEARS_DATA_DIR")
    torch.set_num_threads(settings.threads)
    ex = Experiment(settings)
    check_settings(ex.out, settings)
    model = ex.recipe.model
    results = {}
    results["dense_base"] = ex.arm("dense_base", lambda: floor_arm(ex, model, "dense base, no fine-tuning"))
    results["lora_r32"] = ex.arm("lora_r32", lambda: lora_arm(ex, model, 32, "LoRA r=32 (dense base)", "lora_r32"))
    results["train_supernet"] = ex.arm("train_supernet", lambda: train_supernet_arm(ex))
    results["sparse_base"] = ex.arm("sparse_base", lambda: floor_arm(ex, str(ex.sparse_base()),
                                                                     "50% Wanda base, no fine-tuning"))
    def supernet():
        return ex.loaded_run().supernet

    results["shears_heuristic"] = ex.arm("shears_heuristic", lambda: subnet_arm(
        ex, supernet().heuristic(), "Shears: 50% Wanda + NLS, heuristic subnet"))
    results["nls_maximal"] = ex.arm("nls_maximal", lambda: subnet_arm(
        ex, supernet().maximal(), "50% Wanda + NLS, maximal subnet (r=32)"))
    results["search"] = ex.arm("search", lambda: search_arm(ex))
    maximal_params = results["nls_maximal"]["adapter_params"]
    picks = {name: front_pick(results["search"]["front"], maximal_params, fraction)
             for name, fraction in FRONT_TARGETS.items()}
    for name, fraction in FRONT_TARGETS.items():
        pick = picks[name]
        results[name] = ex.arm(name, lambda pick=pick, fraction=fraction: subnet_arm(
            ex, pick["config"], f"searched, <= {fraction:.0%} of maximal adapter",
            {"validation_accuracy": pick["objectives"]["accuracy"], "target_fraction": fraction}))
    results["squeeze16"] = ex.arm("squeeze16", lambda: squeeze_arm(ex, "squeeze16", "maximal squeezed to r=16", 0))
    results["squeeze16_recovered"] = ex.arm("squeeze16_recovered", lambda: squeeze_arm(
        ex, "squeeze16_recovered", f"maximal squeezed to r=16 + {settings.recover_steps} recovery steps",
        settings.recover_steps))
    results["lora_r16_sparse"] = ex.arm("lora_r16_sparse", lambda: lora_arm(
        ex, str(ex.sparse_base()), 16, "LoRA r=16 (50% Wanda base)", "lora_r16_sparse"))

    results["majority"] = majority_row(ex)
    text = "\n\n".join([f"## Test accuracy ({settings.steps} steps x {settings.batch_size} per trained arm)",
                        table(results), "## Search front (validation)", front_table(results["search"], picks),
                        "## Wall time per arm", stage_table(results)])
    write_json(ex.out / "settings.json", dataclasses.asdict(settings))
    (ex.out / ".table.md.tmp").write_text(text + "\n")
    os.replace(ex.out / ".table.md.tmp", ex.out / "table.md")
    print("\n" + text)
    print(f"\nwrote {ex.results}/<arm>.json (one per arm), {ex.out / 'table.md'}, the super-network run in "
          f"{ex.run_dir}, adapters under {ex.out}/<arm>/adapter")


if __name__ == "__main__":
    main(sys.argv[1:])
