"""Wanda / magnitude pruning against a plain reference written here.

The reference prunes a deep copy block by block: for block i it runs the *whole model* (whose
blocks < i are already pruned) on every calibration sample with hooks on block i's linears, so
it shares none of shears.sparsity's capture/replay machinery, and picks each row's lowest scores
with a Python sort.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from conftest import ARCHITECTURES, make_tiny_model
from torch import nn
from transformers import AutoModelForCausalLM, Cache, PreTrainedTokenizerFast

from shears import data, sparsity
from shears.errors import ShearsError
from shears.recipe import SparsityConfig
from shears.sparsity import (capture_block_inputs, prune_to_folder, run_block, save_pruned, sparsity_report,
                             wanda_prune)

SEQLEN = 24  # longer than the gemma3 sliding window (16), so sliding and global layers differ


def tiny(arch: str, seed: int = 0) -> nn.Module:
    """A tiny model; gemma3 gets one sliding and one global layer (different masks and rotary tables)."""
    extra = {"layer_types": ["sliding_attention", "full_attention"]} if arch == "gemma3" else {}
    return make_tiny_model(arch, seed=seed, **extra)


def calibration(nsamples: int = 4, seqlen: int = SEQLEN, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (ids < 128, matching the tiny models' vocab)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def save_tiny_model(folder, arch: str = "llama"):
    """A tiny model + tokenizer saved as an ordinary HF folder; returns the folder."""
    tiny(arch).save_pretrained(folder, safe_serialization=True)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- the reference

def block_linears(model, i: int) -> dict[str, nn.Linear]:
    return {f"model.layers.{i}.{name}": module for name, module in model.model.layers[i].named_modules()
            if isinstance(module, nn.Linear)}


def reference_keep(score: torch.Tensor, fraction: float, nm=None) -> torch.Tensor:
    """True = kept: in each group (a row, or M consecutive columns of a row) drop the lowest scores."""
    rows, cols = score.shape
    values = score.tolist()
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for r in range(rows):
        if nm is None:
            groups, n_pruned = [range(cols)], math.floor(cols * fraction)
        else:
            n_pruned, m = nm
            groups = [range(start, start + m) for start in range(0, cols, m)]
        for group in groups:
            for j in sorted(group, key=lambda j: (values[r][j], j))[:n_pruned]:
                keep[r, j] = False
    return keep


def squared_input_norms(model, ids, linears, bf16: bool = False) -> dict[str, torch.Tensor]:
    """sum over all calibration tokens of X_j^2 for each linear's input, via full-model forwards
    (each its own autocast region under `bf16`, so no cast is carried from one forward to the next)."""
    sums = {name: torch.zeros(m.in_features) for name, m in linears.items()}

    def hook(name):
        def add(module, inputs, output):
            sums[name].add_(inputs[0].reshape(-1, module.in_features).float().pow(2).sum(0))
        return add

    handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
    with torch.no_grad():
        for row in ids:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(input_ids=row[None], use_cache=False)
    for handle in handles:
        handle.remove()
    return sums


def reference_wanda(model, ids, fraction, nm=None, sequential=True, bf16=False) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model)
    n_blocks = len(model.model.layers)
    stages = [[i] for i in range(n_blocks)] if sequential else [list(range(n_blocks))]
    masks = {}
    for blocks in stages:
        linears = {k: v for i in blocks for k, v in block_linears(model, i).items()}
        norms = squared_input_norms(model, ids, linears, bf16)  # the model's blocks before these are pruned
        for name, linear in linears.items():
            keep = reference_keep(linear.weight.detach().abs() * norms[name].sqrt(), fraction, nm)
            linear.weight.data[~keep] = 0
            masks[name] = keep
    return masks


# --------------------------------------------------------------------------- masks equal the reference

@pytest.mark.parametrize("pattern,nm", [("unstructured", None), ("2:4", (2, 4))])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_wanda_masks_equal_reference(arch, pattern, nm):
    model = tiny(arch)
    ids = calibration()
    expected = reference_wanda(model, ids, 0.5, nm)
    masks = wanda_prune(model, ids, sparsity=0.5, pattern=pattern)
    assert masks.keys() == expected.keys()
    for name, keep in expected.items():
        assert torch.equal(masks[name], keep), name


def test_blocks_are_scored_on_pruned_predecessors():
    model = tiny("llama")
    ids = calibration()
    sequential = reference_wanda(model, ids, 0.5)
    one_shot = reference_wanda(model, ids, 0.5, sequential=False)  # every block scored on unpruned inputs
    masks = wanda_prune(model, ids, sparsity=0.5)
    block1 = [name for name in masks if name.startswith("model.layers.1.")]
    assert all(torch.equal(masks[n], one_shot[n]) for n in masks if n.startswith("model.layers.0."))
    assert any(not torch.equal(sequential[n], one_shot[n]) for n in block1)  # the test can tell them apart
    assert all(torch.equal(masks[n], sequential[n]) for n in block1)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_bf16_calibration_agrees_with_fp32_masks_and_accumulates_in_fp32(arch):
    from shears.precision import native_bf16

    if not native_bf16("cpu"):
        pytest.skip("this CPU has no native bf16 (avx512_bf16 / amx_bf16)")
    ids = calibration()
    fp32 = wanda_prune(tiny(arch), ids, sparsity=0.5)
    model = tiny(arch)
    seen = []  # the dtype each linear's input arrives in under autocast
    for block in target_linears_of(model):
        block.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    bf16 = wanda_prune(model, ids, sparsity=0.5, bf16=True)
    assert torch.bfloat16 in seen  # the forward really ran in bf16
    for name, keep in fp32.items():
        agree = (bf16[name] == keep).float().mean().item()
        assert agree >= 0.9, (name, agree)  # rounding swaps only near-tied weights (32-wide rows here; bench_prune: real)
        assert bf16[name].sum() == keep.sum()  # the same count kept per matrix


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_bf16_calibration_equals_the_reference_run_in_bf16(arch):
    """Each block is scored on what the *pruned* blocks before it output in bf16. (Autocast caches its
    bf16 copy of a weight that requires grad for as long as the autocast region lasts, so pruning inside
    one region left the next block's inputs computed with the unpruned copies.)"""
    from shears.precision import native_bf16

    if not native_bf16("cpu"):
        pytest.skip("this CPU has no native bf16 (avx512_bf16 / amx_bf16)")
    model, ids = tiny(arch), calibration()
    assert all(p.requires_grad for p in model.parameters())  # as loaded: the weights autocast would cache
    expected = reference_wanda(model, ids, 0.5, bf16=True)
    masks = wanda_prune(model, ids, sparsity=0.5, bf16=True)
    for name, keep in expected.items():
        agree = (masks[name] == keep).float().mean().item()
        assert agree >= 0.999, (name, agree)


def target_linears_of(model):
    return [linear for i in range(len(model.model.layers)) for linear in block_linears(model, i).values()]


def test_magnitude_masks_equal_reference_without_calibration():
    model = tiny("qwen2")
    expected = {name: reference_keep(linear.weight.detach().abs(), 0.5)
                for i in range(2) for name, linear in block_linears(model, i).items()}
    masks = wanda_prune(model, None, sparsity=0.5, method="magnitude")
    assert masks.keys() == expected.keys()
    assert all(torch.equal(masks[n], expected[n]) for n in masks)


def test_batched_calibration_gives_the_same_masks():
    ids = calibration(nsamples=4)
    one = wanda_prune(tiny("mistral"), ids, sparsity=0.5, batch_size=1)
    two = wanda_prune(tiny("mistral"), ids, sparsity=0.5, batch_size=2)
    assert all(torch.equal(one[n], two[n]) for n in one)


# --------------------------------------------------------------------------- structure of the result

@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_exact_per_row_counts_and_zeroing(fraction):
    model = tiny("phi3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = wanda_prune(model, calibration(), sparsity=fraction)
    after = model.state_dict()
    for name, keep in masks.items():
        cols = keep.shape[1]
        assert (keep.sum(dim=1) == cols - math.floor(cols * fraction)).all(), name
        weight, original = after[f"{name}.weight"], before[f"{name}.weight"]
        assert torch.equal(weight[keep], original[keep])  # kept weights are bit-identical
        assert (weight[~keep] == 0).all()


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_n_m_structure(pattern, method):
    n, m = map(int, pattern.split(":"))
    model = tiny("gemma3")
    masks = wanda_prune(model, calibration(), sparsity=n / m, pattern=pattern, method=method)
    for name, keep in masks.items():
        rows, cols = keep.shape
        assert (keep.reshape(rows, cols // m, m).sum(dim=-1) == m - n).all(), name
        assert (model.get_submodule(name).weight[~keep] == 0).all()


def test_only_block_linears_change_and_exclude_is_respected():
    model = tiny("qwen2")  # q/k/v biases: must stay untouched too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = wanda_prune(model, calibration(), sparsity=0.5, exclude=["*.mlp.down_proj", "model.layers.1.self_attn.q_*"])
    assert "model.layers.0.mlp.down_proj" not in masks and "model.layers.1.self_attn.q_proj" not in masks
    assert "model.layers.0.self_attn.q_proj" in masks
    pruned = {f"{name}.weight" for name in masks}
    for key, value in model.state_dict().items():
        if key not in pruned:
            assert torch.equal(value, before[key]), key
    assert len(pruned) == 14 - 3


def test_no_kv_cache_reaches_any_block():
    model = tiny("gemma3")
    seen = []

    def spy(module, args, kwargs):
        seen.append([k for k, v in kwargs.items()
                     if isinstance(v, Cache) or (k in ("past_key_values", "past_key_value") and v is not None)])

    for block in model.model.layers:
        block.register_forward_pre_hook(spy, with_kwargs=True)
    wanda_prune(model, calibration(nsamples=2), sparsity=0.5)
    assert len(seen) == 2 * 2 + 2 * 2 * 2  # capture reaches both blocks + 2 runs per block, 2 samples each
    assert all(cache == [] for cache in seen)


def test_capture_replays_each_blocks_own_arguments():
    model = tiny("gemma3")
    ids = calibration(nsamples=1)
    _, blocks = sparsity.decoder_layers(model)
    with torch.no_grad():
        hidden, received = capture_block_inputs(model, blocks, [ids])
        expected = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        # the sliding layer and the global layer get different masks and rotary tables
        masks = [received[i][0].kwargs["attention_mask"] for i in (0, 1)]
        assert (masks[0] is None) != (masks[1] is None) or not torch.equal(*masks)
        assert not torch.equal(received[0][0].kwargs["position_embeddings"][0],
                               received[1][0].kwargs["position_embeddings"][0])
        torch.testing.assert_close(hidden[0], expected[0])
        hidden = run_block(blocks[0], hidden, received[0])
        torch.testing.assert_close(hidden[0], expected[1])
        hidden = run_block(blocks[1], hidden, received[1])
        torch.testing.assert_close(model.model.norm(hidden[0]), expected[2])


def test_sparsity_report_counts_zeros():
    model = tiny("llama")
    linear = model.model.layers[1].mlp.up_proj
    linear.weight.data[:, :16] = 0  # 16 of 32 columns
    report = sparsity_report(model)
    assert report["modules"]["model.layers.1.mlp.up_proj"] == 0.5
    assert report["modules"]["model.layers.0.mlp.up_proj"] == 0.0
    total = sum(m.weight.numel() for i in range(2) for m in block_linears(model, i).values())
    assert report["params"] == total and report["zeros"] == 64 * 16
    assert report["total"] == 64 * 16 / total
    assert report["layers"]["0"] == 0.0 and report["layers"]["1"] > 0


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs,message", [
    (dict(sparsity=1.0), "sparsity must be in"),
    (dict(sparsity=-0.1), "sparsity must be in"),
    (dict(pattern="4:2"), "bad sparsity pattern"),
    (dict(pattern="2-4"), "bad sparsity pattern"),
    (dict(pattern="2:4", sparsity=0.3), "pass --sparsity 0.5"),
    (dict(pattern="2:5", sparsity=0.4), "divisible by 5"),
    (dict(method="obs"), "unknown pruning method"),
    (dict(exclude=["*.no_such_proj"]), "match no linear"),
    (dict(exclude=["*"]), "every decoder-block linear is excluded"),
])
def test_bad_settings_raise_one_line_errors(kwargs, message):
    model = tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ShearsError, match=message) as info:
        wanda_prune(model, calibration(), **{"sparsity": 0.5, **kwargs})
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-pruned


@pytest.mark.parametrize("ids", [None, torch.empty(0, 8, dtype=torch.long), torch.ones(8, dtype=torch.long)])
def test_empty_or_malformed_calibration_raises(ids):
    with pytest.raises(ShearsError, match="calibration set is empty"):
        wanda_prune(tiny("llama"), ids, sparsity=0.5)


def test_calibration_longer_than_the_model_raises():
    with pytest.raises(ShearsError, match="max_position_embeddings"):
        wanda_prune(tiny("llama"), calibration(nsamples=1, seqlen=300), sparsity=0.5)


def test_model_without_decoder_blocks_raises():
    with pytest.raises(ShearsError, match="no decoder blocks"):
        wanda_prune(nn.Sequential(nn.Linear(4, 4)), calibration(), sparsity=0.5)


# --------------------------------------------------------------------------- writing folders

def test_save_pruned_is_an_ordinary_hf_folder(tmp_path):
    model = tiny("mistral")
    masks = wanda_prune(model, calibration(), sparsity=0.5)
    out = save_pruned(model, make_tiny_tokenizer(), tmp_path / "sparse", {"method": "wanda"})
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    record = json.loads((out / "sparsity.json").read_text())
    assert record["method"] == "wanda" and record["total"] == 0.5 and set(record["modules"]) == set(masks)
    with pytest.raises(ShearsError, match="already exists"):
        save_pruned(model, None, out, {})
    assert [p.name for p in tmp_path.iterdir()] == ["sparse"]  # no temp folders left behind


def test_prune_to_folder_matches_in_memory_pruning_and_reuses(tmp_path, monkeypatch):
    base = save_tiny_model(tmp_path / "base")
    records = data.load_records("builtin:arithmetic?n=40")
    section = SparsityConfig(sparsity=0.5, nsamples=3, seqlen=4096, seed=1)  # the recipe's sparsity: section
    settings = dict(calibration_records=records, calibration_source="builtin:arithmetic?n=40")
    out = prune_to_folder(base, tmp_path / "sparse", section, **settings)

    model = AutoModelForCausalLM.from_pretrained(base)
    ids = data.calibration_input_ids(make_tiny_tokenizer(), records, 3, 256, 1)  # seqlen capped to 256
    wanda_prune(model, ids, sparsity=0.5)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    record = json.loads((out / "sparsity.json").read_text())
    assert record["method"] == "wanda" and record["pattern"] == "unstructured" and record["sparsity"] == 0.5
    assert record["calibration"]["seqlen"] == 256 and record["calibration"]["nsamples"] == 3
    assert record["calibration"]["source"] == "builtin:arithmetic?n=40" and record["total"] == 0.5

    def must_not_run(*args, **kwargs):
        raise AssertionError("recomputed instead of reusing")

    monkeypatch.setattr(sparsity, "wanda_prune", must_not_run)
    assert prune_to_folder(base, tmp_path / "sparse", section, **settings) == out
    with pytest.raises(ShearsError, match="not pruned with these settings"):
        prune_to_folder(base, tmp_path / "sparse", dataclasses.replace(section, seed=2), **settings)
    monkeypatch.undo()
    prune_to_folder(base, tmp_path / "sparse", dataclasses.replace(section, sparsity=0.25, method="magnitude"),
                    **settings, force=True)
    record = json.loads((out / "sparsity.json").read_text())
    assert record["method"] == "magnitude" and record["calibration"] is None and record["total"] == 0.25
