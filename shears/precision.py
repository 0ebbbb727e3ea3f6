"""Compute precision: the one owner of "does this device have native bf16" and of the autocast context.

Every stage that runs the model (training, evaluation, search, Wanda calibration) takes the same
setting, `auto | true | false`: `auto` autocasts matmuls to bfloat16 where the hardware executes
them natively (CUDA with bf16, a CPU with AVX512-BF16 or AMX), and stays float32 elsewhere, where
emulated bf16 would be slower *and* less accurate. Weights, adapter parameters and optimizer
state stay float32 either way: autocast only changes the dtype the matmuls run in.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Union

import torch

from .errors import ShearsError

BF16Setting = Union[bool, str]  # True | False | "auto"
_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def _cpu_has_native_bf16() -> bool:
    # torch has no public "native bf16 on this CPU" query; Linux names the ISA extensions in /proc/cpuinfo.
    # Elsewhere we answer no, so `auto` stays fp32 rather than risk emulated (slow) bf16.
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & set(_CPU_FLAGS))


def native_bf16(device: Union[str, torch.device, None] = None) -> bool:
    """Whether `device` (default: CUDA when present, else the CPU) runs bf16 matmuls natively."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_has_native_bf16()
    return False


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_bf16(setting: BF16Setting, device: Union[str, torch.device, None] = None,
                 key: str = "training.bf16") -> bool:
    """`auto` -> whether the device has native bf16; `true` -> True, or a one-line error without it."""
    device = torch.device(device) if device is not None else default_device()
    if setting == "auto":
        return native_bf16(device)
    if setting is True:
        if not native_bf16(device):
            raise ShearsError(f"{key}=true but this {device.type} has no native bf16 "
                              f"(needs CUDA bf16, or a CPU with {' or '.join(_CPU_FLAGS)}): "
                              f"use {key}=auto (bf16 where supported) or false")
        return True
    if setting is False:
        return False
    raise ShearsError(f"{key}={setting!r}: use auto, true or false")


def precision_name(bf16: bool) -> str:
    """What run summaries and histories record: the compute dtype of the matmuls."""
    return "bf16-autocast" if bf16 else "fp32"


def autocast(bf16: bool, device: Union[str, torch.device, None] = None):
    """bf16 autocast on `device` when `bf16`, else a no-op context."""
    if not bf16:
        return contextlib.nullcontext()
    device = torch.device(device) if device is not None else default_device()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class _Float32Head(torch.nn.Module):
    """The output projection computed in float32 whatever the surrounding autocast says.

    Under bf16 autocast the logits would come out in bf16, whose 8-bit mantissa rounds a logit near 20
    to a step of 0.125: two answer options whose log-likelihoods differ by less than that tie (seen on
    ARC-Easy: 4 of 48 picks flipped against fp32, at a margin of exactly 0). The hidden states stay bf16
    products; only the last projection, which sees few positions (`logits_to_keep`), runs in fp32."""

    def __init__(self, head: torch.nn.Linear):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        bias = None if self.head.bias is None else self.head.bias.float()
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            # contiguous: a `logits_to_keep` slice is a strided view, and torch multiplies a strided 3-D input by a
            # weight that needs no grad through bmm, at about half the speed of one mm
            return torch.nn.functional.linear(hidden.float().contiguous(), self.head.weight.float(), bias)


def output_head(model):
    """The model's output projection (an HF model's or a PeftModel's), or None."""
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


@contextlib.contextmanager
def float32_logits(model):
    """For the duration, `model`'s logits are computed in float32 (see _Float32Head); restored after.

    `model` is an HF causal LM or a PeftModel around one. An output layer that is not a plain Linear
    (a LoRA-wrapped lm_head) is left alone: replacing it would drop its adapter."""
    head = output_head(model)
    if type(head) is not torch.nn.Linear:
        yield model
        return
    model.set_output_embeddings(_Float32Head(head))
    try:
        yield model
    finally:
        model.set_output_embeddings(head)


@contextlib.contextmanager
def bf16_weights(model, enabled: bool = True, frozen_only: bool = True):
    """For the duration, float32 Linear weights are held in bf16 (by default only frozen ones, which
    require no grad); the float32 originals come back after, untouched.

    Autocast caches its bf16 copy of a weight only for leaf tensors that require grad, so a frozen base
    weight is re-cast on every call: for one-token decode steps that cast costs more than the matmul.
    Casting once gives the same numbers — autocast's cast and `.to(bfloat16)` round alike. The output
    projection is skipped: `float32_logits` reads it in float32 (and a tied embedding shares its tensor)."""
    head = output_head(model)
    head = getattr(head, "head", head)  # inside float32_logits the Linear is wrapped
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    if enabled:
        for module in model.modules():
            w = getattr(module, "weight", None)
            if (isinstance(module, torch.nn.Linear) and module is not head and isinstance(w, torch.nn.Parameter)
                    and w.dtype == torch.float32 and not (frozen_only and w.requires_grad)):
                saved.append((w, w.data))
                w.data = w.data.to(torch.bfloat16)
    try:
        yield model
    finally:
        for w, original in saved:
            w.data = original
