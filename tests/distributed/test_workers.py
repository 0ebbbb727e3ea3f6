"""Three `python -m shears.search` processes on one study, one budget: PostgreSQL and a journal file.

Run by `make test-distributed` (tests/distributed/postgres.sh starts the throw-away server). Each
test trains a tiny super-network once, then checks, from the files and the study alone:
  * the budget is spent exactly: `budget` distinct configs in history.jsonl, none twice, none lost;
  * front.json is the non-dominated subset of every evaluation (brute force, here);
  * after a SIGKILL of one worker in the middle of an evaluation, the others finish the budget and
    only that one evaluation is repeated: its trial is failed and retried, and its config is
    evaluated once, by a survivor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from conftest import make_tiny_model, make_tiny_tokenizer
from killable import ENV, REPO, kill_at
from shears.recipe import load_recipe
from shears.train_supernet import train_supernet
from test_train_supernet import tiny_recipe

pytestmark = pytest.mark.skipif(os.environ.get("SHEARS_TEST_DISTRIBUTED") != "1",
                                reason="several search worker processes: run `make test-distributed`")

BUDGET = 12  # of the 18 configs of the tiny space
WORKERS = 3
STORAGES = ["postgresql", "journal"]
POSTGRES_URL = os.environ.get("SHEARS_TEST_POSTGRES_URL")  # set by tests/distributed/postgres.sh


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("supernet")
    model_dir = root / "tiny-llama"
    make_tiny_model("llama", max_position_embeddings=512).save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    run = root / "run"
    train_supernet(load_recipe(tiny_recipe(model_dir, root, max_steps=2),
                               {"evaluation.max_new_tokens": 8, "evaluation.batch_size": 4}), run)
    return run


def storage_url(kind: str, run: Path) -> str:
    if kind == "journal":
        return str(run / "search" / "study.log")
    if POSTGRES_URL is None:
        pytest.fail("SHEARS_TEST_POSTGRES_URL is not set: run these tests with `make test-distributed`")
    # one database, one study per test: a fresh study name keeps the tests apart
    return POSTGRES_URL


def worker_args(run: Path, storage: str, study: str, seed: int) -> list[str]:
    # The stop rule is off: these tests count that the workers spend the budget exactly.
    return ["--run", str(run), "--budget", str(BUDGET), "--stop-when-flat", "0", "--storage", storage,
            "--study-name", study, "--seed", str(seed), "--backend", "optuna", "--sampler", "tpe", "--no-progress"]


def start_worker(run: Path, storage: str, study: str, seed: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shears.search", *worker_args(run, storage, study, seed)],
                            cwd=REPO, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT)


def read_history(run: Path) -> list[dict]:
    lines = (run / "search" / "history.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def non_dominated(records: list[dict]) -> list[dict]:
    """Accuracy up, adapter params down: the records no other record beats in one and matches in both."""
    def beats(a, b):
        (qa, sa), (qb, sb) = [(r["objectives"]["accuracy"], r["objectives"]["adapter_params"]) for r in (a, b)]
        return qa >= qb and sa <= sb and (qa > qb or sa < sb)

    return [r for r in records if not any(beats(o, r) for o in records)]


def check_budget_and_front(run: Path) -> list[dict]:
    history = read_history(run)
    configs = [json.dumps(r["config"], sort_keys=True) for r in history]
    assert len(history) == BUDGET and len(set(configs)) == BUDGET, configs  # exact, no config twice
    front = json.loads((run / "search" / "front.json").read_text())
    assert front["evaluations"] == BUDGET
    key = lambda r: json.dumps(r["config"], sort_keys=True)  # noqa: E731
    assert sorted(map(key, front["front"])) == sorted(map(key, non_dominated(history)))
    return history


def fresh_run(trained: Path, tmp_path: Path) -> Path:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("checkpoints"))
    return run


@pytest.mark.parametrize("kind", STORAGES)
def test_three_workers_spend_one_budget_exactly(kind, trained, tmp_path):
    run = fresh_run(trained, tmp_path)
    storage, study = storage_url(kind, run), f"exact-{kind}-{time.time_ns()}"
    workers = [start_worker(run, storage, study, seed, tmp_path / f"worker{seed}.log") for seed in range(WORKERS)]
    codes = [w.wait(600) for w in workers]
    assert codes == [0] * WORKERS, [(tmp_path / f"worker{s}.log").read_text()[-2000:] for s in range(WORKERS)]
    history = check_budget_and_front(run)
    assert len({r["worker"] for r in history}) >= 2  # the work really was shared
    trials = optuna.load_study(study_name=study, storage=open_storage(storage)).get_trials(deepcopy=False)
    evaluated = [t.user_attrs["config"] for t in trials if t.user_attrs.get("outcome") == "evaluated"]
    assert len(evaluated) == BUDGET == len(set(evaluated))


@pytest.mark.parametrize("kind", STORAGES)
def test_a_worker_killed_mid_evaluation_costs_at_most_that_evaluation(kind, trained, tmp_path):
    run = fresh_run(trained, tmp_path)
    storage, study = storage_url(kind, run), f"kill-{kind}-{time.time_ns()}"
    survivors: list[subprocess.Popen] = []

    def start_survivors_and_let_them_work():
        survivors.extend(start_worker(run, storage, study, seed, tmp_path / f"worker{seed}.log")
                         for seed in (1, 2))
        deadline = time.monotonic() + 300
        while len(read_history(run)) < 3 and time.monotonic() < deadline:  # the victim's 1 + theirs
            time.sleep(0.1)

    # the victim parks inside its second evaluation; the survivors start, evaluate, and then it is killed
    parked = json.loads(kill_at("eval:2", "shears.search", *worker_args(run, storage, study, 0), tmp_path=tmp_path,
                                before_kill=start_survivors_and_let_them_work))
    codes = [w.wait(600) for w in survivors]
    assert codes == [0, 0], [(tmp_path / f"worker{s}.log").read_text()[-2000:] for s in (1, 2)]
    history = check_budget_and_front(run)
    victim = [r for r in history if r["worker"].endswith(f":{parked['pid']}")]
    assert len(victim) == 1, (parked, [(r["worker"], r["config"]) for r in history])  # its first evaluation kept
    lost = [r for r in history if json.dumps(r["config"], sort_keys=True, separators=(",", ":")) == parked["config"]]
    assert len(lost) == 1 and lost[0]["worker"] != victim[0]["worker"]  # evaluated again once, by a survivor

    trials = optuna.load_study(study_name=study, storage=open_storage(storage)).get_trials(deepcopy=False)
    dead = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]  # failed, not left RUNNING
    assert len(dead) == 1 and dead[0].user_attrs["config"] == parked["config"], \
        (parked, [(t.number, t.state, t.user_attrs) for t in trials])
    assert dead[0].user_attrs["worker"].split("#")[0].endswith(f":{parked['pid']}")
    retried = [t for t in trials if dead[0].number in
               optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(t)]
    assert retried and any(t.state == optuna.trial.TrialState.COMPLETE for t in retried)
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    # two survivors' housekeeping may both have re-enqueued it; a retry left waiting is harmless: it is a
    # duplicate of the one that ran, and would be pruned as such if a later search popped it
    waiting = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
    assert all(t.system_attrs.get("failed_trial") == dead[0].number for t in waiting)


def open_storage(url: str):
    from shears.search.optuna_backend import open_storage as shears_storage

    return shears_storage(url)
