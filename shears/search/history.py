"""Every evaluation of a search, its non-dominated front and hypervolume.

RUN/search/history.jsonl holds one JSON line per evaluated config, appended (under an exclusive
file lock, so several local search processes may share it) the moment the evaluation finishes:

    {"n": 7, "config": {...}, "objectives": {"accuracy": 0.61, "adapter_params": 1.2e5},
     "seconds": 3.2, "backend": "optuna:tpe", "trial": 9, "label": null,
     "per_record": {"accuracy": {"values": [1, 0, 1, ...]}}, "se": {"accuracy": 0.021},
     "front_moved": "noise", "paired": {"against": 3, "diff": 0.004, "se": 0.006, "n": 256},
     "front_size": 4, "hypervolume": 0.8123, "worker": "host:pid", "time": "..."}

(the record format is shears.scores.score_record's, which training's RUN/warm_start.jsonl shares;
`read_history` is shears.scores', re-exported here for the readers of a search's files).

The front is kept incrementally: a new point dominated by a front member changes nothing;
otherwise it joins and evicts the members it dominates (dominance is transitive, so this is exactly
the non-dominated subset of everything seen). Hypervolume is measured on the normalised objectives
(see objectives.py) against the reference point 1.1 in every objective: an exact sweep in 2-D,
pymoo's HV indicator beyond.

Every score keeps its per-record values (`per_record`: the quality objectives' value on each record,
with the loss's token weights; shears/noise.py) and their standard error (`se`), so each new full-set
point is judged against the front it meets, paired over the same records (`front_moved`):

    no       a front point is at least as good in every objective: it adds no hypervolume
    yes      it adds hypervolume for real: no front point is as small, or it beats every front
             point no larger than it (its incumbents) by more than Z = 2 paired standard errors in quality
    noise    it adds hypervolume on its scores, but not beyond the paired noise
    unknown  it adds hypervolume, and an incumbent (or itself) has no per-record values (a history
             written before they were kept): no noise estimate

`flat` counts the full-set points in a row, to the end of the history, that were "no" or "noise": the
stop rule (`search(..., stop_when_flat=K)`) ends a search when it reaches K. A history line marked
`remeasure` brings the per-record values of a point recorded without them (`--remeasure-noise`): it
fills them in, and costs no budget.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from pathlib import Path

import numpy as np

from ..atomic import write_text
from ..errors import ShearsError
from ..rundir import SearchFiles
from ..scores import parse_records, read_history, score_record
from ..search_space import canonical
from ..noise import Z, PerRecord, paired
from .objectives import REFERENCE, Objective


def dominates(a, b) -> bool:
    """a dominates b (both minimised): no worse anywhere, better somewhere."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def hypervolume_2d(points, reference=(REFERENCE, REFERENCE)) -> float:
    """Exact area dominated by minimised 2-D `points` and bounded by `reference`."""
    inside = sorted((float(x), float(y)) for x, y in points if x < reference[0] and y < reference[1])
    area, ceiling = 0.0, reference[1]
    for x, y in inside:  # by x ascending; each point adds the strip under the lowest y so far
        if y < ceiling:
            area += (reference[0] - x) * (ceiling - y)
            ceiling = y
    return area


def hypervolume(points, reference: float = REFERENCE) -> float:
    points = np.asarray(points, dtype=float)
    if len(points) == 0:
        return 0.0
    if points.shape[1] == 2:
        return hypervolume_2d(points, (reference, reference))
    from pymoo.indicators.hv import HV

    return float(HV(ref_point=np.full(points.shape[1], reference))(points))


def fidelity(record: dict) -> float:
    """The share of the full evaluation set behind a record's quality score (1.0: the full set)."""
    return float(record.get("fidelity", 1.0))


def per_record(record: dict, name: str) -> PerRecord | None:
    """The per-record values of objective `name` behind a record's score, or None (a score written
    before they were kept, or a size objective)."""
    return PerRecord.from_json((record.get("per_record") or {}).get(name))


def read_front(folder: str | os.PathLike) -> dict | None:
    """front.json of a search's `folder` as `write_front` wrote it, or None when there is none."""
    path = SearchFiles(Path(folder)).front_json
    return json.loads(path.read_text()) if path.is_file() else None


def recorded_scores(folder: str | os.PathLike) -> dict[str, dict]:
    """canonical(config) -> the full-set record of every evaluation of a search's `folder` (its
    "objectives", and "n_examples": how many records scored it): its history (the first evaluation
    wins, as in the search), then the points of front.json (which outlives a pruned history)."""
    records = read_history(SearchFiles(Path(folder)).history) + ((read_front(folder) or {}).get("front") or [])
    found: dict[str, dict] = {}
    for record in records:
        if fidelity(record) >= 1.0:  # a screening score on a slice is not the subnet's score
            found.setdefault(canonical(record["config"]), record)
    return found


def _z(difference) -> float:
    """A paired difference in standard errors (infinite when it has no spread and is positive)."""
    if difference.se > 0:
        return difference.diff / difference.se
    return math.inf if difference.diff > 0 else (0.0 if difference.diff == 0 else -math.inf)


