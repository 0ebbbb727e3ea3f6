"""Real faults: SIGKILLed training and export subprocesses, torn and corrupted files, wrong inputs.

Each kill is a real SIGKILL of a subprocess that tests/killable.py parks at a chosen point (mid-step,
mid-checkpoint-save, mid-export), so nothing in it gets to clean up. The references are runs that
were never interrupted. docs/RELIABILITY.md tabulates what each test tries and what happens.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import make_tiny_model, make_tiny_tokenizer
from killable import ENV, kill_at
from shears.recipe import load_recipe
from shears.train_supernet import train_supernet
from test_train_supernet import tiny_recipe

REPO = Path(__file__).resolve().parents[1]


def cli(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def one_line_failure(result: subprocess.CompletedProcess, *parts: str) -> str:
    """A CLI that failed the way users should see: exit 2, one `error:` line naming the fix, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for part in parts:
        assert part in errors[0], (part, errors[0])
    return errors[0]


def one_line_exit(main, args: list[str], capsys, *parts: str) -> str:
    """The same as one_line_failure, for a CLI main called in this process."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1, errors
    for part in parts:
        assert part in errors[0], (part, errors[0])
    return errors[0]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "supernet" / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path) -> None:
    x, y = adapter(a), adapter(b)
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), (key, float((x[key] - y[key]).abs().max()))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    make_tiny_model("llama", max_position_embeddings=512).save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- kill -9 of training

# (recipe training keys, kill point). save_steps 2: checkpoints after steps 2, 4 (and each stage's end).
KILLS = {
    "mid-step": ({}, "step:3"),  # the last checkpoint is step 2's
    "mid-checkpoint-save": ({}, "save:2"),  # checkpoint-4 torn: optimizer.pt half written, no trainer_state.json
    "stages-mid-step": ({"rank_schedule": [16, 8]}, "step:2"),  # in stage 0, after its checkpoint-2
    "stages-mid-save": ({"rank_schedule": [16, 8]}, "save:3"),  # stage 1's first checkpoint torn
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(KILLS))
def test_training_killed_then_resumed_equals_an_uninterrupted_run(case, model_dir, tmp_path):
    training, point = KILLS[case]
    recipe = tiny_recipe(model_dir, tmp_path, max_steps=6, save_steps=2, **training)
    full = tmp_path / "full"
    train_supernet(load_recipe(recipe), full)  # the reference, never interrupted

    cut = tmp_path / "cut"
    kill_at(point, "shears.train_supernet", "--recipe", str(recipe), "--output", str(cut), tmp_path=tmp_path)
    assert not (cut / "supernet").exists()  # killed before it finished
    result = cli("shears.train_supernet", "--recipe", str(recipe), "--output", str(cut), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_adapter(full, cut)
    summary = {run: json.loads((run / "train_summary.json").read_text()) for run in (full, cut)}
    assert summary[cut]["validation"] == summary[full]["validation"]


def test_resume_of_a_run_that_never_started_names_the_fix(model_dir, tmp_path):
    result = cli("shears.train_supernet", "--recipe", str(tiny_recipe(model_dir, tmp_path)), "--output",
                 str(tmp_path / "nothing"), "--resume")
    one_line_failure(result, "drop --resume")


# --------------------------------------------------------------------------- a trained run to break

@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory) -> Path:
    """A finished tiny run with a search (history + front) and an export: the earlier results to keep."""
    from shears.search.cli import main as search_main

    root = tmp_path_factory.mktemp("trained")
    run = root / "run"
    train_supernet(load_recipe(tiny_recipe(model_dir, root, max_steps=2, save_steps=1)), run)
    search_main(["--run", str(run), "--budget", "4", "--backend", "pymoo", "--no-progress"])
    return run


def copy_of(run: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path: an earlier result, to check nothing touched it."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- kill -9 of export

def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


@pytest.mark.slow
def test_export_killed_midway_shows_no_partial_folder_and_a_rerun_completes(trained, tmp_path):
    run, out = copy_of(trained, tmp_path), tmp_path / "export"
    args = ["--run", str(run), "--subnet", "maximal", "--subnet", "minimal", "--subnet", "heuristic",
            "--output", str(out)]
    kill_at("export:2", "shears.export", *args, tmp_path=tmp_path)  # inside minimal/, before its shears.json
    assert visible(out) == ["maximal"]  # the finished one, whole; minimal/ never appeared
    assert any(p.name.startswith(".minimal.tmp-") for p in out.iterdir())  # killed mid-folder indeed
    assert {"adapter_model.safetensors", "adapter_config.json", "shears.json"} <= set(visible(out / "maximal"))

    one_line_failure(cli("shears.export", *args), "maximal", "--force")  # the same command: refused, kept
    result = cli("shears.export", *args, "--force")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["heuristic", "maximal", "minimal"]  # no leftovers
    reference = tmp_path / "reference"
    assert cli("shears.export", *args[:-1], str(reference)).returncode == 0
    for name in ("maximal", "minimal", "heuristic"):
        a = load_file(out / name / "adapter_model.safetensors")
        b = load_file(reference / name / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# --------------------------------------------------------------------------- kill -9 of a search


def test_a_search_killed_mid_evaluation_resumes_with_its_per_record_values_and_measures_nothing_again(trained,
                                                                                                     tmp_path):
    from shears.search.cli import main as search_main

    run = copy_of(trained, tmp_path)
    (run / "search").rename(run / "earlier-search")
    args = ["--run", str(run), "--objectives", "loss,adapter_params", "--backend", "pymoo", "--no-warm-start",
            "--no-progress"]
    kill_at("eval:4", "shears.search", *args, "--budget", "6", tmp_path=tmp_path)  # the 4th, in flight
    history = run / "search" / "history.jsonl"
    before = history.read_text()
    written = [json.loads(line) for line in before.splitlines()]
    assert len(written) == 3 and all(len(r["per_record"]["loss"]["values"]) == 8 for r in written)
    search_main([*args, "--budget", "6"])
    after = history.read_text()
    records = [json.loads(line) for line in after.splitlines()]
    assert after.startswith(before)  # the three kept as written, per-record values and standard errors included
    assert len(records) == 6 and len({json.dumps(r["config"], sort_keys=True) for r in records}) == 6
    assert all("per_record" in r and r["se"]["loss"] > 0 for r in records)
    front = json.loads((run / "search" / "front.json").read_text())["front"]
    assert all(row["se"]["loss"] is not None for row in front)


# --------------------------------------------------------------------------- damaged files

def test_a_torn_last_history_line_is_skipped_and_the_search_continues(trained, tmp_path):
    from shears.export import main as export_main
    from shears.search.cli import main as search_main

    run = copy_of(trained, tmp_path)
    history = run / "search" / "history.jsonl"
    whole = history.read_text().splitlines()
    assert len(whole) == 4
    torn = json.dumps(json.loads(whole[-1]) | {"n": 99})[:40]  # a kill mid-append: half a line, no newline
    history.write_text("\n".join(whole) + "\n" + torn)
    search_main(["--run", str(run), "--budget", "6", "--backend", "pymoo", "--no-progress"])
    lines = history.read_text().splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            assert line == torn  # the torn fragment stays on its own line; nothing else is damaged
    assert len(records) == 6 and lines[:4] == whole
    assert len({json.dumps(r["config"], sort_keys=True) for r in records}) == 6
    export_main(["--run", str(run), "--front", "--output", str(tmp_path / "export")])
    assert (tmp_path / "export" / "manifest.json").is_file()


def damage(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # what a kill mid-copy or a full disk leaves


@pytest.mark.slow
def test_a_damaged_supernet_file_is_one_line_everywhere_and_resume_rewrites_it(trained, tmp_path, capsys):
    run = copy_of(trained, tmp_path)
    weights = run / "supernet" / "adapter_model.safetensors"
    good = weights.read_bytes()
    damage(weights)
    earlier = snapshot(run / "search")
    from shears.evaluate import main as evaluate_main
    from shears.export import main as export_main
    from shears.search.cli import main as search_main

    for main, args in ((export_main, ["--run", str(run), "--subnet", "minimal"]),
                       (search_main, ["--run", str(run), "--budget", "6", "--no-progress"]),
                       (evaluate_main, ["--run", str(run), "--data", "builtin:arithmetic?n=4", "--task", "loss"])):
        one_line_exit(main, args, capsys, str(weights), "damaged")
    assert snapshot(run / "search") == earlier and not (run / "export").exists()
    # the checkpoints hold the finished training: --resume writes the super-network again, bit for bit
    result = cli("shears.train_supernet", "--recipe", str(run / "recipe.yaml"), "--output", str(run), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert weights.read_bytes() == good


def test_a_damaged_exported_adapter_is_one_line(trained, tmp_path, capsys):
    from shears.evaluate import main as evaluate_main
    from shears.export import export_subnets
    from shears.squeeze import main as squeeze_main

    folder = export_subnets(trained, {"minimal": {"qv.0": 2, "qv.1": 2, "up": 2}},
                            tmp_path / "export")[0].folder
    damage(folder / "adapter_model.safetensors")
    recipe = load_recipe(trained / "recipe.yaml")
    for main, args in ((evaluate_main, ["--model", recipe.model, "--adapter", str(folder), "--data",
                                        "builtin:arithmetic?n=4", "--task", "loss"]),
                       (squeeze_main, ["--adapter", str(folder), "--rank", "1", "--output", str(tmp_path / "sq")])):
        one_line_exit(main, args, capsys, "damaged")
    assert not (tmp_path / "sq").exists()


# --------------------------------------------------------------------------- another base, a wrong recipe

def other_base(folder: Path) -> Path:
    """A model of the same family with other shapes, where the run's base used to be."""
    make_tiny_model("llama", max_position_embeddings=512, intermediate_size=48).save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


