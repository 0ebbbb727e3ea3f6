"""Does one sparse super-network match separately trained LoRAs? SmolLM2-135M, real data.

    python benchmarks/experiment_compression.py          # the whole experiment (hours; resumable)
    python benchmarks/experiment_compression.py --pilot  # the signal check that must come first

Task: LLM-Adapters ARC-Easy + OpenBookQA in the *content* answer format (data.answer_format=content):
the prompt is the question, the response is the chosen option's text, and a test question is scored
lm-eval style by the log-likelihood of each option's text after the prompt (acc, and acc_norm per
character). Training, validation and test use the same format. Every trained arm gets the same budget
(`--steps` optimizer steps x `--batch-size` examples of the same training records in the same order,
same lr and schedule). Selection uses only the validation loss of the answer span over `--val-size`
records carved from the training files; the test files are read only for the final rows.

Rows (arms), in the order they run, so that a partial run answers the first questions first:

  dense_base              dense base, no fine-tuning                                  (pilot)
  lora_r32_dense          stock PEFT LoRA r=32 on the dense base                       (pilot)
  nls_s50                 python -m shears.train_supernet: 50% Wanda + NLS super-network (training only)
  sparse50_base           50% Wanda base, no fine-tuning
  nls_s50_heuristic / _maximal / _minimal   subnets of that super-network (ranks 24 / 32 / 16)
  lora_r24_s50, lora_r16_s50                stock LoRA trained alone at those ranks on the same sparse base
  squeeze16, squeeze16_recovered            the maximal subnet squeezed to r=16 (python -m shears.squeeze),
                                            without and with `--recover-steps` recovery steps
  search                  shears.search on (validation loss, adapter params), budget `--budget`
  front_100/75/50         the front point of lowest validation loss within 100/75/50% of the maximal adapter
  lora_r32_s50            stock LoRA r=32 on the sparse base
  nls_2of4 (+_heuristic)  the same on a 2:4 Wanda base
  nls_s40, nls_s25, nls_s0 (+_heuristic)    the sparsity sweep of the heuristic subnet
  nls_s50_rerun_heuristic                  the heuristic subnet of the super-network in runs/<name>/nls_s50 now
                                           (PTQ's peer; a retraining when that folder was made again)
  nls_s50_q8_ptq, nls_s50_q4_ptq           nls_s50's sparse base quantized after training (Q8_0 / Q4_0), heuristic
  qa_nls_s50_q4 (+_heuristic)               50% Wanda base quantized to Q4_0 first, NLS on its dequantized weights
  qa_sparse_s50_q4 (+_merged)               the same with QA-SparsePEFT; the heuristic merged into one Q4_0 folder
  qa_nls_s0_q4, qa_nls_s25_q4 (+_heuristic) dense and 25% Wanda bases, Q4_0 QA-NLS
  winning back what compression costs (each a super-network, read at its heuristic subnet):
  nls_s50_kd_logit / _kd_squarehead         50% Wanda + NLS with logit KD / SquareHead from the dense base
  sparsegpt50 (+ sparsegpt50_kd)            50% SparseGPT + NLS (+ the KD of lower validation loss)
  nls_s50_inplace                           50% Wanda + NLS, sandwich with in-place distillation
  best_s40, best_2of4                       the method of lowest validation loss at 40% and at 2:4,
                                            among those within 1.5x plain NLS's step time

Every arm writes benchmarks/results/<name>/arms/<arm>.json (metrics, commands, times) and
.../predictions/<arm>.jsonl (one line per test question) atomically when it finishes; a re-run skips
finished arms, and a killed training resumes from its last checkpoint under runs/<name>/ (adapters,
sparse bases, checkpoints: heavy, git-ignored). Each run ends by printing the table with paired
bootstrap 95% CIs and McNemar p-values (written to .../table.md) and drawing .../tradeoff.png and
.../bytes.png (test accuracy against the bytes of the deployed model, base + adapter).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from shears import precision  # noqa: E402
from shears.atomic import write_json, write_text  # noqa: E402
from shears.data import Collator, TokenizedDataset, load_records, to_answer_format  # noqa: E402
from shears.errors import ShearsError, cli_errors  # noqa: E402
from shears.evaluate import evaluate  # noqa: E402
from shears.models import load_model, load_tokenizer  # noqa: E402
from shears.recipe import load_recipe, save_recipe  # noqa: E402
from shears.run import recipe_splits  # noqa: E402
from shears.rundir import RunDir  # noqa: E402
from shears.search_space import canonical  # noqa: E402
from shears.squeeze import ADAPTER_WEIGHTS, SQUEEZE_RECORD  # noqa: E402

BASE_RECIPE = REPO / "recipes" / "smollm2-commonsense.yaml"
TRAIN_FILES = ("{data_dir}/commonsense/arc-easy_train.json", "{data_dir}/commonsense/openbookqa_train.json")
TEST_FILES = {"ARC-e": "commonsense/arc-easy_test.json", "OBQA": "commonsense/openbookqa_test.json"}
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")  # the llama search space's modules
LORA_DROPOUT = 0.1  # the llama search space's
FRONT_TARGETS = {"front_100": 1.00, "front_75": 0.75, "front_50": 0.50}
SIZE_SLACK = 0.005  # "within" a target size: up to 0.5% above it still counts
BOOTSTRAP = 10_000
PILOT_ARMS = ("dense_base", "lora_r32_dense")


@dataclass
class Settings:
    name: str = "compression"  # results in benchmarks/results/<name>/, heavy artifacts in runs/<name>/
    data_dir: str = os.environ.get("SHEARS_DATA_DIR", str(REPO.parent / "shared" / "data" / "llm-adapters"))
    steps: int = 300  # optimizer steps of every trained arm ...
    batch_size: int = 16  # ... of this many examples: 4,800 examples seen
    learning_rate: float = 3e-4
    cutoff_len: int = 160  # the longest content-format ARC-e/OBQA training example is 150 tokens (mean 50)
    val_size: int = 512  # validation records carved out of the training files (selection and ranking)
    arc_test: int = 1000  # first N ARC-Easy test questions (of 2,376)
    obqa_test: int = 500  # first N OpenBookQA test questions (all 500)
    budget: int = 40  # search: distinct subnet evaluations, each on all validation records
    recover_steps: int = 30  # squeeze recovery steps (shears.squeeze default schedule: lr 1e-4 constant)
    sweep: str = "0.4,0.25,0"  # extra unstructured sparsities for the heuristic subnet (besides 50% and 2:4)
    nsamples: int = 64  # Wanda calibration windows ...
    seqlen: int = 256  # ... of this many tokens, from the training records
    eval_batch_size: int = 32
    bf16: bool = True  # bf16 autocast for training (Trainer) and evaluation: 1.7-2.8x on this CPU
    threads: int = 2
    seed: int = 42
    arms: str = "all"  # comma list of arms to run (their prerequisites must be done), or all
    require_signal: bool = True  # stop after the pilot arms unless dense LoRA beats the untuned base (CI > 0)


def pilot_settings(s: Settings) -> Settings:
    """The signal check: the two pilot arms, fewer steps and questions, its own folders."""
    arms = ",".join(PILOT_ARMS) if s.arms == "all" else s.arms
    return dataclasses.replace(s, name=s.name + "_pilot", steps=40, batch_size=8, arc_test=300, obqa_test=300,
                               arms=arms)


# --------------------------------------------------------------------------- the experiment's state

class Experiment:
    def __init__(self, settings: Settings):
        self.s = settings
        self.results = REPO / "benchmarks" / "results" / settings.name
        self.runs = REPO / "runs" / settings.name
        self.wanted = None if settings.arms == "all" else set(settings.arms.split(","))
        self._tests: dict[str, list[dict]] | None = None
        self._val: list[dict] | None = None
        self._loaded: dict[str, object] = {}

    # ---- bookkeeping

    def check_settings(self) -> None:
        """Resuming with other settings would mix incomparable arms in one table: refuse."""
        path = self.results / "settings.json"
        # which arms run and where the data lives do not change any result; the thread count changes the
        # speed (and float summation order, in the last bits) but not what is computed, so an experiment may
        # resume on fewer threads when the machine is shared; each arm records the count it ran with
        current = {k: v for k, v in dataclasses.asdict(self.s).items()
                   if k not in ("arms", "data_dir", "require_signal", "threads")}
        if path.is_file():
            previous = json.loads(path.read_text())
            changed = sorted(k for k in current if previous.get(k) != current[k])
            if changed:
                raise ShearsError(f"{self.results} was run with other settings ({', '.join(changed)}): pass the same "
                                  "flags to resume, or another --name")
        write_json(path, current)

    def done(self, arm: str) -> dict | None:
        path = self.results / "arms" / f"{arm}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def arm(self, name: str, fn) -> dict | None:
        """Run an arm unless its result exists (or it is not wanted); its files are written atomically."""
        previous = self.done(name)
        if previous is not None:
            print(f"== {name}: done before ({self.results / 'arms' / (name + '.json')})")
            return previous
        if self.wanted is not None and name not in self.wanted:
            return None
        print(f"\n== {name}", flush=True)
        start = time.time()
        result = {"arm": name, **fn()}
        result["wall_s"] = round(time.time() - start, 1)
        result["threads"] = self.s.threads
        predictions = result.pop("predictions", None)
        if predictions is not None:
            lines = "".join(json.dumps(p, separators=(",", ":")) + "\n" for p in predictions)
            write_text(self.results / "predictions" / f"{name}.jsonl", lines)
        write_json(self.results / "arms" / f"{name}.json", result)
        return result

    def autocast(self):
        return precision.autocast(self.s.bf16)

    # ---- recipes and data

    def recipe_overrides(self, sparsity: float = 0.0, pattern: str = "unstructured") -> dict:
        s = self.s
        return {
            "data.train": list(TRAIN_FILES), "data.data_dir": s.data_dir, "data.train_limit": None,
            "data.val_size": s.val_size, "data.cutoff_len": s.cutoff_len, "data.answer_format": "content",
            "sparsity.sparsity": sparsity, "sparsity.pattern": pattern,
            "sparsity.nsamples": s.nsamples, "sparsity.seqlen": s.seqlen,
            "training.max_steps": s.steps, "training.per_device_train_batch_size": s.batch_size,
            "training.gradient_accumulation_steps": 1, "training.learning_rate": s.learning_rate,
            "training.seed": s.seed, "training.bf16": s.bf16, "training.logging_steps": max(1, s.steps // 20),
            "training.save_steps": max(1, s.steps // 6), "training.val_limit": 64,
            "evaluation.batch_size": s.eval_batch_size,
            "search.objectives": ["loss", "adapter_params"], "search.budget": s.budget,
            "search.eval_limit": None, "search.seed": s.seed,
        }

    def recipe(self, **sparsity):
        return load_recipe(BASE_RECIPE, self.recipe_overrides(**sparsity))

    def train_records(self) -> list[dict]:
        return recipe_splits(self.recipe())[0]  # exactly what train_supernet trains on

    def validation_records(self) -> list[dict]:
        if self._val is None:
            self._val = recipe_splits(self.recipe())[1]
        return self._val

    def tests(self) -> dict[str, list[dict]]:
        if self._tests is None:
            limits = {"ARC-e": self.s.arc_test, "OBQA": self.s.obqa_test}
            self._tests = {task: to_answer_format(load_records(Path(self.s.data_dir) / rel)[:limits[task]], "content")
                           for task, rel in TEST_FILES.items()}
        return self._tests

    # ---- measuring one row

    def measure(self, model, tokenizer) -> dict:
        """Validation loss (answer span) and test accuracy of a model, a PeftModel or a SuperNet's active subnet."""
        start = time.time()
        with self.autocast():
            val = evaluate(model, tokenizer, self.validation_records(), "loss", batch_size=self.s.eval_batch_size,
                           cutoff_len=self.s.cutoff_len)
            tests, predictions = {}, []
            for task, records in self.tests().items():
                r = evaluate(model, tokenizer, records, "choice", batch_size=self.s.eval_batch_size)
                tests[task] = {"accuracy": r["accuracy"], "accuracy_norm": r["accuracy_norm"], "n": r["n"]}
                for p, record in zip(r["predictions"], records):
                    predictions.append({"task": task, "index": p["index"],
                                        "gold": record["choices"].index(record["answer"]),
                                        "pick": p["choices"].index(p["prediction"]),
                                        "pick_norm": p["choices"].index(p["prediction_norm"]),
                                        "correct": p["correct"], "correct_norm": p["correct_norm"],
                                        "logprobs": [round(x, 4) for x in p["logprobs"]]})
                print(f"  {task}: acc {r['accuracy']:.4f}  acc_norm {r['accuracy_norm']:.4f}  (n={r['n']})", flush=True)
        print(f"  validation loss {val['loss']:.4f} ({val['tokens']} answer tokens)", flush=True)
        return {"validation_loss": val["loss"], "tests": tests,
                "average": float(np.mean([t["accuracy"] for t in tests.values()])),
                "average_norm": float(np.mean([t["accuracy_norm"] for t in tests.values()])),
                "eval_s": round(time.time() - start, 1), "predictions": predictions}

    def loaded_run(self, arm: str):
        if arm not in self._loaded:
            from shears.run import load_run

            self._loaded = {arm: load_run(self.runs / arm)}  # one run in memory at a time
        return self._loaded[arm]


