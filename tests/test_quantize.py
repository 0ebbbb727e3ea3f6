"""The quantize stage and training against a quantized base (QA-NLS, QA-SparsePEFT).

References: the `gguf` package's own quants.quantize / quants.dequantize for the bytes, qformat's
dequantize(requantize(...)) for the frozen grid, and models built by hand from the dequantized weights."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from gguf import GGMLQuantizationType, quants
from safetensors.torch import load_file

from conftest import make_tiny_model, make_tiny_tokenizer, one_line_error, train_two_processes
from shears import qformat
from shears.errors import ShearsError
from shears.models import load_model, save_sliced_model, slice_linears
from shears.quantize import main, quantize_to_folder
from shears.recipe import QuantizationConfig, load_recipe
from test_train_supernet import TINY_SPACE, kill_at_step, tiny_recipe

GGML = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}


def pruned_tiny(folder: Path, tied: bool = True, seed: int = 0, **config) -> torch.nn.Module:
    """A tiny Llama with half of every decoder-block linear weight zeroed (a pruned base), saved to `folder`."""
    model = make_tiny_model("llama", seed=seed, tie_word_embeddings=tied, **config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and name.endswith("proj.weight"):
                p[torch.rand(p.shape, generator=g) < 0.5] = 0.0
    model.save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return model


def gguf_blocks(weight: torch.Tensor, scheme: str) -> np.ndarray:
    return quants.quantize(weight.detach().to(torch.float32).numpy(), GGML[scheme])


# --------------------------------------------------------------------------- the stage


@pytest.mark.parametrize("scheme", qformat.SCHEMES)
def test_stage_writes_gguf_bytes_keeps_zeros_and_loads_back_bit_identical(tmp_path, scheme):
    source = pruned_tiny(tmp_path / "base")
    out = quantize_to_folder(tmp_path / "base", tmp_path / "q", QuantizationConfig(scheme=scheme))
    stored = load_file(out / qformat.WEIGHTS_FILE)
    record = json.loads((out / qformat.QUANT_FILE).read_text())
    params = dict(source.named_parameters())
    assert record["format"] == qformat.QUANT_FORMAT and record["scheme"] == scheme
    # the explicit choice: every block linear and the (tied) embedding quantized; norms kept, with why
    assert "model.embed_tokens.weight" in record["quantized"]
    assert record["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert set(record["kept"]) == {n for n, p in params.items() if p.dim() == 1}
    assert set(record["quantized"]) | set(record["kept"]) == set(params)
    back = dict(load_model(out).named_parameters())
    for name, p in params.items():
        if name in record["quantized"]:
            np.testing.assert_array_equal(stored[name + qformat.BLOCKS_SUFFIX].numpy(), gguf_blocks(p, scheme))
            reference = torch.from_numpy(quants.dequantize(gguf_blocks(p, scheme), GGML[scheme]))
            assert torch.equal(back[name], reference), name
            assert torch.all(back[name][p == 0] == 0), name  # a pruned zero stays exactly zero
        else:
            assert torch.equal(stored[name], p.detach()) and torch.equal(back[name], p), name
    loaded = load_model(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_storage_is_blocks_and_kept_tensors_only(tmp_path):
    pruned_tiny(tmp_path / "base")
    out = quantize_to_folder(tmp_path / "base", tmp_path / "q", QuantizationConfig(scheme="q4_0"))
    state = qformat.load_quantized_state(out)
    file = out / qformat.WEIGHTS_FILE
    header = struct.unpack("<Q", file.read_bytes()[:8])[0]
    expected = sum(qformat.nbytes(t.shape, "q4_0") for t in state.quantized.values()) + \
        sum(t.numel() * 4 for t in state.kept.values())
    assert file.stat().st_size == 8 + header + expected == 8 + header + state.nbytes()
    fp32 = (tmp_path / "base" / "model.safetensors").stat().st_size
    assert file.stat().st_size < 0.18 * fp32 + 8 + header


def test_load_model_in_a_requested_dtype_and_the_forward_of_the_dequantized_model(tmp_path):
    source = pruned_tiny(tmp_path / "base")
    out = quantize_to_folder(tmp_path / "base", tmp_path / "q", QuantizationConfig(scheme="q8_0"))
    state = qformat.load_quantized_state(out)
    bf16 = load_model(out, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(bf16.get_parameter(name), state.quantized[name].dequantize().to(torch.bfloat16))
    # the loaded model computes what the source model computes once its weights are replaced by hand
    by_hand = make_tiny_model("llama", tie_word_embeddings=True)
    by_hand.load_state_dict(source.state_dict())
    with torch.no_grad():
        for n, q in state.quantized.items():
            by_hand.get_parameter(n).copy_(qformat.dequantize(q.blocks, q.scheme))
    ids = torch.randint(3, 128, (2, 12))
    assert torch.equal(load_model(out)(ids).logits, by_hand(ids).logits)


def test_embeddings_and_excluded_linears_are_kept_when_asked(tmp_path):
    source = pruned_tiny(tmp_path / "base", tied=False)
    config = QuantizationConfig(scheme="q4_0", embeddings=False, exclude=["*.down_proj"])
    out = quantize_to_folder(tmp_path / "base", tmp_path / "q", config)
    record = json.loads((out / qformat.QUANT_FILE).read_text())
    assert "embedding" in record["kept"]["model.embed_tokens.weight"]
    assert "output layer" in record["kept"]["lm_head.weight"] and record["tied"] == {}
    assert "exclude" in record["kept"]["model.layers.0.mlp.down_proj.weight"]
    loaded = load_model(out)
    assert torch.equal(loaded.model.layers[0].mlp.down_proj.weight, source.model.layers[0].mlp.down_proj.weight)


def test_a_width_pruned_base_is_quantized_and_loads_at_its_widths(tmp_path):
    model = make_tiny_model("llama", intermediate_size=96, tie_word_embeddings=True)
    spec = [{"rows": [f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj"],
             "columns": [f"model.layers.{i}.mlp.down_proj"], "width": w} for i, w in enumerate((64, 32))]
    slice_linears(model, spec)
    save_sliced_model(model, spec, tmp_path / "narrow", make_tiny_tokenizer())
    out = quantize_to_folder(tmp_path / "narrow", tmp_path / "q", QuantizationConfig(scheme="q4_0"))
    loaded = load_model(out)
    assert loaded.model.layers[1].mlp.down_proj.weight.shape == (32, 32)
    expected = qformat.dequantize(qformat.quantize(model.model.layers[1].mlp.down_proj.weight, "q4_0"), "q4_0")
    assert torch.equal(loaded.model.layers[1].mlp.down_proj.weight, expected)


def test_cli_writes_and_checks(tmp_path, capsys):
    pruned_tiny(tmp_path / "base")
    main(["--model", str(tmp_path / "base"), "--scheme", "q8_0", "--output", str(tmp_path / "q")])
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'q'}" in out and "x float32" in out
    main(["--check", str(tmp_path / "q")])
    assert "kept x" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # an existing output is not overwritten without --force
        main(["--model", str(tmp_path / "base"), "--scheme", "q8_0", "--output", str(tmp_path / "q")])
    assert "--force" in capsys.readouterr().err


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_naming_the_fix(tmp_path):
    pruned_tiny(tmp_path / "base")
    one_line_error(lambda: load_recipe(None, {"quantization.scheme": "q5_k"}), "quantization.scheme", "q4_0")
    one_line_error(lambda: quantize_to_folder(tmp_path / "base", tmp_path / "x", QuantizationConfig()),
                   "--scheme q8_0 or q4_0")
    one_line_error(lambda: quantize_to_folder(tmp_path / "base", tmp_path / "x",
                                              QuantizationConfig(scheme="q4_0", exclude=["*.nothing"])),
                   "match no decoder-block linear")
    make_tiny_model("llama", intermediate_size=48).save_pretrained(tmp_path / "odd")
    make_tiny_tokenizer().save_pretrained(tmp_path / "odd")
    one_line_error(lambda: quantize_to_folder(tmp_path / "odd", tmp_path / "x", QuantizationConfig(scheme="q4_0")),
                   "down_proj has 48 inputs", "quantization.exclude", "--exclude")
    quantize_to_folder(tmp_path / "odd", tmp_path / "x", QuantizationConfig(scheme="q4_0", exclude=["*.down_proj"]))
    quantize_to_folder(tmp_path / "base", tmp_path / "q", QuantizationConfig(scheme="q4_0"))
    one_line_error(lambda: quantize_to_folder(tmp_path / "q", tmp_path / "qq", QuantizationConfig(scheme="q8_0")),
                   "already quantized", "sparse_base")
    one_line_error(lambda: quantize_to_folder(tmp_path / "base", tmp_path / "q", QuantizationConfig(scheme="q8_0")),
                   "not quantized with these settings", "--force")
    one_line_error(lambda: load_recipe(None, {"training.qa_sparse_adapter": True}), "quantization.scheme")


def test_a_failure_midway_leaves_no_half_quantized_folder(tmp_path):
    model = pruned_tiny(tmp_path / "base")
    quantize_to_folder(tmp_path / "base", tmp_path / "q", QuantizationConfig(scheme="q8_0"))
    before = (tmp_path / "q" / qformat.WEIGHTS_FILE).read_bytes()
    with torch.no_grad():  # a weight in the middle of the model that cannot be quantized
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "base")
    one_line_error(lambda: quantize_to_folder(tmp_path / "base", tmp_path / "q", QuantizationConfig(scheme="q4_0"),
                                              force=True), "inf or NaN")
    one_line_error(lambda: quantize_to_folder(tmp_path / "base", tmp_path / "new", QuantizationConfig(scheme="q4_0")),
                   "inf or NaN")
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "q" / qformat.WEIGHTS_FILE).read_bytes() == before  # the earlier result, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "q"]  # no temporaries left behind


def test_the_folder_reader_refuses_what_its_record_does_not_account_for(tmp_path):
    pruned_tiny(tmp_path / "base")
    out = quantize_to_folder(tmp_path / "base", tmp_path / "q", QuantizationConfig(scheme="q4_0"))
    record = json.loads((out / qformat.QUANT_FILE).read_text())
    del record["kept"]["model.norm.weight"]
    (out / qformat.QUANT_FILE).write_text(json.dumps(record))
    one_line_error(lambda: qformat.load_quantized_state(out), "does not account for")
    (out / qformat.QUANT_FILE).write_text(json.dumps({**record, "format": "other/9"}))
    one_line_error(lambda: load_model(out), "expected shears-quant/1")


@pytest.mark.parametrize("scheme", qformat.SCHEMES)
def test_round_to_grid_is_dequantize_of_requantize(scheme):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 128, generator=g)
    w[w.abs() < 0.5] = 0
    packed = qformat.quantize(w, scheme)
    moved = w + 0.3 * torch.randn(w.shape, generator=g)
    reference = qformat.dequantize(qformat.requantize(moved, packed, scheme), scheme)
    assert torch.equal(qformat.round_to_grid(moved, qformat.scales(packed, scheme), scheme), reference)
    x = moved.clone().requires_grad_(True)
    out = qformat.fake_quantize_on_scales(x, qformat.scales(packed, scheme), scheme)
    assert torch.equal(out.detach(), reference)
    (2 * out).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


# --------------------------------------------------------------------------- training on a quantized base


def quantized_recipe(model_dir: Path, tmp_path: Path, scheme: str = "q4_0", **training):
    return load_recipe(tiny_recipe(model_dir, tmp_path, **training),
                       {"sparsity.sparsity": 0.5, "sparsity.nsamples": 2, "sparsity.seqlen": 64,
                        "quantization.scheme": scheme})


def adapted_layers(supernet):
    return supernet.layers.items()


def test_qa_nls_trains_on_the_dequantized_base_with_the_adapter_separate(tiny_model_dir, tmp_path):
    from shears.run import load_run
    from shears.scores import run_scoring
    from shears.train_supernet import train_supernet

    recipe = quantized_recipe(tiny_model_dir, tmp_path)
    train_supernet(recipe, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["quantization"]["scheme"] == "q4_0" and summary["base"].endswith("quantized_base")
    run = load_run(tmp_path / "run")
    assert run.base_source.endswith("quantized_base")
    net = run.supernet
    net.activate(net.maximal())
    sparse = dict(load_model(tmp_path / "run" / "sparse_base").named_parameters())
    # by hand: the sparse base, each weight quantized and dequantized with the gguf package, plus B A
    by_hand = load_model(tmp_path / "run" / "sparse_base")
    scale = TINY_SPACE["lora_alpha"] / TINY_SPACE["r_max"]
    with torch.no_grad():
        for name, p in by_hand.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.from_numpy(quants.dequantize(gguf_blocks(sparse[name], "q4_0"), GGML["q4_0"])))
        for module, layer in adapted_layers(net):
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            assert B.abs().sum() > 0  # trained
            by_hand.get_submodule(module).weight.add_(B @ A * scale)
    ids = torch.randint(3, 100, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(net.model(input_ids=ids).logits, by_hand(ids).logits, rtol=1e-5, atol=1e-5)
    # the scorer fingerprint records the scheme: the same adapters on an unquantized base score differently
    plain = load_recipe(tmp_path / "run" / "recipe.yaml", {"quantization.scheme": "none"})
    assert run_scoring(recipe, net, run.validation_records, 4).fingerprint != \
        run_scoring(plain, net, run.validation_records, 4).fingerprint


def on_grid(weight: torch.Tensor, blocks: qformat.QuantizedTensor) -> bool:
    requantized = qformat.requantize(weight, blocks.blocks, blocks.scheme)
    return torch.equal(qformat.dequantize(requantized, blocks.scheme), weight)


def test_qa_sparse_peft_merges_onto_the_frozen_grid_and_export_writes_those_blocks(tiny_model_dir, tmp_path):
    from shears.export import main as export_main
    from shears.run import load_run
    from shears.train_supernet import train_supernet

    train_supernet(quantized_recipe(tiny_model_dir, tmp_path, qa_sparse_adapter=True), tmp_path / "run")
    run = load_run(tmp_path / "run")
    net = run.supernet
    base = qformat.load_quantized_state(tmp_path / "run" / "quantized_base")
    assert net.sparse_adapter and net.qa_scheme == "q4_0"
    net.activate(net.heuristic())
    trained = {}
    for module, layer in adapted_layers(net):
        blocks = base.quantized[f"{module}.weight"]
        with torch.no_grad():
            weight = layer.updated_weight(["default"])
        assert on_grid(weight, blocks), module
        assert torch.all(weight[blocks.dequantize() == 0] == 0), module  # the base's zeros stay zero
        trained[module] = weight
    assert any(not torch.equal(w, base.quantized[f"{m}.weight"].dequantize()) for m, w in trained.items())
    export_main(["--run", str(tmp_path / "run"), "--subnet", "heuristic", "--merge", "--output", str(tmp_path / "ex")])
    merged_dir = tmp_path / "ex" / "heuristic" / "merged"
    merged = qformat.load_quantized_state(merged_dir)
    for name, q in base.quantized.items():  # every block keeps its scale: the merged model is still q4_0
        assert torch.equal(qformat.scales(merged.quantized[name].blocks, "q4_0"), qformat.scales(q.blocks, "q4_0"))
    for module, weight in trained.items():
        assert torch.equal(merged.quantized[f"{module}.weight"].dequantize(), weight), module
    ids = torch.randint(3, 100, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(load_model(merged_dir)(ids).logits, net.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_qa_sparse_peft_resumes_as_an_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    import shears.train_supernet as ts

    overrides = {"training.max_steps": 4, "training.save_steps": 2}
    recipe = lambda: load_recipe(tiny_recipe(tiny_model_dir, tmp_path, qa_sparse_adapter=True),  # noqa: E731
                                 {**overrides, "quantization.scheme": "q8_0"})
    ts.train_supernet(recipe(), tmp_path / "full")
    restore = kill_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        ts.train_supernet(recipe(), tmp_path / "cut")
    restore()
    ts.train_supernet(recipe(), tmp_path / "cut", resume=True)
    a = load_file(tmp_path / "full" / "supernet" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "supernet" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    with pytest.raises(ShearsError, match="quantization"):  # the base may not change under a resume
        ts.train_supernet(load_recipe(tmp_path / "cut" / "recipe.yaml", {"quantization.scheme": "q4_0"}),
                          tmp_path / "cut", resume=True)


def test_qa_sparse_peft_refuses_a_width_space_and_an_unquantized_module(tiny_llama):
    from shears.elastic import SuperNet

    quantized = {n: qformat.QuantizedTensor.from_weight(p, "q4_0") for n, p in tiny_llama.named_parameters()
                 if ".layers." in n and p.dim() == 2}
    width = {**TINY_SPACE, "groups": TINY_SPACE["groups"] + [
        {"name": "mlp", "kind": "width", "modules": ["gate_proj", "up_proj"], "consumers": ["down_proj"],
         "choices": [1.0, 0.5], "scope": "per_layer"}]}
    from shears.search_space import SearchSpace

    one_line_error(lambda: SuperNet.from_base(tiny_llama, SearchSpace.from_dict(width), quantized=quantized),
                   "rank-only search space")
    del quantized["model.layers.1.self_attn.v_proj.weight"]
    one_line_error(lambda: SuperNet.from_base(make_tiny_model("llama"), SearchSpace.from_dict(TINY_SPACE),
                                              quantized=quantized), "v_proj is kept unquantized")


def test_two_process_ddp_qa_sparse_peft(tiny_model_dir, tmp_path):
    recipe = tiny_recipe(tiny_model_dir, tmp_path, qa_sparse_adapter=True)
    recipe.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), "quantization": {"scheme": "q4_0"}}))
    run = tmp_path / "run"
    train_two_processes(recipe, run)
    assert (run / "trace" / "rank0.jsonl").read_text() == (run / "trace" / "rank1.jsonl").read_text()
    assert json.loads((run / "supernet" / "shears.json").read_text())["qa_scheme"] == "q4_0"
