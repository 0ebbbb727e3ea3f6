"""The search space of an elastic-LoRA super-network: groups of modules x rank choices.

A search space (search_spaces/*.yaml) names the LoRA `target_modules`, the maximal rank `r_max`,
`lora_alpha`, `lora_dropout`, and `groups`. A group is a list of module names (leaf names inside a
decoder block, e.g. `q_proj`, or a dotted suffix such as `self_attn.q_proj`) whose ranks are chosen
together, with its rank `choices` and a `scope`:

    per_layer  one choice per decoder block (Shears' default: 3 groups x N layers of choices)
    global     one choice shared by the group's modules in every block

A group's `kind` is `rank` (the default: LoRA ranks, as above) or `width` (LoNAS/EFTNAS elastic base
width): the number of leading channels a block keeps between `modules`, the layers that produce the
channels (their weight rows, e.g. the MLP's gate_proj and up_proj), and `consumers`, the layers that
read them (their weight columns, e.g. down_proj). Width choices are fractions of the full width
(floats in (0, 1], e.g. [1.0, 0.75, 0.5]) or channel counts (integers); binding resolves them to
channel counts, so a config's width value is a number of channels. A width group may give some
layers their own choices with `layer_choices: {layer index: [choices]}` (what
`width_bounds` writes). Width modules need not be LoRA targets. A space without width groups is
exactly a Shears rank space.

`kind: heads` is the attention's width, GQA-aware: its unit is a whole key/value group -- one
key/value head and the num_attention_heads / num_key_value_heads query heads that read it -- so a
subnet keeps the leading g key/value heads and their query heads. `modules` produce the heads
(q_proj, k_proj, v_proj: each head's head_dim weight rows), `consumers` read them (o_proj's columns);
choices are fractions of the key/value heads or counts of them, and a config's value is the number
of key/value heads kept. Everything said of width groups below holds for heads groups too: both
are elastic base width, one `WidthSite` per block, whose `units` say how many weight rows or
columns of each module one channel (a key/value group for heads) spans.

`SearchSpace.bind(model)` resolves the names against a concrete model and enumerates the config
keys: `f"{group}.{layer}"` for per-layer groups (layer-major), then `group` for global ones. A
**config** is a plain `dict[str, int]` key -> rank; it survives JSON round-trips, and
`canonical(config)` is its stable string, used to key caches and search trials.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from torch import nn

from .errors import ShearsError
from .models import decoder_layers

SEARCH_SPACES_DIR = Path(__file__).resolve().parents[1] / "search_spaces"
SCOPES = ("per_layer", "global")
KINDS = ("rank", "width", "heads")
WIDTH_KINDS = ("width", "heads")  # the kinds that cut the base model, each block a WidthSite
_SPACE_KEYS = {"target_modules", "r_max", "lora_alpha", "lora_dropout", "groups"}
_GROUP_KEYS = {"name", "modules", "choices", "scope", "kind", "consumers", "layer_choices"}
_WIDTH_ONLY_KEYS = ("consumers", "layer_choices")
_GROUP_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")  # no dots: keys are "group.layer"

Config = dict[str, int]
ANCHORS = ("maximal", "heuristic", "minimal")  # the named subnets (BoundSpace methods) every stage knows


def canonical(config: Config) -> str:
    """The stable string form of a config: sorted keys, no spaces."""
    return json.dumps({str(k): int(v) for k, v in config.items()}, sort_keys=True, separators=(",", ":"))


def heuristic_choice(choices) -> int:
    """The middle rank, as the reference implementations (NNCF, SQFT) pick it: choices[(n - 1) // 2] of
    the choices in descending order -- for an even n the upper of the two middle ranks."""
    descending = sorted(choices, reverse=True)
    return int(descending[(len(descending) - 1) // 2])


def _is_rank(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


# ----------------------------------------------------------------------------- the YAML space


@dataclass(frozen=True)
class Group:
    name: str
    modules: tuple[str, ...]  # rank: the adapted modules; width: the producers (weight rows sliced)
    choices: tuple[int | float, ...]  # as written in the YAML, duplicates refused
    scope: str = "per_layer"
    kind: str = "rank"
    consumers: tuple[str, ...] = ()  # width: the modules whose weight columns read the channels
    layer_choices: tuple[tuple[int, tuple[int | float, ...]], ...] = ()  # width: (layer, choices) overrides

    def choices_for(self, layer: int) -> tuple[int | float, ...]:
        return dict(self.layer_choices).get(layer, self.choices)

    def to_dict(self) -> dict:
        out = {"name": self.name, "modules": list(self.modules), "choices": list(self.choices), "scope": self.scope}
        if self.kind in WIDTH_KINDS:
            out.update(kind=self.kind, consumers=list(self.consumers))
            if self.layer_choices:
                out["layer_choices"] = {layer: list(c) for layer, c in self.layer_choices}
        return out


@dataclass(frozen=True)
class SearchSpace:
    target_modules: tuple[str, ...]
    r_max: int
    lora_alpha: float
    lora_dropout: float
    groups: tuple[Group, ...]
    source: str = field(default="<dict>", compare=False)  # where it came from, for messages

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "SearchSpace":
        """Parse and validate (model-independently) a search space given as a dict."""
        where = f"search space {source}"
        if not isinstance(data, dict):
            raise ShearsError(f"{where}: expected a mapping with keys {sorted(_SPACE_KEYS)}")
        unknown = set(data) - _SPACE_KEYS
        if unknown:
            raise ShearsError(f"{where}: unknown key(s) {sorted(unknown)}; allowed keys are {sorted(_SPACE_KEYS)}")
        missing = _SPACE_KEYS - set(data)
        if missing:
            raise ShearsError(f"{where}: missing key(s) {sorted(missing)}")
        r_max, alpha, dropout = data["r_max"], data["lora_alpha"], data["lora_dropout"]
        if not _is_rank(r_max):
            raise ShearsError(f"{where}: r_max must be a positive integer, got {r_max!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
            raise ShearsError(f"{where}: lora_alpha must be a positive number, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ShearsError(f"{where}: lora_dropout must be a number in [0, 1), got {dropout!r}")
        targets = _name_list(data["target_modules"], f"{where}: target_modules")
        groups_data = data["groups"]
        if not isinstance(groups_data, list) or not groups_data:
            raise ShearsError(f"{where}: groups must be a non-empty list of groups")
        groups = tuple(_parse_group(g, i, int(r_max), where) for i, g in enumerate(groups_data))
        space = cls(targets, int(r_max), alpha, float(dropout), groups, source)
        space._check_groups(where)
        return space

    @property
    def rank_groups(self) -> tuple[Group, ...]:
        return tuple(g for g in self.groups if g.kind == "rank")

    @property
    def width_groups(self) -> tuple[Group, ...]:
        return tuple(g for g in self.groups if g.kind in WIDTH_KINDS)

    def _check_groups(self, where: str) -> None:
        owner: dict[str, str] = {}
        names = [g.name for g in self.groups]
        if not self.rank_groups:
            raise ShearsError(f"{where}: every space needs at least one rank group (kind: rank) over target_modules")
        width_owner: dict[str, str] = {}
        for group in self.width_groups:  # a module may have a rank and a width, but only one width
            for module in group.modules + group.consumers:
                if module in width_owner:
                    raise ShearsError(f"{where}: module {module!r} is in width groups {width_owner[module]!r} and "
                                      f"{group.name!r}; put it in one width group only")
                width_owner[module] = group.name
        for group in self.groups:
            if names.count(group.name) > 1:
                raise ShearsError(f"{where}: group name {group.name!r} is used twice; give each group its own name")
            if group.kind != "rank":
                continue
            for module in group.modules:
                if module in owner:
                    raise ShearsError(f"{where}: module {module!r} is in groups {owner[module]!r} and "
                                      f"{group.name!r}; put it in one group only")
                owner[module] = group.name
        uncovered = [t for t in self.target_modules if t not in owner]
        if uncovered:
            raise ShearsError(f"{where}: target module(s) {uncovered} are in no group; add them to a group "
                              "or drop them from target_modules")
        untargeted = [m for m in owner if m not in self.target_modules]
        if untargeted:
            raise ShearsError(f"{where}: group module(s) {untargeted} are not in target_modules; add them there")

    def to_dict(self) -> dict:
        return {"target_modules": list(self.target_modules), "r_max": self.r_max, "lora_alpha": self.lora_alpha,
                "lora_dropout": self.lora_dropout,
                "groups": [g.to_dict() for g in self.groups]}

    def bind(self, model: nn.Module) -> "BoundSpace":
        """Resolve module names against `model` (a plain HF causal LM) and enumerate config keys."""
        layers_name, layers = decoder_layers(model)
        per_layer = [_block_linears(block) for block in layers]
        owner: dict[str, str] = {}  # full module name -> group, to catch two names matching one module
        group_modules: dict[str, list[list[str]]] = {}  # group -> per layer -> full module names
        for group in self.rank_groups:
            group_modules[group.name] = []
            for index, linears in enumerate(per_layer):
                found = []
                for module in group.modules:
                    hits = [rel for rel in linears if rel == module or rel.endswith("." + module)]
                    if not hits:
                        raise ShearsError(_not_in_model(module, index, linears, type(model).__name__))
                    found += hits
                full = [f"{layers_name}.{index}.{rel}" for rel in found]
                for name in full:
                    if name in owner:
                        raise ShearsError(f"search space {self.source}: module {name} is matched by groups "
                                          f"{owner[name]!r} and {group.name!r}; put it in one group only")
                    owner[name] = group.name
                group_modules[group.name].append(full)
        sites = [self._bind_width(group, index, layers_name, linears, model)
                 for group in self.width_groups for index, linears in enumerate(per_layer)]
        width_modules = [name for site in sites for name in site.rows + site.columns]
        shapes = {name: _in_out(model.get_submodule(name)) for name in [*owner, *width_modules]}
        keys: list[str] = []
        choices: dict[str, tuple[int, ...]] = {}
        modules: dict[str, tuple[str, ...]] = {}
        for index in range(len(layers)):
            for group in self.groups:
                if group.scope == "per_layer":
                    key = f"{group.name}.{index}"
                    keys.append(key)
                    if group.kind == "rank":
                        choices[key] = group.choices
                        modules[key] = tuple(group_modules[group.name][index])
                    else:
                        site = next(s for s in sites if s.key == key)
                        choices[key] = site.choices
                        modules[key] = site.rows
        for group in self.groups:
            if group.scope == "global":
                keys.append(group.name)
                if group.kind == "rank":
                    choices[group.name] = group.choices
                    modules[group.name] = tuple(n for layer in group_modules[group.name] for n in layer)
                else:
                    mine = [s for s in sites if s.key == group.name]
                    if len({s.choices for s in mine}) > 1:
                        raise ShearsError(f"search space {self.source}: global width group {group.name!r} resolves "
                                          "to different channel counts per layer (layers differ in width); use "
                                          "scope: per_layer")
                    choices[group.name] = mine[0].choices
                    modules[group.name] = tuple(n for s in mine for n in s.rows)
        return BoundSpace(self, layers_name, len(layers), tuple(keys), choices, modules, shapes, tuple(sites))

    def _bind_width(self, group: Group, index: int, layers_name: str, linears: list[str],
                    model: nn.Module) -> "WidthSite":
        """One block's channels of a width group: its producers and consumers, checked to agree."""
        def find(names: tuple[str, ...]) -> tuple[str, ...]:
            found = []
            for module in names:
                hits = [rel for rel in linears if rel == module or rel.endswith("." + module)]
                if not hits:
                    raise ShearsError(_not_in_model(module, index, linears, type(model).__name__))
                found += hits
            return tuple(f"{layers_name}.{index}.{rel}" for rel in found)

        rows, columns = find(group.modules), find(group.consumers)
        widths = {name: _in_out(model.get_submodule(name))[1] for name in rows}
        widths.update({name: _in_out(model.get_submodule(name))[0] for name in columns})
        heads = None
        if group.kind == "heads":
            heads = _attention_heads(model, group.name, index, rows, widths, self.source)
            channels = heads.kv_heads
            units = tuple(widths[name] // channels for name in rows + columns)
        else:
            if len(set(widths.values())) != 1:
                raise ShearsError(f"search space {self.source}: width group {group.name!r} in block {index} joins "
                                  f"modules of different widths {widths}: producers' out_features must equal "
                                  "consumers' in_features")
            channels, units = next(iter(widths.values())), ()
        resolved = []
        for choice in group.choices_for(index):
            count = max(1, round(choice * channels)) if isinstance(choice, float) else int(choice)
            if count > channels:
                raise ShearsError(f"search space {self.source}: width group {group.name!r} has choice {choice} "
                                  f"above block {index}'s {channels} channels; choose at most {channels}")
            resolved.append(count)
        if len(set(resolved)) != len(resolved):
            raise ShearsError(f"search space {self.source}: width group {group.name!r} choices {list(group.choices)} "
                              f"give repeated channel counts {resolved} in block {index}; space them further apart")
        key = group.name if group.scope == "global" else f"{group.name}.{index}"
        if heads is None:
            return WidthSite(key, group.name, index, rows, columns, channels, tuple(resolved))
        return WidthSite(key, group.name, index, rows, columns, channels, tuple(resolved), "heads", units,
                         heads.head_dim, heads.query_per_kv)


def _name_list(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ShearsError(f"{where} must be a non-empty list of module names")
    if not all(isinstance(v, str) and v for v in value):
        raise ShearsError(f"{where} must hold module names (strings), got {value!r}")
    if len(set(value)) != len(value):
        raise ShearsError(f"{where} lists a module twice: {value!r}")
    return tuple(value)


def _parse_group(data: Any, index: int, r_max: int, where: str) -> Group:
    if not isinstance(data, dict):
        raise ShearsError(f"{where}: group #{index} must be a mapping with keys {sorted(_GROUP_KEYS)}")
    name = data.get("name", f"#{index}")
    unknown = set(data) - _GROUP_KEYS
    if unknown:
        raise ShearsError(f"{where}: group {name!r} has unknown key(s) {sorted(unknown)}; "
                          f"allowed keys are {sorted(_GROUP_KEYS)}")
    missing = {"name", "modules", "choices"} - set(data)
    if missing:
        raise ShearsError(f"{where}: group {name!r} is missing key(s) {sorted(missing)}")
    if not isinstance(name, str) or not _GROUP_NAME.match(name):
        raise ShearsError(f"{where}: group name {name!r} must be an identifier (letters, digits, _ or -; no dots)")
    if data["modules"] in ([], None):
        raise ShearsError(f"{where}: group {name!r} is empty; list at least one module in it or remove it")
    modules = _name_list(data["modules"], f"{where}: group {name!r} modules")
    kind = data.get("kind", "rank")
    if kind not in KINDS:
        raise ShearsError(f"{where}: group {name!r} has kind {kind!r}; use one of {list(KINDS)}")
    scope = data.get("scope", "per_layer")
    if scope not in SCOPES:
        raise ShearsError(f"{where}: group {name!r} has scope {scope!r}; use one of {list(SCOPES)}")
    if kind in WIDTH_KINDS:
        return _parse_width_group(data, name, modules, scope, where, kind)
    misplaced = [k for k in _WIDTH_ONLY_KEYS if k in data]
    if misplaced:
        raise ShearsError(f"{where}: group {name!r} has {misplaced}, which only width groups take; add kind: width")
    choices = data["choices"]
    if not isinstance(choices, list) or not choices:
        raise ShearsError(f"{where}: group {name!r} needs a non-empty list of rank choices")
    for rank in choices:
        if not _is_rank(rank):
            raise ShearsError(f"{where}: group {name!r} has rank choice {rank!r}; ranks must be positive integers")
        if rank > r_max:
            raise ShearsError(f"{where}: group {name!r} has rank choice {rank} above r_max {r_max}; "
                              "lower the choice or raise r_max")
    if len(set(choices)) != len(choices):
        raise ShearsError(f"{where}: group {name!r} repeats a rank choice in {choices}; list each rank once")
    return Group(name, modules, tuple(int(c) for c in choices), scope)


def _width_choices(choices: Any, name: str, where: str) -> tuple[int | float, ...]:
    if not isinstance(choices, list) or not choices:
        raise ShearsError(f"{where}: width group {name!r} needs a non-empty list of width choices")
    for choice in choices:
        fraction = isinstance(choice, float) and 0 < choice <= 1
        if not (fraction or _is_rank(choice)):
            raise ShearsError(f"{where}: width group {name!r} has choice {choice!r}; use fractions in (0, 1] "
                              "such as 0.75, or channel counts (positive integers)")
    if len(set(choices)) != len(choices):
        raise ShearsError(f"{where}: width group {name!r} repeats a choice in {choices}; list each width once")
    return tuple(float(c) if isinstance(c, float) else int(c) for c in choices)


def _parse_width_group(data: dict, name: str, modules: tuple[str, ...], scope: str, where: str,
                       kind: str = "width") -> Group:
    if "consumers" not in data:
        example = "[o_proj]" if kind == "heads" else "[down_proj]"
        raise ShearsError(f"{where}: width group {name!r} needs consumers: the modules that read its channels "
                          f"(e.g. {example})")
    consumers = _name_list(data["consumers"], f"{where}: width group {name!r} consumers")
    choices = _width_choices(data["choices"], name, where)
    overrides = data.get("layer_choices") or {}
    if not isinstance(overrides, dict):
        raise ShearsError(f"{where}: width group {name!r} layer_choices must map layer indices to choice lists")
    if overrides and scope != "per_layer":
        raise ShearsError(f"{where}: width group {name!r} has layer_choices but scope {scope}; use scope: per_layer")
    layer_choices = []
    for layer, values in overrides.items():
        if isinstance(layer, str) and layer.isdigit():  # a JSON round trip makes keys strings
            layer = int(layer)
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise ShearsError(f"{where}: width group {name!r} layer_choices key {layer!r} is not a layer index")
        layer_choices.append((layer, _width_choices(values, name, where)))
    return Group(name, modules, choices, scope, kind, consumers, tuple(sorted(layer_choices)))


@dataclass(frozen=True)
class AttentionHeads:
    heads: int  # query heads
    kv_heads: int
    head_dim: int

    @property
    def query_per_kv(self) -> int:
        return self.heads // self.kv_heads


def _attention_heads(model: nn.Module, group: str, index: int, rows: tuple[str, ...], widths: dict[str, int],
                     source: str) -> AttentionHeads:
    """The model's head layout (its text config), checked against a heads group's modules in block `index`:
    each producer is query-shaped (heads x head_dim rows) or key/value-shaped (kv_heads x head_dim), each
    consumer reads heads x head_dim columns."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        raise ShearsError(f"search space {source}: heads group {group!r} needs a model config with "
                          f"num_attention_heads; {type(model).__name__} has none: use a width group instead")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layout = AttentionHeads(int(heads), int(kv_heads), int(head_dim))
    query, kv = layout.heads * layout.head_dim, layout.kv_heads * layout.head_dim
    wrong = {name: width for name, width in widths.items() if width not in ((query, kv) if name in rows else (query,))}
    if wrong or layout.heads % layout.kv_heads:
        raise ShearsError(f"search space {source}: heads group {group!r} in block {index}: {wrong or widths} do "
                          f"not fit {layout.heads} query and {layout.kv_heads} key/value heads of {layout.head_dim}: "
                          "list the separate q/k/v projections as modules and o_proj as consumers")
    return layout


def _block_linears(block: nn.Module) -> list[str]:
    return [name for name, child in block.named_modules() if isinstance(child, nn.Linear)]


def _in_out(module: nn.Module) -> tuple[int, int]:
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return int(base.in_features), int(base.out_features)


def _not_in_model(module: str, layer: int, linears: list[str], model_type: str) -> str:
    leaves = list(dict.fromkeys(rel.rsplit(".", 1)[-1] for rel in linears))
    return (f"module {module!r} is not a linear layer in decoder block {layer} of {model_type}; "
            f"its linear layers are: {', '.join(leaves)}")


def load_search_space(name_or_path: str | Path) -> SearchSpace:
    """A search space from a YAML file, or by name from search_spaces/NAME.yaml."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        if path.suffix in (".yaml", ".yml") or "/" in str(name_or_path):
            raise ShearsError(f"search space file not found: {path}")
        path = SEARCH_SPACES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in SEARCH_SPACES_DIR.glob("*.yaml"))
            raise ShearsError(f"unknown search space {str(name_or_path)!r}: use one of {known} or a .yaml path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ShearsError(f"search space {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    return SearchSpace.from_dict(data, source=str(path))


def recipe_search_space(spec: str | Path | dict) -> SearchSpace:
    """A recipe's `search_space:`: a name in search_spaces/, a path, or the space inline (a dict)."""
    if isinstance(spec, dict):
        return SearchSpace.from_dict(spec, source="recipe.search_space")
    return load_search_space(spec)


# ----------------------------------------------------------------------------- bound to a model


@dataclass(frozen=True)
class WidthSite:
    """One block's elastic channels of a width group: a subnet keeps the first `width` of `channels`,
    i.e. rows [:width] of every module in `rows` and columns [:width] of every module in `columns`."""
    key: str  # the config key that sets its width ("group.layer", or "group" for a global group)
    group: str
    layer: int
    rows: tuple[str, ...]  # full module names of the producers
    columns: tuple[str, ...]  # ... and of the consumers
    channels: int  # full width (heads: key/value heads)
    choices: tuple[int, ...]  # channel counts
    kind: str = "width"  # or "heads"
    units: tuple[int, ...] = ()  # per module of rows + columns: its weight rows/columns per channel (() = 1)
    head_dim: int = 0  # heads only
    query_per_kv: int = 0  # heads only: query heads per key/value head

    @property
    def name(self) -> str:
        """Unique per site, also for a global group (which has one key over all layers)."""
        return f"{self.group}.{self.layer}"

    def unit(self, module: str) -> int:
        """Weight rows (producers) or columns (consumers) of `module` per channel of this site."""
        return self.units[(self.rows + self.columns).index(module)] if self.units else 1

    def to_dict(self) -> dict:
        out = {"key": self.key, "group": self.group, "layer": self.layer, "rows": list(self.rows),
               "columns": list(self.columns), "channels": self.channels, "choices": list(self.choices)}
        if self.kind != "width":
            out.update(kind=self.kind, units=list(self.units), head_dim=self.head_dim, query_per_kv=self.query_per_kv)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "WidthSite":
        return cls(str(data["key"]), str(data["group"]), int(data["layer"]), tuple(data["rows"]),
                   tuple(data["columns"]), int(data["channels"]), tuple(int(c) for c in data["choices"]),
                   str(data.get("kind", "width")), tuple(int(u) for u in data.get("units", ())),
                   int(data.get("head_dim", 0)), int(data.get("query_per_kv", 0)))


@dataclass(frozen=True)
class BoundSpace:
    space: SearchSpace
    layers_name: str  # qualified name of the decoder-block ModuleList, e.g. "model.layers"
    num_layers: int
    keys: tuple[str, ...]
    choices: dict[str, tuple[int, ...]]
    modules: dict[str, tuple[str, ...]]  # key -> full module names in the base model
    shapes: dict[str, tuple[int, int]]  # module name -> (in_features, out_features)
    sites: tuple[WidthSite, ...] = ()  # elastic-width channels, one per (width group, block)

    @property
    def r_max(self) -> int:
        return self.space.r_max

    @property
    def width_keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(site.key for site in self.sites))

    @property
    def rank_keys(self) -> tuple[str, ...]:
        widths = set(self.width_keys)
        return tuple(k for k in self.keys if k not in widths)

    def module_names(self) -> list[str]:
        """Every LoRA-adapted module, in key order."""
        return [name for key in self.rank_keys for name in self.modules[key]]

    def site_widths(self, config: Config) -> dict[str, int]:
        """site name -> the channels the config keeps there (empty for a rank-only space)."""
        config = self.validate(config)
        return {site.name: config[site.key] for site in self.sites}

    def module_shapes(self, config: Config) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every rank and width module in the config's subnet."""
        shapes = dict(self.shapes)
        widths = self.site_widths(config)
        for site in self.sites:
            for name in site.rows:
                shapes[name] = (shapes[name][0], widths[site.name] * site.unit(name))
            for name in site.columns:
                shapes[name] = (widths[site.name] * site.unit(name), shapes[name][1])
        return shapes

    def validate(self, config: Any) -> Config:
        """`config` as a clean dict[str, int], or a ShearsError naming what is wrong."""
        if not isinstance(config, dict):
            raise ShearsError(f"a config must be a dict key -> rank, got {type(config).__name__}")
        unknown = [k for k in config if k not in self.choices]
        if unknown:
            raise ShearsError(f"config has unknown key(s) {unknown[:5]}; keys look like {list(self.keys[:3])}")
        missing = [k for k in self.keys if k not in config]
        if missing:
            raise ShearsError(f"config is missing key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                              "give a rank for every key of the search space")
        for key in self.keys:
            rank = config[key]
            if not _is_rank(rank) or int(rank) not in self.choices[key]:
                raise ShearsError(f"config gives {key}={rank!r}; choose one of {list(self.choices[key])}")
        return {key: int(config[key]) for key in self.keys}

    def maximal(self) -> Config:
        return {key: max(self.choices[key]) for key in self.keys}

    def minimal(self) -> Config:
        return {key: min(self.choices[key]) for key in self.keys}

    def heuristic(self) -> Config:
        """Shears' heuristic subnet: the middle choice of every key (`heuristic_choice`)."""
        return {key: heuristic_choice(self.choices[key]) for key in self.keys}

    def sample(self, rng: np.random.Generator) -> Config:
        """A uniformly random config; deterministic given the state of `rng` (one draw per key)."""
        picks = rng.integers(0, [len(self.choices[key]) for key in self.keys])
        return {key: int(self.choices[key][i]) for key, i in zip(self.keys, picks)}

    def module_ranks(self, config: Config) -> dict[str, int]:
        config = self.validate(config)
        return {name: config[key] for key in self.rank_keys for name in self.modules[key]}

    def adapter_params(self, config: Config) -> int:
        """Adapter parameters of the subnet: sum over modules of r * (in + out), at the subnet's widths."""
        shapes = self.module_shapes(config) if self.sites else self.shapes
        return sum(rank * sum(shapes[name]) for name, rank in self.module_ranks(config).items())

    def to_dict(self) -> dict:
        out = {"space": self.space.to_dict(), "layers_name": self.layers_name, "num_layers": self.num_layers,
               "keys": list(self.keys), "choices": {k: list(v) for k, v in self.choices.items()},
               "modules": {k: list(v) for k, v in self.modules.items()},
               "shapes": {k: list(v) for k, v in self.shapes.items()}}
        if self.sites:
            out["sites"] = [site.to_dict() for site in self.sites]
        return out

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "BoundSpace":
        try:
            space = SearchSpace.from_dict(data["space"], source=source)
            keys = tuple(data["keys"])
            bound = cls(space, str(data["layers_name"]), int(data["num_layers"]), keys,
                        {k: tuple(int(c) for c in data["choices"][k]) for k in keys},
                        {k: tuple(data["modules"][k]) for k in keys},
                        {k: (int(v[0]), int(v[1])) for k, v in data["shapes"].items()},
                        tuple(WidthSite.from_dict(site) for site in data.get("sites", [])))
        except (KeyError, TypeError, IndexError, ValueError) as err:
            raise ShearsError(f"{source} is not a bound search space ({type(err).__name__}: {err}); "
                              "re-create it with SuperNet.save") from None
        return bound


# ----------------------------------------------------------------------------- EFTNAS bounds


def width_bounds(bound: BoundSpace, scores: dict[str, Any], keep: float = 0.9, multiple: int = 8) -> SearchSpace:
    """EFTNAS-style search-space bounds from channel importance: in every block, each width group's
    smallest choice becomes the fewest channels (most important first) holding a share `keep` of
    the block's total importance, rounded up to a multiple of `multiple` (heads groups: whole key/value
heads); its choices are that
    minimum, the full width, and evenly spaced counts between, as many as the group had. Returns an
    ordinary SearchSpace (per-block `layer_choices`) to write with `save_search_space`.

    `scores`: site name ("group.layer") -> one non-negative score per channel (shears.width.channel_importance)."""
    if not 0 < keep <= 1:
        raise ShearsError(f"keep must be a share of the importance in (0, 1], got {keep}")
    if not bound.sites:
        raise ShearsError(f"search space {bound.space.source} has no width groups: add a group with kind: width")
    data = bound.space.to_dict()
    groups = {g["name"]: g for g in data["groups"]}
    for site in bound.sites:
        if site.name not in scores:
            raise ShearsError(f"no importance scores for {site.name}: score every width site of the space")
        score = np.sort(np.asarray(scores[site.name], dtype=np.float64))[::-1]
        if score.shape != (site.channels,) or (score < 0).any():
            raise ShearsError(f"importance of {site.name} must be {site.channels} non-negative scores")
        total = score.sum()
        needed = int(np.searchsorted(np.cumsum(score), keep * total - 1e-12 * total) + 1) if total > 0 else 1
        step = multiple if site.kind == "width" else 1  # a heads site counts key/value heads, not channels
        low = min(site.channels, -(-needed // step) * step)
        count = max(2, len(site.choices))
        choices = sorted({int(round(c)) for c in np.linspace(low, site.channels, count)}, reverse=True)
        group = groups[site.group]
        if group.get("scope", "per_layer") != "per_layer":
            raise ShearsError(f"width group {site.group!r} has scope global: per-block bounds need scope: per_layer")
        group.setdefault("layer_choices", {})[site.layer] = choices
    source = f"{bound.space.source} with EFTNAS bounds (keep {keep})"
    return SearchSpace.from_dict(data, source=source)


def save_search_space(space: SearchSpace, path: str | Path, comment: str = "") -> Path:
    """Write `space` as an ordinary search-space YAML (atomically), with `comment` lines on top."""
    from .atomic import write_text

    header = "".join(f"# {line}\n" for line in comment.splitlines())
    return write_text(path, header + yaml.safe_dump(space.to_dict(), sort_keys=False, default_flow_style=None))
