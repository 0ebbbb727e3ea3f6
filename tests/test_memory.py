"""Memory: no stage upcasts a bf16 base; the plan counts a model without loading it and refuses a recipe
that cannot fit, before writing anything."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer, one_line_error
from safetensors import safe_open
from torch import nn

from shears.elastic import ElasticLoraLinear
from shears.recipe import load_recipe
from shears.search_space import SearchSpace
from test_train_supernet import tiny_recipe


def folder_dtypes(folder: Path) -> set[str]:
    """The dtype of every tensor in a folder's safetensors files, read from their headers."""
    dtypes = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            dtypes |= {f.get_slice(key).get_dtype() for key in f.keys()}
    return dtypes


class ParameterDtypes:
    """Every module that runs a forward, with its own parameters' dtypes at that moment (a global forward
    pre-hook, public torch API). LoRA factors are kept apart: PEFT holds adapters in float32 by design."""

    def __init__(self):
        self.calls: list[tuple[nn.Module, set[torch.dtype]]] = []

    def __enter__(self):
        def record(module, args):
            self.calls.append((module, {p.dtype for p in module.parameters(recurse=False)}))

        self.handle = nn.modules.module.register_module_forward_pre_hook(record)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def base_dtypes(self) -> set[torch.dtype]:
        lora = {id(m) for module, _ in self.calls if isinstance(module, ElasticLoraLinear)
                for m in (*module.lora_A.values(), *module.lora_B.values())}
        return set().union(*(dtypes for module, dtypes in self.calls if id(module) not in lora))


def test_no_stage_upcasts_a_bf16_base(tmp_path):
    from shears.export import main as export
    from shears.run import load_run
    from shears.search import main as search
    from shears.sparsity import prune_to_folder
    from shears.train_supernet import train_supernet

    model_dir = tmp_path / "tiny-bf16"
    make_tiny_model("llama", max_position_embeddings=512).to(torch.bfloat16).save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    assert folder_dtypes(model_dir) == {"BF16"}
    overrides = {"dtype": "bfloat16", "sparsity.sparsity": 0.5, "sparsity.nsamples": 2, "sparsity.seqlen": 64,
                 "training.max_steps": 2, "evaluation.max_new_tokens": 4, "evaluation.batch_size": 2}
    recipe = load_recipe(tiny_recipe(model_dir, tmp_path), overrides)
    run = tmp_path / "run"

    # pruning, as train_supernet runs it (the calibration forward), and what it writes
    with ParameterDtypes() as pruning:
        prune_to_folder(recipe.model, tmp_path / "pruned", recipe.sparsity, dtype=recipe.dtype)
    assert pruning.calls and pruning.base_dtypes() == {torch.bfloat16}
    assert folder_dtypes(tmp_path / "pruned") == {"BF16"}

    with ParameterDtypes() as training:  # prunes into RUN/sparse_base, then trains on it
        train_supernet(recipe, run)
    assert training.base_dtypes() == {torch.bfloat16}
    assert folder_dtypes(run / "sparse_base") == {"BF16"}

    with ParameterDtypes() as searching:
        search(["--run", str(run), "--budget", "2", "--no-warm-start", "--eval-limit", "2", "--no-progress"])
    assert searching.calls and searching.base_dtypes() == {torch.bfloat16}

    export(["--run", str(run), "--subnet", "heuristic", "--output", str(tmp_path / "plain")])
    export(["--run", str(run), "--subnet", "heuristic", "--merge", "--output", str(tmp_path / "merged")])
    assert folder_dtypes(tmp_path / "merged" / "heuristic" / "merged") == {"BF16"}
    loaded = load_run(run)  # what the export and the search load the base as
    assert {p.dtype for n, p in loaded.supernet.model.named_parameters() if "lora_" not in n} == {torch.bfloat16}


# --------------------------------------------------------------------------- no whole-model mask

