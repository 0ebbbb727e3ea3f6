"""Multi-objective subnet search: the accuracy/size Pareto front of a trained super-network.

Shears ships only the median "heuristic" subnet; LoNAS searched with NSGA-II. Here a fixed budget
of subnet evaluations is spent by one of two backends behind one interface (problem.Backend):

    optuna_backend  a study in shared storage (sqlite, journal file, PostgreSQL): TPE, NSGA-II, GP
                    or random sampling; several processes split one budget with no duplicate configs
    pymoo_backend   NSGA-II over integer-encoded ranks in our own ask/tell loop (one process)

Both evaluate through problem.Evaluator: a cache keyed by the config's canonical string, persisted
to RUN/search/history.jsonl after every evaluation, so a killed search resumes where it stopped and
`budget` always counts every distinct config evaluated so far. The first evaluations are the
maximal, heuristic and minimal subnets. `search()` (runner.py) ends by writing front.json, front.csv and
front.png; `python -m shears.search --run RUN --budget N` runs it on a trained run.
"""

from __future__ import annotations

from .cli import main
from .fidelity import Rungs
from .history import History, hypervolume, hypervolume_2d, write_front
from .objectives import Objective, parse_objectives
from .optuna_backend import SAMPLERS, OptunaBackend
from .problem import ANCHORS, Backend, Evaluator, SearchProblem
from .pymoo_backend import PymooBackend
from .runner import SearchResult, search
from .surrogate import SurrogateBackend

__all__ = ["search", "SearchResult", "SearchProblem", "Objective", "parse_objectives", "History", "Evaluator",
           "OptunaBackend", "PymooBackend", "SurrogateBackend", "Rungs", "Backend", "hypervolume", "hypervolume_2d",
           "write_front", "SAMPLERS", "ANCHORS", "main"]
