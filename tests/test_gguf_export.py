"""GGUF export against llama.cpp itself: llama-cpp-python loads what shears wrote, and its logits are the
PyTorch subnet's.

Tolerances. The exports here are float32 GGUF (base, adapters), so llama.cpp and PyTorch compute the same
function in float32 and differ only by summation order and by llama.cpp's own approximations: the KV cache
(set to float32 here), its softmax and RoPE in float32. A float32 dot product of length n has error at most
n * 2**-24 * sum|w_i x_i| (Higham, ch. 3); the tiny model's longest is n = 64, so each layer's output is off by
about 4e-6 of its magnitude, and two blocks plus the head leave the logits (|logit| ~ 1) within 1e-4: TOL_F32.

A quantized base (Q8_0 / Q4_0 blocks) computes differently in llama.cpp: its matmuls quantize each activation
row to Q8_0 (blocks of 32, d = max|x| / 127, x rounded to d * round(x / d)) before the integer dot product.
Each activation moves by at most d / 2 = max|x_b| / 254 in its block b, so a row w of the weight gives
w·x̂ - w·x bounded by sum_b ||w_b||_1 max|x_b| / 254 -- about 0.4% of |w|·|x| -- which then propagates
through the blocks. The PyTorch reference therefore rounds each quantized linear's input the same way
(`q8_0_activations`, with qformat's Q8_0 -- the gguf package's bytes); what remains is float32 order (and
llama.cpp's rounding of exact ties, to even in SIMD where qformat rounds away from zero), within TOL_Q = TOL_F32.
Measured on the tiny model: 9e-8 with that rounding modelled, 2e-3 (0.5% of the largest logit) without it --
the size the bound above predicts, so the rounding is the whole difference and the blocks are right.

The real model (smollm2-135m, float16 GGUF) adds llama.cpp's float16 arithmetic: an F16 matmul rounds its
activations to float16 (relative 2**-11, modelled in the reference like the Q8_0 rounding), its kernels sum
in float32 in another order over 30 blocks, and its SiLU/softmax/exp use SIMD approximations. Measured: the
largest logit difference is 1.6e-3 of the largest logit (0.072 of 45.8) and the top-1 token agrees on all 512
positions: TOL_REAL["f16"] = 5e-3 of the largest logit, top-1 on >= 99%. A Q4_0 base on the real model is not
tracked that closely by the reference: smollm2's activations have outlier channels (a block's step max|x|/127
is then coarse for its other 31 values), so 30 blocks amplify any rounding that differs -- ggml computes the
step as 127 / max|x| and rounds ties to even -- and PyTorch with and without the Q8_0 rounding already differ
by 1.6 in the logits and on 1.4% of the top-1 tokens, with no adapter at all. llama.cpp is that far from
either reference (max 1.5 of 42.7, top-1 98.6-99.2% over adapters of different sizes, the bare base
included); so the Q4_0 case asserts what the rounding allows: within 5% of the largest logit, top-1 >= 97.5%.
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_model
from shears import qformat
from shears.errors import ShearsError
from shears.export import subnet_factors
from shears.gguf_export import (ADAPTER_GGUF, BASE_GGUF, MERGED_GGUF, converter_dir, export_gguf, read_gguf)
from shears.recipe import load_recipe
from shears.run import load_run
from shears.train_supernet import train_supernet
from test_export import MAXIMAL, MINIMAL, MIXED, randomise_adapter
from test_train_supernet import tiny_recipe

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install "
                                                     "'shears-nas[gguf]' (make test installs it)")

REPO = Path(__file__).resolve().parents[1]
TOL_F32 = 1e-4
TOL_Q = 1e-4
TOL_REAL = {"f16": (5e-3, 0.99), "q4_0": (5e-2, 0.975)}  # (share of the largest logit, top-1 agreement)
VOCAB = 384
TOKENS = [[1, 40, 77, 300, 12, 290, 5, 99, 260, 33, 17, 350], [1, 270, 271, 272, 9, 8, 300, 301, 3, 44]]


def llama_tokenizer():
    """A Llama-style tokenizer (BPE with byte fallback, as llama.cpp's converter reads Llama tokenizers), small
    enough for the tiny models: 3 specials, 256 byte tokens, the printable characters, fillers up to VOCAB."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"])}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for c in ["▁"] + [c for c in string.printable if c not in " \t\n\r\x0b\x0c"]:
        vocab.setdefault(c, len(vocab))
    for i in range(VOCAB - len(vocab)):  # llama.cpp wants one token per embedding row
        vocab[f"<extra_{i}>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")