def test_a_sparse_adapter_reads_its_mask_from_the_weights_when_it_uses_it():
    from shears.elastic import SuperNet, lora_delta
    from test_train_supernet import TINY_SPACE

    model = make_tiny_model("llama")
    net = SuperNet.from_base(model, SearchSpace.from_dict(TINY_SPACE), sparse_adapter=True)
    assert not [b for b in net.model.buffers() if b.dtype == torch.bool]  # no mask is stored
    layer = net.layers["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        weight = layer.get_base_layer().weight
        weight[:, ::3] = 0  # zeros that appear after wrapping: the update must follow them
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = (B @ A) * layer.scaling["default"] * (weight != 0)
    torch.testing.assert_close(layer.get_delta_weight("default"), expected)
    assert torch.equal(lora_delta(A, B, layer.scaling["default"], weight != 0) == 0, expected == 0)


def test_wanda_returns_masks_only_when_asked_and_prunes_alike():
    from shears.sparsity import wanda_prune
    from test_sparsity import calibration, tiny

    ids = calibration()
    asked, unasked = tiny("llama"), tiny("llama")
    masks = wanda_prune(asked, ids, sparsity=0.5)
    assert wanda_prune(unasked, ids, sparsity=0.5, return_masks=False) is None
    assert all(torch.equal(a, b) for a, b in zip(asked.state_dict().values(), unasked.state_dict().values()))
    for name, keep in masks.items():  # the zeros are the mask
        assert torch.equal(unasked.get_submodule(name).weight != 0, keep), name


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 0.97])
def test_the_selection_prunes_what_a_stable_sort_prunes_ties_included(fraction):
    from shears.sparsity import keep_mask

    scores = torch.randint(0, 4, (16, 37), generator=torch.Generator().manual_seed(1)).float()  # many ties
    keep = keep_mask(scores, fraction, None)
    n = int(37 * fraction)
    for row, kept in zip(scores.tolist(), keep):
        pruned = sorted(range(37), key=lambda j: (row[j], j))[:n]  # lowest score first, then lowest index
        assert [j for j in range(37) if not kept[j]] == sorted(pruned)


# --------------------------------------------------------------------------- merging a shard at a time

def test_merged_export_written_in_shards_loads_as_the_one_file_merge(tmp_path):
    from transformers import AutoModelForCausalLM

    from shears.export import subnet_factors, stream_merged
    from shears.run import load_run
    from shears.train_supernet import train_supernet

    model_dir = tmp_path / "tiny-tied"
    make_tiny_model("llama", max_position_embeddings=512, tie_word_embeddings=True).save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    recipe = load_recipe(tiny_recipe(model_dir, tmp_path), {"training.max_steps": 1})
    train_supernet(recipe, tmp_path / "run")
    run = load_run(tmp_path / "run")
    net = run.supernet
    config = net.heuristic()
    for layer in net.layers.values():
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_()  # an update that shows in every merged matrix
    base_before = {k: v.clone() for k, v in net.model.get_base_model().state_dict().items()}
    factors = subnet_factors(net, config)
    scale = net.space.space.lora_alpha / net.space.r_max
    one = stream_merged(tmp_path / "one", net, factors, scale, run.tokenizer)
    sharded = stream_merged(tmp_path / "sharded", net, factors, scale, run.tokenizer, shard_bytes=4096)
    assert [p.name for p in (tmp_path / "one").glob("*.safetensors")] == ["model.safetensors"]
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file() and one == sharded
    for key, value in net.model.get_base_model().state_dict().items():  # the base serves the next subnet
        assert torch.equal(value, base_before[key]), key

    a = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").state_dict()
    base = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert a.keys() == b.keys() == base.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
        module = key.removesuffix(".weight")
        if module in factors:  # W + scale * B A, in float64, rounded once
            A, B = factors[module]
            expected = (base[key].double() + scale * (B.double() @ A.double())).to(base[key].dtype)
            assert torch.equal(a[key], expected), key
        else:
            assert torch.equal(a[key], base[key]), key
    assert a["lm_head.weight"].data_ptr() == a["model.embed_tokens.weight"].data_ptr()  # still tied


