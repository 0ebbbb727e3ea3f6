"""Q8_0 / Q4_0 blocks are byte-identical to the `gguf` package's (llama.cpp's own Python reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from shears import qformat
from shears.errors import ShearsError

GGML = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}


def reference(weight: torch.Tensor, scheme: str) -> np.ndarray:
    return quants.quantize(weight.to(torch.float32).numpy(), GGML[scheme])


def hard_weights(seed: int = 0) -> torch.Tensor:
    """Gaussian rows plus the blocks where rounding is delicate: all zero, half zero (pruned), ties,
    one outlier, a negative extreme, tiny and huge magnitudes, float16-subnormal scales."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 256, generator=g) * 0.05
    w[0, :32] = 0.0
    w[1, ::2] = 0.0
    w[2, :32] = torch.arange(32) - 16.0  # integer grid: exact ties x/d = k + 0.5 for q8_0
    w[3, :32] = 1e-3
    w[3, 5] = 3.0
    w[4, :32] = -torch.rand(32, generator=g)
    w[5, :32] *= 1e-6
    w[6, :32] *= 1e4
    w[7, 32:64] = torch.linspace(-1, 1, 32)
    w[8] = w[8].to(torch.bfloat16).to(torch.float32)
    return w


@pytest.mark.parametrize("scheme", qformat.SCHEMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantize_is_byte_identical_to_gguf(scheme, seed):
    w = hard_weights(seed)
    ours = qformat.quantize(w, scheme)
    assert ours.dtype == torch.uint8
    np.testing.assert_array_equal(ours.numpy(), reference(w, scheme))


@pytest.mark.parametrize("scheme", qformat.SCHEMES)
def test_dequantize_equals_gguf(scheme):
    w = hard_weights(3)
    blocks = reference(w, scheme)
    theirs = quants.dequantize(blocks, GGML[scheme])
    ours = qformat.dequantize(torch.from_numpy(blocks), scheme)
    np.testing.assert_array_equal(ours.numpy(), theirs)
    assert ours.shape == w.shape


@pytest.mark.parametrize("scheme", qformat.SCHEMES)
def test_codes_and_scales_rebuild_the_weights(scheme):
    w = hard_weights(4)
    packed = qformat.quantize(w, scheme)
    d, q = qformat.scales(packed, scheme), qformat.codes(packed, scheme)
    lo, hi = (-127, 127) if scheme == "q8_0" else (-8, 7)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    rebuilt = (q.to(torch.float32).reshape(24, -1, 32) * d.unsqueeze(-1)).reshape(24, -1)
    assert torch.equal(rebuilt, qformat.dequantize(packed, scheme))


@pytest.mark.parametrize("scheme", qformat.SCHEMES)
def test_pruned_zeros_stay_exactly_zero(scheme):
    w = hard_weights(5)
    w[w.abs() < w.abs().median()] = 0.0
    back = qformat.dequantize(qformat.quantize(w, scheme), scheme)
    assert torch.all(back[w == 0] == 0)


@pytest.mark.parametrize("scheme", qformat.SCHEMES)
def test_requantize_keeps_the_scales_and_is_idempotent(scheme):
    w = hard_weights(6)
    packed = qformat.quantize(w, scheme)
    # requantizing the dequantized weights on their own scales gives back the same weights (and bytes,
    # except the codes of blocks whose scale underflowed to float16 zero, which dequantize to 0 anyway)
    back = qformat.dequantize(packed, scheme)
    again = qformat.requantize(back, packed, scheme)
    assert torch.equal(qformat.dequantize(again, scheme), back)
    live = (qformat.scales(packed, scheme) != 0).repeat_interleave(32, dim=1)
    assert torch.equal(qformat.codes(again, scheme)[live], qformat.codes(packed, scheme)[live])
    # a perturbed weight keeps every scale; its codes move to the nearest grid point (clipped)
    moved = w + 0.01 * torch.randn_like(w)
    moved[w == 0] = 0.0
    again = qformat.requantize(moved, packed, scheme)
    assert torch.equal(qformat.scales(again, scheme), qformat.scales(packed, scheme))
    assert torch.all(qformat.dequantize(again, scheme)[w == 0] == 0)


def test_fake_quantize_passes_the_gradient_straight_through():
    packed = qformat.quantize(hard_weights(7), "q4_0")
    # as in training: the dequantized base (plus an update) is snapped back onto the frozen grid
    w = qformat.dequantize(packed, "q4_0").requires_grad_(True)
    out = qformat.fake_quantize_on_scales(w, qformat.scales(packed, "q4_0"), "q4_0")
    assert torch.equal(out.detach(), qformat.dequantize(packed, "q4_0"))
    (out * 3).sum().backward()
    assert torch.equal(w.grad, torch.full_like(w, 3.0))


def test_quantized_tensor_and_sizes():
    w = hard_weights(8)
    t = qformat.QuantizedTensor.from_weight(w, "q4_0")
    assert t.blocks.numel() == qformat.nbytes((24, 256), "q4_0") == 24 * 8 * 18
    assert t.ggml_type() == GGMLQuantizationType.Q4_0
    assert torch.equal(t.dequantize(), qformat.dequantize(t.blocks, "q4_0"))
    with pytest.raises(ShearsError, match="do not hold"):
        qformat.QuantizedTensor("q8_0", (24, 256), t.blocks)


def test_bad_input_is_one_line():
    with pytest.raises(ShearsError, match="use one of q8_0, q4_0"):
        qformat.quantize(torch.zeros(2, 32), "q5_k")
    with pytest.raises(ShearsError, match="not a multiple of 32"):
        qformat.quantize(torch.zeros(2, 40), "q8_0")
    with pytest.raises(ShearsError, match="inf or NaN"):
        qformat.quantize(torch.full((2, 32), float("nan")), "q8_0")


@pytest.mark.real_model
@pytest.mark.parametrize("scheme", qformat.SCHEMES)
def test_real_weights_are_byte_identical_to_gguf(scheme):
    from shears.models import load_model

    model = load_model("smollm2-135m")
    for name, p in model.named_parameters():
        if name.endswith(("layers.0.self_attn.q_proj.weight", "layers.29.mlp.down_proj.weight")):
            np.testing.assert_array_equal(qformat.quantize(p, scheme).numpy(), reference(p.detach(), scheme))
