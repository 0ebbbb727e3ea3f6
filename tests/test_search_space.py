"""Search spaces: YAML parsing and validation, binding to models, configs and their helpers."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import yaml
from torch import nn

from conftest import make_tiny_model
from shears.errors import ShearsError
from shears.search_space import BoundSpace, SearchSpace, canonical, load_search_space

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def space_dict(**overrides):
    base = {
        "target_modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
        "r_max": 32, "lora_alpha": 64, "lora_dropout": 0.1,
        "groups": [
            {"name": "qkv", "modules": ["q_proj", "k_proj", "v_proj"], "choices": [32, 24, 16]},
            {"name": "up", "modules": ["up_proj"], "choices": [32, 24, 16]},
            {"name": "down", "modules": ["down_proj"], "choices": [32, 24, 16], "scope": "per_layer"},
        ],
    }
    base.update(overrides)
    return base


def one_line_error(fn, *match):
    with pytest.raises(ShearsError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for fragment in match:
        assert fragment in message, message
    return message


# ----------------------------------------------------------------------------- shipped spaces


def test_llama_yaml_is_shears_default():
    space = load_search_space("llama")
    assert space.target_modules == ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    assert (space.r_max, space.lora_alpha, space.lora_dropout) == (32, 64, 0.1)
    assert [(g.name, g.modules, g.choices, g.scope) for g in space.groups] == [
        ("qkv", ("q_proj", "k_proj", "v_proj"), (32, 24, 16), "per_layer"),
        ("up", ("up_proj",), (32, 24, 16), "per_layer"),
        ("down", ("down_proj",), (32, 24, 16), "per_layer"),
    ]


def test_llama_binds_three_groups_per_layer(tiny_llama):
    bound = load_search_space("llama").bind(tiny_llama)
    assert bound.keys == ("qkv.0", "up.0", "down.0", "qkv.1", "up.1", "down.1")
    assert bound.modules["qkv.1"] == ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
                                         "model.layers.1.self_attn.v_proj")
    assert bound.modules["down.0"] == ("model.layers.0.mlp.down_proj",)
    assert all(bound.choices[k] == (32, 24, 16) for k in bound.keys)


def test_gate_and_all_spaces(tiny_llama):
    gate = load_search_space("llama-gate").bind(tiny_llama)
    assert gate.modules["gate_up.0"] == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
    every = load_search_space("llama-all").bind(tiny_llama)
    leaves = sorted(name.rsplit(".", 1)[-1] for name in every.module_names())
    assert leaves == sorted(LLAMA_LINEARS * 2)  # all seven projections of both blocks


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma3"])
def test_llama_all_binds_on_llama_like_models(arch):
    model = make_tiny_model(arch)
    bound = load_search_space("llama-all").bind(model)
    expected = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n)
    assert sorted(bound.module_names()) == expected


def test_phi3_fused_projections_need_their_own_space():
    phi3 = make_tiny_model("phi3")
    one_line_error(lambda: load_search_space("llama").bind(phi3), "q_proj", "qkv_proj", "gate_up_proj")
    space = SearchSpace.from_dict({
        "target_modules": ["qkv_proj", "gate_up_proj", "down_proj"], "r_max": 16, "lora_alpha": 32,
        "lora_dropout": 0.0,
        "groups": [{"name": "attn", "modules": ["qkv_proj"], "choices": [16, 8]},
                   {"name": "mlp", "modules": ["gate_up_proj", "down_proj"], "choices": [16, 8, 4]}]})
    bound = space.bind(phi3)
    assert bound.modules["mlp.1"] == ("model.layers.1.mlp.gate_up_proj", "model.layers.1.mlp.down_proj")
    qkv = phi3.get_submodule("model.layers.0.self_attn.qkv_proj")
    assert bound.shapes["model.layers.0.self_attn.qkv_proj"] == (qkv.in_features, qkv.out_features)


def test_global_scope_has_one_key_over_all_layers(tiny_llama):
    groups = space_dict()["groups"]
    groups[1]["scope"] = "global"
    bound = SearchSpace.from_dict(space_dict(groups=groups)).bind(tiny_llama)
    assert bound.keys == ("qkv.0", "down.0", "qkv.1", "down.1", "up")
    assert bound.modules["up"] == ("model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj")


def test_dotted_suffix_names_match(tiny_llama):
    groups = space_dict()["groups"]
    groups[0]["modules"] = ["self_attn.q_proj", "k_proj", "v_proj"]
    data = space_dict(groups=groups, target_modules=["self_attn.q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])
    bound = SearchSpace.from_dict(data).bind(tiny_llama)
    assert bound.modules["qkv.0"][0] == "model.layers.0.self_attn.q_proj"


# ----------------------------------------------------------------------------- validation errors


def with_group(index, **changes):
    groups = space_dict()["groups"]
    groups[index] = {**groups[index], **changes}
    return space_dict(groups=groups)


@pytest.mark.parametrize("data, fragments", [
    (with_group(0, choices=[48, 24]), ["qkv", "48", "above r_max 32"]),
    (with_group(1, modules=[]), ["'up'", "empty"]),
    (with_group(1, choices=[16, 0]), ["'up'", "positive"]),
    (with_group(1, choices=[16, -8]), ["'up'", "positive"]),
    (with_group(1, choices=[16, 8.5]), ["'up'", "positive integers"]),
    (with_group(1, choices=[16, 16]), ["repeats"]),
    (with_group(1, scope="sometimes"), ["scope", "per_layer"]),
    (with_group(1, rank=4), ["unknown key", "rank"]),
    (with_group(1, name="up.proj"), ["no dots"]),
    (with_group(1, modules=["up_proj", "q_proj"]), ["q_proj", "'qkv'", "'up'", "one group"]),
    (with_group(2, name="up"), ["used twice"]),
    (space_dict(extra=1), ["unknown key", "extra"]),
    (space_dict(r_max=0), ["r_max", "positive"]),
    (space_dict(lora_alpha=-1), ["lora_alpha"]),
    (space_dict(lora_dropout=1.5), ["lora_dropout"]),
    (space_dict(groups=[]), ["groups"]),
    (space_dict(target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj", "o_proj"]),
     ["o_proj", "no group"]),
    (space_dict(target_modules=["q_proj", "k_proj", "v_proj", "up_proj"]), ["down_proj", "not in target_modules"]),
    ({k: v for k, v in space_dict().items() if k != "r_max"}, ["missing", "r_max"]),
])
def test_space_validation_errors(data, fragments):
    one_line_error(lambda: SearchSpace.from_dict(data), *fragments)


def test_module_not_in_model_lists_linear_names(tiny_llama):
    data = space_dict(target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj", "wq"])
    data["groups"][0]["modules"].append("wq")
    message = one_line_error(lambda: SearchSpace.from_dict(data).bind(tiny_llama), "'wq'")
    assert all(name in message for name in LLAMA_LINEARS)


def test_two_names_for_one_module_are_refused_at_bind(tiny_llama):
    groups = space_dict()["groups"]
    groups[1]["modules"] = ["up_proj", "self_attn.q_proj"]
    data = space_dict(groups=groups, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj",
                                                     "self_attn.q_proj"])
    one_line_error(lambda: SearchSpace.from_dict(data).bind(tiny_llama), "self_attn.q_proj", "one group")


def test_yaml_file_and_unknown_name(tmp_path, tiny_llama):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(space_dict()))
    assert load_search_space(path).bind(tiny_llama).keys[0] == "qkv.0"
    one_line_error(lambda: load_search_space("no-such-space"), "llama", "llama-all")
    one_line_error(lambda: load_search_space(tmp_path / "missing.yaml"), "not found")
    (tmp_path / "bad.yaml").write_text("groups: [unclosed\n")
    one_line_error(lambda: load_search_space(tmp_path / "bad.yaml"), "not valid YAML")


# ----------------------------------------------------------------------------- configs


@pytest.fixture
def bound(tiny_llama):
    return load_search_space("llama").bind(tiny_llama)


def test_config_validation_errors(bound):
    good = bound.maximal()
    assert bound.validate(good) == good
    one_line_error(lambda: bound.validate({**good, "qkv.9": 32}), "unknown", "qkv.9")
    one_line_error(lambda: bound.validate({k: v for k, v in good.items() if k != "up.1"}), "missing", "up.1")
    one_line_error(lambda: bound.validate({**good, "down.0": 20}), "down.0=20", "[32, 24, 16]")
    one_line_error(lambda: bound.validate({**good, "down.0": "16"}), "down.0")
    one_line_error(lambda: bound.validate([("qkv.0", 32)]), "dict")


def test_canonical_is_stable(bound):
    config = bound.heuristic()
    reordered = dict(reversed(list(config.items())))
    assert canonical(config) == canonical(reordered) == canonical(json.loads(json.dumps(reordered)))
    assert canonical({"up.0": 16, "down.1": 24, "qkv.0": 32}) == '{"down.1":24,"qkv.0":32,"up.0":16}'
    assert canonical({"a": np.int64(8)}) == '{"a":8}'


def test_maximal_minimal_heuristic(bound):
    assert set(bound.maximal().values()) == {32}
    assert set(bound.minimal().values()) == {16}
    assert set(bound.heuristic().values()) == {24}


def test_heuristic_is_the_reference_middle_choice_the_upper_one_for_even_counts(tiny_llama):
    groups = space_dict()["groups"]
    groups[0]["choices"] = [8, 32, 16, 4]  # unsorted on purpose
    groups[1]["choices"] = [4, 12, 32, 8, 16]
    b = SearchSpace.from_dict(space_dict(groups=groups)).bind(tiny_llama)
    for key, rank in b.heuristic().items():  # NNCF / SQFT: choices[(n - 1) // 2] of the descending list
        descending = sorted(b.choices[key], reverse=True)
        assert rank == descending[(len(descending) - 1) // 2]
        assert rank == statistics.median_high(b.choices[key])
    assert b.heuristic()["qkv.0"] == 16 and b.heuristic()["up.1"] == 12


def test_search_anchors_of_a_plain_space_use_the_same_heuristic():
    from types import SimpleNamespace

    from shears.search.problem import anchor_configs

    space = SimpleNamespace(keys=("a", "b"), choices={"a": (2, 8, 4, 1), "b": (3, 1, 2)})
    assert anchor_configs(space) == {"maximal": {"a": 8, "b": 3}, "heuristic": {"a": 4, "b": 2},
                                     "minimal": {"a": 1, "b": 1}}


def test_sample_is_deterministic_and_uniform(bound):
    first = [bound.sample(np.random.default_rng(7)) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    rng = np.random.default_rng(0)
    draws = [bound.sample(rng) for _ in range(600)]
    for config in draws[:20]:
        assert bound.validate(config) == config
        assert all(type(v) is int for v in config.values())
    counts = {r: sum(c["qkv.0"] == r for c in draws) for r in (32, 24, 16)}
    assert all(150 < n < 250 for n in counts.values()), counts  # ~200 each: not stuck on one choice
    assert len({canonical(c) for c in draws}) > 300


def test_module_ranks_and_adapter_params(bound, tiny_llama):
    config = bound.sample(np.random.default_rng(3))
    ranks = bound.module_ranks(config)
    assert ranks["model.layers.1.self_attn.k_proj"] == config["qkv.1"]
    expected = 0
    for name, rank in ranks.items():
        linear = tiny_llama.get_submodule(name)
        expected += rank * linear.in_features + linear.out_features * rank  # A is r x in, B is out x r
    assert bound.adapter_params(config) == expected
    # hidden 32, intermediate 64, 2 kv heads of 8: q 32->32, k/v 32->16, up 32->64, down 64->32
    assert bound.adapter_params(bound.maximal()) == 2 * 32 * (64 + 48 + 48 + 96 + 96)


def test_bound_space_json_round_trip(bound):
    restored = BoundSpace.from_dict(json.loads(json.dumps(bound.to_dict())))
    assert restored == bound
    one_line_error(lambda: BoundSpace.from_dict({"space": bound.space.to_dict()}), "bound search space")