def tiny_llama_dir(folder: Path) -> Path:
    make_tiny_model("llama", vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=0).save_pretrained(folder)
    llama_tokenizer().save_pretrained(folder)
    return folder


def quantize_folder(source: Path, out: Path, scheme: str) -> Path:
    """A quantized base as the qformat contract stores it: every linear weight of the blocks as NAME.qblocks,
    the rest kept; quantization.json saying which."""
    import shutil

    shutil.copytree(source, out)
    tensors = load_file(out / "model.safetensors")
    stored, record = {}, {"format": qformat.QUANT_FORMAT, "scheme": scheme, "quantized": {}, "kept": {}, "tied": {}}
    for name, t in tensors.items():
        if ".layers." in name and name.endswith("proj.weight"):
            stored[f"{name}{qformat.BLOCKS_SUFFIX}"] = qformat.quantize(t, scheme)
            record["quantized"][name] = {"shape": list(t.shape), "scheme": scheme}
        else:
            stored[name] = t
            record["kept"][name] = "not a block linear"
    save_file(stored, out / "model.safetensors", metadata={"format": "pt"})
    (out / qformat.QUANT_FILE).write_text(json.dumps(record))
    return out


@pytest.fixture(scope="module")
def converters():
    try:
        return converter_dir()
    except ShearsError as err:
        pytest.skip(f"llama.cpp's converters are not available: {err}")


def train_run(root: Path, base: Path) -> Path:
    run = root / "run"
    train_supernet(load_recipe(tiny_recipe(base, root), {"training.max_steps": 2, "training.save_steps": 100}), run)
    randomise_adapter(run, seed=3)
    return run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gguf")
    return train_run(root, tiny_llama_dir(root / "tiny-llama"))


# --------------------------------------------------------------------------- references

@torch.no_grad()
def torch_logits(model, tokens: list[int]) -> np.ndarray:
    return model(input_ids=torch.tensor([tokens])).logits[0].double().numpy()


def subnet_logits(run_path: Path, config: dict, tokens: list[int], quantized: str | None = None) -> np.ndarray:
    """The super-network's subnet in PyTorch (on the dequantized base), each quantized linear's input rounded to
    Q8_0 as llama.cpp rounds it."""
    run = load_run(run_path)
    run.supernet.activate(config)
    hooks = []
    if quantized:
        for name, module in run.supernet.model.named_modules():
            if name.endswith("proj.base_layer") or (name.endswith("proj") and isinstance(module, torch.nn.Linear)
                                                     and not hasattr(module, "base_layer")):
                hooks.append(module.register_forward_pre_hook(q8_0_activations))
    try:
        return torch_logits(run.supernet.model, tokens)
    finally:
        for hook in hooks:
            hook.remove()


def q8_0_activations(module, args):
    x = args[0]
    rows = x.reshape(-1, x.shape[-1])
    return (qformat.dequantize(qformat.quantize(rows, "q8_0"), "q8_0").reshape(x.shape),)


def load_llama(path: Path, **kwargs):
    return llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=1,
                           type_k=0, type_v=0, flash_attn=False, **kwargs)  # type 0: a float32 KV cache


def engine_logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float64)


def set_adapter(llm, adapter) -> None:
    """The context's adapters, per request: `adapter` alone at scale 1 (None: the bare base)."""
    if adapter is None:
        ok = llama_cpp.llama_set_adapters_lora(llm.ctx, None, 0, None)
    else:
        ok = llama_cpp.llama_set_adapters_lora(llm.ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter), 1,
                                               (llama_cpp.ctypes.c_float * 1)(1.0))
    assert ok == 0


def close(a: np.ndarray, b: np.ndarray, tol: float) -> float:
    err = float(np.abs(a - b).max())
    assert err <= tol * max(1.0, float(np.abs(b).max())), err
    return err


