"""Q8_0 and Q4_0: llama.cpp's block formats, in torch, and how a quantized base is stored.

This is the one interface between quantizing a base (`shears.quantize`), training adapters against it,
and writing it as GGUF (`shears.export --format gguf`): the bytes produced here are the bytes llama.cpp
reads, so a GGUF export copies them and never re-quantizes.

A weight `W[rows, cols]` is cut into blocks of 32 consecutive weights along its input dimension
(`cols`). Each block is stored as one float16 scale `d` followed by its codes (ggml's `block_q8_0` and
`block_q4_0`; GGUF's `GGML_TYPE_Q8_0` / `GGML_TYPE_Q4_0`):

    q8_0  34 bytes: d = max|x| / 127,   code q = round-half-away(x / d) in [-127, 127],   x ~ d * q
    q4_0  18 bytes: d = x_m / -8,       code q = floor(x / d + 8.5) clipped to [0, 15],   x ~ d * (q - 8)
                    where x_m is the block's value of largest magnitude, sign kept; byte j of the 16
                    code bytes holds code j in its low nibble and code j + 16 in its high nibble.

The reciprocal 1/d is taken in float32 from the float32 d, before d is rounded to float16; that is how
ggml (and the `gguf` package, which tests/test_qformat.py compares against byte for byte) computes the
codes. A zero weight gets code 0 (q4_0: nibble 8), so a pruned zero dequantizes to exactly 0.0.

Storage of a quantized base (a model folder): every quantized weight `NAME` is the uint8 tensor
`NAME.qblocks` of shape [rows, cols / 32 * bytes_per_block] in the folder's safetensors (exactly the
GGUF tensor data, row-major), and `quantization.json` records the scheme of each and, for every weight
kept at higher precision, why. `QuantizedTensor` is one such weight. The record's keys:

    {"format": "shears-quant/1",
     "scheme": "q4_0",                                  # the scheme the folder was quantized with
     "block_size": 32,
     "quantized": {NAME: {"shape": [rows, cols], "scheme": "q4_0"}, ...},   # stored as NAME.qblocks
     "kept": {NAME: "why it is kept at higher precision", ...},            # stored as NAME, as it was
     "tied": {NAME: OTHER, ...},       # NAME is the same tensor as OTHER (a tied output layer): not stored
     "settings": {...}, "report": {...}}               # the writer's own provenance (optional)

NAME is a parameter name of the model's state dict (`model.layers.0.mlp.down_proj.weight`). Every
tensor of the safetensors is either a quantized weight's blocks or a kept tensor, and every name of
"quantized" and "kept" is in it. `save_quantized_folder` writes both files, `load_quantized_state`
reads them back (refusing anything that disagrees); `QuantizedState.state_dict()` gives the weights a
model computes with (dequantized, bit-identical to what llama.cpp dequantizes).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .errors import ShearsError

Scheme = Literal["q8_0", "q4_0"]
SCHEMES: tuple[str, ...] = ("q8_0", "q4_0")
BLOCK_SIZE = 32
BYTES_PER_BLOCK = {"q8_0": 2 + 32, "q4_0": 2 + 16}
QUANT_FILE = "quantization.json"
QUANT_FORMAT = "shears-quant/1"
BLOCKS_SUFFIX = ".qblocks"  # safetensors key of a quantized weight: f"{name}{BLOCKS_SUFFIX}"
WEIGHTS_FILE = "model.safetensors"  # the folder's weights, as Hugging Face names a single-file model


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ShearsError(f"unknown quantization scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    return scheme


def check_quantizable(weight: torch.Tensor, name: str = "weight") -> None:
    if weight.dim() != 2:
        raise ShearsError(f"{name} has shape {tuple(weight.shape)}: only 2-D weights are quantized; keep it "
                          "at full precision")
    if weight.shape[1] % BLOCK_SIZE:
        raise ShearsError(f"{name} has {weight.shape[1]} input columns, not a multiple of {BLOCK_SIZE}: keep it "
                          "at full precision (leave it out of the quantized modules)")


def _blocks(weight: torch.Tensor) -> torch.Tensor:
    """[rows, cols] -> float32 [rows, cols / 32, 32]."""
    rows, cols = weight.shape
    return weight.detach().to(torch.float32).reshape(rows, cols // BLOCK_SIZE, BLOCK_SIZE)


def _reciprocal(d: torch.Tensor) -> torch.Tensor:
    # an all-zero block has d = 0 and codes 0 (q4_0: 8); ggml uses 1/d = 0 there
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    # ggml's roundf; floor(|x| + 0.5) is not the same in float32 just below a half (0.49999997 + 0.5 == 1.0)
    a = x.abs()
    whole = torch.floor(a)
    return torch.sign(x) * (whole + torch.floor(2 * (a - whole)))


def _scales(blocks: torch.Tensor, scheme: str) -> torch.Tensor:
    """float32 d per block, before its rounding to float16."""
    if scheme == "q8_0":
        return blocks.abs().amax(dim=-1, keepdim=True) / 127
    index = blocks.abs().argmax(dim=-1, keepdim=True)
    return torch.gather(blocks, -1, index) / -8


def _codes(blocks: torch.Tensor, inverse: torch.Tensor, scheme: str) -> torch.Tensor:
    """Signed codes: q8_0 in [-127, 127]; q4_0 in [-8, 7] (the stored nibble minus 8)."""
    if scheme == "q8_0":
        return _round_half_away(blocks * inverse).clamp(-127, 127).to(torch.int8)
    return (torch.trunc(blocks * inverse + 8.5).clamp(0, 15) - 8).to(torch.int8)


def _pack(scales16: torch.Tensor, codes: torch.Tensor, scheme: str) -> torch.Tensor:
    """float16 [rows, n, 1] scales and int8 [rows, n, 32] codes -> uint8 [rows, n * bytes_per_block]."""
    rows, n, _ = codes.shape
    d = scales16.contiguous().view(torch.uint8)  # [rows, n, 2], little-endian as on every host torch runs on
    if scheme == "q8_0":
        qs = codes.view(torch.uint8)
    else:
        nibbles = (codes.to(torch.int16) + 8).to(torch.uint8)
        qs = nibbles[..., :16] | (nibbles[..., 16:] << 4)
    return torch.cat([d, qs], dim=-1).reshape(rows, n * BYTES_PER_BLOCK[scheme])


def quantize(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """The GGUF bytes of `weight` [rows, cols]: uint8 [rows, cols / 32 * bytes_per_block]."""
    check_scheme(scheme)
    check_quantizable(weight)
    blocks = _blocks(weight)
    if not torch.isfinite(blocks).all():
        raise ShearsError("the weight holds inf or NaN: it cannot be quantized; check the base model")
    d = _scales(blocks, scheme)
    return _pack(d.to(torch.float16), _codes(blocks, _reciprocal(d), scheme), scheme)


def _split(packed: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [rows, n * bytes] -> (float16 scales [rows, n, 1], raw code bytes [rows, n, bytes - 2])."""
    check_scheme(scheme)
    rows, width = packed.shape
    per = BYTES_PER_BLOCK[scheme]
    if packed.dtype != torch.uint8 or width % per:
        raise ShearsError(f"not {scheme} blocks: expected uint8 rows of a multiple of {per} bytes, got "
                          f"{packed.dtype} {tuple(packed.shape)}")
    raw = packed.reshape(rows, width // per, per)
    return raw[..., :2].contiguous().view(torch.float16), raw[..., 2:]


def scales(packed: torch.Tensor, scheme: str) -> torch.Tensor:
    """float32 [rows, cols / 32]: each block's d, as stored (float16)."""
    return _split(packed, scheme)[0].squeeze(-1).to(torch.float32)


def codes(packed: torch.Tensor, scheme: str) -> torch.Tensor:
    """int8 [rows, cols]: each weight's signed code (q4_0: nibble - 8), so that W = d * code."""
    _, qs = _split(packed, scheme)
    if scheme == "q8_0":
        signed = qs.contiguous().view(torch.int8)
    else:
        signed = torch.cat([qs & 0x0F, qs >> 4], dim=-1).to(torch.int8) - 8
    return signed.reshape(signed.shape[0], -1)


def dequantize(packed: torch.Tensor, scheme: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weights llama.cpp computes with: d (float16 -> float32) times each code, [rows, cols]."""
    d = scales(packed, scheme)
    q = codes(packed, scheme).to(torch.float32)
    rows = q.shape[0]
    w = q.reshape(rows, -1, BLOCK_SIZE) * d.unsqueeze(-1)
    return w.reshape(rows, -1).to(dtype)


def requantize(weight: torch.Tensor, packed: torch.Tensor, scheme: str) -> torch.Tensor:
    """The blocks of `weight` with the scales of `packed` kept (frozen), only the codes recomputed.

    This is how an adapter is merged into a quantized base without moving its grid: each merged weight
    takes the nearest code on the base's per-block scale (clipped to the code range), so the result is
    still `scheme` with the same scales, and a weight that is exactly zero stays exactly zero."""
    check_quantizable(weight)
    d16, _ = _split(packed, scheme)
    blocks = _blocks(weight)
    if tuple(blocks.shape[:2]) != tuple(d16.shape[:2]):
        raise ShearsError(f"weight {tuple(weight.shape)} does not match its blocks {tuple(packed.shape)}")
    return _pack(d16, _codes(blocks, _reciprocal(d16.to(torch.float32)), scheme), scheme)


def round_to_grid(weight: torch.Tensor, d: torch.Tensor, scheme: str) -> torch.Tensor:
    """The nearest point of `weight` [rows, cols] on the grid of the frozen block scales `d` [rows, cols / 32]
    (float32, as `scales` returns them), in float32: exactly dequantize(requantize(weight, packed)) for
    d = scales(packed), without packing the codes into bytes and out again (training runs it every step)."""
    check_scheme(scheme)
    check_quantizable(weight)
    blocks = _blocks(weight)
    if tuple(blocks.shape[:2]) != tuple(d.shape):
        raise ShearsError(f"weight {tuple(weight.shape)} does not match its block scales {tuple(d.shape)}")
    d = d.to(torch.float32).unsqueeze(-1)
    q = _codes(blocks, _reciprocal(d), scheme).to(torch.float32)
    return (q * d).reshape(weight.shape)


def fake_quantize_on_scales(weight: torch.Tensor, d: torch.Tensor, scheme: str) -> torch.Tensor:
    """Quantization with a straight-through gradient (Bengio et al. 2013) on the frozen block scales
    `d = scales(packed)`: forward the nearest grid point (round_to_grid, in weight's dtype), backward the
    gradient to `weight` unchanged. weight - weight.detach() is exactly 0 forward, so the output is exactly
    the grid point."""
    return round_to_grid(weight, d, scheme).to(weight.dtype) + (weight - weight.detach())


def nbytes(shape: tuple[int, int], scheme: str) -> int:
    rows, cols = shape
    return rows * (cols // BLOCK_SIZE) * BYTES_PER_BLOCK[check_scheme(scheme)]


@dataclass(frozen=True)
class QuantizedTensor:
    """One stored quantized weight: its scheme, logical shape [rows, cols] and GGUF block bytes."""

    scheme: str
    shape: tuple[int, int]
    blocks: torch.Tensor  # uint8 [rows, cols / 32 * bytes_per_block]

    @classmethod
    def from_weight(cls, weight: torch.Tensor, scheme: str) -> "QuantizedTensor":
        return cls(scheme, (int(weight.shape[0]), int(weight.shape[1])), quantize(weight, scheme))

    def __post_init__(self):
        check_scheme(self.scheme)
        if tuple(self.blocks.shape) != (self.shape[0], nbytes(self.shape, self.scheme) // self.shape[0]):
            raise ShearsError(f"{self.scheme} blocks of shape {tuple(self.blocks.shape)} do not hold a "
                              f"{self.shape[0]}x{self.shape[1]} weight")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.blocks, self.scheme, dtype)

    def ggml_type(self):
        """The `gguf.GGMLQuantizationType` of these blocks (for writing them into a GGUF file)."""
        from gguf import GGMLQuantizationType

        return {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}[self.scheme]


# --------------------------------------------------------------------------- a quantized model folder

@dataclass
class QuantizedState:
    """A quantized folder's weights: the quantized ones as blocks, the others as stored, and why."""

    scheme: str
    quantized: dict[str, QuantizedTensor]
    kept: dict[str, torch.Tensor]
    why: dict[str, str]  # kept name -> why it is kept at higher precision
    tied: dict[str, str] = field(default_factory=dict)  # name -> the stored name it is the same tensor as
    record: dict = field(default_factory=dict)  # the whole quantization.json

    def state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Every stored weight as the model computes with it: quantized ones dequantized (float32, then
        `dtype`), kept floating-point ones cast to `dtype`. Tied names are left to the model to tie."""
        out = {name: t.dequantize(torch.float32).to(dtype) for name, t in self.quantized.items()}
        out.update({name: t.to(dtype) if t.is_floating_point() else t for name, t in self.kept.items()})
        return out

    def nbytes(self) -> int:
        """Bytes of the stored weights (blocks + kept tensors): what the folder's safetensors holds, less its header."""
        return (sum(t.blocks.numel() for t in self.quantized.values())
                + sum(t.numel() * t.element_size() for t in self.kept.values()))


def is_quantized_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / QUANT_FILE).is_file()


def save_quantized_folder(folder: str | os.PathLike, quantized: dict[str, QuantizedTensor],
                          kept: dict[str, torch.Tensor], why: dict[str, str], tied: dict[str, str] | None = None,
                          scheme: str | None = None, extra: dict | None = None) -> Path:
    """Write WEIGHTS_FILE (blocks + kept tensors) and QUANT_FILE into the existing `folder` -- a temporary one
    that the caller renames into place (shears.atomic.atomic_folder), so no reader ever sees half of it.
    `why` gives, for every kept tensor, why it is kept; `extra` adds the writer's own keys to the record."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if set(why) != set(kept):
        raise ShearsError(f"every kept tensor needs a reason: missing for {sorted(set(kept) - set(why))[:3]}")
    clash = set(quantized) & set(kept)
    if clash:
        raise ShearsError(f"{sorted(clash)[:3]} are both quantized and kept: keep each weight one way")
    schemes = {t.scheme for t in quantized.values()}
    scheme = scheme or (schemes.pop() if len(schemes) == 1 else None)
    tensors = {f"{name}{BLOCKS_SUFFIX}": t.blocks.contiguous().cpu() for name, t in quantized.items()}
    tensors.update({name: t.detach().contiguous().cpu() for name, t in kept.items()})
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "shears": QUANT_FORMAT})
    record = {"format": QUANT_FORMAT, "scheme": scheme, "block_size": BLOCK_SIZE,
              "quantized": {name: {"shape": list(t.shape), "scheme": t.scheme} for name, t in quantized.items()},
              "kept": dict(why), "tied": dict(tied or {}), **(extra or {})}
    (folder / QUANT_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return folder


def read_quantization_record(folder: str | os.PathLike) -> dict:
    """A folder's QUANT_FILE, checked for its format (one-line errors)."""
    path = Path(folder) / QUANT_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ShearsError(f"{path} cannot be read ({type(err).__name__}): quantize the base again") from None
    if not isinstance(record, dict) or record.get("format") != QUANT_FORMAT:
        found = record.get("format") if isinstance(record, dict) else None
        raise ShearsError(f"{path} has format {found!r}, expected {QUANT_FORMAT}: quantize the base again "
                          "with this version of shears")
    return record


def load_quantized_state(folder: str | os.PathLike) -> QuantizedState:
    """The weights of a quantized folder (see the module docstring), checked against its record."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    record = read_quantization_record(folder)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError) as err:
            raise ShearsError(f"{file} is damaged ({str(err).splitlines()[0]}): quantize the base again") from None
    quantized, kept = {}, {}
    for name, entry in record["quantized"].items():
        blocks = tensors.pop(f"{name}{BLOCKS_SUFFIX}", None)
        if blocks is None:
            raise ShearsError(f"{folder} lacks the blocks of {name} that {QUANT_FILE} lists: quantize the base again")
        quantized[name] = QuantizedTensor(entry["scheme"], (int(entry["shape"][0]), int(entry["shape"][1])), blocks)
    for name in record["kept"]:
        if name not in tensors:
            raise ShearsError(f"{folder} lacks {name}, which {QUANT_FILE} keeps: quantize the base again")
        kept[name] = tensors.pop(name)
    if tensors:
        raise ShearsError(f"{folder} holds tensors {QUANT_FILE} does not account for ({sorted(tensors)[:3]}): "
                          "quantize the base again")
    return QuantizedState(record.get("scheme"), quantized, kept, dict(record["kept"]), dict(record.get("tied", {})),
                          record)
