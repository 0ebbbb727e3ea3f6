"""shears.recipe: shipped recipes, unknown keys, typed overrides, {data_dir}, save/load round trip,
and the Shears paper's LLaMA-7B math setting."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_model, one_line_error

from shears.recipe import (
    DEFAULT_RECIPE,
    RECIPES_DIR,
    Recipe,
    TrainingConfig,
    load_recipe,
    parse_overrides,
    save_recipe,
)
from shears.search_space import load_search_space

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(RECIPES_DIR.glob("*.yaml"))


def write_recipe(tmp_path, values, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


# ----------------------------------------------------------------------------- shipped recipes


def test_recipes_are_shipped():
    assert {p.stem for p in SHIPPED} >= {"default", "llama-7b-math-shears", "smollm2-math", "smollm2-commonsense"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    written = yaml.safe_load(path.read_text())
    for section, values in written.items():  # what the file says is what the recipe holds
        if isinstance(values, dict) and section != "search_space":
            for key, value in values.items():
                assert getattr(getattr(recipe, section), key) == value, f"{section}.{key}"
        else:
            assert getattr(recipe, section) == values, section
    load_search_space(recipe.search_space)  # names a shipped space
    assert load_recipe(path.stem) == recipe  # a bare name finds the shipped file


def test_default_recipe():
    assert load_recipe() == load_recipe(DEFAULT_RECIPE)
    assert load_recipe().data.sources() == ["builtin:arithmetic?n=2000&seed=0"]


def test_missing_and_malformed_recipe_files(tmp_path):
    one_line_error(lambda: load_recipe(tmp_path / "nope.yaml"), "nope.yaml", "default", "smollm2-math")
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    one_line_error(lambda: load_recipe(tmp_path / "broken.yaml"), "broken.yaml", "not valid YAML")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    one_line_error(lambda: load_recipe(tmp_path / "list.yaml"), "list.yaml", "mapping")


# ----------------------------------------------------------------------------- unknown keys


def test_unknown_section_key_names_it_and_lists_valid_keys(tmp_path):
    path = write_recipe(tmp_path, {"training": {"max_stepz": 10}})
    message = one_line_error(lambda: load_recipe(path), "'training.max_stepz'")
    valid = message.split("valid keys are", 1)[1]
    assert {k.strip() for k in valid.split(",")} == {f"training.{f.name}" for f in dataclasses.fields(TrainingConfig)}


def test_unknown_top_level_key(tmp_path):
    message = one_line_error(lambda: load_recipe(write_recipe(tmp_path, {"modle": "x"})), "'modle'")
    valid = {k.strip() for k in message.split("valid keys are", 1)[1].split(",")}
    assert valid == {f.name for f in dataclasses.fields(Recipe)}


def test_unknown_key_in_override():
    one_line_error(lambda: load_recipe(None, ["sparsity.sparsty=0.3"]), "'sparsity.sparsty'", "sparsity.sparsity")


# ----------------------------------------------------------------------------- overrides


def test_parse_overrides_both_spellings_and_types():
    overrides = parse_overrides([
        "training.max_steps=50",
        "--sparsity.sparsity", "0.4",
        "--training.learning-rate=3e-4",
        "--data.train_on_inputs",  # a bare flag is true
        "--training.bf16", "false",
        "data.train_limit=null",
        "search.objectives=[accuracy, adapter_params]",
        "--training.max_grad_norm", "-1",  # a negative number is a value, not a flag
        "output_dir=",
    ])
    assert overrides == {
        "training.max_steps": 50, "sparsity.sparsity": 0.4, "training.learning_rate": 3e-4,
        "data.train_on_inputs": True, "training.bf16": False, "data.train_limit": None,
        "search.objectives": ["accuracy", "adapter_params"], "training.max_grad_norm": -1, "output_dir": "",
    }
    assert type(overrides["training.max_steps"]) is int and type(overrides["training.learning_rate"]) is float


def test_overrides_are_coerced_to_the_field_types():
    recipe = load_recipe("default", [
        "training.max_steps=50", "--training.num_train_epochs", "2", "--training.learning_rate", "3e-4",
        "--data.train_on_inputs", "true", "data.val_size=0.1", "data.train_limit=100",
        "search.objectives=accuracy,adapter_params", "sparsity.exclude=*.down_proj",
        "sparsity.pattern=2:4", "sparsity.sparsity=0.5", "data.fields.instruction=question", "model=123",
    ])
    assert recipe.training.max_steps == 50 and type(recipe.training.max_steps) is int
    assert recipe.training.num_train_epochs == 2.0 and type(recipe.training.num_train_epochs) is float
    assert recipe.training.learning_rate == 3e-4
    assert recipe.data.train_on_inputs is True
    assert recipe.data.val_size == 0.1 and recipe.data.train_limit == 100
    assert recipe.search.objectives == ["accuracy", "adapter_params"]  # a comma list
    assert recipe.sparsity.exclude == ["*.down_proj"]  # one value for a list field
    assert load_recipe("default", ["training.rank_schedule=64,32"]).training.rank_schedule == [64, 32]
    assert load_recipe("default", ["training.rank_schedule=[64, 32]"]).training.rank_schedule == [64, 32]
    assert load_recipe("default", ["training.rank_schedule=32"]).training.rank_schedule == [32]
    assert recipe.sparsity.pattern == "2:4"  # not YAML 1.1's base-60 integer 124
    assert recipe.data.fields == {"instruction": "question"}
    assert recipe.model == "123"
    assert recipe.training.per_device_train_batch_size == 8  # untouched keys keep the recipe's values


def test_overrides_as_a_dict_and_lists_of_sources():
    recipe = load_recipe("default", {"data.train": ["a.json", "b.jsonl"], "search.eval_limit": None,
                                     "training.learning_rate": "1e-4"})
    assert recipe.data.train == ["a.json", "b.jsonl"] and recipe.search.eval_limit is None
    assert recipe.training.learning_rate == 1e-4
    assert load_recipe("default", ["data.train=[a.json, b.jsonl]"]).data.train == ["a.json", "b.jsonl"]
    assert load_recipe("default", ["data.train=c.csv"]).data.train == "c.csv"


@pytest.mark.parametrize("override, parts", [
    ("training.max_steps=abc", ["recipe.training.max_steps", "integer", "'abc'"]),
    ("training.max_steps=1.5", ["recipe.training.max_steps", "integer", "1.5"]),
    ("data.train_on_inputs=maybe", ["recipe.data.train_on_inputs", "true or false"]),
    ("training.bf16=1", ["recipe.training.bf16", "bool or 'auto'"]),
    ("training.learning_rate=fast", ["recipe.training.learning_rate", "number"]),
    ("training.learning_rate=[1, 2]", ["recipe.training.learning_rate", "number"]),
    ("data.train_limit=lots", ["recipe.data.train_limit", "'lots'"]),
    ("search.objectives={a: 1}", ["recipe.search.objectives", "list"]),
    ("training.rank_schedule=64,x", ["recipe.training.rank_schedule[1]", "integer", "'x'"]),
    ("data.fields=question", ["recipe.data.fields", "mapping"]),
    ("training=5", ["recipe.training", "mapping"]),
    ("search_space=[1, 2]", ["recipe.search_space", "[1, 2]"]),
    ("model.name=x", ["model.name", "model is a value"]),
    ("sparsity.sparsity=1.5", ["sparsity.sparsity=1.5", "[0, 1)"]),
    ("training.strategy=greedy", ["training.strategy='greedy'", "sandwich"]),
    # every choice-valued key is checked when the recipe is read, before any model loads
    ("search.sampler=tpee", ["search.sampler='tpee'", "use tpe, nsga2, gp or random"]),
    ("sparsity.method=wandaa", ["sparsity.method='wandaa'", "use wanda, magnitude or sparsegpt"]),
    ("evaluation.task=maths", ["evaluation.task='maths'", "use math, choice or loss"]),
    ("search.backend=optuna2", ["search.backend='optuna2'", "use optuna, pymoo or surrogate"]),
    ("data.answer_format=text", ["data.answer_format='text'", "use label or content"]),
])
def test_bad_override_is_a_one_line_error(override, parts):
    one_line_error(lambda: load_recipe("default", [override]), *parts)


def test_unreadable_override_argument():
    one_line_error(lambda: parse_overrides(["max_steps"]), "'max_steps'", "key=value")


# ----------------------------------------------------------------------------- {data_dir}


def test_data_dir_substitution(monkeypatch):
    monkeypatch.delenv("SHEARS_DATA_DIR", raising=False)
    recipe = load_recipe("smollm2-commonsense", ["data.data_dir=/data/la"])
    assert recipe.data.sources() == ["/data/la/commonsense/boolq_train.json", "/data/la/commonsense/arc-easy_train.json",
                                     "/data/la/commonsense/openbookqa_train.json"]
    monkeypatch.setenv("SHEARS_DATA_DIR", "/env/wins")
    assert recipe.data.sources()[0] == "/env/wins/commonsense/boolq_train.json"
    assert load_recipe("default").data.sources() == ["builtin:arithmetic?n=2000&seed=0"]  # nothing to substitute


def test_data_dir_in_an_override_value(monkeypatch):
    monkeypatch.delenv("SHEARS_DATA_DIR", raising=False)
    recipe = load_recipe("default", ["data.train={data_dir}/math/train.json", "--data.data_dir", "/d"])
    assert recipe.data.train == "{data_dir}/math/train.json"
    assert recipe.data.sources() == ["/d/math/train.json"]


def test_default_data_dir_finds_the_shared_data_from_the_repo_root(llm_adapters_dir, monkeypatch):
    monkeypatch.delenv("SHEARS_DATA_DIR", raising=False)
    monkeypatch.chdir(REPO)
    for name in ("smollm2-math", "smollm2-commonsense", "llama-7b-math-shears"):
        for source in load_recipe(name).data.sources():
            assert Path(source).resolve().is_relative_to(llm_adapters_dir.resolve()) and Path(source).is_file()


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_save_load_round_trip_shipped(tmp_path, path):
    recipe = load_recipe(path)
    save_recipe(recipe, tmp_path / "run" / "recipe.yaml")
    assert load_recipe(tmp_path / "run" / "recipe.yaml") == recipe
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["recipe.yaml"]  # no temporary left behind


def test_save_load_round_trip_of_values_yaml_could_misread(tmp_path):
    space = yaml.safe_load((REPO / "search_spaces" / "llama.yaml").read_text())
    recipe = load_recipe("default", {
        "sparsity.pattern": "2:4", "output_dir": "3e-4", "model": "1:30", "dtype": "true",
        "training.learning_rate": 3e-4, "training.warmup_steps": 0.05, "data.train": ["x.json", "{data_dir}/y.json"],
        "data.fields": {"instruction": "question"}, "search.storage": "null", "search_space": space,
    })
    assert recipe.output_dir == "3e-4" and recipe.dtype == "true" and recipe.search.storage == "null"
    saved = tmp_path / "recipe.yaml"
    save_recipe(recipe, saved)
    assert load_recipe(saved) == recipe
    plain = yaml.safe_load(saved.read_text())  # the file also reads right with a stock YAML 1.1 reader
    assert plain["sparsity"]["pattern"] == "2:4" and plain["model"] == "1:30" and plain["output_dir"] == "3e-4"
    assert plain["dtype"] == "true" and plain["search"]["storage"] == "null"


def test_save_recipe_replaces_an_older_file(tmp_path):
    saved = tmp_path / "recipe.yaml"
    save_recipe(load_recipe("default"), saved)
    save_recipe(load_recipe("smollm2-math"), saved)
    assert load_recipe(saved) == load_recipe("smollm2-math")


# ----------------------------------------------------------------------------- the paper's setting


def test_llama_7b_math_recipe_is_the_shears_paper_setting():
    recipe = load_recipe("llama-7b-math-shears")
    s, t, d = recipe.sparsity, recipe.training, recipe.data
    assert (s.sparsity, s.method, s.pattern, s.nsamples, s.seqlen) == (0.5, "wanda", "unstructured", 128, 2048)
    assert t.learning_rate == 3e-4 and t.num_train_epochs == 3 and t.max_steps == -1  # epochs decide
    assert d.cutoff_len == 256 and d.train_on_inputs is False
    assert recipe.evaluation.task == "math"

    space = load_search_space(recipe.search_space)
    assert (space.r_max, space.lora_alpha, space.lora_dropout) == (32, 64, 0.1)
    assert set(space.target_modules) == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}
    assert [set(g.modules) for g in space.groups] == [{"q_proj", "k_proj", "v_proj"}, {"up_proj"}, {"down_proj"}]
    assert all(list(g.choices) == [32, 24, 16] and g.scope == "per_layer" for g in space.groups)

    bound = space.bind(make_tiny_model("llama"))  # and it fits a Llama: 3 groups x 2 layers of choices
    assert len(bound.keys) == 3 * 2
    ranks = bound.module_ranks(bound.maximal())
    assert len(ranks) == 5 * 2 and set(ranks.values()) == {32}


# ---- the run directory's one owner

def test_rundir_names_every_path_and_a_fresh_start_discards_training_and_what_follows(tmp_path):
    from shears.rundir import RunDir

    run = RunDir(tmp_path / "run")
    assert run.recipe == tmp_path / "run" / "recipe.yaml"
    assert run.stage_checkpoints(0, 1) == run.checkpoints
    assert run.stage_checkpoints(1, 2) == run.checkpoints / "stage-1"
    assert run.search.history == tmp_path / "run" / "search" / "history.jsonl"
    assert run.export.subnet("maximal") == tmp_path / "run" / "export" / "maximal"
    for folder in (run.sparse_base, run.supernet, run.checkpoints, run.trace, run.search.folder, run.export.folder):
        folder.mkdir(parents=True)
        (folder / "x").write_text("x")
    run.recipe.write_text("model: m\n")
    run.train_summary.write_text("{}")
    assert run.holds_training()
    run.discard_training()
    assert sorted(p.name for p in run.root.iterdir()) == ["recipe.yaml", "sparse_base"]
    assert not run.holds_training()


def test_the_recipes_allowed_values_are_the_owners_constants():
    import typing

    from shears import data, evaluate, recipe, sparsity, train_supernet
    from shears.search import optuna_backend

    assert sparsity.METHODS == typing.get_args(recipe.PruneMethod)
    assert train_supernet.STRATEGIES == typing.get_args(recipe.Strategy)
    assert evaluate.TASKS == typing.get_args(recipe.Task)
    assert data.ANSWER_FORMATS == typing.get_args(recipe.AnswerFormat)
    assert optuna_backend.SAMPLERS == typing.get_args(recipe.OptunaSampler)
