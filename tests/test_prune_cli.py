"""`python -m shears.prune`: round trips through from_pretrained, --check, refusals, errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_sparsity import block_linears, make_tiny_tokenizer, reference_keep, save_tiny_model
from transformers import AutoModelForCausalLM

from shears import data
from shears.prune import main
from shears.precision import resolve_bf16
from shears.sparsity import wanda_prune

REPO = Path(__file__).resolve().parents[1]


def run_cli(*argv: str) -> None:
    main([str(a) for a in argv])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def test_magnitude_round_trip(tmp_path, capsys):
    base = save_tiny_model(tmp_path / "base", "qwen2")
    run_cli("--model", base, "--sparsity", "0.3", "--method", "magnitude", "--output", tmp_path / "out")
    assert "wrote" in capsys.readouterr().out
    original = AutoModelForCausalLM.from_pretrained(base)
    pruned = weights(tmp_path / "out")
    expected = {name: reference_keep(m.weight.detach().abs(), 0.3)
                for i in range(2) for name, m in block_linears(original, i).items()}
    for key, value in original.state_dict().items():
        name = key.removesuffix(".weight")
        want = value * expected[name] if name in expected else value
        assert torch.equal(pruned[key], want), key
    record = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    assert record["method"] == "magnitude" and record["calibration"] is None
    assert record["modules"]["model.layers.0.mlp.up_proj"] == math.floor(32 * 0.3) / 32


def test_wanda_round_trip_with_a_json_data_file(tmp_path):
    base = save_tiny_model(tmp_path / "base", "llama")
    records = data.load_records("builtin:arithmetic?n=30&seed=3")
    source = tmp_path / "calib.json"
    source.write_text(json.dumps(records))
    run_cli("--model", base, "--sparsity", "0.5", "--pattern", "2:4", "--calibration", source,
            "--nsamples", 3, "--seqlen", 40, "--seed", 5, "--exclude", "*.o_proj", "--output", tmp_path / "out")

    model = AutoModelForCausalLM.from_pretrained(base)
    ids = data.calibration_input_ids(make_tiny_tokenizer(), data.load_records(source), 3, 40, 5)
    bf16 = resolve_bf16("auto")  # the CLI's default precision
    masks = wanda_prune(model, ids, sparsity=0.5, pattern="2:4", exclude=["*.o_proj"], bf16=bf16)
    assert "model.layers.0.self_attn.o_proj" not in masks
    pruned = weights(tmp_path / "out")
    for key, value in model.state_dict().items():
        assert torch.equal(pruned[key], value), key
    record = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    assert record["pattern"] == "2:4" and record["exclude"] == ["*.o_proj"]
    assert record["precision"] == ("bf16-autocast" if bf16 else "fp32")
    assert record["calibration"]["source"] == str(source) and record["calibration"]["seqlen"] == 40


def test_existing_output_is_refused_unless_force(tmp_path, capsys):
    base = save_tiny_model(tmp_path / "base")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--model", base, "--sparsity", "0.5", "--method", "magnitude", "--output", out)
    assert exit_info.value.code == 2 and "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    run_cli("--model", base, "--sparsity", "0.5", "--method", "magnitude", "--output", out, "--force")
    assert not (out / "keep.txt").exists() and (out / "sparsity.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out"]  # no temp folders left


def test_check_prints_per_layer_and_total(tmp_path, capsys):
    base = save_tiny_model(tmp_path / "base")
    run_cli("--model", base, "--sparsity", "0.25", "--method", "magnitude", "--output", tmp_path / "out")
    capsys.readouterr()
    run_cli("--check", tmp_path / "out")
    printed = capsys.readouterr().out
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    layer_lines = [line for line in printed.splitlines() if line.startswith("layer ")]
    assert len(layer_lines) == 2
    for i, line in enumerate(layer_lines):
        block = [t for k, t in tensors.items() if k.startswith(f"model.layers.{i}.") and "proj" in k]
        fraction = sum(int((t == 0).sum()) for t in block) / sum(t.numel() for t in block)
        assert line == f"layer {i}: {fraction:.2%}"
    assert "total: 25.00%" in printed


@pytest.mark.slow
def test_module_entry_point_runs(tmp_path):
    base = save_tiny_model(tmp_path / "base")
    result = subprocess.run([sys.executable, "-m", "shears.prune", "--check", str(base)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "total: 0.00%" in result.stdout


@pytest.mark.parametrize("argv,message", [
    (["--sparsity", "1.0"], "sparsity must be in"),
    (["--sparsity", "0.5", "--pattern", "2:5"], "pass --sparsity 0.4"),
    (["--pattern", "1:3", "--method", "magnitude"], "divisible by 3"),
    (["--pattern", "2-4"], "--sparsity is required"),
    (["--sparsity", "0.5", "--calibration", "missing.json"], "data file not found"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, message):
    base = save_tiny_model(tmp_path / "base")
    capsys.readouterr()  # drop the save's progress bar
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--model", base, "--output", tmp_path / "out", *argv)
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bars
    assert exit_info.value.code == 2 and last_line.startswith("error: ") and message in last_line
    assert not (tmp_path / "out").exists()


def test_n_m_pattern_implies_its_sparsity(tmp_path):
    base = save_tiny_model(tmp_path / "base")
    run_cli("--model", base, "--pattern", "3:8", "--method", "magnitude", "--output", tmp_path / "out")
    record = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    assert record["sparsity"] == 3 / 8 and record["total"] == 3 / 8


def test_the_recipes_sparsity_section_sets_the_defaults_and_flags_and_overrides_win(tmp_path):
    base = save_tiny_model(tmp_path / "base")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {base}\nsparsity:\n  sparsity: 0.25\n  method: magnitude\n  exclude: ['*.o_proj']\n")

    def pruned(name: str, *argv) -> dict:
        run_cli("--recipe", recipe, "--output", tmp_path / name, *argv)
        return json.loads((tmp_path / name / "sparsity.json").read_text())

    by_recipe = pruned("by-recipe")  # --model too comes from the recipe
    assert (by_recipe["sparsity"], by_recipe["method"], by_recipe["exclude"]) == (0.25, "magnitude", ["*.o_proj"])
    assert by_recipe["base_model"] == str(base) and by_recipe["modules"]["model.layers.0.self_attn.o_proj"] == 0
    assert pruned("by-flag", "--sparsity", "0.5")["sparsity"] == 0.5
    assert pruned("by-override", "sparsity.sparsity=0.375", "--exclude")["exclude"] == []
    assert json.loads((tmp_path / "by-override" / "sparsity.json").read_text())["sparsity"] == 0.375