# --------------------------------------------------------------------------- measurements

def nonzero_params(model) -> int:
    """Non-zero parameters of the base model (injected LoRA tensors excluded); a tied embedding counts once."""
    return int(sum(torch.count_nonzero(p).item() for name, p in model.named_parameters() if "lora_" not in name))


def peft_folder_params(folder: Path) -> int:
    return int(sum(t.numel() for t in load_file(str(folder / "adapter_model.safetensors")).values()))


def run_command(command: list, settings: Settings) -> float:
    """Run a shears CLI with the experiment's thread count; returns its wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(settings.threads), "MKL_NUM_THREADS": str(settings.threads),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [str(c) for c in command]
    print("$ " + " ".join(command), flush=True)
    start = time.time()
    subprocess.run(command, cwd=REPO, env=env, check=True)
    return time.time() - start


def python_module(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


# --------------------------------------------------------------------------- arms

def floor_arm(ex: Experiment, source: str, label: str) -> dict:
    model, tokenizer = load_model(source), load_tokenizer(source)
    return {"label": label, "base": source, "base_nonzero": nonzero_params(model), "adapter_params": 0,
            **ex.measure(model, tokenizer)}


def lora_arm(ex: Experiment, source: str, rank: int, label: str, arm: str) -> dict:
    """Stock PEFT LoRA at `rank` (alpha = 2·rank: the super-network's scale 64/32) on `source`, trained by
    HF Trainer with the recipe's training settings; checkpoints let a killed run resume."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    t, d = ex.recipe().training, ex.recipe().data
    base, tokenizer = load_model(source), load_tokenizer(source)
    base_nonzero = nonzero_params(base)
    set_seed(t.seed)  # the adapters' initial weights
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=LORA_DROPOUT, target_modules=list(TARGETS),
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    work = ex.runs / arm
    args = TrainingArguments(
        output_dir=str(work / "checkpoints"), max_steps=t.max_steps, per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, logging_steps=t.logging_steps, save_strategy="steps",
        save_steps=t.save_steps, save_total_limit=1, bf16=t.bf16, use_cpu=t.bf16 and not torch.cuda.is_available(),
        seed=t.seed, data_seed=t.seed, report_to=[],
        remove_unused_columns=False, disable_tqdm=False)
    trainer = Trainer(model=model, args=args, data_collator=Collator(tokenizer),
                      train_dataset=TokenizedDataset(tokenizer, ex.train_records(), d.cutoff_len, d.train_on_inputs))
    checkpoints = sorted((work / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    start = time.time()
    loss = trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None).training_loss
    train_s = time.time() - start
    adapter = work / "adapter"
    model.save_pretrained(str(adapter))
    return {"label": label, "base": source, "base_nonzero": base_nonzero, "adapter_params": peft_folder_params(adapter),
            "adapter": str(adapter), "train_s": round(train_s, 1), "train_loss": loss,
            "resumed_from": checkpoints[-1].name if checkpoints else None,
            "command": f"in-process (benchmarks/experiment_compression.py lora_arm): peft.get_peft_model(LoraConfig(r={rank}, "
                       f"lora_alpha={2 * rank}, lora_dropout={LORA_DROPOUT}, target_modules={list(TARGETS)})) + "
                       f"transformers.Trainer, the recipe's training section",
            **ex.measure(model, tokenizer)}


def supernet_arm(ex: Experiment, arm: str, sparsity: float, pattern: str = "unstructured",
                 extra: dict | None = None) -> dict:
    """Train a super-network with the CLI (it prunes first, into RUN/sparse_base); resumes a killed run.
    `extra`: recipe overrides on top of the experiment's (e.g. training.distill.*)."""
    run_dir = RunDir(ex.runs / arm)
    recipe_path = ex.runs / "recipes" / f"{arm}.yaml"
    save_recipe(load_recipe(BASE_RECIPE, {**ex.recipe_overrides(sparsity=sparsity, pattern=pattern), **(extra or {})}),
                recipe_path)
    write_text(ex.results / "recipes" / f"{arm}.yaml", recipe_path.read_text())  # committed: the exact recipe
    resume = run_dir.recipe.is_file()
    command = python_module("shears.train_supernet", "--recipe", recipe_path.relative_to(REPO), "--output",
                            run_dir.root.relative_to(REPO), *(["--resume"] if resume else []))
    train_s = round(run_command(command, ex.s), 1)
    summary = json.loads(run_dir.train_summary.read_text())
    sparse = run_dir.sparse_base / "sparsity.json"
    return {"label": f"super-network, {pattern if pattern != 'unstructured' else f'{sparsity:.0%}'} Wanda base",
            "command": " ".join(map(str, command)), "train_s": train_s, "steps": summary["steps"],
            "train_validation": summary["validation"],
            "sparsity": json.loads(sparse.read_text()) if sparse.is_file() else None}


def trained_weights_sha1(ex: Experiment, run_arm: str) -> str:
    """The identity of a trained super-network: its weights. Run folders are not kept in git, and retraining
    the same recipe under later code is not bit-identical, so a measurement belongs to the weights it saw."""
    digest = hashlib.sha1()
    with open(RunDir(ex.runs / run_arm).supernet / ADAPTER_WEIGHTS, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def subnet_arm(ex: Experiment, run_arm: str, config: dict, label: str, extra: dict | None = None) -> dict:
    """A subnet of a trained super-network (a config measured before on the same weights is reused)."""
    key = hashlib.sha1(f"{run_arm}:{trained_weights_sha1(ex, run_arm)}:{canonical(config)}".encode()).hexdigest()[:12]
    for other in sorted((ex.results / "arms").glob("*.json")):
        previous = json.loads(other.read_text())
        if previous.get("config_sha1") == key and "tests" in previous:
            print(f"  same subnet as {other.stem}: reusing its measurements and predictions")
            source = ex.results / "predictions" / f"{other.stem}.jsonl"
            measured = {k: v for k, v in previous.items() if k not in ("arm", "wall_s", "label")}
            predictions = [json.loads(line) for line in source.read_text().splitlines()]
            return {**measured, "label": label, "reused_from": other.stem, **(extra or {}), "predictions": predictions}
    run = ex.loaded_run(run_arm)
    run.supernet.activate(config)
    return {"label": label, "base": run.base_source, "base_nonzero": nonzero_params(run.supernet.model.get_base_model()),
            "adapter_params": run.supernet.adapter_params(config), "config": config, "config_sha1": key,
            **(extra or {}), **ex.measure(run.supernet, run.tokenizer)}


def search_arm(ex: Experiment, run_arm: str) -> dict:
    """shears.search on (validation loss, adapter params), in process so that it runs under the same bf16
    autocast as every other evaluation; resumable from RUN/search/history.jsonl."""
    from shears.search import OptunaBackend, search
    from shears.search.cli import problem_from_run

    run = ex.loaded_run(run_arm)
    out = RunDir(ex.runs / run_arm).search
    backend = OptunaBackend(sampler="tpe", storage=f"sqlite:///{out.study_db.resolve()}",
                            study_name="shears-search", seed=ex.s.seed, population_size=16)
    start = time.time()
    with ex.autocast():
        problem = problem_from_run(run, ["loss", "adapter_params"], None, ex.s.eval_batch_size)
        result = search(problem, out.folder, ex.s.budget, backend)
    evaluated = [{"config": r["config"], "objectives": r["objectives"], "label": r.get("label")}
                 for r in result.history.records]
    front = json.loads(out.front_json.read_text())
    return {"label": "search", "command": f"in-process: shears.search.search(problem_from_run(load_run({run_arm}), "
                                          f"['loss', 'adapter_params'], eval_limit=None), budget={ex.s.budget}, "
                                          f"OptunaBackend(tpe, seed={ex.s.seed})) under bf16 autocast",
            "search_s": round(time.time() - start, 1), "front": front["front"], "evaluations": front["evaluations"],
            "hypervolume": front["hypervolume"], "evaluated": evaluated}


def front_pick(front: list[dict], maximal_params: int, fraction: float) -> dict:
    """The front point of lowest validation loss whose adapter is at most ~fraction of the maximal."""
    within = [p for p in front if p["objectives"]["adapter_params"] <= fraction * maximal_params * (1 + SIZE_SLACK)]
    if not within:
        raise ShearsError(f"no front point within {fraction:.0%} of the maximal adapter: raise --budget")
    return min(within, key=lambda p: (p["objectives"]["loss"], p["objectives"]["adapter_params"]))


def squeeze_arm(ex: Experiment, run_arm: str, arm: str, label: str, recover_steps: int) -> dict:
    """The maximal subnet (RUN/supernet: stock PEFT at r_max) squeezed to rank 16, optionally recovered."""
    from peft import PeftModel

    run_dir, out = RunDir(ex.runs / run_arm), ex.runs / arm / "adapter"
    command = python_module("shears.squeeze", "--adapter", run_dir.supernet, "--rank", 16, "--output", out, "--force")
    data_file = ex.runs / "train_split.json"  # the recovery CLI reads a data source: the exact training split
    if recover_steps:
        write_json(data_file, ex.train_records())
        command += ["--recover-steps", recover_steps, "--data", data_file, "--model", run_dir.sparse_base,
                    "--batch-size", ex.s.batch_size, "--cutoff-len", ex.s.cutoff_len, "--seed", ex.s.seed]
    try:
        squeeze_s = round(run_command(command, ex.s), 1)
    finally:
        data_file.unlink(missing_ok=True)  # a derived copy of the shared data: not kept
    base, tokenizer = load_model(run_dir.sparse_base), load_tokenizer(run_dir.sparse_base)
    base_nonzero = nonzero_params(base)
    model = PeftModel.from_pretrained(base, str(out))
    record = json.loads((out / SQUEEZE_RECORD).read_text())
    return {"label": label, "base": str(run_dir.sparse_base), "base_nonzero": base_nonzero,
            "adapter_params": peft_folder_params(out), "adapter": str(out), "command": " ".join(map(str, command)),
            "squeeze_s": squeeze_s, "max_rel_error": max(m["rel_error"] for m in record["modules"]),
            "recovery": record.get("recovery"), **ex.measure(model, tokenizer)}


# --------------------------------------------------------------------------- statistics

def correctness(ex: Experiment, arm: str) -> dict[str, np.ndarray] | None:
    """Per task, the 0/1 vector of correct test answers of an arm, in question order."""
    path = ex.results / "predictions" / f"{arm}.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    out = {}
    for task in TEST_FILES:
        mine = sorted((r for r in rows if r["task"] == task), key=lambda r: r["index"])
        out[task] = np.array([r["correct"] for r in mine], dtype=float)
    return out


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p: under H0 the b + c discordant questions split Binomial(b + c, 1/2)."""
    return 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)


def task_average(*differences: np.ndarray, axis: int = -1) -> np.ndarray:
    """The unweighted mean over tasks of each task's mean paired difference (along `axis`)."""
    return sum(d.mean(axis=axis) for d in differences) / len(differences)


def paired_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray], seed: int = 0) -> dict:
    """Difference of task-average accuracy a - b on the same questions: point estimate, paired bootstrap
    95% CI (percentile; questions resampled within each task, the same draw for both rows), McNemar p
    over all questions.

    The pairing is in the per-question difference a - b, so resampling it draws both rows of a question
    together; each task is one sample of scipy's bootstrap, resampled on its own (the tasks differ in
    size, which `paired=True` would refuse)."""
    differences = []
    for task in TEST_FILES:
        if len(a[task]) != len(b[task]):
            raise ShearsError(f"rows were scored on different {task} slices: re-run with the same settings")
        differences.append(a[task] - b[task])
    interval = stats.bootstrap(differences, task_average, n_resamples=BOOTSTRAP, method="percentile",
                               random_state=np.random.default_rng(seed)).confidence_interval
    better, worse = (sum(int((sign * d > 0).sum()) for d in differences) for sign in (1, -1))
    return {"diff": float(task_average(*differences)), "low": float(interval.low), "high": float(interval.high),
            "p": mcnemar_p(better, worse), "better": better, "worse": worse}


# --------------------------------------------------------------------------- the table

# (arm, the row it is compared with besides dense LoRA r=32, the question it answers)
ROWS = [
    ("dense_base", None, ""),
    ("lora_r32_dense", "dense_base", "pilot: training signal"),
    ("sparse50_base", "dense_base", ""),
    ("lora_r32_s50", "lora_r32_dense", ""),
    ("lora_r24_s50", "nls_s50_heuristic", "Q2"),
    ("lora_r16_s50", "nls_s50_minimal", "Q2"),
    ("nls_s50_maximal", "lora_r32_s50", "Q2"),
    ("nls_s50_heuristic", "lora_r32_dense", "Q1 (Shears)"),
    ("nls_s50_minimal", "lora_r16_s50", "Q2"),
    ("front_100", "nls_s50_maximal", "Q3"),
    ("front_75", "nls_s50_maximal", "Q3"),
    ("front_50", "nls_s50_maximal", "Q3"),
    ("squeeze16", "lora_r16_s50", "Q4"),
    ("squeeze16_recovered", "lora_r16_s50", "Q4"),
    ("nls_2of4_heuristic", "nls_s50_heuristic", "Q1 (2:4)"),
    ("nls_s40_heuristic", "nls_s50_heuristic", "sweep"),
    ("nls_s25_heuristic", "nls_s50_heuristic", "sweep"),
    ("nls_s0_heuristic", "nls_s50_heuristic", "sweep"),
]
REFERENCE = "lora_r32_dense"


def fmt_diff(d: dict | None) -> str:
    if d is None:
        return "-"
    return f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] p={d['p']:.2g}"


