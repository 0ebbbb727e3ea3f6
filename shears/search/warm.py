"""Warm start: what earlier searches measured seeds this one.

Every record carries `scorer`, a fingerprint of what its score means (the super-network's weights,
the evaluation records, the task; see shears.scores.Scoring). A record of an earlier search -- in
another folder, say a search with other settings on the same run -- whose scorer is this problem's
was measured exactly as this search would measure it (the same config on the same records gives the
same score), so it is imported as it stands, with `source` naming the file, and the backends start
from it: pymoo's initial population, the surrogate's first fit and Optuna's study (its trials are
seeded from the history) all read the history. Imported records count against the budget as
resumed ones do. Records of another scorer are left out, and a history that holds such records is
refused: its scores and this search's would not be comparable.

Training writes such records too: RUN/warm_start.jsonl holds the maximal, heuristic and minimal
subnets scored at the end of training by the search's own Scoring (shears.scores), with the
recipe's search defaults. They hold the quality alone; the sizes are computed here, as this search
computes them. `python -m shears.search` imports them unless told not to (--no-warm-start).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ShearsError
from ..rundir import SearchFiles
from .history import History, fidelity, read_history
from .problem import SearchProblem


def check_scorer(history: History, problem: SearchProblem) -> None:
    """Refuse a history scored by another super-network, other records or another task."""
    if problem.scorer is None:
        return
    other = next((r for r in history.records if r.get("scorer") not in (None, problem.scorer)), None)
    if other is not None:
        raise ShearsError(f"{history.path} holds scores of another super-network or evaluation set (scorer "
                          f"{other['scorer']}, this search's is {problem.scorer}): search with the settings it "
                          "was made with (--eval-limit), or move it aside and pass it as a warm start")


def import_history(history: History, problem: SearchProblem, source: str | Path) -> int:
    """Append the records of `source` (a history.jsonl or a search folder) that this problem would
    measure the same; returns how many were imported."""
    path = Path(source)
    if path.is_dir():
        path = SearchFiles(path).history
    if not path.is_file():
        raise ShearsError(f"warm start {source}: no such history file (give a history.jsonl or a search folder)")
    if path.resolve() == history.path.resolve():
        return 0
    names = [o.name for o in problem.objectives]
    imported = 0
    for record in read_history(path):
        if problem.scorer is None or record.get("scorer") != problem.scorer:
            continue
        config = record["config"]
        if set(config) != set(problem.keys) or any(config[k] not in problem.choices[k] for k in problem.keys):
            continue
        partial = fidelity(record) < 1.0
        if history.get(config, record["n_examples"] if partial else None) is not None:
            continue
        values = {n: record["objectives"][n] for n in names if n in record["objectives"]}
        if len(values) < len(names) and problem.sizes is not None:
            # Training records only the quality it measured (and an earlier search may have had another
            # size objective); sizes need no model run, and computed here they are exactly this search's.
            values.update({n: v for n, v in problem.sizes(config).items() if n in names and n not in values})
        if len(values) < len(names):
            continue
        extra = {k: record.get(k) for k in ("n_examples", "fidelity", "predicted", "precision", "per_record", "se")}
        history.append(config, {n: values[n] for n in names}, 0.0, record.get("backend") or "",
                       label=problem.label(config), scorer=problem.scorer, source=str(path), **extra)
        imported += 1
    return imported


__all__ = ["check_scorer", "import_history"]
