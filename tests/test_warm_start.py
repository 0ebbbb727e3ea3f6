"""Warm start from training: the anchors' scores written at the end of training are the search's own.

Training scores the maximal, heuristic and minimal subnets with the search's Scoring (shears.scores)
and writes them to RUN/warm_start.jsonl; `python -m shears.search` imports them when its scorer is
the same. Checked against the search's own evaluator on the reloaded run: identical numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from shears.recipe import load_recipe, save_recipe
from shears.scores import read_history
from shears.search.history import dominates
from shears.train_supernet import score_anchors_for_search, train_supernet
from test_train_supernet import tiny_recipe

SEARCH = {"objectives": ["loss", "adapter_params"], "eval_limit": 6, "backend": "pymoo", "budget": 5}


def train_run(model_dir: Path, tmp_path: Path, evaluation_bf16) -> Path:
    path = tiny_recipe(model_dir, tmp_path, learning_rate=3e-2)  # the anchors' losses should differ
    recipe = yaml.safe_load(path.read_text())
    recipe |= {"search": SEARCH, "evaluation": {"bf16": evaluation_bf16, "batch_size": 4}}
    path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    train_supernet(load_recipe(path), run)
    return run


def search_cli(run: Path, *flags: str) -> str:
    import contextlib
    import io

    from shears.search import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["--run", str(run), "--no-progress", *flags])
    return out.getvalue()


# evaluation.bf16 false under training.bf16 auto: on a CPU with native bf16, training ran under accelerate's
# autocast, which must not leak into the scores; unset (auto): the search's own bf16 autocast.
@pytest.mark.parametrize("evaluation_bf16", [False, None])
def test_training_scores_the_anchors_as_the_search_does(tiny_model_dir, tmp_path, evaluation_bf16):
    from shears.run import load_run
    from shears.search.cli import problem_from_run
    from shears.search.history import History
    from shears.search.problem import Evaluator

    run = train_run(tiny_model_dir, tmp_path, evaluation_bf16)
    written = read_history(run / "warm_start.jsonl")
    assert [r["label"] for r in written] == ["maximal", "heuristic", "minimal"]
    assert all(r["source"] == "train_supernet" and r["n_examples"] == 6 and set(r["objectives"]) == {"loss"}
               for r in written)
    for r in written:  # with the per-record losses behind each score: the search judges its front by their noise
        values, weights = r["per_record"]["loss"]["values"], r["per_record"]["loss"]["weights"]
        assert len(values) == 6 and sum(v * w for v, w in zip(values, weights)) / sum(weights) == \
            pytest.approx(r["objectives"]["loss"], rel=1e-5)
    # the search's evaluator, on the run as the search loads it, measures the very same numbers
    loaded = load_run(run)
    problem = problem_from_run(loaded, SEARCH["objectives"], SEARCH["eval_limit"], None)
    assert {r["scorer"] for r in written} == {problem.scorer}
    assert {r["precision"] for r in written} == {problem.precision}
    evaluator = Evaluator(problem, History(tmp_path / "check.jsonl", problem.objectives), "check")
    for record in written:
        assert evaluator.evaluate(record["config"])["objectives"]["loss"] == record["objectives"]["loss"]
    assert len({r["objectives"]["loss"] for r in written}) == 3


def test_the_search_imports_them_counts_them_and_builds_its_front_from_them(tiny_model_dir, tmp_path):
    run = train_run(tiny_model_dir, tmp_path, None)
    written = read_history(run / "warm_start.jsonl")

    # a budget the imported scores fill: nothing is measured, the front is theirs
    out = search_cli(run, "--budget", "3")
    assert f"warm start: 3 scores imported from {run / 'warm_start.jsonl'}" in out and "(0 new)" in out
    history = read_history(run / "search" / "history.jsonl")
    assert [r["objectives"]["loss"] for r in history] == [r["objectives"]["loss"] for r in written]
    assert all(r["source"] == str(run / "warm_start.jsonl") and r["backend"] == "train_supernet" for r in history)
    assert [r["per_record"] for r in history] == [r["per_record"] for r in written]  # imported with their noise
    points = {r["label"]: (r["objectives"]["loss"], r["objectives"]["adapter_params"]) for r in history}
    expected = {label for label, p in points.items() if not any(dominates(q, p) for q in points.values())}
    front = json.loads((run / "search" / "front.json").read_text())["front"]
    assert {r["label"] for r in front} == expected

    # a larger budget continues: the imported three count against it, two are measured, no anchor again
    out = search_cli(run, "--budget", "5")
    assert "warm start: 0 scores imported" in out and "(2 new)" in out
    fresh = [r for r in read_history(run / "search" / "history.jsonl") if not r.get("source")]
    assert len(fresh) == 2 and not any(r.get("label") for r in fresh)

    # another evaluation set is another scorer: nothing imported, no error; the anchors are measured
    (run / "search").rename(run / "search-6")
    out = search_cli(run, "--budget", "3", "--eval-limit", "4")
    assert "warm start: 0 scores imported" in out
    again = read_history(run / "search" / "history.jsonl")
    assert len(again) == 3 and not any(r.get("source") for r in again)

    # --no-warm-start, and the recipe's search.warm_start: false (here overridden), import nothing
    for flags, name in ((["--no-warm-start"], "search-4"), (["search.warm_start=false"], "search-flag")):
        (run / "search").rename(run / name)
        out = search_cli(run, "--budget", "3", *flags)
        assert "warm start" not in out
        assert not any(r.get("source") for r in read_history(run / "search" / "history.jsonl"))


def test_no_scores_without_a_loss_objective_and_contradicting_flags_are_refused(tmp_path, capsys):
    from shears.search import main

    recipe = load_recipe(None, {"search.objectives": ["accuracy", "adapter_params"]})
    assert score_anchors_for_search(recipe, None, None, None, [], {}) == []  # accuracy would mean generating
    run = tmp_path / "run"
    run.mkdir()
    save_recipe(recipe, run / "recipe.yaml")
    with pytest.raises(SystemExit):
        main(["--run", str(run), "--no-warm-start", "--warm-start", "x", "--budget", "3"])
    assert "contradict" in capsys.readouterr().err
