"""Elastic base width: importance reordering keeps the function, subnets equal hand-sliced models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import make_tiny_model, one_line_error
from test_elastic import prune_half, randomize_adapters
from shears.elastic import SuperNet
from shears.errors import ShearsError
from shears.search_space import SearchSpace, load_search_space
from shears.width import (ElasticWidth, channel_importance, importance_order, permute_channels,
                          width_order)

IDS = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))
CALIBRATION = torch.randint(3, 128, (6, 16), generator=torch.Generator().manual_seed(1))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def width_net(arch="llama", sparse=False, space="llama-width", order=True):
    base = make_tiny_model(arch)
    if sparse:
        prune_half(base)
    bound = load_search_space(space).bind(base)
    channel_order = width_order(base, bound, CALIBRATION, progress=False)[0] if order else None
    net = SuperNet.from_base(base, bound, sparse_adapter=sparse, channel_order=channel_order)
    randomize_adapters(net.model)
    net.model.eval()
    return net


def random_orders(sites, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {site.name: torch.randperm(site.channels, generator=gen) for site in sites}


# ----------------------------------------------------------------------------- search spaces


def test_width_groups_bind_to_channel_counts(tiny_llama):
    bound = load_search_space("llama-width").bind(tiny_llama)
    assert bound.keys[:4] == ("qkv.0", "up.0", "down.0", "mlp.0")
    assert bound.choices["mlp.0"] == (64, 48, 32)  # intermediate_size 64 x [1.0, 0.75, 0.5]
    assert bound.width_keys == ("mlp.0", "mlp.1") and "mlp.0" not in bound.rank_keys
    site = bound.sites[0]
    assert site.rows == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
    assert site.columns == ("model.layers.0.mlp.down_proj",)
    assert all(".mlp.gate_proj" not in m for m in bound.module_names())  # gate is not a LoRA target here
    config = {**bound.maximal(), "mlp.0": 32}
    # up_proj's B loses 32 rows, down_proj's A 32 columns, each at rank 32
    assert bound.adapter_params(bound.maximal()) - bound.adapter_params(config) == 32 * 32 * 2
    assert bound.module_ranks(config) == bound.module_ranks(bound.maximal())


def test_channel_counts_global_scope_and_layer_choices(tiny_llama):
    data = load_search_space("llama-width").to_dict()
    data["groups"][3].update(choices=[64, 40], scope="global")
    bound = SearchSpace.from_dict(data).bind(tiny_llama)
    assert "mlp" in bound.keys and bound.choices["mlp"] == (64, 40)
    assert bound.site_widths({**bound.minimal()}) == {"mlp.0": 40, "mlp.1": 40}
    data["groups"][3].update(choices=[1.0, 0.5], scope="per_layer", layer_choices={1: [1.0, 0.25]})
    bound = SearchSpace.from_dict(data).bind(tiny_llama)
    assert bound.choices["mlp.0"] == (64, 32) and bound.choices["mlp.1"] == (64, 16)


def test_rank_only_spaces_are_unchanged(tiny_llama):
    bound = load_search_space("llama").bind(tiny_llama)
    assert bound.sites == () and bound.rank_keys == bound.keys
    assert "sites" not in bound.to_dict()


@pytest.mark.parametrize("change, fragments", [
    ({"consumers": None}, ["needs consumers", "down_proj"]),
    ({"choices": [1.0, 0]}, ["choice 0", "fractions"]),
    ({"choices": [1.5]}, ["choice 1.5"]),
    ({"choices": [0.5, 0.5]}, ["repeats"]),
    ({"kind": "depth"}, ["kind 'depth'"]),
    ({"layer_choices": {"x": [1.0]}}, ["not a layer index"]),
])
def test_width_group_errors(change, fragments):
    data = load_search_space("llama-width").to_dict()
    group = data["groups"][3]
    group.update(change)
    if group.get("consumers") is None:
        group.pop("consumers")
    one_line_error(lambda: SearchSpace.from_dict(data), *fragments)


def test_width_errors_at_bind(tiny_llama):
    data = load_search_space("llama-width").to_dict()
    data["groups"][3].update(choices=[64, 65])
    one_line_error(lambda: SearchSpace.from_dict(data).bind(tiny_llama), "above block 0's 64 channels")
    data["groups"][3].update(choices=[1.0, 0.5], consumers=["o_proj"])
    one_line_error(lambda: SearchSpace.from_dict(data).bind(tiny_llama), "different widths")
    rank = load_search_space("llama").to_dict()
    rank["groups"][0]["consumers"] = ["o_proj"]
    one_line_error(lambda: SearchSpace.from_dict(rank), "only width groups take")


# ----------------------------------------------------------------------------- reordering


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_permutation_leaves_the_dense_model_unchanged(arch):
    model = make_tiny_model(arch)
    before = logits(model)
    bound = load_search_space("llama-width").bind(model)
    order, scores = width_order(model, bound, CALIBRATION, progress=False)
    permute_channels(model, bound.sites, order)
    assert any(not torch.equal(perm, torch.arange(len(perm))) for perm in order.values())
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)
    permute_channels(model, bound.sites, random_orders(bound.sites))
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)


def test_permutation_moves_wanda_zeros_with_their_weights():
    model = make_tiny_model()
    prune_half(model)
    down = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    bound = load_search_space("llama-width").bind(model)
    before = logits(model)
    order = random_orders(bound.sites)
    permute_channels(model, bound.sites, order)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, down[:, order["mlp.0"]])
    assert int((model.model.layers[0].mlp.down_proj.weight == 0).sum()) == int((down == 0).sum())
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sparse", [False, True])
def test_permutation_composes_with_lora_factors(sparse):
    net = width_net(sparse=sparse, order=False)
    config = {**net.maximal(), **{k: 24 for k in net.space.rank_keys}}
    net.activate(config)
    before = logits(net.model)
    permute_channels(net.model, net.space.sites, random_orders(net.space.sites))
    torch.testing.assert_close(logits(net.model), before, atol=1e-5, rtol=1e-5)


def test_importance_order_is_stable_and_descending():
    scores = {"a.0": torch.tensor([1.0, 3.0, 3.0, 0.0, 2.0])}
    assert importance_order(scores)["a.0"].tolist() == [1, 2, 4, 0, 3]
    assert importance_order({"a.0": torch.zeros(4)})["a.0"].tolist() == [0, 1, 2, 3]
    one_line_error(lambda: permute_channels(make_tiny_model(), load_search_space("llama-width").bind(
        make_tiny_model()).sites, {"mlp.0": torch.zeros(64, dtype=torch.long), "mlp.1": torch.arange(64)}),
        "not a permutation")


def test_taylor_score_equals_the_gradient_of_a_channel_gate():
    """Reference: a gate a_c = 1 on every channel; d(sequence loss)/d a_c is the first-order estimate."""
    model = make_tiny_model()
    bound = load_search_space("llama-width").bind(model)
    scores = channel_importance(model, bound.sites, CALIBRATION, "taylor", batch_size=4, progress=False)
    expected = gate_gradient_scores(model, bound.sites, CALIBRATION)
    for name in expected:
        torch.testing.assert_close(scores[name], expected[name], rtol=1e-4, atol=1e-10)


def gate_gradient_scores(model, sites, calibration):
    """The reference Taylor score: one gate per channel on each site's consumer input (a channel spans
    site.unit(consumer) input features), d(sequence loss)/d gate at 1, squared and summed over sequences."""
    expected = {site.name: torch.zeros(site.channels, dtype=torch.float64) for site in sites}
    for sequence in calibration:
        gates = {site.name: torch.ones(site.channels, requires_grad=True) for site in sites}
        handles = [model.get_submodule(site.columns[0]).register_forward_pre_hook(
            lambda m, args, g=gates[site.name], u=site.unit(site.columns[0]): (args[0] * g.repeat_interleave(u),))
            for site in sites]
        ids = sequence[None]
        loss = model(input_ids=ids, labels=ids).loss * (ids.shape[1] - 1)
        grads = torch.autograd.grad(loss, list(gates.values()))
        for handle in handles:
            handle.remove()
        for name, grad in zip(gates, grads):
            expected[name] += grad.double() ** 2
    return expected


def test_activation_score():
    model = make_tiny_model()
    bound = load_search_space("llama-width").bind(model)
    scores = channel_importance(model, bound.sites, CALIBRATION, "activation", progress=False)
    site = bound.sites[1]
    inputs = []
    handle = model.get_submodule(site.columns[0]).register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    logits(model, CALIBRATION)
    handle.remove()
    h = inputs[0].double().reshape(-1, site.channels)
    w = model.get_submodule(site.columns[0]).weight.double()
    torch.testing.assert_close(scores[site.name], h.norm(dim=0) * w.norm(dim=0))
    one_line_error(lambda: channel_importance(model, bound.sites, CALIBRATION, "fisher"), "unknown width importance")


# ----------------------------------------------------------------------------- elastic width


def hand_sliced_reference(net, config):
    """The subnet built by hand: a plain copy of the (permuted) base, each adapted weight merged as
    W + s * B[:, :r] @ A[:r], then smaller nn.Linear layers holding rows / columns [:w]."""
    base = make_tiny_model()  # same seed as width_net's base
    with torch.no_grad():
        for name, param in base.named_parameters():
            param.copy_(net.model.get_base_model().get_parameter(_base_name(net, name)))
        scale = net.space.space.lora_alpha / net.space.r_max
        for name, rank in net.space.module_ranks(config).items():
            layer = net.layers[name]
            A, B = layer.lora_A["default"].weight[:rank], layer.lora_B["default"].weight[:, :rank]
            weight = base.get_submodule(name).weight
            delta = scale * B @ A
            weight.add_(delta * (weight != 0) if net.sparse_adapter else delta)  # SparsePEFT keeps the zeros
        widths = net.space.site_widths(config)
        for site in net.space.sites:
            w = widths[site.name]
            for name in site.rows + site.columns:
                old = base.get_submodule(name)
                new = nn.Linear(old.in_features if name in site.rows else w,
                                w if name in site.rows else old.out_features, bias=False)
                new.weight.copy_(old.weight[:w] if name in site.rows else old.weight[:, :w])
                parent, _, leaf = name.rpartition(".")
                setattr(base.get_submodule(parent), leaf, new)
    return base.eval()


def _base_name(net, name):
    """A plain model's parameter name inside the PEFT-wrapped base (adapted modules gain .base_layer)."""
    module, _, leaf = name.rpartition(".")
    return f"{module}.base_layer.{leaf}" if module in net.layers else name