class History:
    """The evaluations in `path` (a JSON-lines file), as a cache keyed by canonical config.

    A record scored on a slice of the evaluation set (multi-fidelity screening) has `n_examples` and a
    `fidelity` below 1; it is kept apart, keyed by (config, n_examples): `get(config)`, `len()`, the
    front and its hypervolume see only full-fidelity records, and `spent` counts every record by its
    fidelity, in full-set-equivalent evaluations."""

    def __init__(self, path: str | os.PathLike, objectives: tuple[Objective, ...]):
        self.path = Path(path)
        self.objectives = tuple(objectives)
        self.records: list[dict] = []  # every record, full and partial, in file order
        self._by_config: dict[str, dict] = {}  # full-fidelity records
        self._partial: dict[tuple[str, int], dict] = {}  # (config, n_examples) -> a screening record
        self._front: list[dict] = []
        self.spent = 0.0  # full-set-equivalent evaluations behind every record
        self.partial_spent = 0.0  # ... behind the screening records alone
        self._offset = 0  # bytes of the file already read
        self.lines = 0  # history lines accepted (remeasure lines included): the next line's "n"
        self.flat = 0  # full-set points in a row, to the last, that did not move the front beyond the noise
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.refresh()

    def __len__(self) -> int:
        """Distinct configs scored on the full evaluation set."""
        return len(self._by_config)

    def __contains__(self, config) -> bool:
        return self.get(config) is not None

    def configs(self) -> set[str]:
        return set(self._by_config)

    def full_records(self) -> list[dict]:
        return [r for r in self.records if fidelity(r) >= 1.0]

    def get(self, config: dict | str, n_examples: int | None = None) -> dict | None:
        """The full-fidelity record of `config`, or with `n_examples` its record on that slice."""
        key = config if isinstance(config, str) else canonical(config)
        return self._by_config.get(key) if n_examples is None else self._partial.get((key, int(n_examples)))

    def screened(self) -> set[str]:
        """Configs scored on a slice (some stopped there)."""
        return {key for key, _ in self._partial}

    def at(self, n_examples: int) -> list[dict]:
        """Every record scored on the first `n_examples` of the evaluation set."""
        return [r for (_, n), r in self._partial.items() if n == n_examples]

    # ---- objectives as vectors

    def minimised(self, record: dict) -> tuple[float, ...]:
        return tuple(o.minimised(record["objectives"][o.name]) for o in self.objectives)

    def normalised(self, record: dict) -> tuple[float, ...]:
        return tuple(o.normalised(record["objectives"][o.name]) for o in self.objectives)

    def front(self) -> list[dict]:
        """The non-dominated records, by the first size objective ascending."""
        size = next((i for i, o in enumerate(self.objectives) if o.is_size), 0)
        return sorted(self._front, key=lambda r: (self.minimised(r)[size], self.minimised(r)))

    def hypervolume(self) -> float:
        return hypervolume([self.normalised(r) for r in self._front])

    # ---- the noise

    def without_noise(self) -> list[dict]:
        """Full-set records without per-record values of every quality objective (no noise estimate)."""
        quality = [o.name for o in self.objectives if not o.is_size]
        return [r for r in self.full_records() if any(per_record(r, name) is None for name in quality)]

    def advantage(self, record: dict, other: dict):
        """How much better `record` is than `other` in quality, paired over the same records: the
        noise.Difference (oriented so that positive is better) of the quality objective where it is
        most clearly better, or None when either lacks per-record values."""
        best = None
        for o in self.objectives:
            if o.is_size:
                continue
            mine, theirs = per_record(record, o.name), per_record(other, o.name)
            if mine is None or theirs is None:
                return None
            difference = paired(mine, theirs) if o.maximize else paired(theirs, mine)
            if difference is None:
                return None
            if best is None or _z(difference) > _z(best):
                best = difference
        return best

    def judge(self, record: dict) -> tuple[str, dict | None]:
        """(front_moved, the paired comparison with its closest incumbent) of a full-set `record`
        against the current front (see the module docstring)."""
        point = self.minimised(record)
        if any(all(x <= y for x, y in zip(self.minimised(r), point)) for r in self._front):
            return "no", None
        sizes = [i for i, o in enumerate(self.objectives) if o.is_size]
        incumbents = [r for r in self._front if all(self.minimised(r)[i] <= point[i] for i in sizes)]
        if not incumbents:
            return "yes", None
        closest = None
        for incumbent in incumbents:
            difference = self.advantage(record, incumbent)
            if difference is None:
                return "unknown", None
            if closest is None or _z(difference) < _z(closest[1]):
                closest = (incumbent, difference)
        incumbent, difference = closest
        comparison = {"against": incumbent.get("n"), "diff": round(difference.diff, 8), "se": round(difference.se, 8),
                      "n": difference.n}
        return ("yes" if difference.significant(Z) else "noise"), comparison

    def front_noise(self) -> list[dict]:
        """For each front point (in front() order): "se", each quality objective's standard error (None
        without per-record values), and "vs_previous", how much better it is than the previous (smaller)
        front point, paired ({"diff", "se", "n"}; None for the first, or without per-record values)."""
        front, out = self.front(), []
        for i, record in enumerate(front):
            errors = {}
            for o in self.objectives:
                if not o.is_size:
                    values = per_record(record, o.name)
                    errors[o.name] = None if values is None else values.se()
            difference = self.advantage(record, front[i - 1]) if i else None
            out.append({"se": errors, "vs_previous": None if difference is None else
                        {"diff": difference.diff, "se": difference.se, "n": difference.n}})
        return out

    # ---- reading and appending

    def _fill_noise(self, record: dict) -> None:
        """A remeasure line: the per-record values of a full-set point recorded without them."""
        known = self._by_config.get(canonical(record["config"]))
        if known is not None and record.get("per_record") and not known.get("per_record"):
            known["per_record"], known["se"] = record["per_record"], record.get("se")

    def _add(self, record: dict) -> None:
        key = canonical(record["config"])
        partial = fidelity(record) < 1.0
        slot = (key, int(record["n_examples"])) if partial else key
        if record.get("remeasure"):
            self.lines += 1
            self._fill_noise(record)
            return
        if slot in (self._partial if partial else self._by_config):  # first evaluation wins
            return
        missing = [o.name for o in self.objectives if o.name not in record.get("objectives", {})]
        if missing:
            raise ShearsError(f"{self.path} holds evaluations without {missing}: search with the objectives "
                              "it was made with, or move it aside to start a new search")
        self.lines += 1
        self.records.append(record)
        self.spent += fidelity(record)
        if partial:
            self._partial[slot] = record
            self.partial_spent += fidelity(record)
            return
        self._by_config[key] = record
        moved, comparison = self.judge(record)
        record["front_moved"] = moved
        if comparison is not None:
            record["paired"] = comparison
        else:
            record.pop("paired", None)
        self.flat = self.flat + 1 if moved in ("no", "noise") else 0
        point = self.minimised(record)
        if any(dominates(self.minimised(r), point) for r in self._front):
            return
        self._front = [r for r in self._front if not dominates(point, self.minimised(r))] + [record]

    def _read_new(self, f) -> None:
        f.seek(self._offset)
        data = f.read()
        end = data.rfind(b"\n") + 1  # a line without its newline is still being written
        for record in parse_records(data[:end]):
            self._add(record)
        self._offset += end

    def refresh(self) -> None:
        """Read evaluations appended since the last read (by this or another process)."""
        if self.path.exists():
            with open(self.path, "rb") as f:
                self._read_new(f)

    def append(self, config: dict, values: dict, seconds: float, backend: str, trial: int | None = None,
               label: str | None = None, **extra) -> dict:
        """Record a fresh evaluation: read what others appended, add it, write one line, fsync.
        `extra` fields (n_examples, fidelity, scorer, predicted, source) go into the record as given."""
        with open(self.path, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                self._read_new(f)
                record = score_record(config, values, seconds, backend, self.lines, trial, label, **extra)
                self._add(record)
                if not record.get("remeasure"):
                    record["front_size"] = len(self._front)
                    record["hypervolume"] = self.hypervolume()
                f.seek(0, os.SEEK_END)
                if f.tell() > self._offset:  # a torn line at the end: start ours on a fresh line
                    f.write(b"\n")
                f.write((json.dumps(record) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
                self._offset = f.tell()
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return record


def write_front(history: History, folder: str | os.PathLike) -> list[Path]:
    """front.json and front.csv in a search's `folder`: the non-dominated records, by size ascending
    (written atomically)."""
    files = SearchFiles(Path(folder))
    front = history.front()
    names = [o.name for o in history.objectives]
    quality = [o.name for o in history.objectives if not o.is_size]
    rows = [{"config": r["config"], "objectives": r["objectives"], "label": r.get("label"),
             "trial": r.get("trial"), "backend": r.get("backend"), "n": r.get("n"),
             "n_examples": r.get("n_examples"), **noise}
            for r, noise in zip(front, history.front_noise())]
    json_path, csv_path = files.front_json, files.front_csv
    write_text(json_path, json.dumps({"objectives": names, "hypervolume": history.hypervolume(),
                                        "evaluations": len(history), "noise_z": Z, "front": rows}, indent=1) + "\n")

    def number(value) -> str:
        return "" if value is None else repr(float(value))

    lines = [",".join([*names, *(f"{q}_se" for q in quality), "better_than_previous", "better_than_previous_se",
                       "label", "n", "trial", "backend", "config"])]
    for r in rows:
        config = canonical(r["config"]).replace('"', '""')
        values = [repr(float(r["objectives"][n])) for n in names]
        errors = [number(r["se"][q]) for q in quality]
        previous = r["vs_previous"] or {}
        lines.append(",".join([*values, *errors, number(previous.get("diff")), number(previous.get("se")),
                               r["label"] or "", str(r["n"]), str(r["trial"]), r["backend"] or "", f'"{config}"']))
    write_text(csv_path, "\n".join(lines) + "\n")
    return [json_path, csv_path]
