"""Elastic LoRA: one super-network whose every subnet is a stock LoRA of a smaller rank.

Each adapted linear layer holds LoRA factors at the maximal rank, A (r_max x in) and B (out x r_max).
A subnet of rank r uses the leading slices A[:r, :] and B[:, :r] (views, no copies), so compute falls
with r and switching subnets touches no weights. The scaling stays lora_alpha / r_max for every active
rank: an exported subnet of rank r therefore carries alpha = lora_alpha * r / r_max (PEFT's scaling
is alpha / r), which reproduces the super-network's output exactly.

`ElasticLoraLinear` is a `peft.tuners.lora.layer.Linear` registered through LoraConfig's custom-module
API, so state-dict keys, saving and merging stay PEFT's: `save_pretrained` writes an ordinary adapter
at r_max (the maximal subnet), and merge/merge_and_unload merge the *active* subnet.

SparsePEFT (sparse_adapter=True, SQFT): the adapter update is masked by the base weight's non-zero
pattern, (B A) * mask, so merging keeps the sparse base exactly sparse. Cost per step and module:
one B[:, :r] @ A[:r] product (out*r*in MACs) and an out x in mask multiply on top of the base matmul.
When dropout is inactive the masked update is folded into the base weight, so only one tokens x out x
in matmul runs; with active dropout a second one runs on the dropped-out input. A masked update is in
general not low-rank, so a sparse-adapter subnet is exported faithfully by merging, not as factors.

QA-SparsePEFT (SQFT; `from_base(..., quantized=...)`, a base loaded from a shears.qformat folder): the
masked update is merged into the dequantized base and the sum snapped onto the base's frozen Q8_0/Q4_0
grid -- each block keeps its float16 scale, each weight takes the nearest code -- at every forward,
Q(W + (B A) * mask), with a straight-through gradient to A and B (qformat.fake_quantize_on_scales). So the
merged model is Q8_0/Q4_0 with the base's scales, and the base's zeros (pruned, or rounded to zero) stay
zero: the mask keeps them at exactly 0, which is code 0. `grid_merged_weight` is that merge, the one
definition training's forward and the export's requantized merged/ share. Width spaces reorder the
columns a block of 32 is cut from, so QA-SparsePEFT takes rank-only spaces.

`SuperNet` ties the PEFT model to its `BoundSpace`: activate / sample / save / load. A space with
width or heads groups also makes the base's MLP width or attention heads elastic (shears.width.ElasticWidth:
a subnet keeps the leading channels or key/value groups); `from_base(..., channel_order)` permutes the base's channels by importance first,
`unload()` restores them, and the order is saved with the adapter (channel_order.safetensors).
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from .atomic import atomic_folder
from .errors import ShearsError
from .models import load_safetensors, model_fingerprint
from .qformat import QuantizedTensor, fake_quantize_on_scales, round_to_grid, scales
from .rundir import SHEARS_RECORD
from .search_space import BoundSpace, Config, SearchSpace, load_search_space
from .squeeze import ADAPTER_WEIGHTS, PEFT_PREFIX, pattern_key
from .width import ChannelOrder, ElasticWidth, inverse_order, permute_channels

SEARCH_SPACE_FILE = "search_space.json"
CHANNEL_ORDER_FILE = "channel_order.safetensors"
SUPERNET_FORMAT = "shears-supernet/1"
SCALING_RULE = "lora_alpha / r_max for every active rank (export: alpha_pattern = lora_alpha * r / r_max)"


class ElasticLoraLinear(LoraLinear):
    """A PEFT LoRA Linear whose rank can be cut to `active_rank` <= r at run time."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        if self.lora_variant or any(self.lora_bias.values()):
            raise ShearsError("elastic LoRA supports plain LoRA only: turn off DoRA, lora_bias and other variants")
        if self.fan_in_fan_out:  # nn.Linear stores W as (out, in), the layout of B @ A: no transpose anywhere
            raise ShearsError("elastic LoRA adapts nn.Linear modules: set fan_in_fan_out=False")
        self.active_rank: int = self.r[adapter_name]
        self.sparse = False  # SparsePEFT, set by enable_sparse_mask()
        # QA-SparsePEFT: the quantized base's float32 block scales [out, in / 32] and scheme (enable_grid_merge)
        self.register_buffer("grid_scales", None, persistent=False)
        self.grid_scheme: str | None = None

    def enable_sparse_mask(self) -> None:
        self.sparse = True

    @property
    def sparse_mask(self) -> torch.Tensor | None:
        """(base weight != 0) under SparsePEFT, else None: derived from the weight at each use, never stored,
        so a model holds no mask beside its weights (it would cost half a bf16 model) and a mask cannot go
        stale when the base's channels are permuted."""
        return self.get_base_layer().weight.detach() != 0 if self.sparse else None

    def enable_grid_merge(self, blocks: QuantizedTensor) -> None:
        """QA-SparsePEFT: merge the masked update onto the frozen grid of `blocks`, the base's quantized weight."""
        weight = self.get_base_layer().weight
        if tuple(weight.shape) != tuple(blocks.shape):
            raise ShearsError(f"quantized blocks of shape {blocks.shape} do not belong to a weight of shape "
                              f"{tuple(weight.shape)}: load the base from the quantized folder they came from")
        self.enable_sparse_mask()
        self.grid_scales = scales(blocks.blocks, blocks.scheme).to(weight.device)
        self.grid_scheme = blocks.scheme

    def set_active_rank(self, rank: int) -> None:
        r_max = min(self.r[a] for a in self.lora_A)
        if not 1 <= rank <= r_max:
            raise ShearsError(f"active rank {rank} is outside [1, {r_max}]")
        if self.merged and rank != self.active_rank:
            # unmerge subtracts get_delta_weight at the active rank: it must be the rank that was merged
            raise ShearsError("cannot switch subnets while the adapter is merged: unmerge_adapter() first")
        self.active_rank = rank

    def _factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.active_rank
        return self.lora_A[adapter].weight[:r], self.lora_B[adapter].weight[:, :r]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The active subnet's update, scaling * B[:, :r] @ A[:r] (masked under SparsePEFT); under QA-SparsePEFT
        the step from W onto the grid, Q(W + masked update) - W (PEFT's merge adds it to W: W + that rounds
        to the grid point up to one float32 rounding; the export writes the blocks themselves)."""
        if self.grid_scheme is not None:
            return self.updated_weight([adapter]) - self.get_base_layer().weight
        return self._masked_update(adapter)

    def updated_weight(self, adapters: list[str]) -> torch.Tensor:
        """W plus the adapters' (masked) updates; under QA-SparsePEFT snapped onto the base's frozen grid, with a
        straight-through gradient (`grid_merged_weight` is the same sum without the gradient)."""
        weight = self.get_base_layer().weight
        for adapter in adapters:
            weight = weight + self._masked_update(adapter)
        if self.grid_scheme is not None:
            weight = fake_quantize_on_scales(weight, self.grid_scales, self.grid_scheme)
        return weight

    def _masked_update(self, adapter: str) -> torch.Tensor:
        weight_A, weight_B = self._factors(adapter)
        dtype = weight_B.dtype
        # like PEFT: half-precision matmuls are slow on CPU, so compute those in fp32
        cast_to_fp32 = weight_B.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        if cast_to_fp32:
            weight_A, weight_B = weight_A.float(), weight_B.float()
        delta = lora_delta(weight_A, weight_B, self.scaling[adapter], self.sparse_mask)
        return delta.to(dtype) if cast_to_fp32 else delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        special = (self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None
                   or any(kwargs.get(k) is not None for k in VARIANT_KWARG_KEYS))
        if special:
            if kwargs.get("adapter_names") is not None and self.active_rank < min(self.r.values()):
                raise ShearsError("mixed-adapter batches (adapter_names) run at full rank only: activate the "
                                  "maximal subnet, or export the subnet as its own adapter")
            return super().forward(x, *args, **kwargs)
        for key in VARIANT_KWARG_KEYS:
            kwargs.pop(key, None)
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        if self.sparse:
            return self._sparse_forward(x, adapters, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        if _autocast_output(result, x):  # add the update in fp32 (see _autocast_output)
            result, result_dtype = result.float(), torch.float32
        for adapter in adapters:
            weight_A, weight_B = self._factors(adapter)
            h = self.lora_dropout[adapter](self._cast_input_dtype(x, weight_A.dtype))
            result = result + F.linear(F.linear(h, weight_A), weight_B) * self.scaling[adapter]
        return result.to(result_dtype)

    def _sparse_forward(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        dropout_off = all(not self.training or isinstance(self.lora_dropout[a], nn.Identity) for a in adapters)
        plain_base = not args and not kwargs
        same_dtype = all(self.lora_A[a].weight.dtype == base.weight.dtype for a in adapters)
        if dropout_off and plain_base and same_dtype:
            # one matmul: (W + sum of masked updates) x; W is frozen, so gradients reach only A and B
            return F.linear(x, self.updated_weight(adapters), base.bias)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        if _autocast_output(result, x):
            result, result_dtype = result.float(), torch.float32
        if self.grid_scheme is not None and adapters:
            # the grid's step Q(W + updates) - W is the update, applied to the dropped-out input as LoRA's is
            h = self.lora_dropout[adapters[0]](self._cast_input_dtype(x, self.lora_A[adapters[0]].weight.dtype))
            return (result + F.linear(h, self.updated_weight(adapters).to(h.dtype) - base.weight.to(h.dtype))).to(result_dtype)
        for adapter in adapters:
            h = self.lora_dropout[adapter](self._cast_input_dtype(x, self.lora_A[adapter].weight.dtype))
            result = result + F.linear(h, self.get_delta_weight(adapter))
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return f"elastic-{super().__repr__()}"


def _autocast_output(base_output: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the base output is an autocast half-precision result, to which the update is added in fp32.

    Under autocast the base output arrives in bf16, i.e. exactly on bf16's grid, and an update smaller
    than half its spacing (0.4% of the value) added there rounds back to the same number: early in
    training, when B is still small, nearly all of the update vanished from the forward (smollm2-135m
    after two AdamW steps: loss 1.990 under bf16 autocast against 1.916 in fp32; 1.928 with the sum in
    fp32). So the sum is taken, and returned, in fp32; the next matmul casts it to bf16 again, now with
    the update in it. Outside autocast the output keeps the base layer's dtype, as in PEFT."""
    return torch.is_autocast_enabled(x.device.type) and base_output.dtype in (torch.bfloat16, torch.float16)