@pytest.mark.parametrize("sparse", [False, True])
def test_subnet_equals_a_hand_sliced_model(sparse):
    net = width_net(sparse=sparse)
    rng = np.random.default_rng(3)
    for _ in range(3):
        config = net.sample(rng)
        config.update({"mlp.0": 32, "mlp.1": 48})
        net.activate(config)
        reference = hand_sliced_reference(net, config)
        assert reference.model.layers[0].mlp.down_proj.weight.shape == (32, 32)
        torch.testing.assert_close(logits(net.model), logits(reference), atol=1e-5, rtol=1e-4)
    net.activate(net.maximal())
    full = logits(net.model)
    net.activate({**net.maximal(), "mlp.0": 32})
    assert not torch.allclose(logits(net.model), full)


def test_gradients_reach_only_the_kept_channels():
    net = width_net()
    net.model.train()
    config = {**net.maximal(), "mlp.0": 32}
    net.activate(config)
    net.model(input_ids=IDS, labels=IDS).loss.backward()
    up, down = net.layers["model.layers.0.mlp.up_proj"], net.layers["model.layers.0.mlp.down_proj"]
    assert up.lora_B["default"].weight.grad[32:].abs().sum() == 0
    assert up.lora_B["default"].weight.grad[:32].abs().sum() > 0
    assert down.lora_A["default"].weight.grad[:, 32:].abs().sum() == 0
    assert down.lora_A["default"].weight.grad[:, :32].abs().sum() > 0
    layer1 = net.layers["model.layers.1.mlp.down_proj"].lora_A["default"].weight.grad
    assert layer1[:, 32:].abs().sum() > 0  # block 1 kept its full width


