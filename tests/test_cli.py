"""One CLI convention: every stage's flags for a shared concept have one name, type and meaning.

The reference is shears.flags itself: a parser holding every shared flag, against which each
stage's parser is compared action by action (docs/CLI.md is the table of who has which)."""

from __future__ import annotations

import argparse

import pytest

from shears import evaluate, export, flags, prune, quantize, squeeze, train_supernet, width
from shears.recipe import Recipe, save_recipe
from shears.search import cli as search_cli
from test_faults import one_line_exit


def width_bounds_parser() -> argparse.ArgumentParser:
    subparsers = next(a for a in width.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices["bounds"]


PARSERS = {
    "prune": prune.build_parser,
    "quantize": quantize.build_parser,
    "train_supernet": train_supernet.build_parser,
    "evaluate": evaluate.build_parser,
    "search": search_cli.build_parser,
    "export": export.build_parser,
    "squeeze": squeeze.build_parser,
    "width bounds": width_bounds_parser,
}
# other spellings of a shared concept: allowed only as an alias of the shared flag (an old name kept)
SYNONYMS = {"--overwrite": "--force", "--calibration": "--data", "--out": "--output", "--output-dir": "--output",
            "--base-model": "--model", "--precision": "--bf16", "--config": "--recipe", "--run-dir": "--run",
            "--bs": "--batch-size", "--random-seed": "--seed", "--torch-dtype": "--dtype"}


def reference_actions() -> dict[str, argparse.Action]:
    p = argparse.ArgumentParser()
    flags.add_model(p, "d"), flags.add_recipe(p), flags.add_run(p), flags.add_data(p, "w"), flags.add_output(p, "w")
    flags.add_force(p, "w"), flags.add_dtype(p, "d"), flags.add_bf16(p, "d"), flags.add_seed(p, "w")
    flags.add_batch_size(p, "w")
    return {a.option_strings[0]: a for a in p._actions if a.option_strings and a.dest != "help"}


SHARED = reference_actions()


def signature(action: argparse.Action) -> tuple:
    """What a flag means to argparse: its destination, kind of action, type, choices, arity."""
    return action.dest, type(action).__name__, action.type, action.choices, action.nargs, action.const


def test_the_table_in_docs_names_every_shared_flag_and_stage():
    from pathlib import Path

    table = (Path(__file__).resolve().parents[1] / "docs" / "CLI.md").read_text()
    for flag in SHARED:
        assert f"`{flag}`" in table, flag
    header = next(line for line in table.splitlines() if line.startswith("| flag |"))
    for stage in PARSERS:
        assert f"| {stage} |" in header, stage


@pytest.mark.parametrize("stage", sorted(PARSERS))
def test_every_shared_flag_has_one_name_type_and_meaning(stage):
    found = 0
    for action in PARSERS[stage]()._actions:
        names = action.option_strings
        shared = [n for n in names if n in SHARED]
        for name in names:  # a synonym of a shared flag may only stand beside it, as an alias
            assert name not in SYNONYMS or SYNONYMS[name] in names, f"{stage}: {name} should be {SYNONYMS[name]}"
        if not shared:
            continue
        found += 1
        flag = shared[0]
        assert names[0] == flag, f"{stage}: {names} leads with an alias, not {flag}"
        assert signature(action) == signature(SHARED[flag]), (stage, flag)
        # the meaning: the shared words, with only the stage's own default or purpose added
        assert flags.MEANINGS.get(flag, "") in action.help, (stage, flag, action.help)
    assert found >= 3, f"{stage} uses too few of the shared flags: {found}"


def test_bf16_takes_auto_true_false_everywhere_and_names_them_otherwise():
    parser = prune.build_parser()
    assert [parser.parse_args(["--bf16", v]).bf16 for v in ("auto", "true", "false", "TRUE")] == ["auto", True,
                                                                                                  False, True]
    with pytest.raises(SystemExit):
        parser.parse_args(["--bf16", "yes"])


def test_train_supernets_shared_flags_set_the_recipe_keys_they_name(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(train_supernet, "train_supernet", lambda recipe, out, **kw: seen.update(recipe=recipe, out=out))
    train_supernet.main(["--model", "some/model", "--seed", "7", "--bf16", "false", "--dtype", "bfloat16",
                         "--output", str(tmp_path / "run"), "training.max_steps=3"])
    r = seen["recipe"]
    assert (r.model, r.training.seed, r.training.bf16, r.dtype, r.training.max_steps) == ("some/model", 7, False,
                                                                                          "bfloat16", 3)
    assert seen["out"] == str(tmp_path / "run")


@pytest.fixture
def run_with_recipe(tmp_path):
    run = tmp_path / "run"
    save_recipe(Recipe(), run / "recipe.yaml")
    return run


@pytest.mark.parametrize("main,extra,allowed", [(search_cli.main, [], "search.*, evaluation.*"),
                                               (export.main, ["--front"], "export.*"),
                                               (evaluate.main, ["--data", "builtin:arithmetic?n=2"], "evaluation.*")])
def test_later_stages_override_only_their_own_sections_of_the_runs_recipe(main, extra, allowed, run_with_recipe,
                                                                         capsys):
    one_line_exit(main, ["--run", str(run_with_recipe), *extra, "training.max_steps=3"], capsys,
                  "cannot override training.max_steps", allowed)


def test_evaluate_takes_overrides_only_with_a_run(capsys):
    one_line_exit(evaluate.main, ["--model", "m", "--data", "builtin:arithmetic?n=2", "evaluation.task=loss"],
                  capsys, "go with --run")


def test_an_override_reaches_the_search_settings_before_the_model_loads(run_with_recipe, capsys):
    one_line_exit(search_cli.main, ["--run", str(run_with_recipe), "search.backend=bogus"], capsys,
                  "search.backend='bogus'", "optuna")


def test_width_bounds_errors_are_one_line(tmp_path, capsys):
    one_line_exit(width.main, ["bounds", "--space", "no-such-space", "--output", str(tmp_path / "s.yaml")], capsys,
                  "no-such-space")


@pytest.mark.parametrize("module", [prune, train_supernet, evaluate, search_cli, export, squeeze])
def test_every_stage_main_prints_one_line_errors(module):
    assert hasattr(module.main, "__wrapped__"), f"{module.__name__}.main is not wrapped with @cli_errors"