# --------------------------------------------------------------------------- the plan

def test_memory_sizes_parse_with_their_units():
    from shears.errors import ShearsError
    from shears.memory import parse_memory

    assert parse_memory("24GiB") == 24 * 2 ** 30 and parse_memory("24 GB") == 24 * 10 ** 9
    assert parse_memory("512mib") == 512 * 2 ** 20 and parse_memory("1.5TB") == 1.5e12
    one_line_error(lambda: parse_memory("24"), "24GiB")
    with pytest.raises(ShearsError):
        parse_memory("lots")


def test_the_plan_counts_the_model_and_its_adapter_without_loading_them(tiny_model_dir, tmp_path):
    from shears.elastic import SuperNet
    from shears.memory import count_model
    from test_train_supernet import TINY_SPACE

    recipe = load_recipe(tiny_recipe(tiny_model_dir, tmp_path))
    count = count_model(recipe)
    model = make_tiny_model("llama", max_position_embeddings=512)
    assert count.params == sum(p.numel() for p in model.parameters())
    assert count.layers == 2 and count.hidden == 32 and count.vocab == 128 and count.stored_dtype == "float32"
    net = SuperNet.from_base(model, SearchSpace.from_dict(TINY_SPACE))
    lora = [p for n, p in net.model.named_parameters() if "lora_" in n]
    assert count.adapter_params == sum(p.numel() for p in lora)  # at r_max: the trained parameters
    assert count.largest_adapted == max(net.layers[n].get_base_layer().weight.numel() for n in net.layers)


def plan_totals(recipe, stage: str, **changes) -> float:
    from shears.memory import _with, count_model, estimate

    changed = _with(recipe, changes)
    return next(n for n in estimate(changed, count_model(changed)) if n.stage == stage).total


def test_plan_prints_every_stage_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    from shears.memory import STAGES
    from shears.train_supernet import main

    recipe = tiny_recipe(tiny_model_dir, tmp_path)
    main(["--recipe", str(recipe), "--plan", "sparsity.sparsity=0.5", "quantization.scheme=q8_0",
          "--device-memory", "24GiB"])
    out = capsys.readouterr().out
    for stage in STAGES:
        assert f"  {stage} " in out, stage
    assert "24.0 GiB" in out and "given" in out
    assert not (tmp_path / "run").exists()


def test_a_recipe_that_cannot_fit_is_refused_naming_the_setting_and_nothing_is_written(tmp_path, capsys):
    from shears.train_supernet import main

    deep = tmp_path / "tiny-deep"  # deep enough for gradient checkpointing to save memory
    make_tiny_model("llama", num_hidden_layers=8, max_position_embeddings=512).save_pretrained(deep)
    make_tiny_tokenizer().save_pretrained(deep)
    path = tiny_recipe(deep, tmp_path)
    big = {"training.per_device_train_batch_size": 64, "data.cutoff_len": 512}
    recipe = load_recipe(path, big)
    fp32 = plan_totals(recipe, "train")
    bf16 = plan_totals(recipe, "train", dtype="bfloat16")
    checkpointed = plan_totals(recipe, "train", **{"training.gradient_checkpointing": True})
    assert bf16 < fp32 and checkpointed < fp32
    overrides = [f"{k}={v}" for k, v in big.items()]

    def refused(memory: float, *parts):
        with pytest.raises(SystemExit):
            main(["--recipe", str(path), *overrides, "--device-memory", f"{int(memory)}B"])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and all(part in lines[0] for part in parts), lines
        assert not (tmp_path / "run").exists()

    refused((fp32 + max(bf16, checkpointed)) / 2, "train needs", "float32", "dtype: bfloat16")
    both = plan_totals(recipe, "train", dtype="bfloat16", **{"training.gradient_checkpointing": True})
    assert both < min(bf16, checkpointed)
    refused((both + min(bf16, checkpointed)) / 2, "dtype: bfloat16", "gradient_checkpointing: true")
    refused(1e6, "more memory or a smaller model")
