"""LoRA-Squeeze against the obvious computation: form the dense update, take its full SVD, truncate."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from shears.errors import ShearsError
from shears.squeeze import (
    DEFAULT_TOL,
    main,
    rank_for_energy,
    squeeze_adapter_dir,
    squeeze_dense,
    squeeze_lora,
    squeeze_lora_layer,
)
from conftest import make_tiny_model

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------- the reference

def svd_truncation(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Eckart–Young: (best rank-k approximation, its relative Frobenius error, all singular values)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    best = (u[:, :k] * s[:k]) @ vh[:k]
    return best, float(s[k:].norm() / s.norm()), s


def energy_rank_reference(s: list[float], energy: float) -> int:
    total = sum(x * x for x in s)
    return next(k for k in range(1, len(s) + 1) if sum(x * x for x in s[:k]) >= energy * total)


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm())


def random_factors(out_f: int, in_f: int, r: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, in_f, generator=g, dtype=dtype), torch.randn(out_f, r, generator=g, dtype=dtype)


def assert_optimal(result, delta: torch.Tensor, k: int, scale: float) -> None:
    best, optimum, s = svd_truncation(delta, k)
    assert result.rank == k and result.scale == scale
    ours = scale * result.B.double() @ result.A.double()
    assert abs(rel(ours, delta) - optimum) <= 1e-6           # as good as Eckart–Young
    assert abs(result.rel_error - optimum) <= 1e-9            # the core's error estimate is exact
    assert s[k - 1] - s[k] > 1e-3 * s[0]                      # distinct at the cut, so dW_k is unique ...
    assert rel(ours, best) <= 1e-8                            # ... and ours is it


# --------------------------------------------------------------------------- the QR-core squeeze

@pytest.mark.parametrize("out_f,in_f,r,k", [(48, 40, 12, 5), (20, 64, 16, 7), (8, 40, 16, 4), (64, 6, 12, 3)])
def test_squeeze_lora_equals_svd_truncation(out_f, in_f, r, k):
    A, B = random_factors(out_f, in_f, r, seed=out_f + k)
    scale = 2.5
    result = squeeze_lora(A, B, scale, rank=k)
    assert result.A.shape == (k, in_f) and result.B.shape == (out_f, k)
    assert_optimal(result, scale * B @ A, k, scale)
    # sqrt(Σ) is folded symmetrically: both factors have the same per-direction norm sqrt(σ_i/s)
    assert torch.allclose(result.A.norm(dim=1), result.B.norm(dim=0), rtol=1e-10)


def test_squeeze_lora_upcasts_low_precision_factors():
    A, B = random_factors(40, 32, 8, seed=1, dtype=torch.bfloat16)
    result = squeeze_lora(A, B, 0.5, rank=3)
    assert result.A.dtype == torch.bfloat16 and result.B.dtype == torch.bfloat16
    _, optimum, _ = svd_truncation(0.5 * B.double() @ A.double(), 3)
    assert abs(result.rel_error - optimum) <= 1e-9  # computed from the exact upcast values, not in bf16


def test_squeeze_lora_new_scale_moves_magnitude_into_factors():
    A, B = random_factors(30, 20, 6, seed=2)
    result = squeeze_lora(A, B, 2.0, rank=4, new_scale=0.5)
    best, _, _ = svd_truncation(2.0 * B @ A, 4)
    assert result.scale == 0.5 and rel(0.5 * result.B @ result.A, best) <= 1e-8


def test_trained_adapter_layers_squeeze_optimally():
    model = get_peft_model(make_tiny_model("llama"), LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        ids = torch.randint(3, 128, (4, 16), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(layers) == 2 * len(ALL_LINEAR)
    for layer in layers:
        A, B, scale = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        assert B.abs().max() > 0  # really trained: B starts at zero
        result = squeeze_lora_layer(layer, rank=3)
        assert result.A.dtype == A.dtype and result.A.device == A.device
        delta = scale * B.detach().double() @ A.detach().double()
        best, optimum, s = svd_truncation(delta, 3)
        ours = scale * result.B.double() @ result.A.double()
        # float32 outputs: equal to the optimum up to float32 rounding of the new factors
        assert abs(rel(ours, delta) - optimum) <= 1e-6
        if s[2] - s[3] > 1e-2 * s[0]:
            assert rel(ours, best) <= 1e-5


# --------------------------------------------------------------------------- choosing the rank

SPECTRUM = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]


def known_spectrum_factors(spectrum: list[float], out_f=30, in_f=24, seed=3):
    """B·A with exactly these singular values: B = U·diag(σ), A = Vᵀ with random orthonormal U, V."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_f, len(spectrum), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_f, len(spectrum), generator=g, dtype=torch.float64))
    return v.T.contiguous(), u * torch.tensor(spectrum, dtype=torch.float64)


