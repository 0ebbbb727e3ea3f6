"""Elastic LoRA super-network: every subnet must equal a hand-built stock-PEFT LoRA of its ranks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from conftest import make_tiny_model
from shears.elastic import ElasticLoraLinear, SuperNet
from shears.errors import ShearsError
from shears.search_space import SearchSpace, load_search_space

PHI3_SPACE = {
    "target_modules": ["qkv_proj", "gate_up_proj", "down_proj"], "r_max": 16, "lora_alpha": 32, "lora_dropout": 0.1,
    "groups": [{"name": "attn", "modules": ["qkv_proj"], "choices": [16, 8, 4]},
               {"name": "mlp", "modules": ["gate_up_proj", "down_proj"], "choices": [16, 12, 8]}]}
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def space_for(arch):
    return SearchSpace.from_dict(PHI3_SPACE) if arch == "phi3" else load_search_space("llama-all")


def randomize_adapters(peft_model, seed=1):
    """Training leaves B non-zero; PEFT initialises it to zero, which would hide every slicing bug."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def make_net(arch="llama", sparse=False, seed=0, space=None):
    base = make_tiny_model(arch, seed=seed)
    if sparse:
        prune_half(base)
    net = SuperNet.from_base(base, space or space_for(arch), sparse_adapter=sparse)
    randomize_adapters(net.model)
    net.model.eval()
    return net


def prune_half(model):
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight.mul_(torch.rand(module.weight.shape, generator=gen) > 0.5)


def stock_lora_of(net, config, arch, seed=0, sparse=False):
    """A plain get_peft_model LoRA with the config's per-module ranks and the slices copied in by hand."""
    base = make_tiny_model(arch, seed=seed)
    if sparse:
        prune_half(base)
    space = net.space.space
    ranks = net.space.module_ranks(config)
    lora = LoraConfig(r=space.r_max, lora_alpha=space.lora_alpha, target_modules=list(ranks),
                      rank_pattern=ranks,
                      alpha_pattern={n: space.lora_alpha * r / space.r_max for n, r in ranks.items()})
    ref = get_peft_model(base, lora).eval()
    with torch.no_grad():
        for name, r in ranks.items():
            ours, theirs = net.layers[name], ref.get_base_model().get_submodule(name)
            assert type(theirs).__name__ == "Linear" and theirs.r["default"] == r
            theirs.lora_A["default"].weight.copy_(ours.lora_A["default"].weight[:r, :])
            theirs.lora_B["default"].weight.copy_(ours.lora_B["default"].weight[:, :r])
    return ref


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma3", "phi3"])
def test_active_subnet_equals_stock_peft_lora(arch):
    net = make_net(arch)
    assert all(isinstance(layer, ElasticLoraLinear) for layer in net.layers.values())
    rng = np.random.default_rng(0)
    for config in (net.minimal(), net.sample(rng), net.sample(rng), net.maximal()):
        net.activate(config)
        torch.testing.assert_close(logits(net.model), logits(stock_lora_of(net, config, arch)), rtol=0, atol=1e-5)


def test_subnets_differ_and_base_is_untouched():
    net = make_net()
    outs = {}
    for config in (net.minimal(), net.maximal()):
        net.activate(config)
        outs[config["qkv.0"]] = logits(net.model)
    assert (outs[16] - outs[32]).abs().max() > 1e-3
    with net.model.disable_adapter():
        torch.testing.assert_close(logits(net.model), logits(make_tiny_model("llama")), rtol=0, atol=1e-6)