# --------------------------------------------------------------------------- float base

@pytest.fixture(scope="module")
def f32_export(tiny_run, converters) -> Path:
    run = load_run(tiny_run)
    out = tiny_run / "gguf-f32"
    export_gguf(run, {"maximal": MAXIMAL, "mixed": MIXED, "minimal": MINIMAL}, out, dtype="float32", merge=True)
    return out


def test_base_plus_each_adapter_and_each_merged_model_give_the_subnets_logits(tiny_run, f32_export):
    for name, config in (("maximal", MAXIMAL), ("mixed", MIXED), ("minimal", MINIMAL)):
        with_adapter = load_llama(f32_export / BASE_GGUF, lora_path=str(f32_export / name / ADAPTER_GGUF))
        merged = load_llama(f32_export / name / MERGED_GGUF)
        for tokens in TOKENS:
            want = subnet_logits(tiny_run, config, tokens)
            close(engine_logits(with_adapter, tokens), want, TOL_F32)
            close(engine_logits(merged, tokens), want, TOL_F32)
        with_adapter.close()
        merged.close()


def test_the_adapter_switches_per_request_on_one_loaded_base(tiny_run, f32_export):
    llm = load_llama(f32_export / BASE_GGUF)
    adapters = {name: llama_cpp.llama_adapter_lora_init(llm.model, str(f32_export / name / ADAPTER_GGUF).encode())
                for name in ("maximal", "mixed", "minimal")}
    try:
        tokens = TOKENS[0]
        wants = {name: subnet_logits(tiny_run, config, tokens)
                 for name, config in (("maximal", MAXIMAL), ("mixed", MIXED), ("minimal", MINIMAL))}
        for name in ("mixed", "maximal", "minimal", "mixed"):  # back and forth, one model and context throughout
            set_adapter(llm, adapters[name])
            close(engine_logits(llm, tokens), wants[name], TOL_F32)
        set_adapter(llm, None)
        bare = engine_logits(llm, tokens)
        assert np.abs(bare - wants["mixed"]).max() > 100 * TOL_F32  # the adapters do change the output
    finally:
        set_adapter(llm, None)
        for adapter in adapters.values():
            llama_cpp.llama_adapter_lora_free(adapter)
        llm.close()


