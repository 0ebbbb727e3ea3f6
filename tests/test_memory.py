"""Memory: no stage upcasts a bf16 base; the plan counts a model without loading it and refuses a recipe
that cannot fit, before writing anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_model, make_tiny_tokenizer, one_line_error
from safetensors import safe_open
from torch import nn

from shears.elastic import ElasticLoraLinear
from shears.recipe import load_recipe
from test_train_supernet import tiny_recipe


def folder_dtypes(folder: Path) -> set[str]:
    """The dtype of every tensor in a folder's safetensors files, read from their headers."""
    dtypes = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            dtypes |= {f.get_slice(key).get_dtype() for key in f.keys()}
    return dtypes


class ParameterDtypes:
    """Every module that runs a forward, with its own parameters' dtypes at that moment (a global forward
    pre-hook, public torch API). LoRA factors are kept apart: PEFT holds adapters in float32 by design."""

    def __init__(self):
        self.calls: list[tuple[nn.Module, set[torch.dtype]]] = []

    def __enter__(self):
        def record(module, args):
            self.calls.append((module, {p.dtype for p in module.parameters(recurse=False)}))

        self.handle = nn.modules.module.register_module_forward_pre_hook(record)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def base_dtypes(self) -> set[torch.dtype]:
        lora = {id(m) for module, _ in self.calls if isinstance(module, ElasticLoraLinear)
                for m in (*module.lora_A.values(), *module.lora_B.values())}
        return set().union(*(dtypes for module, dtypes in self.calls if id(module) not in lora))


def test_no_stage_upcasts_a_bf16_base(tmp_path):
    from shears.export import main as export
    from shears.run import load_run
    from shears.search import main as search
    from shears.sparsity import prune_to_folder
    from shears.train_supernet import train_supernet

    model_dir = tmp_path / "tiny-bf16"
    make_tiny_model("llama", max_position_embeddings=512).to(torch.bfloat16).save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    assert folder_dtypes(model_dir) == {"BF16"}
    overrides = {"dtype": "bfloat16", "sparsity.sparsity": 0.5, "sparsity.nsamples": 2, "sparsity.seqlen": 64,
                 "training.max_steps": 2, "evaluation.max_new_tokens": 4, "evaluation.batch_size": 2}
    recipe = load_recipe(tiny_recipe(model_dir, tmp_path), overrides)
    run = tmp_path / "run"

    # pruning, as train_supernet runs it (the calibration forward), and what it writes
    with ParameterDtypes() as pruning:
        prune_to_folder(recipe.model, tmp_path / "pruned", recipe.sparsity, dtype=recipe.dtype)
    assert pruning.calls and pruning.base_dtypes() == {torch.bfloat16}
    assert folder_dtypes(tmp_path / "pruned") == {"BF16"}

    with ParameterDtypes() as training:  # prunes into RUN/sparse_base, then trains on it
        train_supernet(recipe, run)
    assert training.base_dtypes() == {torch.bfloat16}
    assert folder_dtypes(run / "sparse_base") == {"BF16"}

    with ParameterDtypes() as searching:
        search(["--run", str(run), "--budget", "2", "--no-warm-start", "--eval-limit", "2", "--no-progress"])
    assert searching.calls and searching.base_dtypes() == {torch.bfloat16}

    export(["--run", str(run), "--subnet", "heuristic", "--output", str(tmp_path / "plain")])
    export(["--run", str(run), "--subnet", "heuristic", "--merge", "--output", str(tmp_path / "merged")])
    assert folder_dtypes(tmp_path / "merged" / "heuristic" / "merged") == {"BF16"}
    loaded = load_run(run)  # what the export and the search load the base as
    assert {p.dtype for n, p in loaded.supernet.model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