def table(ex: Experiment) -> str:
    tasks = list(TEST_FILES)
    lines = ["| row | base non-zeros | adapter params | val loss | " + " | ".join(f"{t} acc (norm)" for t in tasks)
             + " | avg | vs LoRA r=32 dense | vs its peer (peer) | train s | eval s |",
             "|---|---:|---:|---:|" + "---:|" * len(tasks) + "---:|---|---|---:|---:|"]
    missing = []
    for arm, peer, _ in ROWS:
        r = ex.done(arm)
        if r is None:
            missing.append(arm)
            continue
        mine = correctness(ex, arm)
        ref, other = correctness(ex, REFERENCE), correctness(ex, peer) if peer else None
        vs_ref = paired_difference(mine, ref) if ref is not None and arm != REFERENCE else None
        vs_peer = paired_difference(mine, other) if other is not None else None
        accs = " | ".join(f"{100 * r['tests'][t]['accuracy']:.1f} ({100 * r['tests'][t]['accuracy_norm']:.1f})"
                          for t in tasks)
        train_s = r.get("train_s") or (ex.done(arm.rsplit("_", 1)[0]) or {}).get("train_s")
        lines.append(f"| {r['label']} | {r['base_nonzero'] / 1e6:.2f}M | {r['adapter_params']:,} | "
                     f"{r['validation_loss']:.4f} | {accs} | {100 * r['average']:.1f} | {fmt_diff(vs_ref)} | "
                     f"{fmt_diff(vs_peer)}{f' ({peer})' if vs_peer else ''} | "
                     f"{'' if train_s is None else f'{train_s:.0f}'} | {r['eval_s']:.0f} |")
    n = {t: next((ex.done(a)["tests"][t]["n"] for a, _, _ in ROWS if ex.done(a)), "?") for t in tasks}
    lines.append(f"\nAccuracy in % on the first {', '.join(f'{n[t]} {t}' for t in tasks)} test questions (acc_norm: "
                 "log-likelihood per character); avg = unweighted mean of the tasks' acc. Differences in points: "
                 f"paired bootstrap 95% CI ({BOOTSTRAP:,} resamples of the questions within each task), exact McNemar "
                 "p over all questions. val loss: mean answer-span cross-entropy over the validation records.")
    if missing:
        lines.append(f"\nNot run yet: {', '.join(missing)}.")
    return "\n".join(lines)


