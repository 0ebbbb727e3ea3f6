"""`search()`: spend a budget of subnet evaluations through one backend, then write the front.

The one place a search is driven: it opens the history of the search's folder (a re-run continues
it; `warm_start` imports earlier searches' scores), shows the progress bar, hands the backend an
Evaluator (with `rungs`, candidates are screened on slices first), and ends by writing front.json,
front.csv and front.png (shears.rundir.SearchFiles names them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ShearsError
from ..progress import progress as progress_bar  # `progress` is search()'s flag
from ..rundir import SearchFiles
from .fidelity import Rungs
from .history import History, write_front
from .plot import plot_front
from .problem import Backend, Evaluator, SearchProblem
from .warm import check_scorer, import_history


@dataclass
class SearchResult:
    history: History
    front: list[dict]  # non-dominated records, by size ascending
    hypervolume: float
    evaluated: int  # fresh evaluations run by this call
    paths: list[Path]
    imported: dict[str, int] = field(default_factory=dict)  # warm-start source -> records imported from it


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
    imported = {str(source): import_history(history, problem, source) for source in warm_start}
    with progress_bar(total=budget, initial=min(round(history.spent, 2), budget), desc=f"search {backend.name}",
                      unit="eval", disable=not progress) as bar:
        evaluator = Evaluator(problem, history, backend.name, bar, rungs=rungs)
        evaluator.show()
        backend.run(problem, evaluator, budget)
    history.refresh()
    paths = [history.path, *write_front(history, files.folder)]
    if plot and len(history):
        paths.append(plot_front(history, files.front_png))
    return SearchResult(history, history.front(), history.hypervolume(), evaluator.fresh, paths, imported)
