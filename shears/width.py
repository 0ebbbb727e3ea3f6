"""Elastic base width (LoNAS, EFTNAS): subnets that keep the leading channels of each block's MLP
and the leading key/value groups of its attention.

A width site (`search_space.WidthSite`) is one block's intermediate channels: the rows of its
producers (gate_proj, up_proj) and the columns of its consumers (down_proj). A subnet of width w
keeps channels [:w]. Three pieces live here:

Importance reordering. Before training, each site's channels are permuted so that the leading ones
are the most important; a permutation of the intermediate channels (producers' rows and consumers'
columns together) leaves the dense model's function unchanged, and it moves any Wanda zeros and any
LoRA factors (B rows of producers, A columns of consumers) with their weights. The default score is
first-order (Taylor): removing channel c changes the loss of sequence s by about
-sum_t h_c(t) * dL/dh_c(t), h being the consumers' input; the score is the sum over calibration
sequences of that estimate squared (Molchanov et al., 2019), so signs do not cancel between
sequences. It scores what width slicing does -- dropping whole channels -- with the loss the model
is trained on. `importance="activation"` is the backward-free alternative ||h_c||_2 * ||W_down[:, c]||_2
(the channel's share of the consumer's output, as Wanda scores single weights); it ignores how the
rest of the network uses the channel.

Elastic width in the super-network. `ElasticWidth` zeroes the channels a subnet drops at each
consumer's input, with a forward pre-hook on the consumer (the PEFT-wrapped module when it is
adapted, so the LoRA path sees the same input). down(h * [1..1 0..0]) equals the hand-sliced
down[:, :w] @ h[:w], gate/up rows beyond w then feed nothing, and gradients reach only the kept
rows and columns (LoRA B rows of gate/up, A columns of down): exactly the sliced subnet, on any
architecture, with no module replaced and PEFT's state-dict keys untouched. It saves no compute in
training; the speed is delivered by `slice_model`, which exports a physically smaller model.

Attention heads (search_space `kind: heads`). A heads site's channel is a whole key/value group:
one key/value head (head_dim rows of k_proj and v_proj) and the query heads that read it
(query_per_kv x head_dim rows of q_proj and columns of o_proj; HF's repeat_kv gives query head h
the key/value head h // query_per_kv, so a group's query heads are contiguous). Each module's
`site.unit(name)` is the rows/columns one channel spans, and everything above works per unit: the
permutation moves whole groups (the heads are independent and RoPE and q/k norms act per head
alike, so the function is unchanged), a subnet keeps the leading groups (the pre-hook zeroes o_proj's
input beyond them), the scores sum over a group's o_proj input features before squaring -- the
first-order loss change of dropping the whole group -- and the exported attention has fewer heads.

Automatic bounds (EFTNAS). `python -m shears.width bounds --model M --space S --output OUT.yaml`
scores a model's channels on calibration data and writes S with each block's width choices derived
from the importance (search_space.width_bounds: the smallest width keeps a share --keep of it).

Deployment cost. `latency_table` times each site's module (a block's MLP; its attention for heads)
at every width choice on the current device (merged weights, no LoRA) once; `LatencyTable.latency`
predicts a config's forward time from it and the measured full model. `deployed_params` counts the
exported model's parameters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ShearsError
from .progress import progress as progress_bar  # `progress` is a flag here
from .search_space import BoundSpace, Config, WidthSite

IMPORTANCE = ("taylor", "activation")
ChannelOrder = dict[str, torch.Tensor]  # site name -> permutation (new channel i = old channel order[i])


# --------------------------------------------------------------------------- importance and reordering

def _base_linear(module: nn.Module) -> nn.Linear:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def channel_importance(model: nn.Module, sites: Iterable[WidthSite], input_ids: torch.Tensor,
                       importance: str = "taylor", batch_size: int = 4, progress: bool = True) -> dict[str, torch.Tensor]:
    """site name -> a float64 score per channel on the calibration `input_ids` [n, seqlen] (see the module
    docstring). `model` is a plain causal LM (or a PeftModel: the hooks sit on the consumers either way)."""
    if importance not in IMPORTANCE:
        raise ShearsError(f"unknown width importance {importance!r}: use one of {', '.join(IMPORTANCE)}")
    sites = list(sites)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(base.parameters()).device
    scores = {site.name: torch.zeros(site.channels, dtype=torch.float64) for site in sites}
    captured: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(module, args):
            captured[name] = args[0]
        return hook

    handles = [base.get_submodule(site.columns[0]).register_forward_pre_hook(capture(site.name)) for site in sites]
    unit = {site.name: site.unit(site.columns[0]) for site in sites}  # features of the captured input per channel
    if importance == "taylor":  # the consumers' inputs need a graph even when every weight is frozen
        handles.append(base.get_input_embeddings().register_forward_hook(
            lambda module, args, output: output.detach().requires_grad_(True)))
    was_training = base.training
    base.eval()
    try:
        batches = torch.split(input_ids, batch_size)
        for batch in progress_bar(batches, desc=f"width importance ({importance})", unit="batch", disable=not progress):
            batch = batch.to(device)
            if importance == "taylor":
                with torch.enable_grad():
                    # the summed (not mean) token loss, so each sequence's estimate is its own loss change
                    loss = base(input_ids=batch, labels=batch).loss * (batch.shape[0] * (batch.shape[1] - 1))
                    names = list(captured)
                    grads = torch.autograd.grad(loss, [captured[n] for n in names])
                for name, grad in zip(names, grads):
                    per_sequence = (captured[name].detach().double() * grad.double()).sum(dim=1)  # [batch, features]
                    per_sequence = per_sequence.unflatten(-1, (-1, unit[name])).sum(-1)  # [batch, channels]
                    scores[name] += per_sequence.pow(2).sum(dim=0).cpu()
            else:
                with torch.no_grad():
                    base(input_ids=batch)
                for site in sites:
                    h = captured[site.name].detach().double()
                    scores[site.name] += h.pow(2).flatten(0, -2).sum(dim=0).unflatten(0, (-1, unit[site.name])).sum(-1).cpu()
            captured.clear()
    finally:
        for handle in handles:
            handle.remove()
        base.train(was_training)
    if importance == "activation":
        for site in sites:
            column_norm = sum(_base_linear(base.get_submodule(c)).weight.detach().double().pow(2).sum(0).cpu()
                              .unflatten(0, (-1, site.unit(c))).sum(-1) for c in site.columns).sqrt()
            scores[site.name] = scores[site.name].sqrt() * column_norm
    return scores


def importance_order(scores: dict[str, torch.Tensor]) -> ChannelOrder:
    """Channels by descending score; ties keep the original order (a stable sort), so equal scores
    -- e.g. an all-zero calibration signal -- give the identity."""
    return {name: torch.sort(score, descending=True, stable=True).indices for name, score in scores.items()}


def expand_order(perm: torch.Tensor, unit: int) -> torch.Tensor:
    """A permutation of channels as one of weight rows/columns, `unit` consecutive ones per channel."""
    if unit == 1:
        return perm
    return (perm[:, None] * unit + torch.arange(unit, device=perm.device)).reshape(-1)


@torch.no_grad()
def permute_channels(model: nn.Module, sites: Iterable[WidthSite], order: ChannelOrder) -> None:
    """Apply `order` in place: producers' rows (weight, bias, LoRA B) and consumers' columns (weight,
    LoRA A); a SparsePEFT mask is read from the weights, so it follows. The dense function of the model
    is unchanged."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for site in sites:
        perm = order[site.name]
        if sorted(perm.tolist()) != list(range(site.channels)):
            raise ShearsError(f"channel order of {site.name} is not a permutation of its {site.channels} channels: "
                              "re-create it with shears.width.importance_order")
        for name in site.rows:
            module = base.get_submodule(name)
            linear = _base_linear(module)
            perm_here = expand_order(perm, site.unit(name)).to(linear.weight.device)
            linear.weight.copy_(linear.weight[perm_here])
            if linear.bias is not None:
                linear.bias.copy_(linear.bias[perm_here])
            for lora_B in getattr(module, "lora_B", {}).values():
                lora_B.weight.copy_(lora_B.weight[perm_here])
        for name in site.columns:
            module = base.get_submodule(name)
            linear = _base_linear(module)
            perm_here = expand_order(perm, site.unit(name)).to(linear.weight.device)
            linear.weight.copy_(linear.weight[:, perm_here])
            for lora_A in getattr(module, "lora_A", {}).values():
                lora_A.weight.copy_(lora_A.weight[:, perm_here])


