"""`python -m shears.search --run RUN --budget N`: search a trained run's super-network.

Settings default to the recipe's `search:` section; flags override them. Several processes given
the same --storage share one study and one budget (give each its own --seed).
"""

from __future__ import annotations

import argparse

from ..errors import ShearsError, cli_errors
from ..rundir import RunDir
from .objectives import QUALITY, SIZES, check_objective_names, parse_objectives, size_function, supernet_objective
from .optuna_backend import SAMPLERS, OptunaBackend
from .problem import SearchProblem
from .pymoo_backend import PymooBackend


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m shears.search", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run directory (recipe.yaml + supernet/)")
    p.add_argument("--budget", type=int, help="total distinct subnet evaluations; a larger re-run continues")
    p.add_argument("--backend", choices=("optuna", "pymoo"))
    p.add_argument("--sampler", choices=SAMPLERS, help="optuna sampler (pymoo runs NSGA-II)")
    p.add_argument("--objectives", help=f"comma list: one of {'/'.join(QUALITY)} and one of {'/'.join(SIZES)}")
    p.add_argument("--eval-limit", type=int, help="validation records scored per subnet (default: all)")
    p.add_argument("--storage", help="optuna storage: RDB URL or journal file (.log/.journal or journal:PATH); "
                                     "default sqlite:///RUN/search/study.db")
    p.add_argument("--study-name", default="shears-search")
    p.add_argument("--seed", type=int)
    p.add_argument("--population-size", type=int, default=16, help="NSGA-II population (both backends)")
    p.add_argument("--batch-size", type=int, help="evaluation batch size (default: the recipe's)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def problem_from_run(run, objective_names, eval_limit: int | None, batch_size: int | None) -> SearchProblem:
    """The search problem of a loaded run: its super-network's space, scored on its validation split."""
    supernet, space = run.supernet, run.supernet.space
    names = [n.strip() for n in objective_names.split(",")] if isinstance(objective_names, str) else list(objective_names)
    sizes = {name: size_function(supernet, name) for name in names if name in SIZES}
    objectives = parse_objectives(names, lambda name, config: sizes[name](config), space.minimal(), space.maximal())
    evaluation = run.recipe.evaluation
    fn = supernet_objective(supernet, run.tokenizer, run.validation_records, evaluation.task, objectives, sizes,
                            limit=eval_limit, batch_size=batch_size or evaluation.batch_size,
                            max_new_tokens=evaluation.max_new_tokens, cutoff_len=run.recipe.data.cutoff_len)
    return SearchProblem.from_space(space, objectives, fn)


def format_front(result, objectives) -> str:
    names = [o.name for o in objectives]
    header = ["#", *names, "label", "trial"]
    def cell(objective, value: float) -> str:  # sizes are counts: print them whole, with separators
        return f"{value:,.0f}" if objective.is_size else f"{value:.4f}"

    rows = [[str(i), *(cell(o, r["objectives"][o.name]) for o in objectives), r.get("label") or "",
             str(r.get("trial"))]
            for i, r in enumerate(result.front)]
    widths = [max(len(row[j]) for row in [header, *rows]) for j in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *rows])


@cli_errors
def main(argv: list[str] | None = None) -> None:
    from . import search
    from ..run import load_run, load_run_recipe

    args = parse_args(argv)
    run_dir = RunDir(args.run)
    cfg = load_run_recipe(run_dir).search  # settings are checked before the model loads
    backend_name = args.backend or cfg.backend
    budget = args.budget if args.budget is not None else cfg.budget
    seed = args.seed if args.seed is not None else cfg.seed
    if backend_name == "pymoo":
        if args.sampler not in (None, "nsga2"):
            raise ShearsError(f"--backend pymoo runs NSGA-II only: drop --sampler {args.sampler} or use --backend optuna")
        backend = PymooBackend(seed=seed, population_size=args.population_size)
    else:
        storage = args.storage or cfg.storage or f"sqlite:///{run_dir.search.study_db.resolve()}"
        backend = OptunaBackend(sampler=args.sampler or cfg.sampler, storage=storage, study_name=args.study_name,
                                seed=seed, population_size=args.population_size)
    names = args.objectives or cfg.objectives
    check_objective_names(names)  # before the model loads; sizes come with it
    if budget is None or budget < 1:
        raise ShearsError(f"--budget must be a positive number of evaluations, got {budget}")
    run = load_run(run_dir)
    eval_limit = args.eval_limit if args.eval_limit is not None else cfg.eval_limit
    problem = problem_from_run(run, names, eval_limit, args.batch_size)
    result = search(problem, run_dir.search.folder, budget, backend, progress=not args.no_progress)
    print(f"\nPareto front: {len(result.front)} of {len(result.history)} evaluated subnets "
          f"({result.evaluated} new), hypervolume {result.hypervolume:.4f}")
    print(format_front(result, problem.objectives))
    print("\nwrote:")
    for path in result.paths:
        print(f"  {path}")
    if backend_name == "optuna":
        print(f"  study {backend.study_name!r} in {backend.storage}")
