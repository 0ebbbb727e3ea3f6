"""Elastic attention heads (kind: heads), GQA-aware: whole key/value groups are reordered, kept and cut,
checked against models built by hand and against stock HF configs with fewer heads."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model, one_line_error
from test_elastic import prune_half, randomize_adapters
from test_width import gate_gradient_scores
from shears.elastic import SuperNet
from shears.search_space import SearchSpace, load_search_space
from shears.width import channel_importance, permute_channels, width_order

HEADS = dict(num_attention_heads=8, num_key_value_heads=4)  # 2 query heads per key/value head
IDS = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))
CALIBRATION = torch.randint(3, 128, (6, 16), generator=torch.Generator().manual_seed(1))
SPACE = {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"], "r_max": 8, "lora_alpha": 16,
         "lora_dropout": 0.0, "groups": [
             {"name": "qkv", "modules": ["q_proj", "k_proj", "v_proj"], "choices": [8, 4]},
             {"name": "o", "modules": ["o_proj"], "choices": [8, 4]},
             {"name": "up", "modules": ["up_proj"], "choices": [8, 4], "scope": "global"},
             {"name": "attn", "kind": "heads", "modules": ["q_proj", "k_proj", "v_proj"], "consumers": ["o_proj"],
              "choices": [1.0, 0.5, 0.25]},
             {"name": "mlp", "kind": "width", "modules": ["gate_proj", "up_proj"], "consumers": ["down_proj"],
              "choices": [1.0, 0.5]}]}


def tiny(arch="llama", **overrides):
    return make_tiny_model(arch, **{**HEADS, **overrides})


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def random_orders(sites, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {site.name: torch.randperm(site.channels, generator=gen) for site in sites}


def heads_net(arch="llama", sparse=False, order="importance"):
    base = tiny(arch)
    if sparse:
        prune_half(base)
    bound = SearchSpace.from_dict(SPACE).bind(base)
    channel_order = (width_order(base, bound, CALIBRATION, progress=False)[0] if order == "importance"
                     else random_orders(bound.sites) if order == "random" else None)
    net = SuperNet.from_base(base, bound, sparse_adapter=sparse, channel_order=channel_order)
    randomize_adapters(net.model)
    net.model.eval()
    return net


# ----------------------------------------------------------------------------- binding


def test_heads_bind_to_whole_key_value_groups():
    bound = SearchSpace.from_dict(SPACE).bind(tiny())
    site = next(s for s in bound.sites if s.name == "attn.0")
    assert site.kind == "heads" and site.channels == 4 and bound.choices["attn.0"] == (4, 2, 1)
    assert site.head_dim == 4 and site.query_per_kv == 2
    q, k, v, o = (f"model.layers.0.self_attn.{m}_proj" for m in "qkvo")
    assert [site.unit(n) for n in (q, k, v, o)] == [8, 4, 4, 8]  # rows/columns per key/value group
    config = {**bound.maximal(), "attn.0": 1}
    shapes = bound.module_shapes(config)
    assert shapes[q] == (32, 8) and shapes[k] == (32, 4) and shapes[o] == (8, 32)
    # q's B loses 24 rows, k's and v's 12 each, o's A 24 columns, every module at rank 8
    assert bound.adapter_params(bound.maximal()) - bound.adapter_params(config) == 8 * (24 + 12 + 12 + 24)
    assert type(bound).from_dict(bound.to_dict()) == bound


def test_shipped_heads_space_binds_to_the_default_layout():
    bound = load_search_space("llama-width-heads").bind(tiny())
    assert bound.choices["attn.1"] == (4, 3, 1) and bound.choices["mlp.1"] == (64, 48, 32)


def test_heads_errors():
    wrong = copy.deepcopy(SPACE)
    del wrong["groups"][4]  # the MLP width group: up_proj may then be (wrongly) listed as a head producer
    wrong["groups"][3]["modules"] = ["q_proj", "up_proj"]
    one_line_error(lambda: SearchSpace.from_dict(wrong).bind(tiny()), "heads group 'attn'", "query",
                   "key/value heads", "o_proj as consumers")
    fused = copy.deepcopy(SPACE)
    one_line_error(lambda: SearchSpace.from_dict(fused).bind(make_tiny_model("phi3")), "q_proj", "qkv_proj")
    twice = copy.deepcopy(SPACE)
    twice["groups"][3]["choices"] = [1.0, 0.9]
    one_line_error(lambda: SearchSpace.from_dict(twice).bind(tiny()), "repeated", "further apart")


# ----------------------------------------------------------------------------- reordering


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "mistral"])
def test_head_permutation_leaves_the_dense_model_unchanged(arch):
    """qwen2: q/k/v biases move with their rows; gemma3: q/k norms and an explicit head_dim."""
    model = tiny(arch)
    before = logits(model)
    bound = SearchSpace.from_dict(SPACE).bind(model)
    heads = [s for s in bound.sites if s.kind == "heads"]
    order, _ = width_order(model, bound, CALIBRATION, progress=False)
    assert any(not torch.equal(order[s.name], torch.arange(4)) for s in heads)
    permute_channels(model, bound.sites, order)
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)
    permute_channels(model, bound.sites, random_orders(bound.sites, seed=1))
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)


def test_head_permutation_moves_whole_heads():
    model = tiny()
    bound = SearchSpace.from_dict(SPACE).bind(model)
    attention = model.model.layers[0].self_attn
    q, k, o = attention.q_proj.weight.clone(), attention.k_proj.weight.clone(), attention.o_proj.weight.clone()
    order = {s.name: torch.arange(s.channels) for s in bound.sites}
    order["attn.0"] = torch.tensor([2, 0, 3, 1])
    permute_channels(model, bound.sites, order)
    # key/value group 2 comes first: its k/v head (rows 8:12) and its two query heads (q rows 16:24, o columns 16:24)
    assert torch.equal(attention.k_proj.weight[:4], k[8:12])
    assert torch.equal(attention.q_proj.weight[:8], q[16:24]) and torch.equal(attention.o_proj.weight[:, :8], o[:, 16:24])
    assert torch.equal(attention.q_proj.weight[8:16], q[:8])


@pytest.mark.parametrize("sparse", [False, True])
def test_head_permutation_composes_with_lora_factors_and_masks(sparse):
    net = heads_net(sparse=sparse, order=None)
    net.activate({**net.maximal(), **{k: 4 for k in net.space.rank_keys}})
    before = logits(net.model)
    permute_channels(net.model, net.space.sites, random_orders(net.space.sites, seed=2))
    torch.testing.assert_close(logits(net.model), before, atol=1e-5, rtol=1e-5)


def test_taylor_score_of_heads_equals_the_gradient_of_a_group_gate():
    """Reference: one gate per key/value group on o_proj's input (its query heads' outputs); the squared
    d(sequence loss)/d gate, summed over sequences, is the group's score."""
    model = tiny()
    bound = SearchSpace.from_dict(SPACE).bind(model)
    heads = [s for s in bound.sites if s.kind == "heads"]
    scores = channel_importance(model, heads, CALIBRATION, "taylor", batch_size=4, progress=False)
    expected = gate_gradient_scores(model, heads, CALIBRATION)  # gates on whole groups: 8 o_proj inputs each
    for name in expected:
        torch.testing.assert_close(scores[name], expected[name], rtol=1e-4, atol=1e-10)
    activation = channel_importance(model, heads, CALIBRATION, "activation", progress=False)
    assert all(a.shape == (4,) and (a > 0).all() for a in activation.values())


