"""Optuna backend: a study in shared storage, so several processes (or machines) split one budget.

Each trial samples one categorical rank per key, then *claims* its config by writing the config's
canonical string as the trial's user attribute "config", and only then reads the study back:

  * a COMPLETE trial with the same config     -> reuse its values (no evaluation, no budget)
  * a RUNNING trial with the same config      -> back off (prune): that worker evaluates it
  * more distinct claimed configs than budget -> back off, and wait for the in-flight ones
  * otherwise                                 -> evaluate through the cache, record, return

Two workers that claim at the same time each write before they read, so at least one of them sees
the other's claim and backs off: no config is evaluated twice and the budget is never overrun (when
both see each other both back off; they just sample again). The budget counts distinct evaluated
configs: COMPLETE trials' configs plus the local history (an evaluation whose trial was killed
before it was told still counts, and its retry reuses the recorded values).

Killed workers: RDB storages run Optuna's heartbeat, which fails stale trials and re-enqueues them
(RetryHeartbeatStaleTrialCallback). Journal files have no heartbeat, so a RUNNING trial whose worker
is a dead process on this host is failed here and re-enqueued the same way; a trial that failed by
an exception is re-enqueued when a worker next starts. Give concurrent workers different seeds.

`OptunaBackend` holds the settings and opens the study; a `StudyWorker` runs this process's trials
against it, with its state (the study, the budget, the idle count) as explicit fields.
"""

from __future__ import annotations

import os
import random
import socket
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.distributions import CategoricalDistribution
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from ..errors import ShearsError
from ..recipe import OptunaSampler
from ..search_space import canonical
from .problem import ANCHORS, Evaluator, SearchProblem

SAMPLERS = typing.get_args(OptunaSampler)  # the recipe's Literal: one definition
STUDY_NAME = "shears-search"
HEARTBEAT_S, GRACE_S, MAX_RETRY = 30, 90, 3
SCHEMA_RETRIES = 5
LIVE = (TrialState.RUNNING, TrialState.COMPLETE)
HOST = socket.gethostname()


def open_storage(url: str):
    """An Optuna storage: a journal file (`journal:PATH`, or a path ending .log/.journal) or an RDB URL."""
    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        path = Path(url.removeprefix("journal:")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise ShearsError(f"storage {url!r} is neither a journal file (end it in .log or prefix journal:) nor a "
                          "database URL such as sqlite:///study.db or postgresql://user@host/db")
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    # Workers started together on a fresh database all create Optuna's schema at once; on PostgreSQL the
    # losers fail on CREATE TYPE/TABLE (a duplicate-object or unique-violation error). The schema then
    # exists, so opening again succeeds: retry a few times before giving up.
    for attempt in range(SCHEMA_RETRIES):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
        except sqlalchemy.exc.DBAPIError:
            if attempt == SCHEMA_RETRIES - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


def make_sampler(name: str, seed: int, population_size: int) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":  # multi-objective TPE (MOTPE); the constant liar keeps parallel workers apart
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size)
        if name == "gp":  # Optuna >= 4.4 fits one GP per objective and maximises log EHVI
            return optuna.samplers.GPSampler(seed=seed)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
    raise ShearsError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")


def _worker_tag(number: int) -> str:
    # the trial number is part of the tag: a retry copies the user attrs of the trial it retries
    return f"{HOST}:{os.getpid()}#{number}"


def _dead_here(trial: optuna.trial.FrozenTrial) -> bool:
    """Is `trial` RUNNING under a process of this host that no longer exists?"""
    host_pid, _, number = str(trial.user_attrs.get("worker", "")).rpartition("#")
    host, _, pid = host_pid.rpartition(":")
    if host != HOST or number != str(trial.number) or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass
class OptunaBackend:
    sampler: str = "tpe"
    storage: str = "sqlite:///study.db"
    study_name: str = STUDY_NAME
    seed: int = 0
    population_size: int = 16
    max_idle: int = 200  # trials in a row without a fresh evaluation before this worker gives up
    poll_s: float = 0.5  # wait between budget checks while other workers finish the last configs

    @property
    def name(self) -> str:
        return f"optuna:{self.sampler}"

    def open_study(self, problem: SearchProblem, history=None):
        """(study, storage): the study of this search. A new one is told the full-fidelity records
        already in `history` (a resumed or warm-started search) and has the anchors enqueued."""
        names = [o.name for o in problem.objectives]
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # our bar and history report the trials
        storage = open_storage(self.storage)
        study = optuna.create_study(storage=storage, sampler=make_sampler(self.sampler, self.seed, self.population_size),
                                    study_name=self.study_name, load_if_exists=True,
                                    directions=["maximize" if o.maximize else "minimize" for o in problem.objectives])
        # One attribute, written in one call: a worker opening the study while another creates it sees
        # either nothing (and writes the same value) or all of it, never half a signature.
        signature = {"objectives": names, "keys": list(problem.keys)}
        made_with = study.user_attrs.get("signature")
        if made_with is None:
            study.set_user_attr("signature", signature)
        elif made_with != signature:
            raise ShearsError(f"study {self.study_name!r} in {self.storage} was made for objectives "
                              f"{made_with['objectives']} and another space: pass the same --objectives, or another "
                              "--storage/--study-name")
        if not study.get_trials(deepcopy=False):
            distributions = {key: CategoricalDistribution(problem.choices[key]) for key in problem.keys}
            for record in history.full_records() if history is not None else []:
                study.add_trial(optuna.trial.create_trial(
                    params=record["config"], distributions=distributions,
                    values=[record["objectives"][name] for name in names],
                    user_attrs={"config": canonical(record["config"]), "outcome": "from_history"}))
            for label in ANCHORS:
                study.enqueue_trial(problem.anchors[label], skip_if_exists=True)
        return study, storage

    def run(self, problem: SearchProblem, evaluator: Evaluator, budget: int) -> None:
        study, storage = self.open_study(problem, evaluator.history)
        StudyWorker(self, problem, evaluator, budget, study, storage).run()