def test_scales_are_folded_for_llama_cpps_single_alpha(tiny_run, f32_export):
    """Each tensor's B times alpha / r (llama.cpp's scale) is the super-network's scale times B, permuted or not."""
    run = load_run(tiny_run)
    factors = subnet_factors(run.supernet, MIXED)
    reader = read_gguf(f32_export / "mixed" / ADAPTER_GGUF)
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    A, B = factors["model.layers.1.self_attn.v_proj"]  # v is not permuted by the converter
    b = tensors["blk.1.attn_v.weight.lora_b"]
    assert b.shape == tuple(B.shape)
    np.testing.assert_allclose(b * alpha / b.shape[1], (16 / 8) * B.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(tensors["blk.1.attn_v.weight.lora_a"], A.numpy())


# --------------------------------------------------------------------------- quantized base

@pytest.mark.parametrize("scheme", qformat.SCHEMES)
def test_a_quantized_base_keeps_its_blocks_and_serves_the_subnet(tmp_path, scheme, converters):
    base = quantize_folder(tiny_llama_dir(tmp_path / "tiny"), tmp_path / f"tiny-{scheme}", scheme)
    # the run trains on the dequantized weights: its base is the quantized folder, as load_model reads it
    dequantized = tmp_path / "dequantized"
    tiny_llama_dir(dequantized)
    save_file(qformat.load_quantized_state(base).state_dict(), dequantized / "model.safetensors",
              metadata={"format": "pt"})
    run_path = train_run(tmp_path, dequantized)
    run = load_run(run_path)
    run.base_source = str(base)
    out = tmp_path / "gguf"
    export_gguf(run, {"mixed": MIXED}, out, dtype="float32", merge=True)  # kept weights (embeddings) float32

    blocks = {name: t.blocks.numpy() for name, t in qformat.load_quantized_state(base).quantized.items()}
    tensors = {t.name: t for t in read_gguf(out / BASE_GGUF).tensors}
    for layer in range(2):
        for hf, gg in (("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"), ("mlp.up_proj", "ffn_up"),
                       ("mlp.gate_proj", "ffn_gate"), ("mlp.down_proj", "ffn_down")):
            t = tensors[f"blk.{layer}.{gg}.weight"]
            assert t.tensor_type.name == scheme.upper()
            np.testing.assert_array_equal(np.array(t.data), blocks[f"model.layers.{layer}.{hf}.weight"])
        for hf, gg in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k")):  # rows permuted by llama.cpp
            ours, theirs = blocks[f"model.layers.{layer}.{hf}.weight"], np.array(tensors[f"blk.{layer}.{gg}.weight"].data)
            assert sorted(map(bytes, ours)) == sorted(map(bytes, theirs))

    with_adapter = load_llama(out / BASE_GGUF, lora_path=str(out / "mixed" / ADAPTER_GGUF))
    for tokens in TOKENS:
        close(engine_logits(with_adapter, tokens), subnet_logits(run_path, MIXED, tokens, quantized=scheme), TOL_Q)
    with_adapter.close()
    merged = read_gguf(out / "mixed" / MERGED_GGUF)
    assert {t.tensor_type.name for t in merged.tensors if t.name.endswith(("ffn_up.weight", "ffn_down.weight"))} == {
        scheme.upper()}


# --------------------------------------------------------------------------- bad input, atomic writes

def test_an_existing_output_needs_force_and_per_block_widths_are_refused(tiny_run, f32_export):
    run = load_run(tiny_run)
    with pytest.raises(ShearsError, match="already exists: pass --force"):
        export_gguf(run, {"maximal": MAXIMAL}, f32_export)
    assert (f32_export / "mixed" / MERGED_GGUF).is_file()  # untouched


def test_cli_without_llama_cpp_names_the_extra(tiny_run):
    code = ("import sys; sys.modules['llama_cpp'] = None; from shears.export import main; "
            f"main(['--run', {str(tiny_run)!r}, '--subnet', 'maximal', '--format', 'gguf'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("error: --format gguf needs llama-cpp-python: "
                                                      "pip install 'shears-nas[gguf]'")
    assert not (tiny_run / "gguf").exists()


def test_an_unsupported_architecture_is_one_line(tmp_path, converters):
    from shears.gguf_export import convert_model

    folder = tiny_llama_dir(tmp_path / "odd")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ShearsError, match="does not support the architecture NoSuchModelForCausalLM") as caught:
        convert_model(folder, tmp_path / "odd.gguf", "f16", converters, tmp_path / "scratch")
    assert "\n" not in str(caught.value)


def test_a_killed_export_leaves_no_gguf(tiny_run, tmp_path, converters):
    from killable import kill_at

    out = tmp_path / "gguf"
    kill_at("gguf:1", "shears.export", "--run", str(tiny_run), "--subnet", "maximal", "--format", "gguf",
            "--output", str(out), tmp_path=tmp_path)
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".gguf.")]
    assert leftovers  # the killed writer's temporary (it cannot clean up after a SIGKILL) ...
    run = load_run(tiny_run)
    export_gguf(run, {"maximal": MAXIMAL}, out, dtype="float32")  # ... which the next write removes
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".gguf.")) == []
    assert (out / "maximal" / ADAPTER_GGUF).is_file()


# --------------------------------------------------------------------------- elastic width

def test_a_uniform_width_subnet_is_a_stock_smaller_gguf_and_per_block_widths_are_refused(tmp_path, converters):
    from test_width_export import MIXED as PER_BLOCK, UNIFORM, WIDTH_SPACE

    root = tmp_path / "width"
    recipe = load_recipe(tiny_recipe(tiny_llama_dir(root / "tiny-llama"), root),
                         {"search_space": WIDTH_SPACE, "training.max_steps": 3, "width.nsamples": 4, "width.seqlen": 32})
    train_supernet(recipe, root / "run")
    randomise_adapter(root / "run", seed=7)
    run = load_run(root / "run")
    with pytest.raises(ShearsError, match="keeps different widths in different blocks") as caught:
        export_gguf(run, {"uniform": UNIFORM, "per-block": PER_BLOCK}, tmp_path / "refused")
    assert "\n" not in str(caught.value) and not (tmp_path / "refused").exists()

    out = tmp_path / "gguf"
    export_gguf(run, {"uniform": UNIFORM}, out, dtype="float32")
    assert not (out / BASE_GGUF).exists() and not (out / "uniform" / ADAPTER_GGUF).exists()
    reader = read_gguf(out / "uniform" / MERGED_GGUF)
    assert reader.fields["llama.feed_forward_length"].contents() == 32
    merged = load_llama(out / "uniform" / MERGED_GGUF)
    for tokens in TOKENS:
        close(engine_logits(merged, tokens), subnet_logits(root / "run", UNIFORM, tokens), TOL_F32)
    merged.close()