def test_eftnas_bounds_count_whole_key_value_heads():
    from shears.search_space import width_bounds

    bound = SearchSpace.from_dict(SPACE).bind(tiny())
    scores = {site.name: torch.tensor([8.0, 1.0, 0.5, 0.5]) if site.kind == "heads" else torch.ones(site.channels)
              for site in bound.sites}
    bounded = width_bounds(bound, scores, keep=0.8, multiple=8).bind(tiny())
    # 80% of the importance needs the best 1 of 4 groups (8 of 10): heads round to whole groups, not to 8
    assert bounded.choices["attn.0"] == (4, 2, 1) and bounded.choices["mlp.0"] == (64, 56)


# ----------------------------------------------------------------------------- elastic heads


def stock_reference(net, config, arch="llama"):
    """The subnet as a stock HF model with fewer heads (every block keeps the same number of key/value
    heads): a fresh config with num_attention_heads / num_key_value_heads reduced, the weights copied by
    hand -- LoRA merged as W + s * B[:, :r] @ A[:r], then q/k/v rows and o columns of the kept heads."""
    kv = {config[k] for k in net.space.width_keys if k.startswith("attn.")}
    widths = {config[k] for k in net.space.width_keys if k.startswith("mlp.")}
    assert len(kv) == 1 and len(widths) == 1
    kv, width = kv.pop(), widths.pop()
    base = net.model.get_base_model()
    reference = tiny(arch, num_attention_heads=2 * kv, num_key_value_heads=kv, head_dim=4, intermediate_size=width)
    scale = net.space.space.lora_alpha / net.space.r_max
    ranks = net.space.module_ranks(config)
    keep = {"q_proj": 8 * kv, "k_proj": 4 * kv, "v_proj": 4 * kv, "gate_proj": width, "up_proj": width}
    with torch.no_grad():
        for name, param in reference.named_parameters():
            module, _, leaf = name.rpartition(".")
            source = base.get_submodule(module)
            weight = (source.get_base_layer() if hasattr(source, "get_base_layer") else source).get_parameter(leaf)
            if module in ranks and leaf == "weight":
                A = source.lora_A["default"].weight[:ranks[module]]
                B = source.lora_B["default"].weight[:, :ranks[module]]
                delta = scale * B @ A
                weight = weight + (delta * (weight != 0) if net.sparse_adapter else delta)
            kind = module.rsplit(".", 1)[-1]
            if kind in keep:
                weight = weight[:keep[kind]]
            elif kind == "o_proj":
                weight = weight[:, :8 * kv]
            elif kind == "down_proj":
                weight = weight[:, :width]
            param.copy_(weight)
    return reference.eval()


