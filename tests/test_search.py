"""Tests of shears.search: budgets, caching, resume, fronts and hypervolume against brute force,
concurrent Optuna workers on one journal file, and a real tiny super-network."""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing as mp
import os
import random
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest

from conftest import one_line_error

from shears.errors import ShearsError
from shears.search import (ANCHORS, History, OptunaBackend, PymooBackend, SearchProblem, hypervolume_2d,
                           parse_objectives, search)
from shears.search.optuna_backend import open_storage
from shears.search.problem import Evaluator
from shears.search_space import canonical

# ----------------------------------------------------------------------------- a cheap problem

SPACE = SimpleNamespace(keys=["qkv.0", "up.0", "qkv.1", "up.1"],
                        choices={"qkv.0": (16, 8, 4), "up.0": (16, 8, 4), "qkv.1": (16, 12, 8, 4), "up.1": (16, 8, 4)})
SPACE_SIZE = 3 * 3 * 4 * 3


def toy_values(config: dict) -> dict:
    """A deterministic accuracy/size trade-off with a rugged front (not a function of size alone)."""
    size = 10.0 * sum(config.values())
    bumps = ((config["qkv.0"] * 7 + config["up.1"] * 3 + config["qkv.1"]) % 11) / 40
    return {"accuracy": 1 - 8 / (8 + sum(config.values())) - bumps, "adapter_params": size, "loss": 3 - bumps}


class CountingObjective:
    """toy_values that logs every call and can fail like a killed process after `fail_after` calls."""

    def __init__(self, fail_after: int | None = None, sleep: float = 0.0):
        self.calls: list[str] = []
        self.fail_after, self.sleep = fail_after, sleep

    def __call__(self, config: dict) -> dict:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        time.sleep(self.sleep)
        self.calls.append(canonical(config))
        return toy_values(config)


def toy_problem(objective=None, names="accuracy,adapter_params") -> SearchProblem:
    objective = objective or CountingObjective()
    minimal = {k: min(v) for k, v in SPACE.choices.items()}
    maximal = {k: max(v) for k, v in SPACE.choices.items()}
    objectives = parse_objectives(names, lambda name, c: toy_values(c)[name], minimal, maximal)
    return SearchProblem.from_space(SPACE, objectives, objective)


def backends(tmp_path: Path, seed: int = 0):
    return {
        "pymoo": PymooBackend(seed=seed, population_size=8),
        "tpe": OptunaBackend("tpe", storage=f"sqlite:///{tmp_path}/study.db", seed=seed),
        "nsga2": OptunaBackend("nsga2", storage=f"journal:{tmp_path}/study.log", seed=seed, population_size=8),
        "random": OptunaBackend("random", storage=str(tmp_path / "study.journal"), seed=seed),
    }


def brute_force_front(records, objectives) -> list[str]:
    """O(n^2): the configs no other record dominates (objectives turned into minimised vectors)."""
    def vec(r):
        return [-r["objectives"][o.name] if o.maximize else r["objectives"][o.name] for o in objectives]

    def dom(a, b):
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    return sorted(canonical(r["config"]) for r in records if not any(dom(vec(s), vec(r)) for s in records))


