"""Multi-fidelity screening: score a candidate on slices of the evaluation set before the full set.

Successive halving, asynchronous (ASHA, Li et al. 2020) and multi-objective: `Rungs(examples=(16, 64))`
scores each new candidate on the first 16 evaluation examples, then on the first 64, then on all of
them, and stops it at the first rung where it is not among the most promising of everything scored
at that rung so far. Promising means: in the best `keep` share of the rung by non-dominated sorting
(Deb et al.'s ranks on the normalised objectives; the size objectives are exact at every rung, so a
small subnet with a mediocre score survives where a large one would not). Everyone scored at a rung is
compared on the same examples, so the slice's bias is shared and the comparison is fair.

A stopped candidate costs n / N full-set-equivalent evaluations; only full-set scores enter the front.
The maximal, heuristic and minimal subnets always climb every rung: they fill the rungs' pools first.
Any backend uses it through `Evaluator.screen`; Optuna sees a stopped trial as PRUNED (its samplers
learn from that), pymoo as a dominated individual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ShearsError
from .history import History


@dataclass(frozen=True)
class Rungs:
    examples: tuple[int, ...]  # evaluation examples scored at each rung below the full set, ascending
    keep: float = 1 / 3  # the share of a rung that goes on to the next

    @classmethod
    def from_recipe(cls, examples, keep: float, full: int | None) -> "Rungs | None":
        """Rungs for a problem with `full` evaluation examples, or None when `examples` is empty."""
        examples = tuple(int(n) for n in (examples or ()))
        if not examples:
            return None
        if full is None:
            raise ShearsError("search.rungs needs an objective scored on examples (accuracy or loss on the "
                              "validation records): drop search.rungs for this problem")
        if list(examples) != sorted(set(examples)) or examples[0] < 1 or examples[-1] >= full:
            raise ShearsError(f"search.rungs={list(examples)} must be increasing example counts between 1 and "
                              f"{full - 1} (the evaluation set has {full}), e.g. [{max(1, full // 9)}, {max(2, full // 3)}]")
        if not 0 < keep <= 1:
            raise ShearsError(f"search.keep={keep} must be a share in (0, 1], e.g. 0.34 to promote a third")
        return cls(examples, float(keep))


def nondominated_ranks(points: np.ndarray) -> np.ndarray:
    """Rank 0 for the non-dominated points (minimised), rank 1 for those dominated only by rank 0, ..."""
    n = len(points)
    ranks = np.full(n, -1)
    better_eq = (points[:, None, :] <= points[None, :, :]).all(-1)
    strictly = (points[:, None, :] < points[None, :, :]).any(-1)
    dominates = better_eq & strictly  # [i, j]: i dominates j
    remaining = np.ones(n, dtype=bool)
    level = 0
    while remaining.any():
        dominated = (dominates & remaining[:, None]).any(0)
        current = remaining & ~dominated
        ranks[current] = level
        remaining &= ~current
        level += 1
    return ranks


def promising(record: dict, pool: list[dict], history: History, keep: float) -> bool:
    """Is `record` in the best `keep` share of `pool` (every record of its rung, itself included)?
    Fewer than ceil(keep * len(pool)) members may rank strictly better."""
    if record not in pool:
        pool = [*pool, record]
    points = np.array([history.normalised(r) for r in pool])
    ranks = nondominated_ranks(points)
    mine = ranks[next(i for i, r in enumerate(pool) if r is record)]
    return int((ranks < mine).sum()) < math.ceil(keep * len(pool))
