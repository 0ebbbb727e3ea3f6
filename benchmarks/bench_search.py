"""How fast each search backend approaches the true Pareto front, against random search.

    python benchmarks/bench_search.py [--seeds 5] [--train-steps 80]

A real super-network is trained (NLS, shears.train_supernet) on a tiny random-initialised Llama
(hidden 64, 2 layers, the SmolLM2 tokenizer) over the built-in arithmetic task, with the Shears
search space (q,k,v / up / down, per layer, ranks 32/24/16): 3^6 = 729 subnets, few enough to
evaluate every one. The objective is deterministic and cheap -- validation loss on a fixed batch,
computed once per subnet with shears.evaluate, and adapter parameters -- so the exhaustive front
is exact and every backend is replayed against the same table.

Printed: the hypervolume each backend reaches after 10%, 20% and 40% of the space has been
evaluated, as a fraction of the exhaustive front's hypervolume (both objectives min-max normalised
over the whole space, reference point 1.1), mean over seeds. Random search (Optuna's
RandomSampler, same budget and the same maximal/heuristic/minimal first trials) is the peer.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shears.evaluate import evaluate  # noqa: E402
from shears.models import resolve_model_path  # noqa: E402
from shears.recipe import load_recipe  # noqa: E402
from shears.run import load_run  # noqa: E402
from shears.search import OptunaBackend, PymooBackend, SearchProblem, search  # noqa: E402
from shears.search.history import hypervolume_2d  # noqa: E402
from shears.search.objectives import Objective  # noqa: E402
from shears.search_space import canonical  # noqa: E402
from shears.train_supernet import train_supernet  # noqa: E402

FRACTIONS = (0.10, 0.20, 0.40)
SPACE = {"target_modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], "r_max": 32, "lora_alpha": 64,
         "lora_dropout": 0.0,
         "groups": [{"name": "qkv", "modules": ["q_proj", "k_proj", "v_proj"], "choices": [32, 24, 16]},
                    {"name": "up", "modules": ["up_proj"], "choices": [32, 24, 16]},
                    {"name": "down", "modules": ["down_proj"], "choices": [32, 24, 16]}]}


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


def exhaustive_table(run_dir: Path) -> tuple[object, dict[str, dict[str, float]]]:
    """Every subnet's (validation loss on a fixed batch, adapter params)."""
    run = load_run(run_dir)
    space = run.supernet.space
    batch = run.validation_records[:16]
    table = {}
    configs = [dict(zip(space.keys, ranks)) for ranks in itertools.product(*(space.choices[k] for k in space.keys))]
    for config in tqdm(configs, desc="exhaustive evaluation", unit="subnet"):
        run.supernet.activate(config)
        loss = evaluate(run.supernet, run.tokenizer, batch, "loss", batch_size=16, progress=False)["loss"]
        table[canonical(config)] = {"loss": float(loss), "adapter_params": float(space.adapter_params(config))}
    return space, table


def normaliser(table: dict[str, dict[str, float]]):
    lo = {k: min(v[k] for v in table.values()) for k in ("loss", "adapter_params")}
    hi = {k: max(v[k] for v in table.values()) for k in ("loss", "adapter_params")}
    return lambda v: tuple((v[k] - lo[k]) / (hi[k] - lo[k]) for k in ("loss", "adapter_params"))


def backends(name: str, seed: int, storage: Path):
    if name == "pymoo:nsga2":
        return PymooBackend(seed=seed)
    return OptunaBackend(name.split(":")[1], storage=f"journal:{storage}", seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=80)
    # optuna:gp is selectable but not default: its cost grows cubically with trials (~3 s/trial at 90
    # trials on 2 CPU cores), so 40% of this space takes it tens of minutes per seed.
    parser.add_argument("--backends", default="optuna:tpe,optuna:nsga2,pymoo:nsga2,optuna:random")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        run_dir = train_tiny_supernet(root, args.train_steps)
        space, table = exhaustive_table(run_dir)
        setup_s = time.perf_counter() - start
        norm = normaliser(table)
        true_hv = hypervolume_2d([norm(v) for v in table.values()])
        losses = [v["loss"] for v in table.values()]
        size = len(table)
        budgets = [max(3, round(f * size)) for f in FRACTIONS]
        objectives = (Objective("loss", False),
                      Objective("adapter_params", False, min(v["adapter_params"] for v in table.values()),
                                max(v["adapter_params"] for v in table.values())))

        rows = {}
        seconds = {}
        for name in args.backends.split(","):
            fractions = []
            started = time.perf_counter()
            for seed in range(args.seeds):
                problem = SearchProblem.from_space(space, objectives, lambda c: table[canonical(c)])
                out = root / "search" / name.replace(":", "-") / str(seed)
                result = search(problem, out, budgets[-1], backends(name, seed, out / "study.log"), progress=False,
                                plot=False)
                points = [norm(r["objectives"]) for r in result.history.records]
                fractions.append([hypervolume_2d(points[:b]) / true_hv for b in budgets])
            rows[name] = np.mean(fractions, axis=0)
            seconds[name] = (time.perf_counter() - started) / args.seeds

    print(f"\nspace: {size} subnets (Shears groups q,k,v / up / down x 2 layers, ranks 32/24/16) of a tiny "
          f"NLS-trained Llama; objective: validation loss on 16 fixed examples "
          f"(range {min(losses):.4f}-{max(losses):.4f}) and adapter params; set-up {setup_s:.0f} s")
    print(f"hypervolume reached / exhaustive front's hypervolume, mean of {args.seeds} seeds "
          f"(budgets {budgets} evaluations):\n")
    header = f"{'backend':<16}" + "".join(f"{f'{int(f * 100)}% ({b})':>14}" for f, b in zip(FRACTIONS, budgets))
    print(header + f"{'s / search':>12}")
    for name, values in rows.items():
        print(f"{name:<16}" + "".join(f"{v:>14.4f}" for v in values) + f"{seconds[name]:>12.1f}")
    random_row = rows.get("optuna:random")
    if random_row is not None:
        print("\nratio to random search (same budget):")
        for name, values in rows.items():
            if name != "optuna:random":
                print(f"{name:<16}" + "".join(f"{v / r:>14.3f}" for v, r in zip(values, random_row)))


if __name__ == "__main__":
    main()