def inverse_order(order: ChannelOrder) -> ChannelOrder:
    return {name: torch.argsort(perm) for name, perm in order.items()}


def width_order(model: nn.Module, space: BoundSpace, input_ids: torch.Tensor, importance: str = "taylor",
                batch_size: int = 4, progress: bool = True) -> tuple[ChannelOrder, dict[str, torch.Tensor]]:
    """(the descending-importance order of every width site of `space`, the scores) on `input_ids`;
    `SuperNet.from_base(..., channel_order=order)` applies it."""
    scores = channel_importance(model, space.sites, input_ids, importance, batch_size, progress)
    return importance_order(scores), scores


# --------------------------------------------------------------------------- elastic width in a super-network

class ElasticWidth:
    """Forward pre-hooks that make each consumer see only the leading `width` channels of its input."""

    def __init__(self, model: nn.Module, sites: Iterable[WidthSite]):
        self.sites = tuple(sites)
        self.widths = {site.name: site.channels for site in self.sites}
        self._handles = [model.get_submodule(name).register_forward_pre_hook(self._keep_leading(site, site.unit(name)))
                         for site in self.sites for name in site.columns]

    def _keep_leading(self, site: WidthSite, unit: int):
        def hook(module, args):
            width = self.widths[site.name]
            if width == site.channels:
                return None
            if not args:
                raise ShearsError(f"{site.columns[0]} was called without a positional input: elastic width needs "
                                  "the consumer's input as its first argument")
            x = args[0]
            return (F.pad(x[..., :width * unit], (0, (site.channels - width) * unit)), *args[1:])
        return hook

    def activate(self, widths: dict[str, int]) -> None:
        for site in self.sites:
            width = widths[site.name]
            if not 1 <= width <= site.channels:
                raise ShearsError(f"width {width} of {site.name} is outside [1, {site.channels}]")
            self.widths[site.name] = int(width)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# --------------------------------------------------------------------------- a physically smaller model