def sliced_reference(net, config):
    """Per-block head counts: a plain copy of the merged base whose q/k/v/o are smaller nn.Linear layers
    (HF attention takes the number of heads from its projections' shapes)."""
    base = tiny()
    plain = net.model.get_base_model()
    scale = net.space.space.lora_alpha / net.space.r_max
    ranks = net.space.module_ranks(config)
    with torch.no_grad():
        for name, module in list(base.named_modules()):
            if not isinstance(module, nn.Linear) or not name.startswith("model.layers."):
                continue  # lm_head shares the embedding's weight
            source = plain.get_submodule(name)
            weight = (source.get_base_layer() if hasattr(source, "get_base_layer") else source).weight
            if name in ranks:
                weight = weight + scale * source.lora_B["default"].weight[:, :ranks[name]] \
                    @ source.lora_A["default"].weight[:ranks[name]]
            layer, leaf = name.split(".")[2], name.rsplit(".", 1)[-1]
            kv, width = config[f"attn.{layer}"], config[f"mlp.{layer}"]
            rows = {"q_proj": 8 * kv, "k_proj": 4 * kv, "v_proj": 4 * kv, "gate_proj": width, "up_proj": width}
            columns = {"o_proj": 8 * kv, "down_proj": width}
            weight = weight[:rows[leaf]] if leaf in rows else weight[:, :columns[leaf]] if leaf in columns else weight
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            new.weight.copy_(weight)
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent), child, new)
    return base.eval()


@pytest.mark.parametrize("sparse", [False, True])
def test_uniform_heads_subnet_equals_a_stock_model_with_fewer_heads(sparse):
    net = heads_net(sparse=sparse)
    rng = np.random.default_rng(0)
    for kv, width in ((2, 32), (1, 64), (4, 32)):
        config = {**net.sample(rng), **{k: kv for k in net.space.width_keys if k.startswith("attn.")},
                  **{k: width for k in net.space.width_keys if k.startswith("mlp.")}}
        net.activate(config)
        reference = stock_reference(net, config)
        assert reference.model.layers[0].self_attn.k_proj.weight.shape == (4 * kv, 32)
        torch.testing.assert_close(logits(net.model), logits(reference), atol=1e-5, rtol=1e-4)


def test_per_block_heads_subnet_equals_a_hand_sliced_model():
    net = heads_net(order="random")
    config = {**net.sample(np.random.default_rng(1)), "attn.0": 1, "attn.1": 2, "mlp.0": 64, "mlp.1": 32}
    net.activate(config)
    torch.testing.assert_close(logits(net.model), logits(sliced_reference(net, config)), atol=1e-5, rtol=1e-4)
    full = logits(net.model)
    net.activate({**config, "attn.0": 4})
    assert not torch.allclose(logits(net.model), full)


