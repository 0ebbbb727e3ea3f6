"""Scores with their noise: standard errors and paired differences against scipy and a simulation,
the history's verdicts on each new point against a brute-force replay, the stop rule, resume and
histories written before per-record values were kept."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from shears.noise import Z, Difference, PerRecord, mean_and_se, paired
from shears.search import OptunaBackend, PymooBackend, SearchProblem, SurrogateBackend, parse_objectives, search
from shears.search_space import canonical

# ----------------------------------------------------------------------------- the statistics


def test_equal_weights_give_scipys_sem_and_paired_differences_scipys_paired_t():
    rng = np.random.default_rng(0)
    a = rng.normal(2.0, 0.5, 40)
    b = a + rng.normal(0.05, 0.1, 40)  # correlated: the paired error is far below the independent ones
    mean, se = mean_and_se(a)
    assert mean == pytest.approx(a.mean()) and se == pytest.approx(stats.sem(a))
    difference = paired(PerRecord(tuple(b)), PerRecord(tuple(a)))
    assert difference.diff == pytest.approx(b.mean() - a.mean()) and difference.n == 40
    t = stats.ttest_rel(b, a).statistic  # t = mean(d) / SE(d)
    assert difference.se == pytest.approx(difference.diff / t)
    assert difference.se < 0.3 * math.hypot(stats.sem(a), stats.sem(b))
    assert paired(PerRecord((1.0, 2.0)), PerRecord((1.0, 2.0, 3.0))) is None  # not the same records


def test_the_weighted_standard_error_is_the_spread_of_the_ratio_over_fresh_record_sets():
    """Monte Carlo: draw many evaluation sets of n records (a loss and a token count each) from one
    population; the token-weighted loss varies from set to set by what the formula predicts."""
    rng = np.random.default_rng(1)
    n, sets = 120, 4000
    tokens = rng.integers(3, 60, size=(sets, n)).astype(float)
    losses = 2.0 + 0.02 * tokens + rng.gamma(2.0, 0.4, size=(sets, n))  # longer answers cost more
    ratios = (tokens * losses).sum(1) / tokens.sum(1)
    predicted = [mean_and_se(losses[i], tokens[i])[1] for i in range(200)]
    assert np.mean(predicted) == pytest.approx(ratios.std(ddof=1), rel=0.06)
    assert mean_and_se(losses[0], tokens[0])[0] == pytest.approx(ratios[0])


def test_records_needed_is_where_the_difference_reaches_z_standard_errors():
    difference = Difference(diff=0.003, se=0.004, n=256)
    needed = difference.records_needed()
    assert needed == pytest.approx(256 * (Z * 0.004 / 0.003) ** 2)
    assert 0.003 == pytest.approx(Z * 0.004 * math.sqrt(256 / needed))  # SE shrinks as 1/sqrt(n)
    assert not difference.significant() and Difference(0.01, 0.004, 256).significant()
    assert Difference(0.0, 0.0, 9).records_needed() == math.inf


# ----------------------------------------------------------------------------- a noisy problem

SPACE = SimpleNamespace(keys=["a", "b", "c", "d"], choices={k: (4, 8, 12, 16) for k in "abcd"})
RECORDS = 48
DIFFICULTY = np.random.default_rng(7).normal(2.0, 0.6, RECORDS)  # shared by every subnet: why pairing helps


def record_noise(config: dict, sigma: float) -> np.ndarray:
    seed = int(hashlib.sha1(canonical(config).encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).normal(0.0, sigma, RECORDS)


class NoisyObjective:
    """Per-record loss = the record's difficulty - effect * (the config's true quality) + noise."""

    def __init__(self, effect: float, sigma: float = 0.05, with_noise: bool = True):
        self.effect, self.sigma, self.with_noise = effect, sigma, with_noise
        self.calls: list[str] = []

    def __call__(self, config: dict, n_examples: int | None = None) -> dict:
        self.calls.append(canonical(config))
        quality = (config["a"] * 3 + config["b"] * 2 + config["c"] + (config["d"] * 5) % 7) / 100
        values = (DIFFICULTY - self.effect * quality + record_noise(config, self.sigma))[:n_examples]
        out = {"loss": float(values.mean()), "adapter_params": 10.0 * sum(config.values())}
        if self.with_noise:
            out["per_record"] = {"loss": PerRecord(tuple(float(v) for v in values))}
        return out


def noisy_problem(objective: NoisyObjective, examples: int | None = None) -> SearchProblem:
    minimal = {k: 4 for k in SPACE.keys}
    maximal = {k: 16 for k in SPACE.keys}
    sizes = {"adapter_params": lambda c: 10.0 * sum(c.values())}
    objectives = parse_objectives("loss,adapter_params", lambda name, c: sizes[name](c), minimal, maximal)
    return SearchProblem.from_space(SPACE, objectives, objective, examples=examples,
                                    sizes=lambda c: {"adapter_params": sizes["adapter_params"](c)})


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def replay_verdicts(records: list[dict]) -> list[str]:
    """Independently of history.py: each full-set record against the brute-force front of the records
    before it, with scipy's paired t statistic (t > Z: beyond the noise)."""
    def point(r):
        return r["objectives"]["loss"], r["objectives"]["adapter_params"]

    verdicts, seen = [], []
    for record in records:
        front = [r for r in seen if not any(all(x <= y for x, y in zip(point(s), point(r))) and point(s) != point(r)
                                            for s in seen)]
        loss, size = point(record)
        if any(point(f)[0] <= loss and point(f)[1] <= size for f in front):
            verdicts.append("no")
        else:
            incumbents = [f for f in front if point(f)[1] <= size]
            mine = np.array(record["per_record"]["loss"]["values"])
            ts = [stats.ttest_rel(np.array(f["per_record"]["loss"]["values"]), mine).statistic for f in incumbents]
            verdicts.append("yes" if all(t > Z for t in ts) else "noise")
        seen.append(record)
    return verdicts