def test_export_and_evaluate_on_another_base_are_refused_in_one_line(trained, tmp_path, capsys):
    from shears.evaluate import main as evaluate_main
    from shears.export import export_subnets
    from shears.export import main as export_main

    run = copy_of(trained, tmp_path)
    folder = export_subnets(run, {"minimal": {"qv.0": 2, "qv.1": 2, "up": 2}}, tmp_path / "export")[0].folder
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    base = other_base(tmp_path / "other-base")
    # the run's base replaced by another model
    recipe["model"] = str(base)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    one_line_exit(export_main, ["--run", str(run), "--subnet", "maximal", "--output", str(tmp_path / "again")],
                  capsys, "fingerprint")
    assert not (tmp_path / "again").exists()
    # an exported adapter evaluated on another base
    one_line_exit(evaluate_main, ["--model", str(base), "--adapter", str(folder), "--data", "builtin:arithmetic?n=4",
                                  "--task", "loss"], capsys, "fingerprint", "--model")


def test_a_recipe_with_a_wrong_type_is_one_line_and_keeps_the_run(trained, tmp_path, capsys):
    run = copy_of(trained, tmp_path)
    before = snapshot(run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["training"]["max_steps"] = "ten"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(recipe))
    from shears.train_supernet import main

    for extra in ([], ["--resume"], ["--force"]):
        one_line_exit(main, ["--recipe", str(bad), "--output", str(run), *extra], capsys, "training.max_steps",
                      "integer")
    one_line_exit(main, ["--recipe", str(run / "recipe.yaml"), "--output", str(run), "training.learning_rate=fast"],
                  capsys, "learning_rate")
    assert snapshot(run) == before


def test_atomic_outputs_get_the_permissions_plain_writes_get(tmp_path):
    """mkstemp/mkdtemp make 0600/0700 temporaries; what they become must be as readable as a file or folder
    written without shears.atomic (a run folder shared with a group was unreadable)."""
    import os

    from shears.atomic import atomic_folder, write_text

    plain_file, plain_dir = tmp_path / "plain.txt", tmp_path / "plain"
    plain_file.write_text("x")
    plain_dir.mkdir()
    written = write_text(tmp_path / "out.json", "{}")
    with atomic_folder(tmp_path / "folder") as tmp:
        (tmp / "inside.txt").write_text("x")
    mode = lambda p: os.stat(p).st_mode & 0o777  # noqa: E731
    assert mode(written) == mode(plain_file)
    assert mode(tmp_path / "folder") == mode(plain_dir)
    assert mode(tmp_path / "folder" / "inside.txt") == mode(plain_file)