def test_save_load_restores_the_channel_order(tmp_path):
    net = width_net()
    config = {**net.minimal(), "mlp.1": 64}
    net.activate(config)
    expected = logits(net.model)
    net.save(tmp_path / "supernet")
    assert (tmp_path / "supernet" / "channel_order.safetensors").is_file()
    loaded = SuperNet.load(tmp_path / "supernet", make_tiny_model())
    loaded.activate(config)
    torch.testing.assert_close(logits(loaded.model.eval()), expected, atol=1e-6, rtol=1e-6)
    assert loaded.space == net.space


def test_unload_removes_the_width_hooks_and_restores_the_channel_order():
    original = make_tiny_model()
    net = width_net()
    net.activate({**net.maximal(), "mlp.0": 32})
    base = net.unload()
    assert not base.model.layers[0].mlp.down_proj._forward_pre_hooks
    for (name, param), expected in zip(base.named_parameters(), original.parameters()):
        assert torch.equal(param, expected), name
    hooks = ElasticWidth(base, net.space.sites)
    hooks.activate({"mlp.0": 64, "mlp.1": 64})
    one_line_error(lambda: hooks.activate({"mlp.0": 65, "mlp.1": 64}), "outside [1, 64]")


# ----------------------------------------------------------------------------- EFTNAS bounds


def test_width_bounds_keep_a_share_of_each_blocks_importance(tmp_path, tiny_llama):
    from shears.search_space import load_search_space as load, save_search_space, width_bounds

    bound = load("llama-width").bind(tiny_llama)
    # block 0: the first 10 channels (in a shuffled order) hold all importance; block 1: uniform
    block0 = torch.zeros(64)
    block0[torch.randperm(64, generator=torch.Generator().manual_seed(0))[:10]] = 1.0
    scores = {"mlp.0": block0, "mlp.1": torch.ones(64)}
    space = width_bounds(bound, scores, keep=0.9, multiple=8)
    rebound = space.bind(tiny_llama)
    assert rebound.choices["mlp.0"] == (64, 40, 16)  # 9 channels hold 90% -> 16, then evenly spaced
    assert rebound.choices["mlp.1"] == (64,)  # 58 uniform channels hold 90%, rounded up to 64: kept whole
    path = save_search_space(space, tmp_path / "bounded.yaml", "derived\nby a test")
    assert path.read_text().startswith("# derived\n# by a test\n")
    assert load(path).bind(tiny_llama).choices == rebound.choices
    one_line_error(lambda: width_bounds(load("llama").bind(tiny_llama), scores), "no width groups")
    one_line_error(lambda: width_bounds(bound, {"mlp.0": block0}), "no importance scores for mlp.1")