def front_table(ex: Experiment) -> str:
    found = ex.done("search")
    if found is None:
        return "(search not run yet)"
    picks = {name: (ex.done(name) or {}).get("config") for name in FRONT_TARGETS}
    lines = ["| adapter params | validation loss | label | picked as |", "|---:|---:|---|---|"]
    for p in found["front"]:
        chosen = ", ".join(name for name, config in picks.items() if config == p["config"])
        lines.append(f"| {int(p['objectives']['adapter_params']):,} | {p['objectives']['loss']:.4f} | "
                     f"{p.get('label') or ''} | {chosen} |")
    return "\n".join(lines)


def plot(ex: Experiment) -> Path | None:
    """One picture of the trade-off: validation loss and test average against adapter size (the searched
    front, every evaluated subnet, the uniform-rank LoRAs), and accuracy against base non-zeros."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if ex.done("dense_base") is None:
        return None
    fig, (loss_ax, acc_ax, sweep_ax) = plt.subplots(1, 3, figsize=(16, 4.6))
    found = ex.done("search")
    if found is not None:
        evaluated = [e for e in (found.get("evaluated") or found["front"])]
        loss_ax.scatter([e["objectives"]["adapter_params"] / 1e6 for e in evaluated],
                        [e["objectives"]["loss"] for e in evaluated], s=14, c="0.6", label="evaluated subnets")
        front = sorted(found["front"], key=lambda p: p["objectives"]["adapter_params"])
        loss_ax.plot([p["objectives"]["adapter_params"] / 1e6 for p in front],
                     [p["objectives"]["loss"] for p in front], "o-", c="C0", label="searched front")
    groups = {"NLS subnets (50% base)": ("nls_s50_maximal", "nls_s50_heuristic", "nls_s50_minimal", *FRONT_TARGETS),
              "LoRA alone (50% base)": ("lora_r32_s50", "lora_r24_s50", "lora_r16_s50"),
              "squeezed to r=16": ("squeeze16", "squeeze16_recovered"),
              "dense LoRA r=32": ("lora_r32_dense",)}
    for (group, arms), color, marker in zip(groups.items(), ("C0", "C3", "C2", "k"), ("s", "^", "D", "*")):
        rows = [ex.done(a) for a in arms if ex.done(a)]
        if not rows:
            continue
        x = [r["adapter_params"] / 1e6 for r in rows]
        loss_ax.scatter(x, [r["validation_loss"] for r in rows], c=color, marker=marker, s=50, label=group, zorder=3)
        acc_ax.scatter(x, [100 * r["average"] for r in rows], c=color, marker=marker, s=50, label=group, zorder=3)
    for floor, style in (("dense_base", "k:"), ("sparse50_base", "r:")):
        r = ex.done(floor)
        if r is not None:
            acc_ax.axhline(100 * r["average"], ls=style[1], c=style[0], lw=1, label=r["label"])
    sweep = [ex.done(a) for a in ("nls_s0_heuristic", "nls_s25_heuristic", "nls_s40_heuristic", "nls_s50_heuristic")]
    sweep = [r for r in sweep if r]
    if sweep:
        sweep.sort(key=lambda r: r["base_nonzero"])
        sweep_ax.plot([r["base_nonzero"] / 1e6 for r in sweep], [100 * r["average"] for r in sweep], "s-", c="C0",
                      label="NLS heuristic, unstructured Wanda")
    for arm, marker, color in (("nls_2of4_heuristic", "D", "C1"), ("lora_r32_dense", "*", "k"),
                               ("dense_base", "o", "0.5"), ("sparse50_base", "o", "r")):
        r = ex.done(arm)
        if r is not None:
            sweep_ax.scatter([r["base_nonzero"] / 1e6], [100 * r["average"]], marker=marker, c=color, s=50,
                             label=r["label"], zorder=3)
    loss_ax.set(xlabel="adapter parameters (M)", ylabel="validation loss (answer span)", title="selection signal")
    acc_ax.set(xlabel="adapter parameters (M)", ylabel="test accuracy, task average (%)", title="test")
    plot_recovery(ex, sweep_ax)
    sweep_ax.set(xlabel="base non-zero parameters (M)", ylabel="test accuracy, task average (%)", title="sparsity")
    for ax in (loss_ax, acc_ax, sweep_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = ex.results / "tradeoff.png"
    tmp = path.with_name(".tradeoff.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def commands(ex: Experiment) -> str:
    lines = []
    for path in sorted((ex.results / "arms").glob("*.json")):
        command = json.loads(path.read_text()).get("command")
        if command:
            lines.append(f"{path.stem}: {command}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- quantized bases (Q8_0 / Q4_0)
# A base quantized to llama.cpp's Q8_0/Q4_0 (python -m shears.quantize): after training (PTQ of nls_s50's
# sparse base, no training), or before it (quantization-aware NLS, QA-SparsePEFT). Rows compare with the
# same subnet unquantized; bytes.png puts every row's test accuracy against the bytes of its deployed model.

QUANT_SCHEMES = ("q8_0", "q4_0")
# (training arm, sparsity, QA-SparsePEFT): each trains the recipe with quantization.scheme=q4_0
QA_RUNS = (("qa_nls_s50_q4", 0.5, False), ("qa_sparse_s50_q4", 0.5, True), ("qa_nls_s0_q4", 0.0, False),
           ("qa_nls_s25_q4", 0.25, False))
QUANTIZED_ROWS = [
    ("nls_s50_rerun_heuristic", "nls_s50_heuristic", "retraining the same recipe"),
    ("nls_s50_q8_ptq", "nls_s50_rerun_heuristic", "PTQ"),
    ("nls_s50_q4_ptq", "nls_s50_rerun_heuristic", "PTQ"),
    ("qa_nls_s50_q4_heuristic", "nls_s50_heuristic", "QA-NLS (target: within 1 point)"),
    ("qa_nls_s50_q4_heuristic", "nls_s50_rerun_heuristic", "QA-NLS (target: within 1 point)"),
    ("qa_nls_s50_q4_heuristic", "nls_s50_q4_ptq", "QA-NLS - PTQ"),
    ("qa_sparse_s50_q4_merged", "qa_nls_s50_q4_heuristic", "QA-SparsePEFT, one merged Q4_0 file"),
    ("qa_nls_s0_q4_heuristic", "nls_s0_heuristic", "quantization alone"),
    ("qa_nls_s0_q4_heuristic", "nls_s50_heuristic", "quantization instead of sparsity"),
    ("qa_nls_s25_q4_heuristic", "nls_s25_heuristic", "25% + Q4_0"),
]
ROWS.extend(QUANTIZED_ROWS)


def weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def fp32_base_bytes(ex: Experiment) -> int:
    """The bytes of the recipe model's fp32 folder: 4 per parameter (a tied output layer counted once)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from shears.models import resolve_model_path

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model_path(ex.recipe().model)))
    return 4 * sum(p.numel() for p in model.parameters())


