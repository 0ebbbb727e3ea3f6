"""`make demo` shows no warning that our own calls cause: the tiny pipeline, stage by stage through
each CLI's main, with every warning recorded. A deprecation (or any warning) attributed to a line of
shears/ is our call to fix; so is a library warning about a setting we pass (pin_memory on a CPU)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

import shears
from shears.evaluate import main as evaluate_main
from shears.export import main as export_main
from shears.prune import main as prune_main
from shears.search.cli import main as search_main
from shears.train_supernet import main as train_main
from test_train_supernet import tiny_recipe

PACKAGE = str(Path(shears.__file__).resolve().parent)
# what a library says about a value we pass it: ours to set right, though the warning names the library's line
ABOUT_OUR_SETTINGS = ("pin_memory",)


def ours(w: warnings.WarningMessage) -> bool:
    return str(Path(w.filename).resolve()).startswith(PACKAGE) or any(k in str(w.message) for k in ABOUT_OUR_SETTINGS)


@pytest.mark.slow
def test_the_tiny_pipeline_raises_no_warning_from_our_calls(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        prune_main(["--model", str(tiny_model_dir), "--sparsity", "0.5", "--method", "magnitude",
                    "--output", str(tmp_path / "pruned")])
        train_main(["--recipe", str(tiny_recipe(tiny_model_dir, tmp_path, max_steps=2)), "--output", str(run),
                    "sparsity.sparsity=0.5", "sparsity.nsamples=2", "sparsity.seqlen=32",
                    "--bf16", "false"])  # fp32: what a CPU without native bf16 runs (Trainer's settings differ)
        search_main(["--run", str(run), "--budget", "3", "--no-progress"])  # the optuna backend, as make demo
        export_main(["--run", str(run), "--front", "--force", "--merge"])
        evaluate_main(["--run", str(run), "--data", "builtin:arithmetic?n=4", "--limit", "2"])
    found = [f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}" for w in seen if ours(w)]
    assert not found, "\n".join(found)