@dataclass
class StudyWorker:
    """This process's part of one search: it runs trials of the shared study until the budget is spent.

    Its state is these fields; each method does one thing. Everything about other workers is read
    back from the study (trials, their claims) and the history, never kept here."""
    backend: OptunaBackend
    problem: SearchProblem
    evaluator: Evaluator
    budget: int
    study: optuna.Study
    storage: optuna.storages.BaseStorage
    study_id: int = field(init=False)
    idle: int = field(init=False, default=0)  # trials in a row without a fresh evaluation by this worker
    fresh_seen: int = field(init=False)  # evaluator.fresh when the last trial ended

    def __post_init__(self) -> None:
        self.study_id = self.storage.get_study_id_from_name(self.backend.study_name)
        self.fresh_seen = self.evaluator.fresh

    @property
    def history(self):
        return self.evaluator.history

    def run(self) -> None:
        self.housekeeping()
        if self.finished():
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study.optimize(self.objective, callbacks=[self.after_trial], gc_after_trial=False)

    # ---- the budget

    def evaluated(self) -> set[str]:
        """Canonical configs evaluated at full fidelity by any worker: COMPLETE trials' and the history's."""
        self.history.refresh()
        done = {t.user_attrs.get("config") for t in self.trials(TrialState.COMPLETE)}
        return (done - {None}) | self.history.configs()

    def finished(self) -> bool:  # screening on slices (multi-fidelity) spends budget too; the stop rule ends it
        evaluated = len(self.evaluated())
        return (evaluated >= self.problem.size or evaluated + self.history.partial_spent >= self.budget
                or self.evaluator.front_is_flat())

    def wait_for_room(self, me: int) -> bool:
        """Block while configs in flight in other trials fill the budget; False once it is done."""
        while True:
            if self.finished():
                return False
            running = {t.user_attrs.get("config") for t in self.trials(TrialState.RUNNING) if t.number != me}
            if len(self.evaluated() | (running - {None})) + self.history.partial_spent < self.budget:
                return True
            time.sleep(self.backend.poll_s)
            self.housekeeping()

    # ---- the study's trials

    def trials(self, *states: TrialState) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=states or None)

    def system_attrs(self, trial: optuna.Trial) -> dict:
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)
        return self.storage.get_trial(trial_id).system_attrs

    def fixed(self, trial: optuna.Trial) -> bool:
        """Was this trial enqueued with its params (an anchor or a retry)?"""
        return bool(self.system_attrs(trial).get("fixed_params"))

    def duplicate_retry(self, trial: optuna.Trial) -> bool:
        """Two workers' housekeeping may both re-enqueue one failed trial. Of its retries the lowest-numbered
        one runs: it was enqueued first, so every later sibling sees it (no claim race to lose)."""
        failed = self.system_attrs(trial).get("failed_trial")
        return failed is not None and any(t.number < trial.number and t.system_attrs.get("failed_trial") == failed
                                          for t in self.trials(TrialState.WAITING, *LIVE))

    def housekeeping(self) -> None:
        """Fail this host's trials whose process died; re-enqueue failed trials not yet retried."""
        for t in self.trials(TrialState.RUNNING):
            if _dead_here(t):
                try:
                    self.storage.set_trial_state_values(self.storage.get_trial_id_from_study_id_trial_number(
                        self.study_id, t.number), TrialState.FAIL)
                except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
                    continue  # another worker failed it first
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)  # heartbeat storages only
            trials = self.trials()
            retried = {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
            done = {t.user_attrs.get("config") for t in trials if t.state == TrialState.COMPLETE}
            for t in trials:
                if t.state == TrialState.FAIL and t.number not in retried and t.params \
                        and t.user_attrs.get("config") not in done:
                    RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(self.study, t)

    # ---- one trial

    def objective(self, trial: optuna.Trial) -> list[float]:
        trial.set_user_attr("worker", _worker_tag(trial.number))
        if trial.user_attrs.get("config") is not None:  # a retry copies the failed trial's claim: not ours yet
            trial.set_user_attr("config", None)
        self.back_off_before_sampling(trial)
        config = {key: trial.suggest_categorical(key, self.problem.choices[key]) for key in self.problem.keys}
        key = canonical(config)
        values = self.claim(trial, key)
        if values is not None:
            return values
        fresh = key not in self.history.configs()
        if not self.evaluator.screen(config, trial=trial.number):  # stopped at a rung of multi-fidelity
            _prune(trial, "stopped_at_rung")
        record = self.evaluator.evaluate(config, trial=trial.number)
        trial.set_user_attr("outcome", "evaluated" if fresh else "recorded")
        return [record["objectives"][o.name] for o in self.problem.objectives]

    def back_off_before_sampling(self, trial: optuna.Trial) -> None:
        """Prune `trial` before it samples when another trial should run instead, or the budget is done."""
        if self.duplicate_retry(trial):
            _prune(trial, "duplicate_retry")
        if not self.wait_for_room(trial.number):
            self.study.stop()
            _prune(trial, "budget_done")
        if self.trials(TrialState.WAITING) and not self.fixed(trial):
            # A retry of a killed worker's trial was enqueued while this one waited. Sampling afresh
            # here would spend its slot of the budget on another config and lose that one (an anchor,
            # say): yield, so the next trial asked for is the retry.
            _prune(trial, "yield_to_waiting")

    def claim(self, trial: optuna.Trial, key: str) -> list[float] | None:
        """Claim config `key` for `trial`, then read the study back: the values of a COMPLETE trial of the
        same config (reused, no evaluation), None when this trial is to evaluate it, else prune."""
        trial.set_user_attr("config", key)  # the claim: written before the study is read back
        trials = self.trials(*LIVE)
        rivals = [t for t in trials if t.number != trial.number and t.user_attrs.get("config") == key]
        done = next((t for t in rivals if t.state == TrialState.COMPLETE), None)
        if done is not None:
            trial.set_user_attr("outcome", f"duplicate_of:{done.number}")
            return list(done.values)
        if rivals:
            _prune(trial, f"evaluated_by:{rivals[0].number}")
        self.history.refresh()
        claimed = {t.user_attrs.get("config") for t in trials} - {None}
        recorded = self.history.configs()
        # with screening a candidate costs less than one evaluation: start it while budget is left
        if key not in recorded and len((claimed - {key}) | recorded) + self.history.partial_spent >= self.budget:
            trial.set_user_attr("outcome", "over_budget")
            time.sleep(random.uniform(0.0, self.backend.poll_s))  # desynchronise workers that collided
            raise optuna.TrialPruned()
        return None

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna's callback: count idle trials, show progress, stop when the budget is spent or the sampler
        keeps proposing configs already evaluated."""
        self.idle = 0 if self.evaluator.fresh > self.fresh_seen else self.idle + 1
        self.fresh_seen = self.evaluator.fresh
        self.evaluator.show()
        if self.finished():
            study.stop()
        elif self.idle >= self.backend.max_idle:
            warnings.warn(f"{self.backend.name}: {self.idle} trials in a row proposed configs already evaluated; "
                          f"stopping this worker with {len(self.evaluated())} of {self.budget} (try another sampler "
                          "or seed)")
            study.stop()


def _prune(trial: optuna.Trial, outcome: str) -> typing.NoReturn:
    """End `trial` without values, recording why in its "outcome" attribute."""
    trial.set_user_attr("outcome", outcome)
    raise optuna.TrialPruned()
