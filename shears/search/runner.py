"""`search()`: spend a budget of subnet evaluations through one backend, then write the front.

The one place a search is driven: it opens the history of the search's folder (a re-run continues
it; `warm_start` imports earlier searches' scores), shows the progress bar, hands the backend an
Evaluator (with `rungs`, candidates are screened on slices first), and ends by writing front.json,
front.csv and front.png (shears.rundir.SearchFiles names them).

With `stop_when_flat=K` the search ends early once K full-set evaluations in a row moved the front by
no more than the paired noise (history.py says when a point moves it); `FlatStop` says what that saved
and at how many records the remaining differences would become measurable (shears/noise.py). Points
recorded without per-record values (a history older than them) are reported, and scored again only
with `remeasure_noise`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ShearsError
from ..progress import progress as progress_bar  # `progress` is search()'s flag
from ..rundir import SearchFiles
from .fidelity import Rungs
from .history import History, fidelity, write_front
from ..noise import Z, Difference
from .plot import plot_front
from .problem import Backend, Evaluator, SearchProblem
from .warm import check_scorer, import_history


@dataclass
class FlatStop:
    """Why and where the stop rule ended a search."""

    k: int  # full-set evaluations in a row that moved the front by noise only
    spent: float  # full-set-equivalent evaluations spent when it stopped
    budget: int
    within_noise: list[Difference]  # the K points' paired advantage over their closest incumbent, when they had one
    dominated: int  # of the K, points a front point matched or beat outright

    @property
    def saved(self) -> float:
        return max(0.0, self.budget - self.spent)

    def message(self) -> str:
        line = (f"stopped: the last {self.k} full-set evaluations added no hypervolume beyond {Z:g} paired standard "
                f"errors ({len(self.within_noise)} within the noise, {self.dominated} matched or beaten outright by "
                f"the front); spent {self.spent:g} of the budget of {self.budget}, saving {self.saved:g} evaluations.")
        ranked = sorted((d for d in self.within_noise if d.diff > 0), key=Difference.records_needed)
        if not ranked:
            return line + " No point came close: more records would not change this front."
        closest = ranked[0]
        need = closest.records_needed()
        line += (f" The closest call beat its front point by {closest.diff:.4g} ± {closest.se:.2g} (paired, on "
                 f"{closest.n} records): it would become measurable at ~{need:,.0f} records, by records needed ≈ "
                 f"n·(z·SE/|Δ|)² = {closest.n}·({Z:g}·{closest.se:.2g}/{abs(closest.diff):.2g})²")
        if len(ranked) > 1:
            line += f"; the median of the {len(ranked)} at ~{statistics.median(d.records_needed() for d in ranked):,.0f}"
        return line + (". To spend the rest, search again with a larger --stop-when-flat, or without it.")


def flat_stop(history: History, k: int, budget: int) -> FlatStop:
    """The FlatStop of a history whose last `k` full-set points moved the front by noise only."""
    last = [r for r in history.records if fidelity(r) >= 1.0][-k:]
    within = [Difference(r["paired"]["diff"], r["paired"]["se"], r["paired"]["n"]) for r in last
              if r["front_moved"] == "noise" and r.get("paired")]
    return FlatStop(k, round(history.spent, 4), budget, within, sum(r["front_moved"] == "no" for r in last))


def no_noise_note(history: History, missing: list[dict], remeasure: bool) -> str | None:
    """The line that says which points (`missing`: history.without_noise()) have no noise estimate (None
    when every point has one)."""
    if not missing:
        return None
    on_front = sum(1 for r in history.front() if r in missing)
    what = ("scoring the front's again (--remeasure-noise)" if remeasure else
            "nothing is measured again unless asked: --remeasure-noise scores the front's again")
    return (f"no noise estimate for these points: {len(missing)} of {len(history)} evaluations ({on_front} on the "
            f"front) were recorded without per-record values (a history written before they were kept); the "
            f"front's ± and the stop rule leave them out; {what}")


@dataclass
class SearchResult:
    history: History
    front: list[dict]  # non-dominated records, by size ascending
    hypervolume: float
    evaluated: int  # fresh evaluations run by this call
    paths: list[Path]
    imported: dict[str, int] = field(default_factory=dict)  # warm-start source -> records imported from it
    stopped: FlatStop | None = None  # set when the stop rule ended the search
    notes: list[str] = field(default_factory=list)  # what the search reported about its history (no noise estimate)


def search(problem: SearchProblem, out_dir: str | Path, budget: int, backend: Backend,
           progress: bool = True, plot: bool = True, rungs: Rungs | None = None,
           warm_start: list[str | Path] = (), stop_when_flat: int | None = None,
           remeasure_noise: bool = False) -> SearchResult:
    """Spend up to `budget` full-set-equivalent evaluations in total (those in out_dir/history.jsonl
    included; without `rungs`, distinct configs). `rungs` screens candidates on slices first
    (fidelity.py); `warm_start` imports the matching scores of earlier searches' histories (warm.py);
    `stop_when_flat=K` ends the search once K full-set evaluations in a row moved the front by no more
    than the paired noise; `remeasure_noise` scores the front points recorded without per-record
    values again (at no budget)."""
    if not isinstance(budget, int) or budget < 1:
        raise ShearsError(f"budget must be a positive number of evaluations, got {budget!r}")
    if stop_when_flat is not None and (not isinstance(stop_when_flat, int) or stop_when_flat < 1):
        raise ShearsError(f"stop_when_flat must be a positive number of evaluations, got {stop_when_flat!r}: "
                          "e.g. --stop-when-flat 10, or leave it out to spend the whole budget")
    files = SearchFiles(Path(out_dir))
    history = History(files.history, problem.objectives)
    check_scorer(history, problem)
    imported = {str(source): import_history(history, problem, source) for source in warm_start}
    missing = history.without_noise()
    note = no_noise_note(history, missing, remeasure_noise)
    notes = [note] if note else []
    if note:
        print(note, flush=True)
    with progress_bar(total=budget, initial=min(round(history.spent, 2), budget), desc=f"search {backend.name}",
                      unit="eval", disable=not progress) as bar:
        evaluator = Evaluator(problem, history, backend.name, bar, rungs=rungs, stop_when_flat=stop_when_flat)
        if remeasure_noise:
            for record in [r for r in history.front() if r in missing]:
                evaluator.remeasure(record["config"])
        evaluator.show()
        backend.run(problem, evaluator, budget)
    history.refresh()
    paths = [history.path, *write_front(history, files.folder)]
    if plot and len(history):
        paths.append(plot_front(history, files.front_png))
    stopped = flat_stop(history, stop_when_flat, budget) if evaluator.front_is_flat() else None
    return SearchResult(history, history.front(), history.hypervolume(), evaluator.fresh, paths, imported,
                        stopped, notes)