def read_history(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- hypervolume, front


def test_hypervolume_2d_matches_pymoo_and_a_grid_count():
    from pymoo.indicators.hv import HV

    rng = np.random.default_rng(0)
    for trial in range(20):
        points = rng.uniform(0, 1.3, size=(int(rng.integers(1, 30)), 2))
        if trial % 3 == 0:
            points = np.round(points, 1)  # ties and duplicates
        inside = points[(points < 1.1).all(axis=1)]
        expected = float(HV(ref_point=np.array([1.1, 1.1]))(inside)) if len(inside) else 0.0
        assert hypervolume_2d(points, (1.1, 1.1)) == pytest.approx(expected, abs=1e-12)
    # an independent count on a grid for a staircase of three points
    pts = [(0.2, 0.8), (0.5, 0.4), (0.9, 0.1)]
    g = (np.arange(1100) + 0.5) / 1000
    xx, yy = np.meshgrid(g, g)
    covered = np.zeros_like(xx, dtype=bool)
    for x, y in pts:
        covered |= (xx >= x) & (yy >= y)
    assert hypervolume_2d(pts) == pytest.approx(covered.sum() / 1e6, abs=2e-3)


def test_history_front_is_the_non_dominated_subset(tmp_path):
    problem = toy_problem(names="accuracy,adapter_params,loss")
    history = History(tmp_path / "history.jsonl", problem.objectives)
    rng = random.Random(0)
    configs = [dict(zip(SPACE.keys, c)) for c in itertools.product(*(SPACE.choices[k] for k in SPACE.keys))]
    for config in rng.sample(configs, 60):
        values = toy_values(config)
        values["accuracy"] = round(values["accuracy"], 1)  # many ties
        history.append(config, values, 0.0, "test")
        front = sorted(canonical(r["config"]) for r in history.front())
        assert front == brute_force_front(history.records, problem.objectives)
    reread = History(tmp_path / "history.jsonl", problem.objectives)  # the file holds the same
    assert [r["config"] for r in reread.records] == [r["config"] for r in history.records]
    assert reread.hypervolume() == pytest.approx(history.hypervolume())


def test_history_skips_a_torn_last_line_and_refuses_other_objectives(tmp_path):
    problem = toy_problem()
    path = tmp_path / "history.jsonl"
    history = History(path, problem.objectives)
    history.append(SPACE_MAX, toy_values(SPACE_MAX), 0.1, "test")
    with open(path, "a") as f:
        f.write('{"n": 1, "config": {"qkv.0"')  # killed mid-write
    again = History(path, problem.objectives)
    assert len(again) == 1
    again.append(SPACE_MIN, toy_values(SPACE_MIN), 0.1, "test")
    assert len(History(path, problem.objectives)) == 2
    with pytest.raises(ShearsError, match="objectives"):
        History(path, parse_objectives("accuracy,nonzero_params", lambda n, c: toy_values(c)["adapter_params"],
                                       SPACE_MIN, SPACE_MAX))


SPACE_MAX = {k: max(v) for k, v in SPACE.choices.items()}
SPACE_MIN = {k: min(v) for k, v in SPACE.choices.items()}


# ----------------------------------------------------------------------------- both backends


@pytest.mark.parametrize("name", ["pymoo", "tpe", "nsga2", "random"])
def test_budget_exact_no_reevaluation_anchors_first_and_front(tmp_path, name):
    objective = CountingObjective()
    problem = toy_problem(objective)
    result = search(problem, tmp_path / "search", 20, backends(tmp_path)[name], progress=False)
    history = read_history(tmp_path / "search" / "history.jsonl")
    assert len(history) == 20 and len(objective.calls) == 20
    assert len(set(objective.calls)) == 20
    assert [canonical(r["config"]) for r in history[:3]] == [canonical(problem.anchors[a]) for a in ANCHORS]
    assert [r["label"] for r in history[:3]] == list(ANCHORS)
    front = json.loads((tmp_path / "search" / "front.json").read_text())["front"]
    assert sorted(canonical(r["config"]) for r in front) == brute_force_front(history, problem.objectives)
    sizes = [r["objectives"]["adapter_params"] for r in front]
    assert sizes == sorted(sizes)
    csv_lines = (tmp_path / "search" / "front.csv").read_text().splitlines()
    assert len(csv_lines) == len(front) + 1
    assert (tmp_path / "search" / "front.png").stat().st_size > 1000
    # hypervolume after each evaluation = recomputed from the prefix of the history
    for i in (0, 5, 19):
        prefix = history[: i + 1]
        pts = [(1 - r["objectives"]["accuracy"], (r["objectives"]["adapter_params"] - 160) / (640 - 160))
               for r in prefix]
        assert history[i]["hypervolume"] == pytest.approx(hypervolume_2d(pts), abs=1e-12)
    assert result.evaluated == 20


@pytest.mark.parametrize("name", ["pymoo", "tpe", "nsga2"])
def test_resume_after_a_kill_spends_only_the_remaining_budget(tmp_path, name):
    killed = CountingObjective(fail_after=7)
    with pytest.raises(KeyboardInterrupt):
        search(toy_problem(killed), tmp_path / "search", 18, backends(tmp_path)[name], progress=False)
    assert len(read_history(tmp_path / "search" / "history.jsonl")) == 7
    resumed = CountingObjective()
    search(toy_problem(resumed), tmp_path / "search", 18, backends(tmp_path, seed=1)[name], progress=False)
    history = read_history(tmp_path / "search" / "history.jsonl")
    assert len(resumed.calls) == 11 and len(history) == 18
    assert len(set(killed.calls + resumed.calls)) == 18  # nothing evaluated twice across the kill
    more = CountingObjective()  # a larger budget continues
    search(toy_problem(more), tmp_path / "search", 25, backends(tmp_path, seed=2)[name], progress=False)
    assert len(more.calls) == 7 and len(set(killed.calls + resumed.calls + more.calls)) == 25
    again = CountingObjective()  # the same budget again does nothing
    search(toy_problem(again), tmp_path / "search", 25, backends(tmp_path, seed=3)[name], progress=False)
    assert again.calls == []


def test_backends_share_the_cache_and_stop_when_the_space_is_exhausted(tmp_path):
    first = CountingObjective()
    search(toy_problem(first), tmp_path / "s", 30, backends(tmp_path)["tpe"], progress=False)
    second = CountingObjective()
    result = search(toy_problem(second), tmp_path / "s", 500, backends(tmp_path)["pymoo"], progress=False)
    assert len(result.history) == SPACE_SIZE and len(second.calls) == SPACE_SIZE - 30
    assert not set(first.calls) & set(second.calls)


def test_gp_sampler_is_multi_objective(tmp_path):
    objective = CountingObjective()
    backend = OptunaBackend("gp", storage=f"journal:{tmp_path}/gp.log", seed=0)
    search(toy_problem(objective), tmp_path / "s", 14, backend, progress=False)
    assert len(objective.calls) == 14 == len(set(objective.calls))


def test_loss_objective_is_minimised(tmp_path):
    problem = toy_problem(names="loss,adapter_params")
    result = search(problem, tmp_path / "s", 12, backends(tmp_path)["random"], progress=False)
    assert sorted(canonical(r["config"]) for r in result.front) == brute_force_front(result.history.records,
                                                                                        problem.objectives)
    assert problem.objectives[0].maximize is False


def test_bad_input_names_the_fix(tmp_path):
    with pytest.raises(ShearsError, match="unknown objective"):
        parse_objectives("accuracy,flops", lambda n, c: 0.0, {}, {})
    with pytest.raises(ShearsError, match="one quality"):
        parse_objectives("accuracy,loss", lambda n, c: 0.0, {}, {})
    one_line_error(lambda: parse_objectives("accuracy,nonzero_params", lambda n, c: 1234.0, SPACE_MIN, SPACE_MAX),
                   "nonzero_params", "1,234", "every subnet", "adapter_params")
    with pytest.raises(ShearsError, match="journal"):
        open_storage("study.db")
    with pytest.raises(ShearsError, match="budget"):
        search(toy_problem(), tmp_path / "s", 0, backends(tmp_path)["pymoo"], progress=False)
    search(toy_problem(), tmp_path / "s", 4, backends(tmp_path)["tpe"], progress=False)
    with pytest.raises(ShearsError, match="objectives"):  # same study, other objectives
        search(toy_problem(names="loss,adapter_params"), tmp_path / "t", 4, backends(tmp_path)["tpe"], progress=False)


def test_cli_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    from shears.search import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--run", str(tmp_path), "--budget", "3"])
    assert exit_info.value.code == 2 and "recipe.yaml" in capsys.readouterr().err


def test_cli_scores_on_the_default_device(tmp_path, monkeypatch):
    """The search scores its subnets on a GPU when there is one (shears.precision.default_device), not on
    the CPU where load_run leaves a model by default."""
    from test_export import train_tiny_run

    import shears.run
    from shears.precision import default_device
    from shears.search import main

    run = train_tiny_run(tmp_path, "llama").path
    asked = {}

    def spy(*args, **kwargs):
        asked.update(kwargs)
        raise KeyboardInterrupt  # enough: the model's device is decided here

    monkeypatch.setattr(shears.run, "load_run", spy)
    with pytest.raises(KeyboardInterrupt):
        main(["--run", str(run), "--budget", "3", "--no-progress"])
    assert asked["device"] == default_device()


# ----------------------------------------------------------------------------- several processes


def _worker(out_dir: str, storage: str, budget: int, seed: int, calls_file: str, die_after: int | None) -> None:
    """One search process; with die_after it exits abruptly mid-evaluation, leaving a RUNNING trial."""
    class Logged(CountingObjective):
        def __call__(self, config):
            if die_after is not None and len(self.calls) >= die_after:
                os._exit(3)
            values = super().__call__(config)
            with open(calls_file, "a") as f:
                f.write(canonical(config) + "\n")
            return values

    backend = OptunaBackend("tpe", storage=storage, seed=seed)
    search(toy_problem(Logged(sleep=0.01)), out_dir, budget, backend, progress=False, plot=False)


def _study_trials(storage: str):
    return optuna.load_study(study_name="shears-search", storage=open_storage(storage)).get_trials(deepcopy=False)


@pytest.mark.slow
def test_two_concurrent_optuna_workers_share_one_budget_without_duplicates(tmp_path):
    storage, out, budget = f"journal:{tmp_path}/study.log", str(tmp_path / "search"), 40
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=_worker, args=(out, storage, budget, seed, str(tmp_path / f"calls{seed}"), None))
               for seed in (1, 2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    calls = [Path(tmp_path / f"calls{s}").read_text().split() for s in (1, 2)]
    assert all(calls), "both workers must have evaluated something"
    every = calls[0] + calls[1]
    assert len(every) == budget and len(set(every)) == budget  # no config evaluated twice, budget exact
    history = read_history(Path(out) / "history.jsonl")
    assert sorted(canonical(r["config"]) for r in history) == sorted(every)
    evaluated = [t for t in _study_trials(storage) if t.user_attrs.get("outcome") == "evaluated"]
    assert len(evaluated) == budget and len({t.user_attrs["config"] for t in evaluated}) == budget


@pytest.mark.slow
def test_a_worker_killed_mid_evaluation_has_its_trial_retried(tmp_path):
    storage, out = f"journal:{tmp_path}/study.log", str(tmp_path / "search")
    proc = mp.get_context("spawn").Process(target=_worker, args=(out, storage, 12, 0, str(tmp_path / "c"), 5))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 3
    dead = [t for t in _study_trials(storage) if t.state == optuna.trial.TrialState.RUNNING]
    assert len(dead) == 1
    lost = dead[0].user_attrs["config"]
    resumed = CountingObjective()
    search(toy_problem(resumed), out, 12, OptunaBackend("tpe", storage=storage, seed=5), progress=False, plot=False)
    assert len(resumed.calls) == 7 and lost in resumed.calls  # the lost trial came back
    history = read_history(Path(out) / "history.jsonl")
    assert len(history) == 12 == len({canonical(r["config"]) for r in history})


# ----------------------------------------------------------------------------- a real tiny super-network


def test_real_tiny_supernet_search_and_analytic_sizes(tmp_path):
    import copy

    import torch
    from conftest import make_tiny_model

    from shears.elastic import SuperNet
    from shears.search.cli import format_front
    from shears.search.objectives import size_function
    from shears.search_space import SearchSpace

    base = make_tiny_model("llama")
    with torch.no_grad():  # a 50%-sparse base, so dense merging adds non-zeros
        for name, p in base.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_((torch.rand_like(p) > 0.5).float())
    space = SearchSpace.from_dict({"target_modules": ["q_proj", "v_proj", "up_proj"], "r_max": 8, "lora_alpha": 16,
                                   "lora_dropout": 0.0, "groups": [
                                       {"name": "qv", "modules": ["q_proj", "v_proj"], "choices": [8, 4, 2]},
                                       {"name": "up", "modules": ["up_proj"], "choices": [8, 2], "scope": "global"}]})
    supernet = SuperNet.from_base(base, space)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in supernet.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a non-trivial adapter
    batch = torch.randint(3, 128, (2, 12))
    sizes = {n: size_function(supernet, n) for n in ("adapter_params", "nonzero_params")}

    def loss_of(config):
        supernet.activate(config)
        with torch.no_grad():
            loss = supernet.model(input_ids=batch, labels=batch).loss
        return {"loss": float(loss), **{n: f(config) for n, f in sizes.items()}}

    bound = supernet.space
    objectives = parse_objectives("loss,adapter_params", lambda n, c: sizes[n](c), bound.minimal(), bound.maximal())
    problem = SearchProblem.from_space(bound, objectives, loss_of)
    assert problem.size == 3 * 3 * 2
    result = search(problem, tmp_path / "s", 10, PymooBackend(population_size=6), progress=False)
    assert len(result.history) == 10
    assert [r["config"] for r in result.history.records[:3]] == [bound.maximal(), bound.heuristic(), bound.minimal()]
    assert "loss" in format_front(result, objectives)
    # sizes, checked against the model itself: the adapter tensors of the subnet, and the non-zeros of
    # what a user deploys -- the sparse base (a dense merge would fill its zeros) plus the subnet's adapter
    with torch.no_grad():
        supernet.model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight[1, :5] = 0.0
    base_nonzeros = sum(int(p.count_nonzero()) for n, p in base.named_parameters() if "lora_" not in n)
    deployed = [sum(int(t.count_nonzero()) for t in supernet.subnet_state_dict(c).values())
                for c in (bound.minimal(), bound.heuristic(), bound.maximal())]
    nonzeros = size_function(supernet, "nonzero_params")
    for config, adapter_nonzeros in zip((bound.minimal(), bound.heuristic(), bound.maximal()), deployed):
        assert sizes["adapter_params"](config) == sum(t.numel() for t in supernet.subnet_state_dict(config).values())
        assert nonzeros(config) == base_nonzeros + adapter_nonzeros
    assert len({nonzeros(c) for c in (bound.minimal(), bound.heuristic(), bound.maximal())}) == 3
    parse_objectives("loss,nonzero_params", lambda n, c: nonzeros(c), bound.minimal(), bound.maximal())  # varies


def test_nonzero_params_of_a_masked_adapter_is_the_merged_models_and_is_refused_as_constant():
    import copy

    import torch
    from conftest import make_tiny_model

    from shears.elastic import SuperNet
    from shears.search.objectives import size_function
    from shears.search_space import SearchSpace

    base = make_tiny_model("llama")
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_((torch.rand_like(p) > 0.5).float())
    space = SearchSpace.from_dict({"target_modules": ["q_proj", "up_proj"], "r_max": 8, "lora_alpha": 16,
                                   "lora_dropout": 0.0, "groups": [
                                       {"name": "q", "modules": ["q_proj"], "choices": [8, 2]},
                                       {"name": "up", "modules": ["up_proj"], "choices": [8, 4]}]})
    supernet = SuperNet.from_base(base, space, sparse_adapter=True)
    with torch.no_grad():
        for name, p in supernet.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    bound, nonzeros = supernet.space, size_function(supernet, "nonzero_params")
    for config in (bound.minimal(), bound.maximal()):
        supernet.activate(config)
        merged = copy.deepcopy(supernet.model).merge_and_unload()  # the masked update keeps the zeros
        assert nonzeros(config) == sum(int(p.count_nonzero()) for p in merged.parameters())
    one_line_error(lambda: parse_objectives("loss,nonzero_params", lambda n, c: nonzeros(c), bound.minimal(),
                                            bound.maximal()), "nonzero_params", "every subnet", "adapter_params")


# ----------------------------------------------------------------------------- multi-fidelity screening


def fidelity_problem(names="accuracy,adapter_params", n_full=64, noise=0.0):
    """toy_values on the full set; on the first n examples the same quality plus a shift every
    config shares (a slice is easier) and optional config-dependent noise that shrinks with n."""
    calls: list[tuple[str, int | None]] = []

    def objective(config, n_examples=None):
        calls.append((canonical(config), n_examples))
        values = dict(toy_values(config))
        if n_examples is not None:
            wobble = noise * (((config["qkv.0"] * 5 + config["up.0"] * 3 + config["qkv.1"]) % 7) / 7 - 0.5)
            shift = 0.05 + wobble * (1 - n_examples / n_full)
            values["accuracy"] += shift
            values["loss"] -= shift
        return values

    base = toy_problem(names=names)
    problem = SearchProblem(base.keys, base.choices, base.objectives, objective, base.anchors, examples=n_full)
    return problem, calls


def replay_promotions(records, objectives, rung: int, keep: float):
    """Independently of fidelity.py: for each record at `rung`, in file order, how many earlier-or-same
    records of the rung strictly out-rank it (fewer dominance levels, counted by brute force)."""
    def vec(r):
        return [(1 - r["objectives"][o.name]) if o.name == "accuracy" else r["objectives"][o.name]
                for o in objectives]

    def levels(pool):
        left, level, out = list(range(len(pool))), 0, {}
        while left:
            top = [i for i in left if not any(all(a <= b for a, b in zip(vec(pool[j]), vec(pool[i])))
                                                and vec(pool[j]) != vec(pool[i]) for j in left)]
            for i in top:
                out[i] = level
            left = [i for i in left if i not in top]
            level += 1
        return out

    verdicts = {}
    pool = []
    for record in records:
        if record.get("n_examples") != rung:
            continue
        pool.append(record)
        ranks = levels(pool)
        better = sum(1 for i in ranks if ranks[i] < ranks[len(pool) - 1])
        verdicts[canonical(record["config"])] = better < -(-keep * len(pool) // 1)
    return verdicts


# (TPE is left out here: on a 108-config space it keeps re-proposing configs stopped at a rung)
@pytest.mark.parametrize("name", ["pymoo", "nsga2", "random"])
@pytest.mark.parametrize("names", ["accuracy,adapter_params", "loss,adapter_params"])
def test_multi_fidelity_promotes_exactly_the_rungs_best_and_spends_full_set_equivalents(tmp_path, name, names):
    from shears.search import Rungs

    problem, calls = fidelity_problem(names, noise=0.3)
    rungs = Rungs((8, 24), keep=0.34)
    result = search(problem, tmp_path / "s", 12, backends(tmp_path)[name], progress=False, rungs=rungs)
    records = read_history(tmp_path / "s" / "history.jsonl")
    # every score says how many examples are behind it, and costs n/N of a full evaluation
    assert all(r["n_examples"] in (8, 24, 64) for r in records)
    spent = sum(r["n_examples"] / 64 for r in records)
    assert result.history.spent == pytest.approx(spent)
    assert 12 <= spent < 12 + 1 + (8 + 24) / 64  # stops at the budget, overrunning by at most one candidate
    assert len(calls) == len(records) == len(set(calls))  # nothing scored twice on the same slice
    # a config reaches a rung (or the full set) only when it was among the best at the rung below
    # (the anchors climb every rung)
    anchors = {canonical(a) for a in problem.anchors.values()}
    for below, above in ((8, 24), (24, 64)):
        verdicts = replay_promotions(records, problem.objectives, below, rungs.keep)
        reached = {canonical(r["config"]) for r in records if r["n_examples"] == above}
        for key, promoted in verdicts.items():
            if key not in anchors:
                assert (key in reached) == promoted, (below, key)
    # the front is built from full-set scores only
    full = [r for r in records if r["n_examples"] == 64]
    assert sorted(canonical(r["config"]) for r in result.front) == brute_force_front(full, problem.objectives)
    assert len(result.history) == len(full) <= len({canonical(r["config"]) for r in records})
    front_json = json.loads((tmp_path / "s" / "front.json").read_text())
    assert front_json["evaluations"] == len(full)


def test_screening_with_a_faithful_slice_keeps_the_true_front_cheaper(tmp_path):
    """When a slice ranks configs exactly as the full set does (a shared shift only), every config
    of the full front survives screening: the front of a multi-fidelity search over the whole space
    is the exhaustive front, found for less than one full evaluation per config."""
    from shears.search import Rungs

    problem, _ = fidelity_problem(noise=0.0)
    exhaustive = [{"config": dict(zip(SPACE.keys, c)), "objectives": toy_values(dict(zip(SPACE.keys, c)))}
                  for c in itertools.product(*(SPACE.choices[k] for k in SPACE.keys))]
    truth = brute_force_front(exhaustive, problem.objectives)
    result = search(problem, tmp_path / "s", 1000, PymooBackend(seed=0), progress=False, plot=False,
                    rungs=Rungs((8,), keep=0.5))
    assert sorted(canonical(r["config"]) for r in result.front) == truth
    assert result.history.spent < SPACE_SIZE * 0.8


def test_rungs_are_checked_against_the_evaluation_set():
    from shears.search import Rungs

    assert Rungs.from_recipe([], 0.3, 64) is None
    one_line_error(lambda: Rungs.from_recipe([32, 16], 0.3, 64), "increasing", "64")
    one_line_error(lambda: Rungs.from_recipe([16, 64], 0.3, 64), "increasing")
    one_line_error(lambda: Rungs.from_recipe([16], 1.5, 64), "keep")
    one_line_error(lambda: Rungs.from_recipe([16], 0.3, None), "rungs")


# ----------------------------------------------------------------------------- the predictor


def test_ridge_matches_the_augmented_least_squares_closed_form_and_loo_matches_refits():
    from shears.search.surrogate import Ridge, loo_error

    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1, (25, 9)), rng.normal(size=25)
    for alpha in (1e-3, 0.5, 30.0):
        model = Ridge.fit(x, y, alpha)
        # independent: min |y - b - Xw|^2 + alpha |w|^2 as one least-squares system with an unpenalised
        # intercept column and sqrt(alpha) * I rows for w
        design = np.vstack([np.hstack([np.ones((25, 1)), x]), np.hstack([np.zeros((9, 1)), np.sqrt(alpha) * np.eye(9)])])
        solution = np.linalg.lstsq(design, np.concatenate([y, np.zeros(9)]), rcond=None)[0]
        assert model.predict(x) == pytest.approx(solution[0] + x @ solution[1:], abs=1e-9)
        refits = [Ridge.fit(np.delete(x, i, 0), np.delete(y, i), alpha).predict(x[i:i + 1])[0] for i in range(25)]
        assert loo_error(x, y, alpha) == pytest.approx(np.mean((y - np.array(refits)) ** 2), rel=1e-9)


def test_kendall_tau_matches_pair_counting():
    from shears.search.surrogate import kendall_tau

    def tau_b(a, b):  # the definition: (concordant - discordant) / sqrt(pairs untied in a * pairs untied in b)
        pairs = [(a[i] - a[j], b[i] - b[j]) for i in range(len(a)) for j in range(i + 1, len(a))]
        score = sum(np.sign(x) * np.sign(y) for x, y in pairs)
        return score / math.sqrt(sum(x != 0 for x, _ in pairs) * sum(y != 0 for _, y in pairs))

    rng = np.random.default_rng(1)
    for _ in range(10):
        a = rng.integers(0, 5, 12).astype(float)  # ties
        b = a + rng.normal(0, 2, 12)
        b[:3] = b[0]  # ties on both sides
        assert kendall_tau(a, b) == pytest.approx(tau_b(a, b), abs=1e-12)
    a, b = [1, 2, 3, 4], [1, 3, 2, 4]  # 5 concordant, 1 discordant pair
    assert kendall_tau(a, b) == pytest.approx((5 - 1) / 6)
    assert kendall_tau([1, 1, 1], [1, 2, 3]) is None  # no variation on one side
    assert kendall_tau([1, 2], [2, 1]) is None


def linear_problem():
    """Quality exactly linear in the ranks (a ridge predictor can learn it), size another linear map:
    the exhaustive front is known."""
    weights = {"qkv.0": 3.0, "up.0": 0.2, "qkv.1": 2.0, "up.1": 0.1}

    def values(config):
        return {"loss": 3.0 - sum(weights[k] * config[k] for k in config) / 100,
                "adapter_params": 10.0 * sum(config.values())}

    objectives = parse_objectives("loss,adapter_params", lambda n, c: values(c)[n], SPACE_MIN, SPACE_MAX)
    problem = SearchProblem.from_space(SPACE, objectives, CountingObjective(), sizes=lambda c: {
        "adapter_params": values(c)["adapter_params"]})
    problem.objective_fn = lambda config: values(config)
    return problem, values


@pytest.mark.parametrize("enumerate_limit", [4096, 0], ids=["space-predicted-whole", "nsga2-on-the-predictor"])
def test_surrogate_learns_a_linear_quality_and_finds_the_exhaustive_front(tmp_path, enumerate_limit):
    from shears.search import SurrogateBackend

    problem, values = linear_problem()
    exhaustive = [{"config": dict(zip(SPACE.keys, c)), "objectives": values(dict(zip(SPACE.keys, c)))}
                  for c in itertools.product(*(SPACE.choices[k] for k in SPACE.keys))]
    truth = brute_force_front(exhaustive, problem.objectives)
    backend = SurrogateBackend(seed=0, initial=8, population_size=16, generations=8, enumerate_limit=enumerate_limit)
    result = search(problem, tmp_path / "s", 30, backend, progress=False, plot=False)
    history = read_history(tmp_path / "s" / "history.jsonl")
    assert len(history) == 30 == len({canonical(r["config"]) for r in history})
    assert [canonical(r["config"]) for r in history[:3]] == [canonical(problem.anchors[a]) for a in ANCHORS]
    proposed = [r for r in history if "predicted" in r]
    assert len(proposed) == len(backend.predictions) == 22
    assert backend.kendall_tau() > 0.9  # held-out: each prediction was made before its point was fitted
    found = {canonical(r["config"]) for r in result.front}
    assert len(found & set(truth)) >= 0.8 * len(truth)


def test_surrogate_on_a_small_space_proposes_the_best_predicted_gain_over_every_unseen_config(tmp_path):
    from shears.search import SurrogateBackend
    from shears.search.history import hypervolume

    problem, _ = linear_problem()
    backend = SurrogateBackend(seed=0, initial=8)
    history = search(problem, tmp_path / "s", 9, backend, progress=False, plot=False).history
    proposal, predicted = backend.propose(problem, history, np.random.default_rng(0), quality=0)

    models = backend.fit(problem, history, 0)  # the same fit the proposal was made with
    front = [history.normalised(r) for r in history.front()]
    unseen = [c for c in (dict(zip(SPACE.keys, ranks)) for ranks in itertools.product(*(SPACE.choices[k] for k in SPACE.keys)))
              if c not in history]
    assert len(unseen) == SPACE_SIZE - 9 and proposal in unseen

    def gain(config):  # one candidate at a time, by the plain hypervolume of the front plus its predicted point
        return hypervolume([*front, tuple(backend.predict(problem, models, [config])[0])]) - hypervolume(front)

    assert gain(proposal) == pytest.approx(max(gain(c) for c in unseen)) and gain(proposal) > 0
    assert predicted == pytest.approx(backend.predict(problem, models, [proposal])[0, 0])


def test_surrogate_with_rungs_and_the_cli_parts_fit_together(tmp_path):
    from shears.search import Rungs, SurrogateBackend

    problem, calls = fidelity_problem("loss,adapter_params", noise=0.2)
    problem.sizes = lambda c: {"adapter_params": toy_values(c)["adapter_params"]}
    backend = SurrogateBackend(seed=1, initial=6, population_size=16, generations=5)
    result = search(problem, tmp_path / "s", 10, backend, progress=False, plot=False, rungs=Rungs((16,), 0.5))
    assert 10 <= result.history.spent < 11.25
    assert len(calls) == len(set(calls))


# ----------------------------------------------------------------------------- warm start


def test_warm_start_imports_only_scores_of_the_same_scorer_and_backends_start_from_them(tmp_path):
    import dataclasses

    first = CountingObjective()
    problem = dataclasses.replace(toy_problem(first), scorer="aaaa")
    search(problem, tmp_path / "earlier", 12, backends(tmp_path)["random"], progress=False, plot=False)
    other = dataclasses.replace(toy_problem(CountingObjective()), scorer="bbbb")
    search(other, tmp_path / "other", 5, PymooBackend(seed=3), progress=False, plot=False)

    for name in ("pymoo", "tpe"):
        again = CountingObjective()
        warm = dataclasses.replace(toy_problem(again), scorer="aaaa")
        out = tmp_path / f"warm-{name}"
        result = search(warm, out, 16, backends(tmp_path / name)[name], progress=False, plot=False,
                        warm_start=[tmp_path / "earlier", tmp_path / "other" / "history.jsonl"])
        history = read_history(out / "history.jsonl")
        imported = [r for r in history if r.get("source")]
        assert len(imported) == 12 and all(r["source"].endswith("earlier/history.jsonl") for r in imported)
        assert len(again.calls) == 4 and not set(again.calls) & set(first.calls)  # the budget counts them
        assert len(result.history) == 16
    # a history holding another scorer's scores is refused, in one line
    one_line_error(lambda: search(other, tmp_path / "earlier", 14, PymooBackend(), progress=False, plot=False),
                   "another super-network", "warm start")
    one_line_error(lambda: search(problem, tmp_path / "x", 3, PymooBackend(), progress=False,
                                  warm_start=[tmp_path / "nowhere"]), "nowhere")


def test_cli_on_a_trained_run_surrogate_with_rungs_then_a_warm_started_search(tmp_path, capsys):
    from test_export import train_tiny_run

    from shears.search import main

    run = train_tiny_run(tmp_path, "llama").path  # 8 validation records; randomised adapter
    main(["--run", str(run), "--budget", "6", "--backend", "surrogate", "--rungs", "2,4",
          "--objectives", "loss,nonzero_params", "--no-progress"])
    out = capsys.readouterr().out
    assert "Kendall tau" in out and "hypervolume" in out
    records = read_history(run / "search" / "history.jsonl")
    assert {r["n_examples"] for r in records} == {2, 4, 8} and len({r["scorer"] for r in records}) == 1
    assert 6 <= sum(r["n_examples"] / 8 for r in records) < 6 + 1 + 6 / 8
    sizes = {r["objectives"]["nonzero_params"] for r in records}
    assert len(sizes) > 1  # the size axis exists
    # another search folder, warm-started from the first: its scores are reused, not re-measured
    (run / "search").rename(run / "earlier")
    main(["--run", str(run), "--budget", "9", "--backend", "pymoo", "--objectives", "loss,nonzero_params",
          "--warm-start", str(run / "earlier"), "--no-progress"])
    again = read_history(run / "search" / "history.jsonl")
    assert len([r for r in again if r.get("source")]) == len(records)
    # the same search with fewer records is another scorer: refused instead of mixing scores
    with pytest.raises(SystemExit):
        main(["--run", str(run), "--budget", "10", "--eval-limit", "4", "--objectives", "loss,nonzero_params",
              "--backend", "pymoo", "--no-progress"])
    assert "another super-network or evaluation set" in capsys.readouterr().err


def test_every_history_record_names_the_precision_and_the_bar_shows_seconds_per_eval(tmp_path):
    problem = toy_problem(CountingObjective())
    problem.precision = "bf16-autocast"
    history = History(tmp_path / "history.jsonl", problem.objectives)

    class Bar:
        n, postfix = 0, {}

        def refresh(self):
            pass

        def set_postfix(self, **kwargs):
            self.postfix = kwargs

    bar = Bar()
    Evaluator(problem, history, "test", bar).evaluate(problem.anchors["maximal"])
    assert read_history(tmp_path / "history.jsonl")[0]["precision"] == "bf16-autocast"
    assert float(bar.postfix["s/eval"]) >= 0