@pytest.mark.parametrize("energy", [0.5, 0.8, 0.95, 0.99, 0.997, 0.9995, 1.0])
def test_energy_mode_picks_smallest_rank_reaching_energy(energy):
    A, B = known_spectrum_factors(SPECTRUM)
    expected = energy_rank_reference(SPECTRUM, energy)
    result = squeeze_lora(A, B, 1.0, energy=energy)
    assert result.rank == expected
    if expected < len(SPECTRUM):
        assert_optimal(result, B @ A, expected, 1.0)
    assert rank_for_energy(torch.tensor(SPECTRUM), energy) == expected


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, DEFAULT_TOL)])
def test_zero_direction_mode_recovers_exact_rank_of_deficient_update(dtype, tol):
    g = torch.Generator().manual_seed(4)
    # r = 10 factors whose product has rank 4: B's columns span only 4 directions (up to dtype rounding)
    B = (torch.randn(36, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 10, generator=g, dtype=torch.float64))
    A = torch.randn(10, 28, generator=g, dtype=torch.float64)
    A, B = A.to(dtype), B.to(dtype)
    delta = 0.75 * B.double() @ A.double()
    assert torch.linalg.matrix_rank(delta, rtol=1e-4).item() == 4
    result = squeeze_lora(A, B, 0.75, tol=tol)
    assert result.rank == 4 and result.rel_error <= tol
    assert rel(0.75 * result.B.double() @ result.A.double(), delta) <= 10 * tol


def test_rank_is_clamped_to_what_the_factors_hold():
    A, B = random_factors(10, 12, 4, seed=5)
    assert squeeze_lora(A, B, 1.0, rank=16).rank == 4
    zero = squeeze_lora(A, torch.zeros_like(B), 1.0, energy=0.9)
    assert zero.rank == 1 and zero.rel_error == 0.0 and zero.B.abs().max() == 0


@pytest.mark.parametrize("kwargs", [{}, {"rank": 2, "energy": 0.9}, {"rank": 0}, {"energy": 1.5}, {"tol": -1.0}])
def test_bad_rank_rule_is_a_shears_error(kwargs):
    A, B = random_factors(10, 12, 4, seed=6)
    with pytest.raises(ShearsError):
        squeeze_lora(A, B, 1.0, **kwargs)


# --------------------------------------------------------------------------- the randomised, dense path

def masked_update(out_f=96, in_f=128, r=16, seed=7) -> torch.Tensor:
    """A SparsePEFT-style update (s·B·A) ⊙ M: the mask makes it full rank, with a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, in_f, generator=g) * torch.logspace(0, -2, r)[:, None]
    B = torch.randn(out_f, r, generator=g)
    mask = torch.rand(out_f, in_f, generator=g) > 0.5
    return (2.0 * B @ A) * mask


def test_rsvd_on_masked_update_is_near_optimal():
    delta = masked_update()
    torch.manual_seed(0)
    result = squeeze_dense(delta, rank=8, scale=2.0)
    _, optimum, _ = svd_truncation(delta, 8)
    ours = rel(2.0 * result.B @ result.A, delta)
    assert result.A.shape == (8, 128) and result.B.shape == (96, 8)
    assert abs(result.rel_error - ours) <= 1e-6
    assert optimum <= ours <= optimum * 1.01


def test_dense_energy_mode_matches_full_svd_rule():
    delta = masked_update()
    s = torch.linalg.svd(delta.double()).S.tolist()
    expected = energy_rank_reference(s, 0.9)
    torch.manual_seed(0)
    result = squeeze_dense(delta, energy=0.9)
    assert result.rank == expected
    assert 1 - result.rel_error**2 >= 0.9 - 1e-4


def test_dense_tolerance_mode_finds_exact_rank():
    g = torch.Generator().manual_seed(8)
    delta = torch.randn(200, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 150, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    result = squeeze_dense(delta, tol=1e-8, dtype=torch.float64)
    assert result.rank == 5 and rel(result.B @ result.A, delta) <= 1e-8


# --------------------------------------------------------------------------- stock PEFT folders and the CLI

def lora_scale(config: dict, module: str, r: int) -> float:
    """The original adapter's scale, from the options the test itself chose (short keys are fine here)."""
    leaf = module.rsplit(".", 1)[-1]
    alpha = config["alpha_pattern"].get(leaf, config["lora_alpha"])
    return alpha / math.sqrt(r) if config["use_rslora"] else alpha / r