def test_each_new_point_is_judged_against_its_incumbents_paired_as_a_replay_finds(tmp_path):
    objective = NoisyObjective(effect=0.6, sigma=0.08)
    search(noisy_problem(objective), tmp_path / "s", 40, OptunaBackend("random", storage=str(tmp_path / "j.log")),
           progress=False, plot=False)
    records = read(tmp_path / "s" / "history.jsonl")
    assert [r["front_moved"] for r in records] == replay_verdicts(records)
    assert {"yes", "noise", "no"} <= {r["front_moved"] for r in records}  # the test sees every case
    for r in records:  # the standard error is recorded, and is the per-record values' own
        assert r["se"]["loss"] == pytest.approx(stats.sem(r["per_record"]["loss"]["values"]), rel=1e-5)
    # front.json and front.csv: each point's standard error and its paired advantage over the previous one
    front = json.loads((tmp_path / "s" / "front.json").read_text())["front"]
    csv = (tmp_path / "s" / "front.csv").read_text().splitlines()
    assert "loss_se" in csv[0] and len(csv) == len(front) + 1
    for previous, point in zip(front, front[1:]):
        expected = stats.ttest_rel(point_values(previous, records), point_values(point, records)).statistic  # loss falls
        assert point["vs_previous"]["diff"] / point["vs_previous"]["se"] == pytest.approx(expected)


def point_values(point: dict, records: list[dict]) -> np.ndarray:
    record = next(r for r in records if canonical(r["config"]) == canonical(point["config"]))
    return np.array(record["per_record"]["loss"]["values"])


# ----------------------------------------------------------------------------- the stop rule