def width_spec(space: BoundSpace, config: Config) -> list[dict]:
    """The reduced shapes of a config's subnet, as `shears.models` writes and reads them: per site, the
    modules cut to one number of rows/columns (a heads site: q_proj rows and o_proj columns, then k/v rows)."""
    widths = space.site_widths(config)
    return [entry for site in space.sites for entry in site_spec(site, widths[site.name])]


def site_spec(site: WidthSite, width: int) -> list[dict]:
    """One site at `width` channels as `shears.models.slice_linears` entries, one per rows/columns count."""
    return [{"rows": [n for n in site.rows if site.unit(n) == unit],
             "columns": [n for n in site.columns if site.unit(n) == unit], "width": width * unit}
            for unit in dict.fromkeys(site.unit(n) for n in site.rows + site.columns)]


def uniform_widths(space: BoundSpace, config: Config) -> dict[str, int | None]:
    """Width group kind -> the one width every site of that kind has in `config` (None: widths differ)."""
    widths = space.site_widths(config)
    by_kind: dict[str, set[int]] = {}
    for site in space.sites:
        by_kind.setdefault(site.kind, set()).add(widths[site.name])
    return {kind: next(iter(values)) if len(values) == 1 else None for kind, values in by_kind.items()}


def stock_config(space: BoundSpace, config: Config) -> dict | None:
    """The HF config fields that describe the config's smaller model with stock modules -- one MLP width
    (intermediate_size) and one head count (num_attention_heads / num_key_value_heads, head_dim explicit) in
    every block -- or None when a kind's widths differ between blocks (then shears_widths.json says them)."""
    uniform = uniform_widths(space, config)
    if any(width is None for width in uniform.values()):
        return None
    changes = {}
    if "width" in uniform:
        changes["intermediate_size"] = uniform["width"]
    if "heads" in uniform:
        site = next(s for s in space.sites if s.kind == "heads")
        changes.update(num_key_value_heads=uniform["heads"], num_attention_heads=uniform["heads"] * site.query_per_kv,
                       head_dim=site.head_dim)
    return changes


# --------------------------------------------------------------------------- deployment cost