def deployed_bytes(ex: Experiment, row: dict) -> int:
    """Base + adapter as deployed: recorded by the quantized rows; for the others the fp32 base folder (a pruned
    one stores its zeros) plus the fp32 adapter."""
    if "deployed_bytes" in row:
        return row["deployed_bytes"]
    return fp32_base_bytes(ex) + 4 * row["adapter_params"]


def ptq_arm(ex: Experiment, run_arm: str, scheme: str) -> dict:
    """The trained super-network's heuristic subnet on its sparse base quantized after training (no training)."""
    from shears.elastic import SuperNet

    run_dir = RunDir(ex.runs / run_arm)
    out = ex.runs / f"{run_arm}_{scheme}_base"
    command = python_module("shears.quantize", "--model", run_dir.sparse_base, "--scheme", scheme, "--output", out,
                            "--force")
    quantize_s = round(run_command(command, ex.s), 1)
    net = SuperNet.load(run_dir.supernet, load_model(out))
    net.model.eval()
    config = net.heuristic()
    net.activate(config)
    adapter_params = net.adapter_params(config)
    return {"label": f"50% Wanda + NLS heuristic, base {scheme.upper()} after training (PTQ)", "base": str(out),
            "base_nonzero": nonzero_params(net.model.get_base_model()), "adapter_params": adapter_params,
            "config": config, "deployed_bytes": weights_bytes(out) + 4 * adapter_params,
            "command": " ".join(map(str, command)), "quantize_s": quantize_s,
            **ex.measure(net, load_tokenizer(out))}