@pytest.mark.parametrize("name", ["pymoo", "tpe", "surrogate"])
def test_the_stop_rule_ends_a_flat_search_k_evaluations_after_the_front_last_moved(tmp_path, name):
    backend = {"pymoo": PymooBackend(seed=0, population_size=8),
               "tpe": OptunaBackend("tpe", storage=f"journal:{tmp_path}/study.log", seed=0),
               "surrogate": SurrogateBackend(seed=0, initial=6, population_size=16, generations=4)}[name]
    objective = NoisyObjective(effect=0.0, sigma=0.3)  # subnets differ by noise only
    result = search(noisy_problem(objective), tmp_path / "s", 60, backend, progress=False, plot=False,
                    stop_when_flat=6)
    records = read(tmp_path / "s" / "history.jsonl")
    verdicts = [r["front_moved"] for r in records]
    assert verdicts == replay_verdicts(records)
    assert len(records) < 60 and result.stopped is not None
    assert all(v in ("no", "noise") for v in verdicts[-6:]) and verdicts[-7] == "yes"  # exactly K after the last move
    assert result.stopped.saved == 60 - len(records)
    message = result.stopped.message()
    assert f"saving {60 - len(records)} evaluations" in message and "n·(z·SE/|Δ|)²" in message
    within = [r["paired"] for r in records[-6:] if r["front_moved"] == "noise"]
    if within:  # the closest call's back-of-envelope, by the formula
        closest = min((Difference(p["diff"], p["se"], p["n"]) for p in within), key=Difference.records_needed)
        assert f"~{RECORDS * (Z * closest.se / closest.diff) ** 2:,.0f} records" in message
    # a re-run with the rule on stops at once; without it, the budget is spent
    again = NoisyObjective(effect=0.0, sigma=0.3)
    assert search(noisy_problem(again), tmp_path / "s", 60, PymooBackend(), progress=False, plot=False,
                  stop_when_flat=6).stopped is not None and again.calls == []


def test_the_stop_rule_counts_full_set_points_only_and_multi_fidelity_still_works(tmp_path):
    from shears.search import Rungs

    objective = NoisyObjective(effect=0.0, sigma=0.3)
    result = search(noisy_problem(objective, examples=RECORDS), tmp_path / "s", 40, PymooBackend(seed=1),
                    progress=False, plot=False, rungs=Rungs((12,), keep=0.5), stop_when_flat=4)
    records = read(tmp_path / "s" / "history.jsonl")
    full = [r for r in records if r["n_examples"] == RECORDS]
    assert {r["n_examples"] for r in records} == {12, RECORDS}
    assert all(len(r["per_record"]["loss"]["values"]) == r["n_examples"] for r in records)  # slices keep theirs
    assert "front_moved" not in records[0] or records[0]["n_examples"] == RECORDS
    assert result.stopped is not None and [r["front_moved"] for r in full] == replay_verdicts(full)
    assert all(r["front_moved"] in ("no", "noise") for r in full[-4:]) and full[-5]["front_moved"] == "yes"


def test_the_cli_stops_by_the_recipe_default_and_0_spends_the_whole_budget(tmp_path, capsys):
    from test_export import train_tiny_run

    from shears.recipe import SearchConfig
    from shears.search import main

    assert SearchConfig().stop_when_flat == 10  # the default bench_search.py's real-space table chose
    run = train_tiny_run(tmp_path, "llama").path
    args = ["--run", str(run), "--budget", "12", "--backend", "pymoo", "--no-warm-start", "--no-progress"]
    main([*args, "--stop-when-flat", "1"])
    stopped = read(run / "search" / "history.jsonl")
    assert len(stopped) < 12 and "saving" in capsys.readouterr().out
    (run / "search").rename(run / "stopped")
    main([*args, "--stop-when-flat", "0"])
    assert len(read(run / "search" / "history.jsonl")) == 12 and "saving" not in capsys.readouterr().out


def test_bad_stop_rule_settings_name_the_fix(tmp_path):
    from conftest import one_line_error

    one_line_error(lambda: search(noisy_problem(NoisyObjective(0.1)), tmp_path / "s", 5, PymooBackend(),
                                  progress=False, stop_when_flat=0), "--stop-when-flat")


