"""The search space of an elastic-LoRA super-network: groups of modules x rank choices.

A search space (search_spaces/*.yaml) names the LoRA `target_modules`, the maximal rank `r_max`,
`lora_alpha`, `lora_dropout`, and `groups`. A group is a list of module names (leaf names inside a
decoder block, e.g. `q_proj`, or a dotted suffix such as `self_attn.q_proj`) whose ranks are chosen
together, with its rank `choices` and a `scope`:

    per_layer  one choice per decoder block (Shears' default: 3 groups x N layers of choices)
    global     one choice shared by the group's modules in every block

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
_SPACE_KEYS = {"target_modules", "r_max", "lora_alpha", "lora_dropout", "groups"}
_GROUP_KEYS = {"name", "modules", "choices", "scope"}
_GROUP_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")  # no dots: keys are "group.layer"

Config = dict[str, int]


def canonical(config: Config) -> str:
    """The stable string form of a config: sorted keys, no spaces."""
    return json.dumps({str(k): int(v) for k, v in config.items()}, sort_keys=True, separators=(",", ":"))


def _is_rank(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


# ----------------------------------------------------------------------------- the YAML space


@dataclass(frozen=True)
class Group:
    name: str
    modules: tuple[str, ...]
    choices: tuple[int, ...]  # as written in the YAML, duplicates refused
    scope: str = "per_layer"


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

    def _check_groups(self, where: str) -> None:
        owner: dict[str, str] = {}
        names = [g.name for g in self.groups]
        for group in self.groups:
            if names.count(group.name) > 1:
                raise ShearsError(f"{where}: group name {group.name!r} is used twice; give each group its own name")
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
                "groups": [{"name": g.name, "modules": list(g.modules), "choices": list(g.choices),
                            "scope": g.scope} for g in self.groups]}

    def bind(self, model: nn.Module) -> "BoundSpace":
        """Resolve module names against `model` (a plain HF causal LM) and enumerate config keys."""
        layers_name, layers = decoder_layers(model)
        per_layer = [_block_linears(block) for block in layers]
        owner: dict[str, str] = {}  # full module name -> group, to catch two names matching one module
        group_modules: dict[str, list[list[str]]] = {}  # group -> per layer -> full module names
        for group in self.groups:
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
        shapes = {name: _in_out(model.get_submodule(name)) for name in owner}
        keys: list[str] = []
        choices: dict[str, tuple[int, ...]] = {}
        modules: dict[str, tuple[str, ...]] = {}
        for index in range(len(layers)):
            for group in self.groups:
                if group.scope == "per_layer":
                    key = f"{group.name}.{index}"
                    keys.append(key)
                    choices[key] = group.choices
                    modules[key] = tuple(group_modules[group.name][index])
        for group in self.groups:
            if group.scope == "global":
                keys.append(group.name)
                choices[group.name] = group.choices
                modules[group.name] = tuple(n for layer in group_modules[group.name] for n in layer)
        return BoundSpace(self, layers_name, len(layers), tuple(keys), choices, modules, shapes)


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
    scope = data.get("scope", "per_layer")
    if scope not in SCOPES:
        raise ShearsError(f"{where}: group {name!r} has scope {scope!r}; use one of {list(SCOPES)}")
    return Group(name, modules, tuple(int(c) for c in choices), scope)


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


# ----------------------------------------------------------------------------- bound to a model


@dataclass(frozen=True)
class BoundSpace:
    space: SearchSpace
    layers_name: str  # qualified name of the decoder-block ModuleList, e.g. "model.layers"
    num_layers: int
    keys: tuple[str, ...]
    choices: dict[str, tuple[int, ...]]
    modules: dict[str, tuple[str, ...]]  # key -> full module names in the base model
    shapes: dict[str, tuple[int, int]]  # module name -> (in_features, out_features)

    @property
    def r_max(self) -> int:
        return self.space.r_max

    def modules_of(self, key: str) -> tuple[str, ...]:
        return self.modules[key]

    def module_names(self) -> list[str]:
        """Every adapted module, in key order."""
        return [name for key in self.keys for name in self.modules[key]]

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
        """Shears' heuristic subnet: the median choice of every key. For an even number of choices
        the lower median (the smaller of the two middle ranks) is taken: the cheaper subnet."""
        return {key: sorted(self.choices[key])[(len(self.choices[key]) - 1) // 2] for key in self.keys}

    def sample(self, rng: np.random.Generator) -> Config:
        """A uniformly random config; deterministic given the state of `rng` (one draw per key)."""
        picks = rng.integers(0, [len(self.choices[key]) for key in self.keys])
        return {key: int(self.choices[key][i]) for key, i in zip(self.keys, picks)}

    def module_ranks(self, config: Config) -> dict[str, int]:
        config = self.validate(config)
        return {name: config[key] for key in self.keys for name in self.modules[key]}

    def adapter_params(self, config: Config) -> int:
        """Trainable adapter parameters of the subnet: sum over modules of r * (in + out)."""
        return sum(rank * sum(self.shapes[name]) for name, rank in self.module_ranks(config).items())

    def to_dict(self) -> dict:
        return {"space": self.space.to_dict(), "layers_name": self.layers_name, "num_layers": self.num_layers,
                "keys": list(self.keys), "choices": {k: list(v) for k, v in self.choices.items()},
                "modules": {k: list(v) for k, v in self.modules.items()},
                "shapes": {k: list(v) for k, v in self.shapes.items()}}

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "BoundSpace":
        try:
            space = SearchSpace.from_dict(data["space"], source=source)
            keys = tuple(data["keys"])
            bound = cls(space, str(data["layers_name"]), int(data["num_layers"]), keys,
                        {k: tuple(int(c) for c in data["choices"][k]) for k in keys},
                        {k: tuple(data["modules"][k]) for k in keys},
                        {k: (int(v[0]), int(v[1])) for k, v in data["shapes"].items()})
        except (KeyError, TypeError, IndexError, ValueError) as err:
            raise ShearsError(f"{source} is not a bound search space ({type(err).__name__}: {err}); "
                              "re-create it with SuperNet.save") from None
        return bound