def qa_subnet_arm(ex: Experiment, run_arm: str, label: str) -> dict:
    """The heuristic subnet of a super-network trained on a quantized base, its adapter kept separate."""
    base = RunDir(ex.runs / run_arm).quantized_base
    net = ex.loaded_run(run_arm).supernet
    config = net.heuristic()
    extra = {"deployed_bytes": weights_bytes(base) + 4 * net.adapter_params(config)}
    return subnet_arm(ex, run_arm, config, label, extra)


def qa_merged_arm(ex: Experiment, run_arm: str, label: str) -> dict:
    """QA-SparsePEFT's heuristic subnet as one merged Q4_0 folder (python -m shears.export --merge): no adapter."""
    out = ex.runs / run_arm / "export"
    command = python_module("shears.export", "--run", ex.runs / run_arm, "--subnet", "heuristic", "--merge",
                            "--output", out, "--force")
    export_s = round(run_command(command, ex.s), 1)
    merged = out / "heuristic" / "merged"
    model = load_model(merged)
    return {"label": label, "base": str(merged), "base_nonzero": nonzero_params(model), "adapter_params": 0,
            "deployed_bytes": weights_bytes(merged), "command": " ".join(map(str, command)), "export_s": export_s,
            **ex.measure(model, load_tokenizer(merged))}


def run_quantized_arms(ex: Experiment) -> None:
    if RunDir(ex.runs / "nls_s50").has_supernet():
        # PTQ's peer: the heuristic subnet of the very weights PTQ quantizes, unquantized. The folder may hold a
        # retraining of the super-network the nls_s50 rows measured (they differ: trained_weights_sha1), and
        # then this row also measures what retraining alone moves.
        ex.arm("nls_s50_rerun_heuristic", lambda: {
            **subnet_arm(ex, "nls_s50", ex.loaded_run("nls_s50").supernet.heuristic(),
                         "50% Wanda + NLS heuristic, the super-network PTQ quantizes (fp32 base)"),
            "training": json.loads(RunDir(ex.runs / "nls_s50").train_summary.read_text())["validation"]})
        for scheme in QUANT_SCHEMES:
            ex.arm(f"nls_s50_{scheme[:2]}_ptq", lambda scheme=scheme: ptq_arm(ex, "nls_s50", scheme))
    for arm, sparsity, qa_sparse in QA_RUNS:
        # the base quantized to Q4_0 after pruning (and, for QA-SparsePEFT, the adapter merged onto its grid)
        quantized = {"quantization.scheme": "q4_0", "training.qa_sparse_adapter": qa_sparse}
        if ex.arm(arm, lambda arm=arm, sparsity=sparsity, quantized=quantized: {
                **supernet_arm(ex, arm, sparsity, extra=quantized), "quantization": "q4_0",
                "qa_sparse_adapter": qa_sparse}) is None:
            continue
        described = f"{sparsity:.0%} Wanda" if sparsity else "dense"
        if qa_sparse:
            ex.arm(f"{arm}_merged", lambda arm=arm, described=described: qa_merged_arm(
                ex, arm, f"{described} + Q4_0 QA-SparsePEFT, heuristic merged (one Q4_0 folder)"))
        else:
            ex.arm(f"{arm}_heuristic", lambda arm=arm, described=described: qa_subnet_arm(
                ex, arm, f"{described} + Q4_0 QA-NLS, heuristic subnet"))


