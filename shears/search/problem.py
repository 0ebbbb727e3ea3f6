"""The search problem and the one door to the objective.

A problem is a space (ordered `keys`, `choices[key]` of ranks), the objectives, and a function
config -> {objective: value}. Backends propose configs; `Evaluator.evaluate` is the only place the
objective runs: it is cached by the config's canonical string (a config is never evaluated twice,
whichever backend or process asks) and every fresh result is appended to the history at once, so a
killed search loses at most the evaluation in flight.

Backends share one interface, `run(problem, evaluator, budget)`, and stop once `budget` full-set-
equivalent evaluations are spent in total (history included: a re-run with a larger budget continues).
Without multi-fidelity screening that is `budget` distinct configs; with it, a config scored on n of N
examples costs n / N. A backend calls `evaluator.screen(config)` before `evaluator.evaluate(config)`:
with rungs (fidelity.py) a config is first scored on slices and only the promising reach the full set.

An objective function may also return "per_record": {quality objective: shears.noise.PerRecord or its JSON}
-- the value on each record behind the score -- which the history keeps with the standard error, so
that the front is judged against the paired noise (history.py) and the stop rule can end a search
whose last K evaluations moved nothing beyond it (`stop_when_flat`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..errors import ShearsError
from ..search_space import ANCHORS, Config, canonical, heuristic_choice  # anchors: evaluated first, in this order
from .history import History, fidelity
from ..noise import PerRecord
from .objectives import Objective

if TYPE_CHECKING:
    from .fidelity import Rungs



def anchor_configs(space: Any) -> dict[str, Config]:
    """The space's maximal, heuristic (search_space.heuristic_choice per key) and minimal configs."""
    out = {}
    for label in ANCHORS:
        if hasattr(space, label):
            out[label] = dict(getattr(space, label)())
        else:
            pick = {"maximal": max, "heuristic": heuristic_choice, "minimal": min}[label]
            out[label] = {key: int(pick(space.choices[key])) for key in space.keys}
    return out


@dataclass
class SearchProblem:
    """`objective_fn(config)` scores a config on the full evaluation set; a problem with `examples`
    (the size of that set) also takes `objective_fn(config, n_examples=n)`: the score on its first n,
    which multi-fidelity screening uses. `sizes(config)`, when given, computes the size objectives
    without a model run (a predictor then needs to learn quality only); `scorer` fingerprints what a
    score means (the super-network's weights, the evaluation records and task), so a record scored
    another way is never mistaken for this problem's."""

    keys: tuple[str, ...]
    choices: dict[str, tuple[int, ...]]  # each sorted ascending: the ordinal encoding of a rank is its index
    objectives: tuple[Objective, ...]
    objective_fn: Callable[..., dict[str, float]]
    anchors: dict[str, Config]
    examples: int | None = None
    sizes: Callable[[Config], dict[str, float]] | None = None
    scorer: str | None = None
    precision: str | None = None  # the compute precision objective_fn runs in (shears.precision), per record

    @classmethod
    def from_space(cls, space: Any, objectives: tuple[Objective, ...], objective_fn: Callable[..., dict[str, float]],
                   **options: Any) -> "SearchProblem":
        keys = tuple(space.keys)
        choices = {key: tuple(sorted(int(c) for c in space.choices[key])) for key in keys}
        return cls(keys, choices, tuple(objectives), objective_fn, anchor_configs(space), **options)

    @property
    def quality(self) -> Objective:
        return next(o for o in self.objectives if not o.is_size)

    @property
    def size(self) -> int:
        """How many distinct configs the space holds."""
        return math.prod(len(self.choices[key]) for key in self.keys)

    def encode(self, config: Config) -> list[int]:
        return [self.choices[key].index(config[key]) for key in self.keys]

    def decode(self, indices) -> Config:
        return {key: self.choices[key][int(round(i))] for key, i in zip(self.keys, indices)}

    def label(self, config: Config) -> str | None:
        key = canonical(config)
        return next((name for name, anchor in self.anchors.items() if canonical(anchor) == key), None)

    def measure(self, config: Config, n_examples: int | None = None) -> tuple[dict[str, float], dict[str, PerRecord]]:
        """(every objective's value, the quality objectives' per-record values the function returned)."""
        values = self.objective_fn(config) if n_examples is None else self.objective_fn(config, n_examples=n_examples)
        missing = [o.name for o in self.objectives if o.name not in values]
        if missing:
            raise ShearsError(f"the objective function returned no {missing}: it must return every objective")
        noise = {name: item if isinstance(item, PerRecord) else PerRecord.from_json(item)
                 for name, item in (values.get("per_record") or {}).items()
                 if name in {o.name for o in self.objectives if not o.is_size}}
        return {o.name: float(values[o.name]) for o in self.objectives}, {k: v for k, v in noise.items() if v is not None}


# what the progress bar says of the last full-set point (history.py's front_moved)
MOVED = {"yes": "yes", "noise": "within noise", "no": "no", "unknown": "no noise estimate"}