# --------------------------------------------------------------------------- the real model

def rounded_input(kind: str):
    """A forward pre-hook rounding a linear's input as llama.cpp's CPU matmul does for weights of `kind`:
    float16 for F16 weights, Q8_0 blocks for Q8_0/Q4_0 weights."""
    def hook(module, args):
        x = module.unrounded = args[0]  # the LoRA path reads x itself (llama.cpp: float32 adapter tensors)
        if kind == "f16":
            return (x.half().float(),)
        return q8_0_activations(module, args)
    return hook


@pytest.mark.real_model
@pytest.mark.parametrize("scheme", [None, "q4_0"])
def test_real_smollm2_with_a_subnet_adapter_agrees_with_pytorch(tmp_path, converters, scheme):
    """smollm2-135m, f16 GGUF or a qformat Q4_0 base, + per-module-rank LoRA: llama.cpp's next-token logits vs
    PyTorch's on the weights the GGUF holds, over 512 positions of validation prompts."""
    from shears.data import format_example, load_records
    from shears.gguf_export import convert_adapter, convert_model, fold_scales
    from shears.models import load_model, load_tokenizer, resolve_model_path

    source = Path(resolve_model_path("smollm2-135m"))
    folder = quantize_folder(source, tmp_path / "q4_0", scheme) if scheme else source
    convert_model(folder, tmp_path / "base.gguf", "f16", converters, tmp_path / "scratch-base")
    model = load_model(source)
    quantized = qformat.load_quantized_state(folder).quantized if scheme else {}
    g = torch.Generator().manual_seed(0)
    factors, hooks, lora_alpha, r_max = {}, [], 32.0, 16
    with torch.no_grad():
        for name, p in model.named_parameters():  # the weights the GGUF holds: f16, or the Q4_0 blocks'
            if p.dim() == 2:
                p.copy_(quantized[name].dequantize() if name in quantized else p.half().float())
        for i, (name, module) in enumerate(model.named_modules()):
            if isinstance(module, torch.nn.Linear):
                hooks.append(module.register_forward_pre_hook(
                    rounded_input("q8_0" if f"{name}.weight" in quantized else "f16")))
            if name.endswith(("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")):
                r = (4, 8, 16)[i % 3]  # per-module ranks, as a searched subnet has
                A = torch.randn(r, module.in_features, generator=g) / module.in_features ** 0.5
                B = torch.randn(module.out_features, r, generator=g) * 0.02
                factors[name] = (A, B)
                hooks.append(module.register_forward_hook(
                    lambda mod, args, out, A=A, B=B: out + (lora_alpha / r_max) * (mod.unrounded @ A.T) @ B.T))
    alpha = lora_alpha * 8 / r_max  # the GGUF's one alpha: any value, each module's B is folded against it
    convert_adapter(fold_scales(factors, lora_alpha / r_max, alpha), alpha, folder, tmp_path / "adapter.gguf",
                    converters, tmp_path / "scratch-adapter")
    tokenizer = load_tokenizer(source)
    text = "".join("".join(format_example(r)) for r in load_records("builtin:arithmetic?n=64&seed=5"))
    tokens = tokenizer(text).input_ids[:512]
    assert len(tokens) == 512
    want = torch_logits(model, tokens)
    for hook in hooks:
        hook.remove()
    llm = llama_cpp.Llama(model_path=str(tmp_path / "base.gguf"), lora_path=str(tmp_path / "adapter.gguf"), n_ctx=512,
                          n_batch=512, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0, flash_attn=False)
    got = engine_logits(llm, tokens)
    llm.close()
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    err = np.abs(got - want).max()
    print(f"{scheme or 'f16'}: top-1 agreement {agree:.4f} over 512 positions, max |logit difference| {err:.4f} "
          f"(logits up to {np.abs(want).max():.1f})")
    tolerance, top1 = TOL_REAL[scheme or "f16"]
    assert agree >= top1
    assert err <= tolerance * np.abs(want).max()