def plot_bytes(ex: Experiment) -> Path | None:
    """Test accuracy (task average) against the bytes of the deployed model, base + adapter: one point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {arm: ex.done(arm) for arm, _, _ in ROWS}
    rows = {arm: r for arm, r in rows.items() if r is not None and "tests" in r}
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9, 7))
    points = {arm: (deployed_bytes(ex, r) / 2**20, 100 * r["average"]) for arm, r in rows.items()}
    for arm, (x, y) in points.items():
        quantized = "deployed_bytes" in rows[arm]  # recorded by the rows whose base is quantized
        ax.scatter([x], [y], c="C3" if quantized else "C0", marker="s" if quantized else "o", s=36, zorder=3)
    # Rows of about one size (within 10%) form a column; its labels are spread apart vertically, keeping their
    # order, with a leader line to each point. The largest sizes are at the right edge, so their labels go left.
    columns: list[list[tuple[float, str, float]]] = []
    for arm, (x, y) in sorted(points.items(), key=lambda item: item[1][0]):
        if columns and x <= 1.1 * columns[-1][0][2]:
            columns[-1].append((y, arm, x))
        else:
            columns.append([(y, arm, x)])
    for column in columns:
        left = column is columns[-1]
        label_x = column[0][2] * (0.92 if left else 1.1)  # the column's smallest size: it was built in size order
        column.sort()
        for (y, arm, x), label_y in zip(column, spread([y for y, _, _ in column], gap=0.32)):
            ax.annotate(arm, (x, y), xytext=(label_x, label_y), textcoords="data", fontsize=6, va="center",
                        ha="right" if left else "left",
                        arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.6", "shrinkA": 0, "shrinkB": 3})
    ax.scatter([], [], c="C0", marker="o", label="fp32 base folder (+ fp32 adapter)")
    ax.scatter([], [], c="C3", marker="s", label="Q8_0 / Q4_0 base (+ fp32 adapter)")
    ax.set(xlabel="deployed model: base + adapter (MiB)", ylabel="test accuracy, task average (%)",
           title="accuracy against the bytes a user ships")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, ex.results / "bytes.png")


def spread(ys: list[float], gap: float) -> list[float]:
    """Label heights for sorted point heights `ys`: at least `gap` apart, in order, centred on the points' mean
    but never below the lowest point."""
    out = list(ys)
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1] + gap)
    if not out:
        return out
    # centre on the points, but never below the lowest point: it may sit on the axis
    shift = min((sum(out) - sum(ys)) / len(out), out[0] - ys[0])
    return [y - shift for y in out]


def save_figure(fig, path: Path) -> Path:
    """Write a figure atomically (a temporary sibling renamed over `path`) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- winning back what compression costs
# Distillation from the dense base (training.distill), in-place distillation (training.inplace_distill) and a
# pruner that reconstructs (sparsity.method: sparsegpt), each a super-network of its own on the same data,
# steps and questions, read at its heuristic subnet -- the Shears row whose gap to dense LoRA r=32 the
# methods try to halve. Choices between methods use validation loss only, never the test questions. The
# step-time ratio of each method to plain NLS, measured side by side, is benchmarks/bench_distill.py's.

KD_LOGIT = {"training.distill.logit_weight": 1.0, "training.distill.temperature": 2.0}
KD_SQUAREHEAD = {"training.distill.squarehead_weight": 1.0}
INPLACE = {"training.strategy": "sandwich", "training.inplace_distill": True}
SPARSEGPT = {"sparsity.method": "sparsegpt"}
RECOVERY = {  # run arm -> (recipe overrides, what it adds to 50% Wanda + NLS)
    "nls_s50_kd_logit": (KD_LOGIT, "logit KD (T=2) from the dense base"),
    "nls_s50_kd_squarehead": (KD_SQUAREHEAD, "SquareHead from the dense base"),
    "sparsegpt50": (SPARSEGPT, "SparseGPT instead of Wanda"),
    "nls_s50_inplace": (INPLACE, "sandwich + in-place distillation"),
}
OVER_STEP_BUDGET = {"nls_s50_inplace"}
RECOVERY_ROWS = [
    ("nls_s50_kd_logit_heuristic", "nls_s50_heuristic", "Q5 logit KD"),
    ("nls_s50_kd_squarehead_heuristic", "nls_s50_heuristic", "Q5 SquareHead"),
    ("sparsegpt50_heuristic", "nls_s50_heuristic", "Q5 SparseGPT"),
    ("sparsegpt50_kd_heuristic", "sparsegpt50_heuristic", "Q5 SparseGPT + KD"),
    ("nls_s50_inplace_heuristic", "nls_s50_heuristic", "Q5 in-place"),
    ("best_s40_heuristic", "nls_s40_heuristic", "Q5 best at 40%"),
    ("best_2of4_heuristic", "nls_2of4_heuristic", "Q5 best at 2:4"),
]
ROWS.extend(RECOVERY_ROWS)


def recovery_arm(ex: Experiment, arm: str, overrides: dict, what: str, sparsity: float = 0.5,
                 pattern: str = "unstructured") -> None:
    """Train `arm`'s super-network with `overrides`, then its heuristic subnet row."""
    described = "2:4" if pattern == "2:4" else f"{sparsity:.0%}"
    if ex.arm(arm, lambda: {**supernet_arm(ex, arm, sparsity, pattern, overrides), "method": what,
                            "overrides": overrides}) is not None:
        ex.arm(f"{arm}_heuristic", lambda: subnet_arm(ex, arm, ex.loaded_run(arm).supernet.heuristic(),
                                                      f"{described} + NLS, {what}, heuristic subnet"))


def heuristic_validation_loss(ex: Experiment, arm: str) -> float:
    row = ex.done(f"{arm}_heuristic")
    return row["validation_loss"] if row is not None else math.inf


def run_recovery(ex: Experiment) -> None:
    for arm, (overrides, what) in RECOVERY.items():
        recovery_arm(ex, arm, overrides, what)
    kd_losses = {arm: heuristic_validation_loss(ex, arm) for arm in ("nls_s50_kd_logit", "nls_s50_kd_squarehead")}
    if not all(math.isfinite(v) for v in kd_losses.values()):
        return  # the KD rows come first: the rest needs their comparison
    kd = min(kd_losses, key=kd_losses.get)
    methods = {**RECOVERY, "sparsegpt50_kd": ({**SPARSEGPT, **RECOVERY[kd][0]}, f"SparseGPT + {RECOVERY[kd][1]}")}
    recovery_arm(ex, "sparsegpt50_kd", *methods["sparsegpt50_kd"])
    # The best method is chosen among those within the target's step-time budget (1.5x plain NLS). The sandwich
    # rule that in-place distillation needs runs three subnets per step, 3.1x plain NLS in bench_distill.py, so
    # it is reported at 50% but is not a candidate for 40% and 2:4.
    candidates = {arm: spec for arm, spec in methods.items() if arm not in OVER_STEP_BUDGET}
    scored = {arm: heuristic_validation_loss(ex, arm) for arm in candidates}
    if all(math.isfinite(v) for v in scored.values()):
        best = min(scored, key=scored.get)
        overrides, what = methods[best]
        for arm, sparsity, pattern in (("best_s40", 0.4, "unstructured"), ("best_2of4", 0.5, "2:4")):
            recovery_arm(ex, arm, overrides, f"{what} (best at 50% by validation loss)", sparsity, pattern)