def test_subnet_state_dict_is_a_stock_adapter_with_alpha_pattern():
    net = make_net()
    config = net.sample(np.random.default_rng(4))
    net.activate(config)
    tensors = net.subnet_state_dict(config)
    ranks = net.space.module_ranks(config)
    assert sum(t.numel() for t in tensors.values()) == net.adapter_params(config)
    for key, tensor in tensors.items():
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        full = net.layers[module].lora_A["default"].weight if ".lora_A." in key else \
            net.layers[module].lora_B["default"].weight
        expected = full[: ranks[module]] if ".lora_A." in key else full[:, : ranks[module]]
        assert torch.equal(tensor, expected) and tensor.data_ptr() != full.data_ptr()
    # load them, through PEFT's own loader, into a fresh stock LoRA of the same ranks
    ref = stock_lora_of(net, config, "llama")
    randomize_adapters(ref, seed=9)  # scramble what the helper copied in
    result = set_peft_model_state_dict(ref, tensors)
    assert not result.unexpected_keys
    torch.testing.assert_close(logits(ref), logits(net.model), rtol=0, atol=1e-5)


def test_compute_falls_with_rank():
    net = make_net()
    flops = {}
    for name, config in (("max", net.maximal()), ("min", net.minimal())):
        net.activate(config)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            net.model(input_ids=IDS)
        flops[name] = counter.get_total_flops()
    tokens = IDS.numel()
    saved = sum((32 - 16) * (layer.in_features + layer.out_features) for layer in net.layers.values())
    assert flops["max"] - flops["min"] == 2 * tokens * saved


def test_switching_configs_copies_no_weights():
    net = make_net()
    params = {n: (p, p.data_ptr(), p.detach().clone()) for n, p in net.model.named_parameters()}
    rng = np.random.default_rng(1)
    for _ in range(5):
        net.activate(net.sample(rng))
        logits(net.model)
    for name, param in net.model.named_parameters():
        same, ptr, value = params[name]
        assert param is same and param.data_ptr() == ptr and torch.equal(param, value)


def test_activate_validates_and_reports_active_config():
    net = make_net()
    config = net.heuristic()
    net.activate(config)
    assert net.active_config == config and net.layers["model.layers.0.mlp.up_proj"].active_rank == 24
    with pytest.raises(ShearsError, match="unknown"):
        net.activate({**config, "nope.0": 16})
    with pytest.raises(ShearsError, match="missing"):
        net.activate({k: v for k, v in config.items() if k != "qkv.1"})
    with pytest.raises(ShearsError, match="choose one of"):
        net.activate({**config, "qkv.1": 20})
    assert net.active_config == config  # a refused config changes nothing


def test_sample_is_deterministic_given_rng_state():
    net = make_net()
    a, b = np.random.default_rng(123), np.random.default_rng(123)
    assert [net.sample(a) for _ in range(4)] == [net.sample(b) for _ in range(4)]


# ----------------------------------------------------------------------------- training


def test_gradients_reach_only_the_active_slice():
    net = make_net()
    net.model.train()
    config = net.sample(np.random.default_rng(2))
    net.activate(config)
    out = net.model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    ranks = net.space.module_ranks(config)
    for name, layer in net.layers.items():
        r = ranks[name]
        grad_a, grad_b = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
        assert grad_a[:r].abs().sum() > 0 and grad_b[:, :r].abs().sum() > 0
        assert torch.count_nonzero(grad_a[r:]) == 0 and torch.count_nonzero(grad_b[:, r:]) == 0
    for name, param in net.model.named_parameters():
        if "lora_" not in name:
            assert not param.requires_grad and param.grad is None, name


def test_dropout_is_applied_to_the_adapter_input_only():
    net = make_net()
    layer = net.layers["model.layers.0.mlp.up_proj"]
    layer.set_active_rank(24)
    layer.train()
    x = torch.randn(3, 5, 32)
    torch.manual_seed(11)
    out = layer(x)
    torch.manual_seed(11)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.get_base_layer()(x) + F.dropout(x, 0.1, True) @ a[:24].T @ b[:, :24].T * (64 / 32)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- merging