def deployed_params(model: nn.Module, space: BoundSpace):
    """config -> parameters of the exported (merged, sliced) model: the base's minus what the subnet's
    widths cut from producers' rows (weights and biases) and consumers' columns."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    total = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    per_channel = {}
    for site in space.sites:
        rows = sum(site.unit(n) * (_base_linear(base.get_submodule(n)).in_features
                                   + (_base_linear(base.get_submodule(n)).bias is not None)) for n in site.rows)
        columns = sum(site.unit(n) * _base_linear(base.get_submodule(n)).out_features for n in site.columns)
        per_channel[site.name] = rows + columns

    def count(config: Config) -> float:
        widths = space.site_widths(config)
        return float(total - sum((site.channels - widths[site.name]) * per_channel[site.name]
                                 for site in space.sites))

    return count


@dataclass
class LatencyTable:
    """Measured seconds per forward: the whole merged model at full width, and each site's module (a block's
    MLP, or its attention for a heads site) at each width."""
    device: str
    batch_size: int
    seq_len: int
    full_model: float
    sites: dict[str, dict[int, float]]  # site name -> width -> seconds of that site's module alone

    def to_dict(self) -> dict:
        return {"device": self.device, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "full_model": self.full_model,
                "sites": {name: {str(w): t for w, t in table.items()} for name, table in self.sites.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "LatencyTable":
        return cls(str(data["device"]), int(data["batch_size"]), int(data["seq_len"]), float(data["full_model"]),
                   {name: {int(w): float(t) for w, t in table.items()} for name, table in data["sites"].items()})

    def latency(self, space: BoundSpace, config: Config) -> float:
        """Predicted forward seconds of the config's exported model: the full model's time minus, per
        site, what its module saves at the subnet's width (ranks merge away and cost nothing)."""
        widths = space.site_widths(config)
        return self.full_model - sum(self.sites[s.name][s.channels] - self.sites[s.name][widths[s.name]]
                                     for s in space.sites)


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _sliced_owner(owner: nn.Module, site: WidthSite, layer_prefix: str, width: int) -> nn.Module:
    """A deep copy of the module holding a site's linears (a block's MLP or attention), cut to `width`."""
    import copy

    from .models import slice_linears

    module = copy.deepcopy(owner)
    rel = lambda names: [n.removeprefix(layer_prefix) for n in names]  # noqa: E731 - names inside the owner
    slice_linears(module, [{**entry, "rows": rel(entry["rows"]), "columns": rel(entry["columns"])}
                           for entry in site_spec(site, width)])
    return module


def _site_forward(base: nn.Module, site: WidthSite, x: torch.Tensor):
    """A call of a site's owner on hidden states `x`: the MLP takes x alone; attention also takes the
    rotary position embeddings of positions 0..len-1 (from the model's own rotary module) and runs causal."""
    if site.kind == "width":
        return lambda module: module(x)
    rotary = next((m for n, m in base.named_modules() if n.rsplit(".", 1)[-1] == "rotary_emb"), None)
    if rotary is None:
        raise ShearsError(f"{type(base).__name__} has no rotary_emb module to time its attention heads with: "
                          "search heads groups with the params objective instead of latency")
    positions = torch.arange(x.shape[1], device=x.device)[None]
    cos_sin = rotary(x, positions)
    return lambda module: module(hidden_states=x, position_embeddings=cos_sin, attention_mask=None)


@torch.no_grad()
def latency_table(model: nn.Module, space: BoundSpace, batch_size: int, seq_len: int, repeats: int = 5,
                  progress: bool = True) -> LatencyTable:
    """Time the plain (merged, unhooked) `model` once at full width, and each site's MLP (or attention,
    for a heads site) at each width choice on a [batch_size, seq_len, hidden] input. Sites of the same
    shape share one measurement (the blocks of a decoder are alike), so the table costs choices x
    distinct shapes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.eval()
    param = next(base.parameters())
    ids = torch.randint(0, base.config.vocab_size, (batch_size, seq_len), device=param.device)
    full = _median_time(lambda: base(input_ids=ids, use_cache=False), repeats)
    by_shape: dict[tuple, dict[int, float]] = {}
    table: dict[str, dict[int, float]] = {}
    work = [(site, w) for site in space.sites for w in site.choices]
    bar = progress_bar(work, desc="latency table", unit="site", disable=not progress)
    for site, width in bar:
        owner = _owner_of(base, site)
        shape = (type(owner).__name__, site.kind, site.channels,
                 tuple(tuple(_base_linear(base.get_submodule(n)).weight.shape) for n in site.rows + site.columns))
        cached = by_shape.setdefault(shape, {})
        if width not in cached:
            module = _sliced_owner(owner, site, _common_prefix(site), width)
            x = torch.randn(batch_size, seq_len, _base_linear(base.get_submodule(site.rows[0])).in_features,
                            device=param.device, dtype=param.dtype)
            call = _site_forward(base, site, x)
            cached[width] = _median_time(lambda: call(module), repeats)
        table.setdefault(site.name, {})[width] = cached[width]
    return LatencyTable(param.device.type, batch_size, seq_len, full, table)


def _common_prefix(site: WidthSite) -> str:
    """The qualified name of the module holding all of a site's linears, with a trailing dot."""
    parts = [n.split(".") for n in site.rows + site.columns]
    prefix = []
    for segment in zip(*parts):
        if len(set(segment)) != 1:
            break
        prefix.append(segment[0])
    if len(prefix) == len(parts[0]):  # a site of one module cannot happen: rows and columns differ
        prefix = prefix[:-1]
    return ".".join(prefix) + "."