def test_gradients_reach_only_the_kept_heads():
    net = heads_net()
    net.model.train()
    net.activate({**net.maximal(), "attn.0": 1})
    net.model(input_ids=IDS, labels=IDS).loss.backward()
    layers = {leaf: net.layers[f"model.layers.0.self_attn.{leaf}"] for leaf in ("q_proj", "k_proj", "v_proj", "o_proj")}
    for leaf, kept in (("q_proj", 8), ("k_proj", 4), ("v_proj", 4)):
        grad = layers[leaf].lora_B["default"].weight.grad
        assert grad[kept:].abs().sum() == 0 and grad[:kept].abs().sum() > 0, leaf
    grad = layers["o_proj"].lora_A["default"].weight.grad
    assert grad[:, 8:].abs().sum() == 0 and grad[:, :8].abs().sum() > 0
    assert net.layers["model.layers.1.self_attn.k_proj"].lora_B["default"].weight.grad[4:].abs().sum() > 0


def test_save_load_and_unload_restore_the_head_order(tmp_path):
    net = heads_net(order="random")
    config = {**net.maximal(), "attn.0": 2, "attn.1": 1}
    net.activate(config)
    expected = logits(net.model)
    net.save(tmp_path / "supernet")
    loaded = SuperNet.load(tmp_path / "supernet", tiny())
    loaded.model.eval()
    loaded.activate(config)
    torch.testing.assert_close(logits(loaded.model), expected, atol=1e-6, rtol=1e-6)
    base = loaded.unload()
    assert torch.equal(base.model.layers[0].self_attn.q_proj.weight, tiny().model.layers[0].self_attn.q_proj.weight)


# ----------------------------------------------------------------------------- a trained run, exported


@pytest.fixture(scope="module")
def heads_run(tmp_path_factory):
    from test_width_export import train_width_run

    return train_width_run(tmp_path_factory.mktemp("heads"), tiny(max_position_embeddings=512), SPACE, seed=5)


@pytest.mark.parametrize("widths, stock", [({"attn.0": 2, "attn.1": 2, "mlp.0": 32, "mlp.1": 32}, True),
                                           ({"attn.0": 4, "attn.1": 1, "mlp.0": 32, "mlp.1": 32}, False)])
def test_heads_export_a_smaller_model_equal_to_the_subnet(heads_run, tmp_path, widths, stock):
    """One head count everywhere: a stock config with fewer heads (head_dim explicit), loaded without shears;
    per-block counts: shears_widths.json, loaded by shears. Both compute the subnet, with its params count."""
    import json

    from shears.export import export_subnets
    from shears.models import WIDTH_FILE, load_model
    from shears.run import load_run
    from shears.search.objectives import size_function

    loaded = load_run(heads_run.path)
    config = {**loaded.supernet.minimal(), **widths}
    loaded.supernet.activate(config)
    expected = logits(loaded.supernet.model)
    folder = export_subnets(loaded, {"subnet": config}, tmp_path)[0].folder / "merged"
    if stock:
        assert not (folder / WIDTH_FILE).exists()
        model = AutoModelForCausalLM.from_pretrained(folder).eval()  # no shears code
        assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (4, 2, 4)
        assert model.config.intermediate_size == 32
        assert model.model.layers[1].self_attn.q_proj.weight.shape == (16, 32)
    else:
        spec = json.loads((folder / WIDTH_FILE).read_text())["sites"]
        kv_rows = ("model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj")
        assert {tuple(s["rows"]): s["width"] for s in spec}[kv_rows] == 4
        model = load_model(folder)
        assert model.model.layers[0].self_attn.o_proj.weight.shape == (32, 32)
        assert model.model.layers[1].self_attn.o_proj.weight.shape == (32, 8)
    assert (logits(model) - expected).abs().max() <= 1e-5
    assert size_function(loaded.supernet, "params")(config) == sum(p.numel() for p in model.parameters())


def test_latency_table_times_the_attention_at_each_head_count(heads_run, tmp_path):
    import json

    from shears.rundir import RunDir
    from shears.run import load_run
    from shears.search.objectives import latency_function

    run = load_run(heads_run.path)
    run.dir = RunDir(tmp_path)  # cache the table here, not in the shared fixture run
    latency = latency_function(run)
    table = json.loads(run.dir.latency.read_text())["sites"]
    assert set(table) == {"attn.0", "attn.1", "mlp.0", "mlp.1"} and set(table["attn.0"]) == {"4", "2", "1"}
    assert latency(run.supernet.maximal()) == pytest.approx(json.loads(run.dir.latency.read_text())["full_model"])