def test_merge_of_active_subnet_equals_unmerged_forward():
    net = make_net()
    base_weight = net.layers["model.layers.1.self_attn.v_proj"].get_base_layer().weight.detach().clone()
    config = net.sample(np.random.default_rng(5))
    net.activate(config)
    unmerged = logits(net.model)
    net.model.merge_adapter()
    torch.testing.assert_close(logits(net.model), unmerged, rtol=0, atol=1e-5)
    with pytest.raises(ShearsError, match="unmerge"):
        net.activate(net.maximal())
    net.model.unmerge_adapter()
    torch.testing.assert_close(net.layers["model.layers.1.self_attn.v_proj"].get_base_layer().weight,
                               base_weight, rtol=0, atol=1e-6)
    merged_model = net.model.merge_and_unload()
    assert not any("lora_" in n for n, _ in merged_model.named_parameters())
    torch.testing.assert_close(logits(merged_model), unmerged, rtol=0, atol=1e-5)


def test_mixed_adapter_batches_are_refused_below_full_rank():
    net = make_net()
    net.activate(net.minimal())
    with pytest.raises(ShearsError, match="maximal"):
        net.model(input_ids=IDS, adapter_names=["default", "default"])
    net.activate(net.maximal())
    torch.testing.assert_close(net.model(input_ids=IDS, adapter_names=["default", "default"]).logits,
                               logits(net.model), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- SparsePEFT


def masked_reference(net, config, arch="llama"):
    """The base model with W + scaling * (B[:, :r] A[:r]) * (W != 0) written into every adapted weight."""
    base = make_tiny_model(arch)
    prune_half(base)
    scaling = net.space.space.lora_alpha / net.space.r_max
    with torch.no_grad():
        for name, r in net.space.module_ranks(config).items():
            layer, weight = net.layers[name], base.get_submodule(name).weight
            delta = layer.lora_B["default"].weight[:, :r] @ layer.lora_A["default"].weight[:r]
            weight += scaling * delta * (weight != 0)
    return base


def test_sparse_adapter_forward_equals_masked_dense_and_merge_keeps_sparsity():
    net = make_net(sparse=True)
    config = net.sample(np.random.default_rng(6))
    net.activate(config)
    sparse_logits = logits(net.model)
    torch.testing.assert_close(sparse_logits, logits(masked_reference(net, config)), rtol=0, atol=1e-5)
    assert (sparse_logits - logits(stock_lora_of(net, config, "llama", sparse=True))).abs().max() > 1e-4
    zero_before = {n: layer.get_base_layer().weight == 0 for n, layer in net.layers.items()}
    assert all(0.3 < z.float().mean() < 0.7 for z in zero_before.values())
    merged = net.model.merge_and_unload()
    for name, zeros in zero_before.items():
        assert torch.equal(merged.get_submodule(name).weight == 0, zeros), name
    torch.testing.assert_close(logits(merged), sparse_logits, rtol=0, atol=1e-5)


def test_sparse_adapter_with_active_dropout():
    net = make_net(sparse=True)
    layer = net.layers["model.layers.0.mlp.down_proj"]
    layer.set_active_rank(16)
    layer.train()
    x = torch.randn(3, 5, 64)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    w = layer.get_base_layer().weight
    delta = (layer.lora_B["default"].weight[:, :16] @ layer.lora_A["default"].weight[:16]) * (w != 0) * 2.0
    expected = x @ w.T + F.dropout(x, 0.1, True) @ delta.T
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    out.sum().backward()
    assert torch.count_nonzero(layer.lora_A["default"].weight.grad[16:]) == 0


def test_sparse_mask_is_not_saved():
    net = make_net(sparse=True)
    assert not any("sparse_mask" in k for k in net.model.state_dict())


# ----------------------------------------------------------------------------- save / load


def test_save_is_a_stock_adapter_of_the_maximal_subnet(tmp_path):
    net = make_net()
    net.activate(net.minimal())  # saving does not depend on the active subnet
    folder = net.save(tmp_path / "supernet")
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("README")) == [
        "adapter_config.json", "adapter_model.safetensors", "search_space.json", "shears.json"]
    assert not list(tmp_path.glob(".*"))  # no temp folder left behind
    config_text = (folder / "adapter_config.json").read_text().lower()
    for ours in ("elastic", "shears", "custom", "sparse"):
        assert ours not in config_text
    adapter_config = json.loads(config_text)
    assert adapter_config["r"] == 32 and adapter_config["rank_pattern"] == {} and adapter_config["lora_alpha"] == 64
    assert set(load_file(folder / "adapter_model.safetensors")) == set(net.subnet_state_dict(net.maximal()))
    stock = PeftModel.from_pretrained(make_tiny_model("llama"), folder).eval()
    assert not any(isinstance(m, ElasticLoraLinear) for m in stock.modules())
    net.activate(net.maximal())
    torch.testing.assert_close(logits(stock), logits(net.model), rtol=0, atol=1e-5)
    meta = json.loads((folder / "shears.json").read_text())
    assert meta["fingerprint"] == net.fingerprint and meta["sparse_adapter"] is False
    assert "r_max" in meta["scaling"]


