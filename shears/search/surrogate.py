"""Predictor-assisted search (Evo-NAS style): a learned model proposes, evolution refines, few are run.

Each round:
  1. fit a ridge regression of the normalised quality on per-key rank features (rank / r_max of every
     key), on every full-fidelity evaluation so far; the penalty is chosen by exact leave-one-out error
     (the hat-matrix shortcut, so choosing it costs one fit per candidate penalty);
  2. run NSGA-II on the predictor (quality predicted, sizes exact when the problem gives `sizes`, else
     predicted the same way) from the evaluated configs plus random ones: thousands of predictions,
     no model run. A space of at most `enumerate_limit` subnets is instead predicted whole, which
     finds the predictor's best proposal exactly and costs milliseconds where NSGA-II costs seconds
     (on a small space most of its offspring are duplicates it must redraw);
  3. evaluate the proposal whose predicted point adds most hypervolume to the front of the scores
     measured so far; when none is predicted to add any, a random unseen config (the predictor's
     blind spots get data too);
  4. record the prediction with the evaluation, refit, repeat.

The first `initial` evaluations (the maximal, heuristic and minimal subnets, then random configs)
give the first fit. Kendall's tau between each prediction and the score then measured -- every one
made before its point was in the training set, so it is held-out error -- is on the progress bar and
in `kendall_tau()`: near 1 the predictor ranks subnets as the evaluations do; near 0 trust it no more
than random search.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import kendalltau

from ..search_space import canonical
from .history import History, hypervolume
from .problem import ANCHORS, Config, Evaluator, SearchProblem

ALPHAS = tuple(10.0 ** k for k in range(-3, 4))  # ridge penalties tried by leave-one-out


@dataclass
class Ridge:
    """y ~ b + X w, minimising |y - b - X w|^2 + alpha |w|^2 (the intercept b is not penalised)."""

    alpha: float
    mean_x: np.ndarray
    mean_y: float
    weights: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, alpha: float) -> "Ridge":
        mean_x, mean_y = x.mean(0), float(y.mean())
        xc = x - mean_x
        weights = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - mean_y))
        return cls(alpha, mean_x, mean_y, weights)

    @classmethod
    def fit_loo(cls, x: np.ndarray, y: np.ndarray, alphas=ALPHAS) -> "Ridge":
        """The fit whose penalty has the least leave-one-out squared error."""
        best = None
        for alpha in alphas:
            loo = loo_error(x, y, alpha)
            if best is None or loo < best[0]:
                best = (loo, alpha)
        return cls.fit(x, y, best[1])

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.mean_y + (np.asarray(x, dtype=float) - self.mean_x) @ self.weights


def loo_error(x: np.ndarray, y: np.ndarray, alpha: float) -> float:
    """Mean squared leave-one-out residual of ridge with an unpenalised intercept: e_i / (1 - h_ii) with
    H the hat matrix of the centred problem plus 1/n (exact for a fixed penalty)."""
    n = len(y)
    xc = x - x.mean(0)
    inverse = np.linalg.inv(xc.T @ xc + alpha * np.eye(x.shape[1]))
    hat = xc @ inverse @ xc.T + 1.0 / n
    residual = y - hat @ y
    leverage = np.clip(1.0 - np.diag(hat), 1e-9, None)
    return float(np.mean((residual / leverage) ** 2))


def kendall_tau(a, b) -> float | None:
    """Kendall's tau-b of two sequences (None for fewer than 3 values or no variation)."""
    if len(a) < 3:
        return None
    tau = kendalltau(a, b).statistic  # tau-b, scipy's default; nan when either side has no variation
    return None if math.isnan(tau) else float(tau)