def make_adapter(tmp_path, use_rslora=False):
    """A tiny base saved to disk, and a stock PEFT adapter on it with mixed ranks/alphas and random B."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    make_tiny_model("llama").save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)  # so the adapter records base_model_name_or_path
    config = LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR + ["embed_tokens"], init_lora_weights=False,
                        use_rslora=use_rslora, rank_pattern={"v_proj": 4}, alpha_pattern={"o_proj": 32})
    get_peft_model(base, config).save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def original_updates(adapter_dir) -> dict[str, torch.Tensor]:
    """module path -> dense dW (as it applies to the module's weight), from the saved tensors."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    updates = {}
    for key, A in tensors.items():
        for a_suffix, b_suffix, transpose in ((".lora_A.weight", ".lora_B.weight", False),
                                              (".lora_embedding_A", ".lora_embedding_B", True)):
            if key.endswith(a_suffix):
                module = key.removeprefix("base_model.model.").removesuffix(a_suffix)
                B = tensors[key.removesuffix(a_suffix) + b_suffix]
                delta = lora_scale(config, module, A.shape[0]) * B.double() @ A.double()
                updates[module] = delta.T if transpose else delta
    return updates


def merged_reference(updates: dict[str, torch.Tensor], ranks: dict[str, int]):
    """The base model with each module's weight += its dense update truncated by full SVD."""
    model = make_tiny_model("llama")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for module, delta in updates.items():
            k = ranks[module]
            best, _, _ = svd_truncation(delta.T if "embed" in module else delta, k)
            modules[module].weight += (best.T if "embed" in module else best).float()
    return model


def loaded_ranks_and_scales(peft_model) -> dict[str, tuple[int, float]]:
    found = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            found[name] = (module.lora_A["default"].weight.shape[0], module.scaling["default"])
        elif hasattr(module, "lora_embedding_A") and "default" in module.lora_embedding_A:
            found[name] = (module.lora_embedding_A["default"].shape[0], module.scaling["default"])
    return found


@pytest.mark.parametrize("use_rslora", [False, True])
def test_cli_rank_squeeze_loads_in_peft_and_matches_svd_merge(tmp_path, capsys, use_rslora):
    base_dir, adapter_dir = make_adapter(tmp_path, use_rslora)
    updates = original_updates(adapter_dir)
    original_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    main(["--adapter", str(adapter_dir), "--rank", "3", "--output", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "model.layers.1.self_attn.v_proj" in printed and "wrote squeezed adapter" in printed

    model = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path / "out").eval()
    loaded = loaded_ranks_and_scales(model)
    assert set(loaded) == set(updates)
    for module, (rank, scale) in loaded.items():
        r_before = 4 if module.endswith("v_proj") else 8
        assert rank == 3
        assert scale == pytest.approx(lora_scale(original_config, module, r_before), rel=1e-12)  # s' = s

    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = merged_reference(updates, {m: 3 for m in updates})
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_energy_squeeze_gives_heterogeneous_ranks_applied_per_module(tmp_path):
    base_dir, adapter_dir = make_adapter(tmp_path)
    # give every module its own spectrum so that energy picks different ranks
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    for i, key in enumerate(sorted(k for k in tensors if "lora_B" in k or "lora_embedding_B" in k)):
        decay = torch.logspace(0, -(0.3 + 0.25 * i), tensors[key].shape[1])
        tensors[key] = tensors[key] * decay
    save_file(tensors, str(adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    updates = original_updates(adapter_dir)

    squeezed = squeeze_adapter_dir(adapter_dir, tmp_path / "out", energy=0.9)
    expected = {m: energy_rank_reference(torch.linalg.svd(d).S.tolist(), 0.9) for m, d in updates.items()}
    assert {m.module: m.rank_after for m in squeezed.modules} == expected
    assert len(set(expected.values())) >= 3
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert all(key.startswith("^") for key in config["rank_pattern"])

    model = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path / "out").eval()
    assert {m: rank for m, (rank, _) in loaded_ranks_and_scales(model).items()} == expected
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits,
                                   merged_reference(updates, expected)(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_alpha_follows_rank_and_zero_directions_mode_is_lossless(tmp_path):
    _, adapter_dir = make_adapter(tmp_path)
    squeezed = squeeze_adapter_dir(adapter_dir, tmp_path / "out", rank=2)
    for m in squeezed.modules:
        assert m.alpha_after == pytest.approx(m.alpha_before * 2 / m.rank_before)
    # tol mode on a full-rank adapter keeps every direction and changes nothing
    lossless = squeeze_adapter_dir(adapter_dir, tmp_path / "same", tol=1e-6)
    assert all(m.rank_after == m.rank_before and m.rel_error <= 1e-6 for m in lossless.modules)


def test_cli_refuses_to_overwrite_without_force(tmp_path, capsys):
    _, adapter_dir = make_adapter(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        main(["--adapter", str(adapter_dir), "--rank", "2", "--output", str(out)])
    assert err.value.code == 2 and "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    main(["--adapter", str(adapter_dir), "--rank", "2", "--output", str(out), "--force"])
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp leftovers


@pytest.mark.parametrize("make_bad", ["missing", "not_lora", "no_data"])
def test_cli_bad_input_is_one_line_error(tmp_path, capsys, make_bad):
    _, adapter_dir = make_adapter(tmp_path)
    capsys.readouterr()
    args = ["--adapter", str(adapter_dir), "--rank", "2", "--output", str(tmp_path / "out")]
    if make_bad == "missing":
        args[1] = str(tmp_path / "nowhere")
    elif make_bad == "not_lora":
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    else:
        args += ["--recover-steps", "2"]
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- recovery ("Cont-Squeeze")

def save_char_tokenizer(folder) -> None:
    """A character-level tokenizer with ids < 128, so the tiny model can train on text."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


def test_cli_recovery_trains_at_squeezed_ranks(tmp_path, capsys):
    base_dir, adapter_dir = make_adapter(tmp_path)
    save_char_tokenizer(base_dir)
    records = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}", "answer": f"{2 * i + 1}"}
               for i in range(8)]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    squeeze_adapter_dir(adapter_dir, tmp_path / "plain", rank=3)
    main(["--adapter", str(adapter_dir), "--rank", "3", "--output", str(tmp_path / "out"),
          "--recover-steps", "3", "--data", str(data), "--lr", "1e-2", "--batch-size", "4", "--cutoff-len", "512"])
    assert "recovered 3 steps" in capsys.readouterr().out

    plain = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    recovered = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert set(plain) == set(recovered)
    assert all(plain[k].shape == recovered[k].shape for k in plain)
    assert any(not torch.allclose(plain[k], recovered[k]) for k in plain)  # training moved the factors
    record = json.loads((tmp_path / "out" / "squeeze.json").read_text())
    assert record["recovery"]["steps"] == 3 and math.isfinite(record["recovery"]["final_loss"])
    model = PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path / "out")
    assert {rank for rank, _ in loaded_ranks_and_scales(model).values()} == {3}


def test_cli_recovery_refuses_data_cut_off_before_any_response(tmp_path, capsys):
    base_dir, adapter_dir = make_adapter(tmp_path)
    save_char_tokenizer(base_dir)
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "hi", "answer": "hi"}]))
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        main(["--adapter", str(adapter_dir), "--rank", "3", "--output", str(tmp_path / "out"),
              "--recover-steps", "1", "--data", str(data), "--cutoff-len", "8"])
    assert err.value.code == 2 and "--cutoff-len" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
