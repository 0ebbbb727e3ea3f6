"""The import floors follow the pipeline: a module imports only modules on its own floor or below.

Every module of shears/ must be placed here; a new module fails this test until it is given a floor
(docs/DESIGN.md lists the stages in the same order)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "shears"

FLOORS = [
    {"errors", "atomic", "rundir", "flags", "qformat", "progress", "__init__"},  # imported by everything, import nothing of shears but errors
    {"models", "precision"},
    {"data", "recipe", "search_space", "width", "sparsegpt", "memory"},  # sparsegpt: the OBS math sparsity calls;
    # memory: the plan, from a recipe and a config
    {"sparsity", "prune", "quantize"},  # prune.py is sparsity's CLI; quantize runs after it, on its output
    {"squeeze"},
    {"elastic"},
    {"run"},  # reads RUN: the trained super-network on its base, the recipe's splits
    {"evaluate", "scores", "noise", "distill"},  # the whole package shears/evaluate/; training scores its anchors as the search will
    {"train_supernet"},
    {"search", "lm_eval_tasks"},  # the whole package shears/search/; lm-eval's hooks call data and evaluate
    {"export", "model_card", "gguf_export", "llama_cpp_rows"},  # reads the search's files through search.history;
    # model_card: its READMEs; the GGUF export beside it (llama_cpp_rows runs inside llama.cpp's converter and
    # imports nothing of shears)
]


def floor_of(module: str) -> int:
    top = module.split(".")[0]
    for level, names in enumerate(FLOORS):
        if top in names:
            return level
    raise AssertionError(f"shears.{module} has no import floor: add it to FLOORS in tests/test_imports.py")


def shears_imports(path: Path) -> set[str]:
    """Every shears module `path` imports, at module level or inside a function."""
    module = path.relative_to(PACKAGE).with_suffix("")
    package = list(module.parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                if not target:  # `from . import x`: x is a module of this package
                    found.update(alias.name for alias in node.names)
                elif node.module is None:
                    found.update(f"{target}.{alias.name}" for alias in node.names)
                else:
                    found.add(target)
            elif node.module and node.module.startswith("shears."):
                found.add(node.module.removeprefix("shears."))
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("shears.") for a in node.names if a.name.startswith("shears."))
    return {name for name in found if name}


def test_no_module_imports_a_later_stage():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for imported in shears_imports(path):
            if floor_of(imported) > floor_of(module):
                violations.append(f"shears.{module} imports shears.{imported}")
    assert not violations, violations


# Inside shears/evaluate/, the same rule by module (docs/DESIGN.md): text-only answers, then the scoring
# machinery, then the tasks, then the entry point, then the CLI; the package's __init__ re-exports them all.
EVALUATE_FLOORS = [{"answers"}, {"scoring"}, {"generation", "choice", "loss"}, {"runner"}, {"cli"},
                   {"__init__", "__main__"}]


def test_evaluate_modules_import_only_earlier_ones():
    def level(name: str) -> int:
        return next(i for i, names in enumerate(EVALUATE_FLOORS) if name in names)

    violations = []
    for path in sorted((PACKAGE / "evaluate").glob("*.py")):
        for imported in shears_imports(path):
            parts = imported.split(".")
            if parts[0] == "evaluate" and len(parts) > 1 and level(parts[1]) >= level(path.stem) \
                    and path.stem not in ("__init__", "__main__"):
                violations.append(f"shears.evaluate.{path.stem} imports shears.{imported}")
    assert not violations, violations