@dataclass
class SurrogateBackend:
    seed: int = 0
    initial: int | None = None  # evaluations before the first fit (default: a quarter of the budget, 6-20)
    population_size: int = 64  # of the NSGA-II run on the predictor
    generations: int = 40
    enumerate_limit: int = 4096  # spaces up to this size are predicted whole instead of by NSGA-II
    predictions: list[tuple[float, float]] = field(default_factory=list)  # (predicted, measured) of this run

    name = "surrogate:ridge"

    def features(self, problem: SearchProblem, configs: list[Config]) -> np.ndarray:
        top = max(max(c) for c in problem.choices.values())
        return np.array([[config[key] / top for key in problem.keys] for config in configs], dtype=float)

    def kendall_tau(self) -> float | None:
        if len(self.predictions) < 3:
            return None
        predicted, measured = zip(*self.predictions)
        return kendall_tau(predicted, measured)

    def run(self, problem: SearchProblem, evaluator: Evaluator, budget: int) -> None:
        history = evaluator.history
        rng = np.random.default_rng(self.seed + len(history))
        quality = next(i for i, o in enumerate(problem.objectives) if not o.is_size)
        initial = self.initial if self.initial is not None else int(np.clip(budget // 4, 6, 20))

        def spend(config: Config, **extra) -> bool:
            """Screen and evaluate `config`; False once the budget is spent."""
            if not evaluator.budget_left(budget):
                return False
            if evaluator.screen(config, trial=len(history)):
                evaluator.evaluate(config, trial=len(history), **extra)
            return True

        for label in ANCHORS:
            if not spend(problem.anchors[label]):
                return
        while len(history) < initial:
            if not spend(self.random_unseen(problem, history, rng)):
                return
        while True:
            proposal, predicted = self.propose(problem, history, rng, quality)
            measured_before = history.get(proposal)
            if not spend(proposal, predicted=None if predicted is None else round(float(predicted), 6)):
                return
            record = history.get(proposal)
            if predicted is not None and record is not None and measured_before is None:
                self.predictions.append((float(predicted), history.normalised(record)[quality]))
                tau = self.kendall_tau()
                if tau is not None:
                    evaluator.postfix["tau"] = f"{tau:.2f}"

    def random_unseen(self, problem: SearchProblem, history: History, rng: np.random.Generator) -> Config:
        for _ in range(1000):
            config = {key: int(rng.choice(problem.choices[key])) for key in problem.keys}
            if config not in history:
                return config
        return config

    def fit(self, problem: SearchProblem, history: History, quality: int):
        records = history.full_records()
        x = self.features(problem, [r["config"] for r in records])
        targets = np.array([history.normalised(r) for r in records])
        models = {i: Ridge.fit_loo(x, targets[:, i]) for i in range(len(problem.objectives))
                  if i == quality or problem.sizes is None}
        return models

    def predict(self, problem: SearchProblem, models: dict, configs: list[Config]) -> np.ndarray:
        """Normalised objective vectors of `configs`: predicted quality, sizes exact when known."""
        x = self.features(problem, configs)
        out = np.zeros((len(configs), len(problem.objectives)))
        for i, objective in enumerate(problem.objectives):
            if i in models:
                out[:, i] = models[i].predict(x)
            else:
                out[:, i] = [objective.normalised(problem.sizes(c)[objective.name]) for c in configs]
        return out

    def propose(self, problem: SearchProblem, history: History, rng: np.random.Generator, quality: int):
        """(config, its predicted normalised quality): the unseen proposal of largest predicted
        hypervolume improvement, else a random unseen config."""
        models = self.fit(problem, history, quality)
        if problem.size <= self.enumerate_limit:
            rows = itertools.product(*(range(len(problem.choices[key])) for key in problem.keys))
        else:
            rows = self.evolve(problem, history, rng, models)
        seen, candidates = history.configs() | history.screened(), []
        for row in rows:
            config = problem.decode(row)
            key = canonical(config)
            if key not in seen:
                seen.add(key)
                candidates.append(config)
        front = [history.normalised(r) for r in history.front()]
        base = hypervolume(front)
        if candidates:
            points = self.predict(problem, models, candidates)
            gains = [hypervolume([*front, tuple(p)]) - base for p in points]
            best = int(np.argmax(gains))
            if gains[best] > 0:
                return candidates[best], points[best, quality]
        config = self.random_unseen(problem, history, rng)
        return config, self.predict(problem, models, [config])[0, quality]

    def evolve(self, problem: SearchProblem, history: History, rng: np.random.Generator, models: dict) -> np.ndarray:
        """The final NSGA-II population on the predictor, started from the evaluated configs plus random ones."""
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.problem import Problem
        from pymoo.operators.crossover.sbx import SBX
        from pymoo.operators.mutation.pm import PM
        from pymoo.operators.repair.rounding import RoundingRepair
        from pymoo.optimize import minimize

        upper = np.array([len(problem.choices[key]) - 1 for key in problem.keys], dtype=float)
        backend = self

        class Predicted(Problem):
            def _evaluate(self, x, out, *args, **kwargs):
                out["F"] = backend.predict(problem, models, [problem.decode(row) for row in x])

        known = [problem.encode(r["config"]) for r in history.full_records()]
        start = np.array(known[: self.population_size], dtype=float)
        fill = rng.integers(0, upper + 1, size=(max(0, self.population_size - len(start)), len(upper)))
        sampling = np.vstack([start, fill]) if len(start) else fill.astype(float)
        algorithm = NSGA2(pop_size=self.population_size, sampling=sampling,
                          crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
                          mutation=PM(eta=20, vtype=float, repair=RoundingRepair()), eliminate_duplicates=True)
        result = minimize(Predicted(n_var=len(upper), n_obj=len(problem.objectives), xl=np.zeros_like(upper),
                                    xu=upper, vtype=int),
                          algorithm, ("n_gen", self.generations), seed=int(rng.integers(2**31)), verbose=False)
        return result.pop.get("X") if result.pop is not None else np.empty((0, len(upper)))
