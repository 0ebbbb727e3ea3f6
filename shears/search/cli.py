"""`python -m shears.search --run RUN --budget N`: search a trained run's super-network.

Settings default to the recipe's `search:` section; flags override them. Several processes given
the same --storage share one study and one budget (give each its own --seed).
"""

from __future__ import annotations

import argparse
import typing

from .. import flags
from ..errors import ShearsError, cli_errors
from ..noise import Difference
from ..precision import default_device
from ..recipe import SearchBackend
from ..rundir import RunDir
from ..scores import run_scoring
from .objectives import QUALITY, SIZES, check_objective_names, parse_objectives, size_function, supernet_objective
from .optuna_backend import SAMPLERS, STUDY_NAME, OptunaBackend
from .problem import SearchProblem
from .fidelity import Rungs
from .pymoo_backend import PymooBackend
from .runner import search
from .surrogate import SurrogateBackend


RECIPE_SECTIONS = ("search", "evaluation")  # what key=value arguments may override of the run's recipe


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shears.search", description=__doc__.splitlines()[0],
                                epilog="key=value arguments override the run's recipe for this search: any "
                                       "search.* or evaluation.* key, e.g. evaluation.batch_size=8.")
    flags.add_run(p, required=True)
    p.add_argument("--budget", type=int, help="total full-set-equivalent evaluations (distinct subnets without "
                                              "--rungs); a larger re-run continues")
    p.add_argument("--backend", choices=typing.get_args(SearchBackend),
                   help="surrogate: a ridge predictor of quality proposes, NSGA-II on it refines")
    p.add_argument("--rungs", help="multi-fidelity: comma list of record counts each candidate is first scored "
                                   "on, e.g. 16,64 (default: the recipe's search.rungs)")
    p.add_argument("--keep", type=float, help="share of each rung scored further (default: search.keep)")
    p.add_argument("--warm-start", action="append", metavar="HISTORY",
                   help="an earlier history.jsonl or search folder whose matching scores seed this search "
                        "(besides training's scores of the anchor subnets, RUN/warm_start.jsonl)")
    p.add_argument("--no-warm-start", action="store_true",
                   help="import no earlier scores, not even training's (default: the recipe's search.warm_start)")
    p.add_argument("--stop-when-flat", type=int, metavar="K",
                   help="end the search once K evaluations in a row moved the front by no more than 2 paired standard "
                        "errors (default: the recipe's search.stop_when_flat, 10; 0: spend the whole budget)")
    p.add_argument("--remeasure-noise", action="store_true",
                   help="score again the front points recorded without per-record values (a history from before "
                        "they were kept), so that they get a noise estimate; costs no budget")
    p.add_argument("--sampler", choices=SAMPLERS, help="optuna sampler (pymoo runs NSGA-II)")
    p.add_argument("--objectives", help=f"comma list: one of {'/'.join(QUALITY)} and one of {'/'.join(SIZES)}")
    p.add_argument("--eval-limit", type=int, help="validation records scored per subnet (default: all)")
    p.add_argument("--storage", help="optuna storage: RDB URL or journal file (.log/.journal or journal:PATH); "
                                     "default sqlite:///RUN/search/study.db")
    p.add_argument("--study-name", default=STUDY_NAME)
    flags.add_seed(p, "the sampler (default: search.seed); give concurrent workers different seeds")
    p.add_argument("--population-size", type=int, default=16, help="NSGA-II population (both backends)")
    flags.add_batch_size(p, "evaluation batch size (default: the recipe's evaluation.batch_size)")
    flags.add_bf16(p, "scoring; default: the run's evaluation.bf16, else training.bf16")
    p.add_argument("--no-progress", action="store_true")
    return p


def problem_from_run(run, objective_names, eval_limit: int | None, batch_size: int | None) -> SearchProblem:
    """The search problem of a loaded run: its super-network's space, scored on its validation split
    (the first `eval_limit` records) the way shears.scores.run_scoring defines -- as training scored
    the warm-start subnets it wrote to RUN/warm_start.jsonl."""
    supernet, space = run.supernet, run.supernet.space
    names = [n.strip() for n in objective_names.split(",")] if isinstance(objective_names, str) else list(objective_names)
    sizes = {name: size_function(supernet, name, run) for name in names if name in SIZES}
    objectives = parse_objectives(names, lambda name, config: sizes[name](config), space.minimal(), space.maximal())
    scoring = run_scoring(run.recipe, supernet, run.validation_records, eval_limit, batch_size)
    fn = supernet_objective(supernet, run.tokenizer, scoring, objectives, sizes)
    return SearchProblem.from_space(space, objectives, fn, examples=len(scoring.records), scorer=scoring.fingerprint,
                                    precision=scoring.precision,
                                    sizes=lambda config: {name: f(config) for name, f in sizes.items()})


