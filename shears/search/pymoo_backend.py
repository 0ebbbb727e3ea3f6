"""pymoo backend: NSGA-II over the integer-encoded space, driven by our own ask/tell loop.

A config is encoded as one ordinal index per key (the position of its rank among the key's sorted
choices), so SBX crossover and polynomial mutation move between neighbouring ranks; both are
followed by rounding repair, and pymoo eliminates duplicate offspring. The loop is ours so the
budget is exact: every individual goes through the evaluator's cache (a config seen before costs
nothing and is never re-run) and the loop stops the moment `budget` distinct configs are evaluated,
even mid-generation. pymoo removes duplicates within a generation only; an offspring that repeats a
config of an earlier generation is replaced by a random unseen one, so a converged population still
spends the budget on new configs instead of re-proposing old ones. The initial population is the maximal, heuristic and minimal subnets, then
every config already in the history (so a resumed search starts from what it knew), then random
distinct configs up to the population size. One process per history file.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.problem import Problem
from pymoo.core.termination import NoTermination
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair

from ..search_space import canonical
from .objectives import REFERENCE
from .problem import ANCHORS, Evaluator, SearchProblem


@dataclass
class PymooBackend:
    seed: int = 0
    population_size: int = 16
    max_idle_generations: int = 50  # generations in a row with no new config before giving up

    name = "pymoo:nsga2"

    def initial_population(self, problem: SearchProblem, known: list[dict]) -> np.ndarray:
        configs = [problem.anchors[label] for label in ANCHORS] + known
        rng = np.random.default_rng(self.seed + len(known))
        seen: set[str] = set()
        rows = []
        for config in configs:
            if canonical(config) not in seen:
                seen.add(canonical(config))
                rows.append(problem.encode(config))
        while len(rows) < self.population_size:
            row = self.unseen_row(problem, seen, rng)
            if row is None:
                break
            seen.add(canonical(problem.decode(row)))
            rows.append(row)
        return np.array(rows, dtype=float)

    @staticmethod
    def unseen_row(problem: SearchProblem, seen, rng: np.random.Generator, tries: int = 200) -> list[int] | None:
        """The encoding of a random config not in `seen`, or None when (almost) none is left."""
        for _ in range(tries):
            row = [int(rng.integers(len(problem.choices[key]))) for key in problem.keys]
            if canonical(problem.decode(row)) not in seen:
                return row
        if problem.size <= 100_000:  # nearly exhausted small space: enumerate what is left
            for flat in rng.permutation(problem.size):
                row = list(np.unravel_index(int(flat), [len(problem.choices[k]) for k in problem.keys]))
                if canonical(problem.decode(row)) not in seen:
                    return [int(i) for i in row]
        return None

    def run(self, problem: SearchProblem, evaluator: Evaluator, budget: int) -> None:
        history = evaluator.history
        upper = np.array([len(problem.choices[key]) - 1 for key in problem.keys], dtype=float)
        space = Problem(n_var=len(problem.keys), n_obj=len(problem.objectives), xl=np.zeros_like(upper), xu=upper,
                        vtype=int)
        algorithm = NSGA2(pop_size=self.population_size,
                          sampling=self.initial_population(problem, [r["config"] for r in history.full_records()]),
                          crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
                          mutation=PM(eta=20, vtype=float, repair=RoundingRepair()),
                          eliminate_duplicates=True)
        algorithm.setup(space, termination=NoTermination(), seed=self.seed + len(history))
        idle = 0
        rng = np.random.default_rng(self.seed + 7919 * len(history))
        while evaluator.budget_left(budget):
            population = algorithm.ask()
            before = evaluator.fresh
            scores = []
            rows = population.get("X")
            for i, x in enumerate(rows):
                config = problem.decode(x)
                if config in history:  # explored by an earlier generation: explore something new instead
                    row = self.unseen_row(problem, history, rng)
                    if row is not None:
                        rows[i] = row
                        config = problem.decode(row)
                if config not in history and not evaluator.budget_left(budget):
                    return  # the budget is spent (or the front flat) mid-generation: stop without telling a partial one
                if evaluator.screen(config, trial=algorithm.n_gen):
                    scores.append(history.normalised(evaluator.evaluate(config, trial=algorithm.n_gen)))
                else:
                    scores.append(stopped_score(evaluator, config))
            population.set("X", rows)
            population.set("F", np.array(scores))
            algorithm.tell(infills=population)
            idle = 0 if evaluator.fresh > before else idle + 1
            if idle >= self.max_idle_generations:
                warnings.warn(f"{self.name}: {idle} generations brought no new config; stopping with "
                              f"{len(history)} of {budget} evaluations (try another seed or a larger population)")
                return


def stopped_score(evaluator: Evaluator, config) -> list[float]:
    """The normalised objectives NSGA-II is told for a config stopped at a rung: its exact sizes and
    the worst quality, so every full evaluation of its size or smaller dominates it."""
    scored = [r for r in (evaluator.history.get(config, n) for n in evaluator.rungs.examples) if r is not None]
    values = evaluator.history.normalised(scored[-1])
    return [value if o.is_size else REFERENCE for o, value in zip(evaluator.problem.objectives, values)]