def _owner_of(base: nn.Module, site: WidthSite) -> nn.Module:
    return base.get_submodule(_common_prefix(site).rstrip("."))


def cached_latency_table(path, model_loader, space: BoundSpace, batch_size: int, seq_len: int) -> LatencyTable:
    """The table at `path` when it was measured on this device type and thread count for this batch and
    length, else measured now on `model_loader()` (a plain model at full width) and written there."""
    import json
    from pathlib import Path

    from .atomic import write_json

    path = Path(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    wanted = {"device": device, "batch_size": batch_size, "seq_len": seq_len, "threads": torch.get_num_threads()}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            table = LatencyTable.from_dict(data)
            if {k: data.get(k) for k in wanted} == wanted and set(table.sites) == {s.name for s in space.sites}:
                return table
        except (ValueError, KeyError, TypeError):
            pass  # a torn or foreign file: measure again
    model = model_loader().to(device)
    table = latency_table(model, space, batch_size, seq_len)
    write_json(path, {**table.to_dict(), "threads": wanted["threads"]})
    return table


# --------------------------------------------------------------------------- CLI: EFTNAS bounds

def build_parser():
    import argparse

    from . import flags

    p = argparse.ArgumentParser(prog="python -m shears.width", description="Elastic base width tools.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bounds", help="derive each block's width choices from channel importance (EFTNAS)")
    flags.add_model(b, "default smollm2-135m", default="smollm2-135m")
    b.add_argument("--space", required=True, help="a search space with width groups (name or .yaml)")
    flags.add_output(b, "the search-space YAML to write", required=True)
    flags.add_data(b, "calibration records", default="builtin:arithmetic")
    b.add_argument("--keep", type=float, default=0.9, help="share of each block's importance the smallest "
                                                           "width keeps")
    b.add_argument("--multiple", type=int, default=8, help="round widths up to a multiple of this")
    b.add_argument("--importance", choices=IMPORTANCE, default="taylor")
    b.add_argument("--nsamples", type=int, default=32)
    b.add_argument("--seqlen", type=int, default=256)
    flags.add_seed(b, "the calibration windows' sampling", default=0)
    flags.add_force(b, "overwrite --output")
    return p


def main(argv: list[str] | None = None) -> None:
    from .errors import cli_errors

    @cli_errors
    def run(argv):
        args = build_parser().parse_args(argv)
        from pathlib import Path

        from .atomic import refuse_existing
        from .data import calibration_input_ids, load_records
        from .models import load_model, load_tokenizer
        from .search_space import load_search_space, save_search_space, width_bounds

        refuse_existing(args.output, args.force)
        space = load_search_space(args.space)
        model, tokenizer = load_model(args.model), load_tokenizer(args.model)
        bound = space.bind(model)
        if not bound.sites:
            raise ShearsError(f"search space {args.space} has no width groups: use e.g. --space llama-width")
        ids = calibration_input_ids(tokenizer, load_records(args.data), args.nsamples, args.seqlen, args.seed)
        scores = channel_importance(model, bound.sites, ids, args.importance)
        bounded = width_bounds(bound, scores, args.keep, args.multiple)
        comment = (f"{Path(space.source).name} with EFTNAS width bounds for {args.model}: per block, the smallest width "
                   f"keeps {args.keep:.0%} of the\n{args.importance} importance of its channels on {args.nsamples} x "
                   f"{args.seqlen} tokens of {args.data}. Edit freely.")
        save_search_space(bounded, args.output, comment)
        for site in bounded.bind(model).sites:
            if site.layer in (0, bound.num_layers - 1) or site.layer % 8 == 0:
                print(f"  {site.name}: {list(site.choices)} of {site.channels}")
        print(f"wrote {args.output}")

    run(argv)


if __name__ == "__main__":
    main()