def plot_recovery(ex: Experiment, sweep_ax) -> None:
    """The new methods' heuristic subnets on the sparsity panel."""
    for (arm, _, question), marker in zip(RECOVERY_ROWS, "vP^XhpH"):
        r = ex.done(arm)
        if r is not None:
            sweep_ax.scatter([r["base_nonzero"] / 1e6], [100 * r["average"]], marker=marker, s=45, zorder=3,
                             label=question.removeprefix("Q5 "))


# --------------------------------------------------------------------------- main

def parse_args(argv) -> Settings:
    defaults = Settings()
    p = argparse.ArgumentParser(prog="python benchmarks/experiment_compression.py", description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Settings):
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            p.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=value)
        else:
            p.add_argument("--" + f.name.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--pilot", action="store_true", help="run only the pilot (dense base vs dense LoRA r=32)")
    args = vars(p.parse_args(argv))
    pilot = args.pop("pilot")
    settings = Settings(**args)
    return pilot_settings(settings) if pilot else settings


def signal_check(ex: Experiment) -> None:
    """Signal first: the other arms are worth running only if dense LoRA beats the untuned base by a
    margin whose 95% CI excludes zero; otherwise the task or format must change, not the statistics."""
    tuned, floor = correctness(ex, "lora_r32_dense"), correctness(ex, "dense_base")
    if tuned is None or floor is None:
        return
    d = paired_difference(tuned, floor)
    print(f"signal check: dense LoRA r=32 - untuned dense base = {fmt_diff(d)} (task average, points)", flush=True)
    if d["low"] <= 0 and ex.s.require_signal:
        raise ShearsError(f"no training signal: dense LoRA r=32 beats the untuned base by {fmt_diff(d)}, a CI that "
                          "does not exclude zero; change the task, format or budget before running the other arms")


def run_all(ex: Experiment) -> None:
    s, model = ex.s, ex.recipe().model
    ex.arm("dense_base", lambda: floor_arm(ex, model, "dense base, no fine-tuning"))
    ex.arm("lora_r32_dense", lambda: lora_arm(ex, model, 32, "LoRA r=32 (dense base)", "lora_r32_dense"))
    signal_check(ex)
    sparse = str(RunDir(ex.runs / "nls_s50").sparse_base)
    if ex.arm("nls_s50", lambda: supernet_arm(ex, "nls_s50", 0.5)) is not None:
        net = lambda: ex.loaded_run("nls_s50").supernet  # noqa: E731
        ex.arm("sparse50_base", lambda: floor_arm(ex, sparse, "50% Wanda base, no fine-tuning"))
        for which in ("heuristic", "maximal", "minimal"):
            ex.arm(f"nls_s50_{which}", lambda which=which: subnet_arm(
                ex, "nls_s50", getattr(net(), which)(), f"50% Wanda + NLS, {which} subnet"))
        ex.arm("lora_r24_s50", lambda: lora_arm(ex, sparse, 24, "LoRA r=24 (50% Wanda base)", "lora_r24_s50"))
        ex.arm("lora_r16_s50", lambda: lora_arm(ex, sparse, 16, "LoRA r=16 (50% Wanda base)", "lora_r16_s50"))
        ex.arm("squeeze16", lambda: squeeze_arm(ex, "nls_s50", "squeeze16", "NLS maximal squeezed to r=16", 0))
        ex.arm("squeeze16_recovered", lambda: squeeze_arm(
            ex, "nls_s50", "squeeze16_recovered", f"NLS maximal squeezed to r=16 + {s.recover_steps} recovery steps",
            s.recover_steps))
        found = ex.arm("search", lambda: search_arm(ex, "nls_s50"))
        maximal = ex.done("nls_s50_maximal")
        if found is not None and maximal is not None:
            for name, fraction in FRONT_TARGETS.items():
                pick = front_pick(found["front"], maximal["adapter_params"], fraction)
                ex.arm(name, lambda pick=pick, fraction=fraction: subnet_arm(
                    ex, "nls_s50", pick["config"], f"searched, <= {fraction:.0%} of the maximal adapter",
                    {"search_validation_loss": pick["objectives"]["loss"], "target_fraction": fraction}))
        ex.arm("lora_r32_s50", lambda: lora_arm(ex, sparse, 32, "LoRA r=32 (50% Wanda base)", "lora_r32_s50"))
    sweep = [("nls_2of4", 0.5, "2:4")] + [(f"nls_s{round(100 * float(x))}", float(x), "unstructured")
                                          for x in s.sweep.split(",") if x.strip()]
    for arm, sparsity, pattern in sweep:
        if ex.arm(arm, lambda arm=arm, sparsity=sparsity, pattern=pattern: supernet_arm(ex, arm, sparsity, pattern)):
            described = "2:4" if pattern == "2:4" else f"{sparsity:.0%}"
            ex.arm(f"{arm}_heuristic", lambda arm=arm, described=described: subnet_arm(
                ex, arm, ex.loaded_run(arm).supernet.heuristic(), f"{described} Wanda + NLS, heuristic subnet"))
    run_quantized_arms(ex)
    run_recovery(ex)


@cli_errors
def main(argv=None) -> None:
    settings = parse_args(argv)
    if not (Path(settings.data_dir) / TEST_FILES["OBQA"]).is_file():
        raise ShearsError(f"LLM-Adapters data not found under {settings.data_dir}: pass --data-dir or set SHEARS_DATA_DIR")
    torch.set_num_threads(settings.threads)
    ex = Experiment(settings)
    ex.check_settings()
    print(f"settings: {json.dumps(dataclasses.asdict(settings))}", flush=True)
    run_all(ex)
    text = "\n\n".join([f"## Test accuracy ({settings.steps} steps x {settings.batch_size} examples per trained arm)",
                        table(ex), "## Search front (validation loss)", front_table(ex),
                        "## Commands the arms ran", "```\n" + commands(ex) + "\n```"])
    write_text(ex.results / "table.md", text + "\n")
    picture = plot(ex)
    accuracy_vs_bytes = plot_bytes(ex)
    print("\n" + text)
    print(f"\nwrote {ex.results}/arms/<arm>.json and predictions/<arm>.jsonl (one per finished arm), "
          f"{ex.results / 'table.md'}" + (f", {picture}" if picture else "")
          + (f", {accuracy_vs_bytes}" if accuracy_vs_bytes else "") + f"; heavy artifacts under {ex.runs}")


if __name__ == "__main__":
    main(sys.argv[1:])