def lora_delta(A: torch.Tensor, B: torch.Tensor, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The LoRA update scale * B @ A, masked by `mask` (SparsePEFT: the base weight's non-zeros) when given.
    The one definition: training's forward, PEFT's merge and the export's merged/ all add this to W.
    Scaled and masked in place (autograd needs neither B @ A nor the scaled product), so the update of
    an out x in matrix costs one out x in tensor, not three."""
    delta = (B @ A).mul_(scale)
    return delta.mul_(mask) if mask is not None else delta


def merged_weight(base: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, sparse_adapter: bool) -> torch.Tensor:
    """W + lora_delta, masked by W's non-zeros for a SparsePEFT adapter, in W's dtype: what merging a
    subnet's factors into the base gives (its zeros stay exactly zero under SparsePEFT). Computed in float64
    and rounded once, so the stored weight is the correctly rounded sum (fp32 would round product and sum).
    W is added into the float64 update in place: one float64 matrix at a time, no float64 copy of W."""
    mask = base != 0 if sparse_adapter else None
    return lora_delta(A.double(), B.double(), scale, mask).add_(base).to(base.dtype)


def grid_merged_weight(base: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, d: torch.Tensor,
                       scheme: str) -> torch.Tensor:
    """QA-SparsePEFT's merge: W + lora_delta masked by W's non-zeros, snapped onto the grid of the frozen block
    scales `d` (qformat.round_to_grid), in float32 -- the sum as training's forward computes it, so the merged
    weights are exactly the weights the super-network trained and was scored with."""
    return round_to_grid(base + lora_delta(A, B, scale, base != 0), d, scheme)


def most_common_rank(ranks: dict[str, int]) -> int:
    counts = Counter(ranks.values())
    return max(counts, key=lambda r: (counts[r], r))


def lora_config(ranks: dict[str, int], lora_alpha: float, r_max: int, lora_dropout: float, **peft_kwargs) -> LoraConfig:
    """The one stock LoraConfig builder: each module of `ranks` at its rank k with alpha = lora_alpha * k / r_max,
    so every module keeps the super-network's scale lora_alpha / r_max. r is the most common rank; every other
    module is pinned by an anchored rank_pattern/alpha_pattern key (a short key would match every layer)."""
    r = most_common_rank(ranks)
    others = {module: rank for module, rank in ranks.items() if rank != r}
    return LoraConfig(r=r, lora_alpha=lora_alpha * r / r_max, lora_dropout=lora_dropout,
                      target_modules=sorted(ranks), bias="none", task_type="CAUSAL_LM",
                      rank_pattern={pattern_key(m): k for m, k in others.items()},
                      alpha_pattern={pattern_key(m): lora_alpha * k / r_max for m, k in others.items()},
                      **peft_kwargs)


def supernet_lora_config(space: BoundSpace) -> LoraConfig:
    """The super-network's LoraConfig: every module at r_max, with ElasticLoraLinear registered."""
    s = space.space
    config = lora_config(dict.fromkeys(space.module_names(), s.r_max), s.lora_alpha, s.r_max, s.lora_dropout)
    config._register_custom_module({nn.Linear: ElasticLoraLinear})
    return config


@dataclass
class SuperNet:
    model: PeftModel
    space: BoundSpace
    sparse_adapter: bool
    fingerprint: str  # of the base model
    layers: dict[str, ElasticLoraLinear] = field(repr=False)  # base-model module name -> layer
    width: ElasticWidth | None = field(default=None, repr=False)  # None for a rank-only space
    channel_order: ChannelOrder | None = field(default=None, repr=False)  # already applied to the base
    qa_scheme: str | None = None  # QA-SparsePEFT: the scheme of the frozen grid the merged weights stay on
    _active: Config = field(default_factory=dict, repr=False)

    @classmethod
    def from_base(cls, base_model: nn.Module, space: SearchSpace | BoundSpace | str,
                  sparse_adapter: bool = False, channel_order: ChannelOrder | None = None,
                  quantized: dict[str, QuantizedTensor] | None = None) -> "SuperNet":
        """Wrap `base_model` (in place, as get_peft_model does) into a super-network at r_max. With
        `channel_order` (shears.width.width_order) the base's width channels are first permuted by it,
        in place too; the dense base computes the same function. With `quantized` (the base's blocks,
        qformat.load_quantized_state(folder).quantized, for a base loaded from that folder): QA-SparsePEFT,
        the masked update merged onto their frozen grid (implies sparse_adapter)."""
        if isinstance(base_model, PeftModel):
            raise ShearsError("SuperNet.from_base needs the plain base model, not a PeftModel: pass "
                              "peft_model.get_base_model() or a freshly loaded model")
        if isinstance(space, (str, os.PathLike)):
            space = load_search_space(space)
        bound = space.bind(base_model) if isinstance(space, SearchSpace) else space
        if isinstance(space, BoundSpace) and bound.to_dict() != bound.space.bind(base_model).to_dict():
            raise ShearsError("the search space was bound to another model: bind it to this base model")
        fingerprint = model_fingerprint(base_model)
        if quantized is not None and (bound.sites or channel_order is not None):
            raise ShearsError("QA-SparsePEFT keeps the base's blocks of 32 inputs, which an elastic-width space "
                              "reorders: use a rank-only search space, or training.qa_sparse_adapter=false (QA-NLS)")
        if channel_order is not None:
            if set(channel_order) != {site.name for site in bound.sites}:
                raise ShearsError("the channel order does not cover the search space's width sites: compute it "
                                  "with shears.width.width_order on this space")
            permute_channels(base_model, bound.sites, channel_order)
        with warnings.catch_warnings():
            # PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` inside get_peft_model;
            # the warning is about PEFT's call, not ours, and says nothing a user can act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(base_model, supernet_lora_config(bound))
        layers = {name: model.get_base_model().get_submodule(name) for name in bound.module_names()}
        for name, layer in layers.items():
            if not isinstance(layer, ElasticLoraLinear):
                raise ShearsError(f"{name} became {type(layer).__name__}, not an elastic LoRA layer: shears "
                                  "adapts plain nn.Linear modules only (no quantised bases)")
            if quantized is not None:
                if f"{name}.weight" not in quantized:
                    raise ShearsError(f"{name} is kept unquantized in the base, so QA-SparsePEFT cannot merge into it: "
                                      "quantize every adapted module (narrow quantization.exclude)")
                layer.enable_grid_merge(quantized[f"{name}.weight"])
            elif sparse_adapter:
                layer.enable_sparse_mask()
        schemes = {q.scheme for q in quantized.values()} if quantized is not None else set()
        width = ElasticWidth(model.get_base_model(), bound.sites) if bound.sites else None
        net = cls(model, bound, sparse_adapter or quantized is not None, fingerprint, layers, width, channel_order,
                  ",".join(sorted(schemes)) or None)
        net.activate(bound.maximal())
        return net

    def unload(self) -> nn.Module:
        """The base model as `from_base` got it: adapters and width hooks removed, channel order undone."""
        if self.width is not None:
            self.width.remove()
        base = self.model.unload()
        if self.channel_order is not None:
            permute_channels(base, self.space.sites, inverse_order(self.channel_order))
        return base

    # ---- configs

    def activate(self, config: Config) -> None:
        """Make `config` the active subnet (validated; sets each layer's rank, copies no weights)."""
        ranks = self.space.module_ranks(config)
        for name, rank in ranks.items():
            self.layers[name].set_active_rank(rank)
        if self.width is not None:
            self.width.activate(self.space.site_widths(config))
        self._active = self.space.validate(config)

    @property
    def active_config(self) -> Config:
        return dict(self._active)

    def sample(self, rng: np.random.Generator) -> Config:
        """A uniformly random config (not activated), deterministic given the state of `rng`."""
        return self.space.sample(rng)

    def maximal(self) -> Config:
        return self.space.maximal()

    def minimal(self) -> Config:
        return self.space.minimal()

    def heuristic(self) -> Config:
        return self.space.heuristic()

    def adapter_params(self, config: Config) -> int:
        return self.space.adapter_params(config)

    def subnet_state_dict(self, config: Config) -> dict[str, torch.Tensor]:
        """PEFT-keyed LoRA tensors of the subnet, each sliced to its module's rank (fresh copies)."""
        ranks = self.space.module_ranks(config)
        out = {}
        for key, tensor in get_peft_model_state_dict(self.model).items():
            module, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            if not kind.startswith(("A.", "B.")) or module not in ranks:
                raise ShearsError(f"unexpected adapter tensor {key}: the super-network holds LoRA A/B weights only")
            r = ranks[module]
            sliced = tensor[:r] if kind == "A.weight" else tensor[:, :r] if kind == "B.weight" else tensor
            out[key] = sliced.detach().clone(memory_format=torch.contiguous_format)
        return out

    # ---- disk

    def save(self, directory: str | os.PathLike, force: bool = False) -> Path:
        """Write the stock-PEFT adapter at r_max + search_space.json + shears.json, atomically."""
        with atomic_folder(directory, force=force, hint="choose another folder or pass force=True") as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            (tmp / SEARCH_SPACE_FILE).write_text(json.dumps(self.space.to_dict(), indent=1))
            (tmp / SHEARS_RECORD).write_text(json.dumps(self._metadata(), indent=1))
            if self.channel_order is not None:
                from safetensors.torch import save_file

                save_file({k: v.contiguous().cpu() for k, v in self.channel_order.items()}, str(tmp / CHANNEL_ORDER_FILE))
        return Path(directory)

    def _metadata(self) -> dict:
        base = self.model.get_base_model()
        return {"format": SUPERNET_FORMAT, "base_model": getattr(base.config, "_name_or_path", "") or "",
                "fingerprint": self.fingerprint, "sparse_adapter": self.sparse_adapter,
                "r_max": self.space.r_max, "lora_alpha": self.space.space.lora_alpha, "scaling": SCALING_RULE,
                "channel_order": CHANNEL_ORDER_FILE if self.channel_order is not None else None,
                "qa_scheme": self.qa_scheme}

    @classmethod
    def load(cls, directory: str | os.PathLike, base_model: nn.Module,
             quantized: dict[str, QuantizedTensor] | None = None) -> "SuperNet":
        """A super-network saved by `save`, on `base_model` (refused if its fingerprint differs); a QA-SparsePEFT
        one needs `quantized`, the blocks of the quantized base `base_model` was loaded from."""
        folder = Path(directory)
        for name in (SHEARS_RECORD, SEARCH_SPACE_FILE, ADAPTER_WEIGHTS):
            if not (folder / name).is_file():
                raise ShearsError(f"{folder} is not a shears super-network (no {name}): point at RUN/supernet")
        meta = json.loads((folder / SHEARS_RECORD).read_text())
        if meta.get("format") != SUPERNET_FORMAT:
            raise ShearsError(f"{folder / SHEARS_RECORD} has format {meta.get('format')!r}, expected {SUPERNET_FORMAT}")
        fingerprint = model_fingerprint(base_model)
        if fingerprint != meta["fingerprint"]:
            raise ShearsError(f"base model fingerprint {fingerprint} differs from the super-network's "
                              f"{meta['fingerprint']} ({meta.get('base_model') or 'unnamed base'}): load the base it "
                              "was trained on")
        bound = BoundSpace.from_dict(json.loads((folder / SEARCH_SPACE_FILE).read_text()),
                                     source=str(folder / SEARCH_SPACE_FILE))
        order = None
        if meta.get("channel_order"):
            if not (folder / CHANNEL_ORDER_FILE).is_file():
                raise ShearsError(f"{folder} lost its {CHANNEL_ORDER_FILE}: the width channels cannot be restored; "
                                  "re-train or restore the file")
            order = load_safetensors(folder / CHANNEL_ORDER_FILE)
        if meta.get("qa_scheme") and quantized is None:
            raise ShearsError(f"{folder} was trained with QA-SparsePEFT on a {meta['qa_scheme']} base: load it with "
                              "shears.run.load_run(RUN), which passes the quantized base's blocks")
        net = cls.from_base(base_model, bound, sparse_adapter=bool(meta["sparse_adapter"]), channel_order=order,
                            quantized=quantized if meta.get("qa_scheme") else None)

        weights = load_safetensors(folder / ADAPTER_WEIGHTS, device=str(next(net.model.parameters()).device))
        result = set_peft_model_state_dict(net.model, weights)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            raise ShearsError(f"{folder / ADAPTER_WEIGHTS} does not match the search space "
                              f"(unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}): re-save it")
        return net

