"""Shared fixtures: tiny random-initialised decoder models built from configs (no downloads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from shears.errors import ShearsError
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LLM_ADAPTERS = SHARED_DATA / "llm-adapters"

_COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

ARCHITECTURES = {
    "llama": (LlamaConfig, {}),
    "mistral": (MistralConfig, {}),
    "qwen2": (Qwen2Config, {}),
    "gemma3": (Gemma3TextConfig, {"head_dim": 8, "sliding_window": 16}),
    "phi3": (Phi3Config, {}),
}


def make_tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer, hidden-32 random model of `arch`, in eval mode, float32."""
    config_cls, extra = ARCHITECTURES[arch]
    config = config_cls(**{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_model("llama")


@pytest.fixture(params=sorted(ARCHITECTURES))
def tiny_model_any(request):
    return make_tiny_model(request.param)


@pytest.fixture
def llm_adapters_dir():
    if not LLM_ADAPTERS.is_dir():
        pytest.skip(f"real benchmark data not found at {LLM_ADAPTERS} (it lives in ../shared/data beside the repo)")
    return LLM_ADAPTERS


def make_tiny_tokenizer():
    """A character-level tokenizer (< 128 ids, so it fits the tiny models' vocabulary)."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny Llama + its tokenizer saved as an ordinary HF folder (what `load_model` reads)."""
    folder = tmp_path / "tiny-llama"
    make_tiny_model("llama", max_position_embeddings=512).save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


def one_line_error(call, *parts):
    """Run `call`, expect a ShearsError whose message is one line containing every part."""
    with pytest.raises(ShearsError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    for part in parts:
        assert str(part) in message, (part, message)
    return message


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny matmuls gain nothing from threads, and on a shared, busy CPU torch's spinning threads make
    them 5-30x slower. Tests that load the real model are few and pay for this."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_two_processes(recipe: Path, run: Path) -> Path:
    """`python -m shears.train_supernet` under torch.distributed.run with two CPU processes (DDP on gloo);
    fails the test with the end of stderr when it does not finish cleanly. Returns the run directory."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(  # --standalone: a free rendezvous port, so concurrent test runs do not collide
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "shears.train_supernet", "--recipe", str(recipe), "--output", str(run)],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run
