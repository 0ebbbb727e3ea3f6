"""The search problem and the one door to the objective.

A problem is a space (ordered `keys`, `choices[key]` of ranks), the objectives, and a function
config -> {objective: value}. Backends propose configs; `Evaluator.evaluate` is the only place the
objective runs: it is cached by the config's canonical string (a config is never evaluated twice,
whichever backend or process asks) and every fresh result is appended to the history at once, so a
killed search loses at most the evaluation in flight.

Backends share one interface, `run(problem, evaluator, budget)`, and stop once `budget` distinct
configs have been evaluated in total (history included: a re-run with a larger budget continues).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from ..errors import ShearsError
from ..search_space import canonical
from .history import History
from .objectives import Objective

Config = dict[str, int]
ANCHORS = ("maximal", "heuristic", "minimal")  # evaluated first, in this order


def anchor_configs(space: Any) -> dict[str, Config]:
    """The space's maximal, heuristic (lower-median rank per key) and minimal configs."""
    out = {}
    for label in ANCHORS:
        if hasattr(space, label):
            out[label] = dict(getattr(space, label)())
        else:
            pick = {"maximal": lambda c: c[-1], "heuristic": lambda c: c[(len(c) - 1) // 2], "minimal": lambda c: c[0]}
            out[label] = {key: pick[label](sorted(space.choices[key])) for key in space.keys}
    return out


@dataclass
class SearchProblem:
    keys: tuple[str, ...]
    choices: dict[str, tuple[int, ...]]  # each sorted ascending: the ordinal encoding of a rank is its index
    objectives: tuple[Objective, ...]
    objective_fn: Callable[[Config], dict[str, float]]
    anchors: dict[str, Config]

    @classmethod
    def from_space(cls, space: Any, objectives: tuple[Objective, ...],
                   objective_fn: Callable[[Config], dict[str, float]]) -> "SearchProblem":
        keys = tuple(space.keys)
        choices = {key: tuple(sorted(int(c) for c in space.choices[key])) for key in keys}
        return cls(keys, choices, tuple(objectives), objective_fn, anchor_configs(space))

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

    def measure(self, config: Config) -> dict[str, float]:
        values = self.objective_fn(config)
        missing = [o.name for o in self.objectives if o.name not in values]
        if missing:
            raise ShearsError(f"the objective function returned no {missing}: it must return every objective")
        return {o.name: float(values[o.name]) for o in self.objectives}


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
    fresh: int = field(default=0)  # evaluations run by this evaluator

    def lookup(self, config: Config) -> dict | None:
        """The history record of `config`, if any process evaluated it already."""
        return self.history.get(config)

    def evaluate(self, config: Config, trial: int | None = None) -> dict:
        """The record of `config`: from the cache, else measured now and persisted at once."""
        record = self.history.get(config)
        if record is not None:
            return record
        start = time.perf_counter()
        values = self.problem.measure(config)
        record = self.history.append(config, values, time.perf_counter() - start, self.backend, trial,
                                     label=self.problem.label(config))
        self.fresh += 1
        self.show()
        return record

    def show(self) -> None:
        if self.progress is not None:
            self.progress.n = len(self.history)
            self.progress.set_postfix(front=len(self.history.front()), hv=f"{self.history.hypervolume():.4f}")
            self.progress.refresh()


class Backend(Protocol):
    name: str

    def run(self, problem: SearchProblem, evaluator: Evaluator, budget: int) -> None:
        """Evaluate configs through `evaluator` until `budget` distinct configs are in its history."""