# --------------------------------------------------------------------------- the CLI, the front, the demo's hint

def test_front_cli_writes_the_gguf_folder_that_the_peft_export_points_to(tiny_run, tmp_path, capsys, converters):
    import re
    import shutil

    from shears.export import main
    from test_export import TinyRun, write_search

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints", "gguf-*"))
    heuristic = {"qv.0": 4, "qv.1": 4, "up": 2}
    front = write_search(TinyRun(run, run), [(MINIMAL, 0.2), (heuristic, 0.5), (MAXIMAL, 0.7)])
    main(["--run", str(run), "--front"])  # the PEFT export, as make demo ends
    hint = capsys.readouterr().out.strip().splitlines()[-2:]
    best = next(folder for folder in (run / "export").iterdir() if folder.name.startswith("front-2-"))
    assert hint[0].startswith(f"best subnet: {best.name}; ") and "--front --format gguf" in hint[0]
    main(["--run", str(run), "--front", "--format", "gguf", "--dtype", "float32"])
    printed = capsys.readouterr().out
    assert f"wrote 4 GGUF file(s) for 3 subnet(s)" in printed
    command = re.search(r"llama-cli -m (\S+) --lora (\S+)", hint[1])
    assert Path(command.group(1)) == run / "gguf" / BASE_GGUF and Path(command.group(2)).is_file()
    manifest = json.loads((run / "gguf" / "manifest.json").read_text())
    assert [s["objectives"] for s in manifest["subnets"]] == [row["objectives"] for row in front["front"]]
    readme = (run / "gguf" / "README.md").read_text()
    for subnet in manifest["subnets"]:
        assert f"--lora ./{subnet['folder']}/{ADAPTER_GGUF}" in readme
    with pytest.raises(SystemExit):  # an existing export without --force: one line, exit 2
        main(["--run", str(run), "--front", "--format", "gguf"])
    assert capsys.readouterr().err.strip() == f"error: {run / 'gguf'} already exists: pass --force to replace it, or choose another output"


def test_a_sparse_adapter_is_served_exactly_by_its_merged_gguf(tmp_path, converters):
    """SparsePEFT masks the update by the base's zeros; a LoRA adapter cannot, merged.gguf does."""
    root = tmp_path / "sparse"
    overrides = {"training.max_steps": 2, "training.save_steps": 100, "sparsity.sparsity": 0.5,
                 "sparsity.nsamples": 2, "sparsity.seqlen": 64, "training.sparse_adapter": True}
    train_supernet(load_recipe(tiny_recipe(tiny_llama_dir(root / "tiny-llama"), root), overrides), root / "run")
    randomise_adapter(root / "run", seed=5)
    run = load_run(root / "run")
    out = tmp_path / "gguf"
    export_gguf(run, {"mixed": MIXED}, out, dtype="float32", merge=True)
    base = {t.name: np.array(t.data) for t in read_gguf(out / BASE_GGUF).tensors}
    merged = {t.name: np.array(t.data) for t in read_gguf(out / "mixed" / MERGED_GGUF).tensors}
    zeros = base["blk.0.attn_q.weight"] == 0
    assert zeros.mean() > 0.4 and np.all(merged["blk.0.attn_q.weight"][zeros] == 0)
    assert np.any(merged["blk.0.attn_q.weight"] != base["blk.0.attn_q.weight"])
    llm = load_llama(out / "mixed" / MERGED_GGUF)
    for tokens in TOKENS:
        close(engine_logits(llm, tokens), subnet_logits(root / "run", MIXED, tokens), TOL_F32)
    llm.close()
    assert "only `merged.gguf`" in (out / "README.md").read_text()