@pytest.mark.parametrize("sparse", [False, True])
def test_save_load_round_trip(tmp_path, sparse):
    net = make_net(sparse=sparse)
    folder = net.save(tmp_path / "supernet")
    base = make_tiny_model("llama")
    if sparse:
        prune_half(base)
    loaded = SuperNet.load(folder, base)
    assert loaded.space == net.space and loaded.sparse_adapter is sparse
    assert loaded.active_config == net.maximal()
    config = net.sample(np.random.default_rng(8))
    net.activate(config)
    loaded.activate(config)
    torch.testing.assert_close(logits(loaded.model.eval()), logits(net.model), rtol=0, atol=1e-6)


def test_save_refuses_to_overwrite(tmp_path):
    net = make_net()
    folder = net.save(tmp_path / "supernet")
    with pytest.raises(ShearsError, match="already exists"):
        net.save(folder)
    randomize_adapters(net.model, seed=3)
    net.save(folder, force=True)
    assert SuperNet.load(folder, make_tiny_model("llama")).fingerprint == net.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["supernet"]


def test_load_refuses_another_base(tmp_path):
    folder = make_net().save(tmp_path / "supernet")
    with pytest.raises(ShearsError, match="fingerprint") as info:
        SuperNet.load(folder, make_tiny_model("llama", intermediate_size=48))
    assert "\n" not in str(info.value)
    with pytest.raises(ShearsError, match="not a shears super-network"):
        SuperNet.load(tmp_path, make_tiny_model("llama"))


def test_from_base_refuses_a_peft_model_and_a_foreign_binding():
    net = make_net()
    with pytest.raises(ShearsError, match="plain base model"):
        SuperNet.from_base(net.model, "llama")
    bound_elsewhere = load_search_space("llama").bind(make_tiny_model("llama", num_hidden_layers=3))
    with pytest.raises(ShearsError, match="another model"):
        SuperNet.from_base(make_tiny_model("llama"), bound_elsewhere)


@pytest.mark.parametrize("sparse", [False, True])
def test_under_autocast_a_small_update_is_added_in_fp32_not_rounded_away(sparse):
    """The base output arrives in bf16, on bf16's grid; an update below half its spacing added in bf16
    rounds back to the base output, so early training would not see its own steps."""
    net = make_net("llama", sparse=sparse)
    net.activate(net.maximal())
    layer = next(m for m in net.model.modules() if isinstance(m, ElasticLoraLinear))
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(1e-6)  # a tiny B, as after a first optimizer step
    layer.lora_dropout["default"] = torch.nn.Dropout(0.0)  # deterministic, and SparsePEFT's unmerged path
    layer.train()
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        base = layer.base_layer(x)
        if sparse:
            update = F.linear(x, layer.get_delta_weight("default"))
        else:
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            update = F.linear(F.linear(x, A), B) * layer.scaling["default"]
    assert base.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert ((base + update) == base).float().mean() > 0.5  # a bf16 sum: most of the update lost
    torch.testing.assert_close(out, base.float() + update.float(), rtol=1e-6, atol=1e-9)
    with torch.no_grad():
        assert layer(x).dtype == torch.float32  # outside autocast: the base layer's dtype, as in PEFT
