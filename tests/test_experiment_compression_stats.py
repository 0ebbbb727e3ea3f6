"""The statistics of benchmarks/experiment_compression.py against independent computations."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "experiment_compression.py"


@pytest.fixture(scope="module")
def experiment():
    spec = importlib.util.spec_from_file_location("experiment_compression", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("b, c", [(0, 0), (1, 0), (7, 3), (30, 12), (100, 100), (3, 40)])
def test_mcnemar_is_the_exact_two_sided_binomial_test(experiment, b, c):
    # the definition: twice the smaller tail of Binomial(b + c, 1/2), at most 1
    n = b + c
    expected = min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n)
    assert experiment.mcnemar_p(b, c) == pytest.approx(expected, rel=1e-9)


def test_paired_difference_matches_a_reference_bootstrap_loop(experiment):
    rng = np.random.default_rng(3)
    tasks = list(experiment.TEST_FILES)
    a = {t: (rng.random(n) < 0.6).astype(float) for t, n in zip(tasks, (120, 80))}
    b = {t: (rng.random(n) < 0.5).astype(float) for t, n in zip(tasks, (120, 80))}
    got = experiment.paired_difference(a, b, seed=0)
    # the point estimate: difference of the unweighted task averages
    assert got["diff"] == pytest.approx(np.mean([a[t].mean() - b[t].mean() for t in tasks]))
    assert got["better"] == sum(int(((a[t] == 1) & (b[t] == 0)).sum()) for t in tasks)
    assert got["worse"] == sum(int(((a[t] == 0) & (b[t] == 1)).sum()) for t in tasks)
    # a plain loop: resample question indices per task, the same draw for both rows
    loop_rng, diffs = np.random.default_rng(1), []
    for _ in range(4000):
        total = 0.0
        for t in tasks:
            idx = loop_rng.integers(0, len(a[t]), len(a[t]))
            total += (a[t][idx].mean() - b[t][idx].mean()) / len(tasks)
        diffs.append(total)
    low, high = np.percentile(diffs, [2.5, 97.5])
    assert got["low"] == pytest.approx(low, abs=0.012) and got["high"] == pytest.approx(high, abs=0.012)
    assert math.isclose(got["p"], experiment.mcnemar_p(got["better"], got["worse"]))