# ----------------------------------------------------------------------------- resume, old histories


def test_a_killed_search_resumes_with_every_per_record_value_and_measures_nothing_twice(tmp_path):
    class Killed(NoisyObjective):
        def __call__(self, config, n_examples=None):
            if len(self.calls) == 7:
                raise KeyboardInterrupt("simulated kill")
            return super().__call__(config, n_examples)

    killed = Killed(effect=0.6)
    with pytest.raises(KeyboardInterrupt):
        search(noisy_problem(killed), tmp_path / "s", 15, PymooBackend(seed=0), progress=False, plot=False)
    before = (tmp_path / "s" / "history.jsonl").read_text()
    resumed = NoisyObjective(effect=0.6)
    search(noisy_problem(resumed), tmp_path / "s", 15, PymooBackend(seed=1), progress=False, plot=False)
    after = (tmp_path / "s" / "history.jsonl").read_text()
    assert after.startswith(before)  # the earlier lines, per-record values included, untouched
    records = read(tmp_path / "s" / "history.jsonl")
    assert len(records) == 15 and len(resumed.calls) == 8 and not set(resumed.calls) & set(killed.calls)
    assert all(len(r["per_record"]["loss"]["values"]) == RECORDS for r in records)
    assert [r["front_moved"] for r in records] == replay_verdicts(records)


def test_an_old_history_loads_says_it_has_no_noise_estimate_and_remeasures_only_when_asked(tmp_path, capsys):
    folder = tmp_path / "s"
    search(noisy_problem(NoisyObjective(effect=0.6, with_noise=False)), folder, 8, PymooBackend(seed=0),
           progress=False, plot=False)
    history = folder / "history.jsonl"
    # a line exactly as a search wrote it before per-record values were kept
    old = {"n": 8, "config": {"a": 12, "b": 4, "c": 16, "d": 8}, "objectives": {"loss": 1.9, "adapter_params": 400.0},
           "seconds": 0.5, "backend": "pymoo:nsga2", "trial": 3, "label": None, "n_examples": None,
           "front_size": 4, "hypervolume": 0.31, "worker": "host:1", "time": "2025-01-01T00:00:00"}
    old = {k: v for k, v in old.items() if v is not None}
    history.write_text(history.read_text() + json.dumps(old) + "\n")
    capsys.readouterr()

    same = NoisyObjective(effect=0.6)
    result = search(noisy_problem(same), folder, 9, PymooBackend(), progress=False, plot=False)
    out = capsys.readouterr().out
    assert "no noise estimate for these points: 9 of 9" in out and "--remeasure-noise" in out
    assert same.calls == []  # nothing measured again
    # a point that adds hypervolume over a front point without per-record values cannot be judged by its noise
    assert {r["front_moved"] for r in result.history.records} <= {"yes", "no", "unknown"}
    assert "unknown" in {r["front_moved"] for r in result.history.records}
    assert all(row["se"]["loss"] is None for row in json.loads((folder / "front.json").read_text())["front"])

    asked = NoisyObjective(effect=0.6)
    result = search(noisy_problem(asked), folder, 9, PymooBackend(), progress=False, plot=False, remeasure_noise=True)
    front = {canonical(r["config"]) for r in result.front}
    assert sorted(asked.calls) == sorted(front)  # the front's points, once each, and nothing else
    assert result.history.spent == 9  # at no budget
    lines = read(history)
    assert sum(1 for r in lines if r.get("remeasure")) == len(front)
    rows = json.loads((folder / "front.json").read_text())["front"]
    assert all(row["se"]["loss"] == pytest.approx(stats.sem(point_values(row, [r for r in lines if r.get("remeasure")])))
               for row in rows)
    again = NoisyObjective(effect=0.6)  # a third run: they stay filled in
    search(noisy_problem(again), folder, 9, PymooBackend(), progress=False, plot=False)
    assert again.calls == [] and "(0 on the front)" in capsys.readouterr().out
