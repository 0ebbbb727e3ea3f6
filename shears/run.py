"""Read a run directory: what the stages after training (evaluate, search, export) start from.

RUN is the only thing stages share; its layout is `shears.rundir.RunDir`. `load_run(RUN)` rebuilds the trained super-network on its base
(RUN/quantized_base when the run quantized, else RUN/sparse_base when it pruned, else the recipe's model;
a quantized base is loaded dequantized) and the validation split the recipe
carved out of the training data — the same records every later stage scores on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import load_records, split_validation, to_answer_format
from .elastic import SuperNet
from .errors import ShearsError
from .models import load_model, load_tokenizer
from .qformat import QuantizedTensor, load_quantized_state
from .recipe import Recipe, load_recipe
from .rundir import RunDir
from .search_space import ANCHORS


@dataclass
class Run:
    dir: RunDir
    recipe: Recipe
    supernet: SuperNet
    tokenizer: Any
    base_source: str  # the folder or name the base model was loaded from
    _val: list[dict] | None = field(default=None, repr=False)

    @property
    def validation_records(self) -> list[dict]:
        """The recipe's deterministic validation split of its training data (never a test file)."""
        if self._val is None:
            self._val = recipe_splits(self.recipe)[1]
        return self._val

    @property
    def path(self) -> Path:
        return self.dir.root


def recipe_splits(recipe: Recipe) -> tuple[list[dict], list[dict]]:
    """(train, validation): the recipe's training data and the deterministic split carved from it --
    the one definition training and every later stage share."""
    d = recipe.data
    records = load_records(d.sources(), fields=d.fields or None, limit=d.train_limit, seed=d.val_seed)
    return split_validation(to_answer_format(records, d.answer_format), d.val_size, d.val_seed)


def grid_blocks(recipe: Recipe, source: str) -> dict[str, QuantizedTensor] | None:
    """The quantized base's blocks, which QA-SparsePEFT merges onto (None unless training.qa_sparse_adapter)."""
    return load_quantized_state(source).quantized if recipe.training.qa_sparse_adapter else None


def base_source(run_dir: RunDir, recipe: Recipe) -> str:
    """Where the run's base model loads from: RUN/quantized_base when the recipe quantizes, else RUN/sparse_base
    when the run pruned, else the recipe's model."""
    if recipe.quantization.scheme != "none" and run_dir.has_quantized_base():
        return str(run_dir.quantized_base)
    return str(run_dir.sparse_base) if run_dir.has_base() else recipe.model


def load_run_recipe(run_dir: str | Path | RunDir, overrides: dict[str, Any] | list[str] | None = None,
                    sections: tuple[str, ...] = ()) -> Recipe:
    """RUN/recipe.yaml, with a later stage's `overrides` of its own `sections` (command-line key=value),
    or a one-line error when RUN is not a run directory."""
    run_dir = RunDir(run_dir)
    if not run_dir.recipe.is_file():
        raise ShearsError(f"{run_dir} is not a shears run (no {run_dir.recipe.name}): train one with "
                          "`python -m shears.train_supernet --output RUN`, or pass that --output")
    return load_recipe(run_dir.recipe, overrides, sections)


def load_run(run_dir: str | Path | RunDir, dtype: str | None = None, device: str | None = None,
             recipe: Recipe | None = None) -> Run:
    """The trained super-network of RUN, on its base model, ready for `activate(config)`. `recipe`: RUN's
    recipe as a stage overrode it (load_run_recipe), default RUN/recipe.yaml as it is."""
    run_dir = RunDir(run_dir)
    recipe = recipe or load_run_recipe(run_dir)
    if not run_dir.has_supernet():
        raise ShearsError(f"{run_dir} has no trained super-network yet (no {run_dir.supernet.name}/): finish "
                          f"`python -m shears.train_supernet --output {run_dir} --resume` first")
    source = base_source(run_dir, recipe)
    base = load_model(source, dtype=dtype or recipe.dtype, device=device)
    supernet = SuperNet.load(run_dir.supernet, base, grid_blocks(recipe, source))
    supernet.model.eval()
    return Run(run_dir, recipe, supernet, load_tokenizer(source), source)


def subnet_config(supernet, subnet: str) -> dict:
    """The config a --subnet value names: maximal | heuristic | minimal | inline JSON | a .json file."""
    if subnet in ANCHORS:
        return getattr(supernet, subnet)()
    path = Path(subnet)
    try:
        config = json.loads(path.read_text() if path.suffix == ".json" and path.is_file() else subnet)
    except json.JSONDecodeError:
        raise ShearsError(f"--subnet {subnet!r} is not maximal, heuristic, minimal, a JSON config or a .json "
                          "file holding one") from None
    if not isinstance(config, dict):
        raise ShearsError("--subnet JSON must be an object mapping config keys to ranks")
    return config