def warm_sources(args: argparse.Namespace, setting: bool | list[str], run_dir: RunDir) -> list:
    """The histories this search imports: training's RUN/warm_start.jsonl (when it exists and the recipe's
    search.warm_start is not false) and the --warm-start files, else the recipe's list; none with
    --no-warm-start."""
    if args.no_warm_start:
        if args.warm_start:
            raise ShearsError("--warm-start and --no-warm-start contradict each other: give one of them")
        return []
    training = [run_dir.warm_start] if setting is not False and run_dir.warm_start.is_file() else []
    return training + (args.warm_start or (setting if isinstance(setting, list) else []))


def format_front(result, objectives) -> str:
    """The front as a table: each quality ± its standard error, and how much better each point is than
    the previous (smaller) one, paired over the same records (* beyond 2 paired standard errors)."""
    names = [o.name for o in objectives]
    header = ["#", *names, "vs previous", "label", "trial"]

    def cell(objective, value: float, se: float | None) -> str:  # sizes are counts: print them whole
        if objective.name == "latency":
            return f"{value * 1e3:.2f} ms"
        if objective.is_size:
            return f"{value:,.0f}"
        return f"{value:.4f}" + (f" ± {se:.4f}" if se is not None else "")

    def versus(previous: dict | None) -> str:
        if previous is None:
            return ""
        difference = Difference(previous["diff"], previous["se"], previous["n"])
        return f"{difference.diff:+.4f} ± {difference.se:.4f}{'*' if difference.significant() else ''}"

    noise = result.history.front_noise()
    rows = [[str(i), *(cell(o, r["objectives"][o.name], n["se"].get(o.name)) for o in objectives),
             versus(n["vs_previous"]), r.get("label") or "", str(r.get("trial"))]
            for i, (r, n) in enumerate(zip(result.front, noise))]
    widths = [max(len(row[j]) for row in [header, *rows]) for j in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *rows])


@cli_errors
def main(argv: list[str] | None = None) -> None:
    from ..run import load_run, load_run_recipe

    args, overrides = build_parser().parse_known_args(argv)
    run_dir = RunDir(args.run)
    recipe = load_run_recipe(run_dir, overrides, RECIPE_SECTIONS)  # settings are checked before the model loads
    if args.bf16 is not None:
        recipe.evaluation.bf16 = args.bf16
    cfg = recipe.search
    backend_name = args.backend or cfg.backend
    budget = args.budget if args.budget is not None else cfg.budget
    seed = args.seed if args.seed is not None else cfg.seed
    if backend_name == "surrogate":
        backend = SurrogateBackend(seed=seed)
    elif backend_name == "pymoo":
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
    sources = warm_sources(args, cfg.warm_start, run_dir)
    run = load_run(run_dir, recipe=recipe, device=default_device())  # a GPU when there is one, as evaluate's CLI
    eval_limit = args.eval_limit if args.eval_limit is not None else cfg.eval_limit
    problem = problem_from_run(run, names, eval_limit, args.batch_size)
    rungs = Rungs.from_recipe([int(n) for n in args.rungs.split(",") if n.strip()] if args.rungs else cfg.rungs,
                              args.keep if args.keep is not None else cfg.keep, problem.examples)
    stop_when_flat = args.stop_when_flat if args.stop_when_flat is not None else cfg.stop_when_flat
    stop_when_flat = None if stop_when_flat == 0 else stop_when_flat  # 0 on the command line: the rule is off
    result = search(problem, run_dir.search.folder, budget, backend, progress=not args.no_progress, rungs=rungs,
                    warm_start=sources, stop_when_flat=stop_when_flat, remeasure_noise=args.remeasure_noise)
    for source, count in result.imported.items():  # records scored another way are left out, silently
        print(f"warm start: {count} scores imported from {source}")
    for note in result.notes:
        print(note)
    print(f"\nPareto front: {len(result.front)} of {len(result.history)} evaluated subnets "
          f"({result.evaluated} new), hypervolume {result.hypervolume:.4f}")
    print(format_front(result, problem.objectives))
    print(f"(± one standard error over the {problem.examples or 'evaluation'} records; vs previous: how much better "
          f"than the previous, smaller point, paired over the same records; * beyond 2 paired standard errors)")
    if result.stopped is not None:
        print(f"\n{result.stopped.message()}")
    print("\nwrote:")
    for path in result.paths:
        print(f"  {path}")
    if backend_name == "optuna":
        print(f"  study {backend.study_name!r} in {backend.storage}")
    if backend_name == "surrogate":
        tau = backend.kendall_tau()
        print(f"\npredictor: Kendall tau {'n/a' if tau is None else f'{tau:.3f}'} between its predictions and the "
              f"{len(backend.predictions)} evaluations it proposed (held out when predicted)")