class Progress(Protocol):  # a tqdm bar, or anything with these
    n: int

    def refresh(self) -> Any: ...
    def set_postfix(self, **kwargs) -> Any: ...


@dataclass
class Evaluator:
    problem: SearchProblem
    history: History
    backend: str  # recorded in every history line, e.g. "optuna:tpe"
    progress: Progress | None = None
    rungs: "Rungs | None" = None  # multi-fidelity screening before a full evaluation (fidelity.py)
    stop_when_flat: int | None = None  # stop once this many full-set points in a row moved the front by noise only
    fresh: int = field(default=0)  # evaluations run by this evaluator
    seconds: float = field(default=0.0)  # and the time they took (the bar's s/eval)
    postfix: dict = field(default_factory=dict)  # what a backend adds to the progress bar (e.g. tau)
    shown: tuple | None = field(default=None)  # the state the bar last drew (show() skips a repeat)

    def evaluate(self, config: Config, trial: int | None = None, n_examples: int | None = None,
                 **extra: Any) -> dict:
        """The record of `config` (on the first `n_examples` of the evaluation set, or all of it): from
        the cache, else measured now and persisted at once. `extra` goes into a fresh record."""
        full = self.problem.examples
        if n_examples is not None and (full is None or n_examples >= full):
            n_examples = None
        record = self.history.get(config, n_examples)
        if record is not None:
            return record
        record = self.measure(config, trial, n_examples, **extra)
        self.fresh += 1
        self.show()
        return record

    def measure(self, config: Config, trial: int | None = None, n_examples: int | None = None, **extra: Any) -> dict:
        """Score `config` now and append the record (with its per-record values and standard errors)."""
        full = self.problem.examples
        start = time.perf_counter()
        values, noise = self.problem.measure(config, n_examples)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        return self.history.append(config, values, seconds, self.backend, trial,
                                   label=self.problem.label(config), scorer=self.problem.scorer,
                                   precision=self.problem.precision,
                                   n_examples=n_examples if n_examples is not None else full,
                                   fidelity=round(n_examples / full, 6) if n_examples is not None else None,
                                   per_record={k: v.to_json() for k, v in noise.items()} or None,
                                   se={k: round(v.se(), 8) for k, v in noise.items()} or None, **extra)

    def remeasure(self, config: Config) -> dict:
        """Score a full-set point recorded without per-record values again, for them alone: a
        `remeasure` line, which fills them in and costs no budget (history.py)."""
        return self.measure(config, remeasure=True)

    def front_is_flat(self) -> bool:
        """Has the stop rule fired: `stop_when_flat` full-set points in a row moved the front by noise only?"""
        return self.stop_when_flat is not None and self.history.flat >= self.stop_when_flat

    def budget_left(self, budget: float) -> bool:
        """May a backend start another candidate: budget left, configs left, and the front not flat?"""
        return self.history.spent < budget and len(self.history) < self.problem.size and not self.front_is_flat()

    def screen(self, config: Config, trial: int | None = None) -> bool:
        """Should `config` be scored on the full set? Without rungs, or once it has been, yes; else it
        climbs the rungs (scored on each slice) while it stays among the most promising of its rung."""
        if self.rungs is None or self.history.get(config) is not None:
            return True
        from .fidelity import promising

        for n in self.rungs.examples:
            record = self.evaluate(config, trial=trial, n_examples=n)
            if self.problem.label(config) is None and not promising(record, self.history.at(n), self.history,
                                                                    self.rungs.keep):
                return False
        return True

    def cost(self, config: Config) -> float:
        """Full-set-equivalent evaluations that `screen` then `evaluate` may still spend on `config`."""
        if self.history.get(config) is not None:
            return 0.0
        full = self.problem.examples or 1
        rungs = self.rungs.examples if self.rungs is not None else ()
        return 1.0 + sum(n / full for n in rungs if self.history.get(config, n) is None)

    def show(self) -> None:
        """Put the search's state on the bar; redraw only when it changed (a backend's callback may show the
        state an evaluation just showed, and in a log every redraw is a line: shears.progress)."""
        if self.progress is None:
            return
        speed = {"s/eval": f"{self.seconds / self.fresh:.1f}"} if self.fresh else {}
        last = next((r for r in reversed(self.history.records) if fidelity(r) >= 1.0), None)
        moved = {"moved": MOVED[last["front_moved"]]} if last is not None else {}
        flat = {"flat": f"{self.history.flat}/{self.stop_when_flat}"} if self.stop_when_flat else {}
        postfix = {"front": len(self.history.front()), "hv": f"{self.history.hypervolume():.4f}", **moved, **flat,
                   **speed, **self.postfix}
        state = (round(self.history.spent, 2), postfix)
        if state == self.shown:
            return
        self.shown = state
        self.progress.n = state[0]
        self.progress.set_postfix(**postfix, refresh=False)
        self.progress.refresh()


class Backend(Protocol):
    name: str

    def run(self, problem: SearchProblem, evaluator: Evaluator, budget: int) -> None:
        """Evaluate configs through `evaluator` until `budget` distinct configs are in its history."""
