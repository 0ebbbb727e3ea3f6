"""Multi-objective subnet search: the accuracy/size Pareto front of a trained super-network.

Shears ships only the median "heuristic" subnet; LoNAS searched with NSGA-II. Here a fixed budget
of subnet evaluations is spent by one of two backends behind one interface (problem.Backend):

    optuna_backend  a study in shared storage (sqlite, journal file, PostgreSQL): TPE, NSGA-II, GP
                    or random sampling; several processes split one budget with no duplicate configs
    pymoo_backend   NSGA-II over integer-encoded ranks in our own ask/tell loop (one process)

Both evaluate through problem.Evaluator: a cache keyed by the config's canonical string, persisted
to RUN/search/history.jsonl after every evaluation, so a killed search resumes where it stopped and
`budget` always counts every distinct config evaluated so far. The first evaluations are the
maximal, heuristic and minimal subnets. `search()` ends by writing front.json, front.csv and
front.png; `python -m shears.search --run RUN --budget N` runs it on a trained run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import ShearsError
from ..rundir import SearchFiles
from .fidelity import Rungs
from .history import History, hypervolume, hypervolume_2d, write_front
from .objectives import Objective, parse_objectives
from .optuna_backend import SAMPLERS, OptunaBackend
from .plot import plot_front
from .problem import ANCHORS, Backend, Evaluator, SearchProblem
from .pymoo_backend import PymooBackend
from .surrogate import SurrogateBackend
from .warm import check_scorer, import_history

__all__ = ["search", "SearchResult", "SearchProblem", "Objective", "parse_objectives", "History", "Evaluator",
           "OptunaBackend", "PymooBackend", "SurrogateBackend", "Rungs", "Backend", "hypervolume", "hypervolume_2d", "SAMPLERS", "ANCHORS",
           "main"]


@dataclass
class SearchResult:
    history: History
    front: list[dict]  # non-dominated records, by size ascending
    hypervolume: float
    evaluated: int  # fresh evaluations run by this call
    paths: list[Path]


def search(problem: SearchProblem, out_dir: str | Path, budget: int, backend: Backend,
           progress: bool = True, plot: bool = True, rungs: Rungs | None = None,
           warm_start: list[str | Path] = ()) -> SearchResult:
    """Spend up to `budget` full-set-equivalent evaluations in total (those in out_dir/history.jsonl
    included; without `rungs`, distinct configs). `rungs` screens candidates on slices first
    (fidelity.py); `warm_start` imports the matching scores of earlier searches' histories (warm.py)."""
    if not isinstance(budget, int) or budget < 1:
        raise ShearsError(f"budget must be a positive number of evaluations, got {budget!r}")
    files = SearchFiles(Path(out_dir))
    history = History(files.history, problem.objectives)
    check_scorer(history, problem)
    for source in warm_start:
        import_history(history, problem, source)
    with tqdm(total=budget, initial=min(round(history.spent, 2), budget), desc=f"search {backend.name}",
              unit="eval", disable=not progress, dynamic_ncols=True) as bar:
        evaluator = Evaluator(problem, history, backend.name, bar, rungs=rungs)
        evaluator.show()
        backend.run(problem, evaluator, budget)
    history.refresh()
    paths = [history.path, *write_front(history, files.folder)]
    if plot and len(history):
        paths.append(plot_front(history, files.front_png))
    return SearchResult(history, history.front(), history.hypervolume(), evaluator.fresh, paths)


def main(argv: list[str] | None = None) -> None:
    from .cli import main as cli_main

    cli_main(argv)
