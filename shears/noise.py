"""How much of a score is noise: per-record values, standard errors, and paired differences.

A subnet's quality score is a (weighted) mean over the evaluation records: accuracy is the mean of
1/0 per question, the loss the mean of each record's response-token loss weighted by its response
tokens (shears.evaluate returns both as `per_record` and `per_record_weights`). Over records drawn
from a population, the standard error of such a ratio mean R = sum(w v) / sum(w) is, by the delta
method,

    SE(R)^2 = n / (n - 1) * sum(w_i^2 (v_i - R)^2) / (sum w)^2        (n = records with w_i > 0)

which for equal weights is the familiar std(v, ddof=1) / sqrt(n).

Two subnets scored on the same records are compared *paired*: their difference is the same mean of
the per-record differences d_i = v_a,i - v_b,i (the weights are the records' and so shared), and its
standard error is the formula above applied to d. Records that are hard for one subnet are hard for
the other, so this is far tighter than the two scores' independent errors combined.

A difference D measured with standard error SE on n records becomes measurable (D > Z * SE) at about

    n_needed = n * (Z * SE / |D|)^2

records, since the standard error shrinks as 1 / sqrt(n) (a back-of-envelope: it assumes D stays
what it is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

Z = 2.0  # paired standard errors a difference must exceed to count as real (about 95%, two-sided)


@dataclass(frozen=True)
class PerRecord:
    """One quality objective's value on each evaluation record, and the records' weights in its mean
    (None: equal). A history record keeps it as {"values": [...], "weights": [...]}."""

    values: tuple[float, ...]
    weights: tuple[float, ...] | None = None

    @classmethod
    def from_result(cls, result: dict) -> "PerRecord":
        """From a shears.evaluate result (its `per_record`, and `per_record_weights` for the loss)."""
        weights = result.get("per_record_weights")
        return cls(tuple(float(v) for v in result["per_record"]), tuple(float(w) for w in weights) if weights else None)

    @classmethod
    def from_json(cls, data: dict | None) -> "PerRecord | None":
        if not data or not data.get("values"):
            return None
        weights = data.get("weights")
        return cls(tuple(float(v) for v in data["values"]), tuple(float(w) for w in weights) if weights else None)

    def to_json(self) -> dict:
        """Compact: values to 6 decimals, whole numbers (a 1/0 answer, a token count) as integers."""
        def compact(x: float):
            x = round(float(x), 6)
            return int(x) if x.is_integer() else x

        out: dict = {"values": [compact(v) for v in self.values]}
        if self.weights is not None:
            out["weights"] = [compact(w) for w in self.weights]
        return out

    def mean(self) -> float:
        return mean_and_se(self.values, self.weights)[0]

    def se(self) -> float:
        return mean_and_se(self.values, self.weights)[1]


def mean_and_se(values: Sequence[float], weights: Sequence[float] | None = None) -> tuple[float, float]:
    """(weighted mean, its standard error by the delta method; see the module docstring). NaN for the
    standard error of fewer than two weighted records."""
    w = [1.0] * len(values) if weights is None else [float(x) for x in weights]
    if len(w) != len(values):
        raise ValueError(f"{len(values)} values but {len(w)} weights")
    total = sum(w)
    if total <= 0:
        return math.nan, math.nan
    mean = sum(wi * vi for wi, vi in zip(w, values)) / total
    n = sum(1 for wi in w if wi > 0)
    if n < 2:
        return mean, math.nan
    spread = sum(wi * wi * (vi - mean) ** 2 for wi, vi in zip(w, values))
    return mean, math.sqrt(n / (n - 1) * spread) / total


@dataclass(frozen=True)
class Difference:
    """a - b over the same records: `diff` and its paired standard error `se`, on `n` records."""

    diff: float
    se: float
    n: int

    def significant(self, z: float = Z) -> bool:
        """Is a > b beyond the noise (diff > z * se)? A difference with no spread at all counts when > 0."""
        return self.diff > z * self.se if self.se > 0 else self.diff > 0

    def records_needed(self, z: float = Z) -> float:
        """Records at which this difference would become measurable: n * (z * se / |diff|)^2."""
        if self.diff == 0:
            return math.inf
        return self.n * (z * self.se / abs(self.diff)) ** 2


def paired(a: PerRecord, b: PerRecord) -> Difference | None:
    """a - b from per-record differences over the same records; None when they are not the same
    records (another count or other weights)."""
    if len(a.values) != len(b.values) or a.weights != b.weights:
        return None
    diff, se = mean_and_se([x - y for x, y in zip(a.values, b.values)], a.weights)
    n = sum(1 for w in (a.weights or [1.0] * len(a.values)) if w > 0)
    return Difference(diff, se, n)
