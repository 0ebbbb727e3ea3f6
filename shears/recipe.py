"""Recipes: one YAML file holds every knob of a run; any key can be overridden on the command line.

    python -m shears.train_supernet --recipe recipes/smollm2-math.yaml training.max_steps=50 --sparsity.sparsity 0.4

A recipe is parsed into typed dataclasses. Unknown keys and values of the wrong type are errors that
list what is valid, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import yaml

from .atomic import write_text
from .errors import ShearsError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DEFAULT_RECIPE = RECIPES_DIR / "default.yaml"


# The allowed values of the recipe's choice-valued keys, defined once: they type the fields below,
# so a recipe (or an override) is checked -- with the error naming the choices -- as it is read, and the
# owners' constants are these (sparsity.METHODS, train_supernet.STRATEGIES, evaluate.TASKS, ...).
PruneMethod = Literal["wanda", "magnitude", "sparsegpt"]
Strategy = Literal["uniform", "sandwich"]
AnswerFormat = Literal["label", "content"]
Task = Literal["math", "choice", "loss"]
SearchBackend = Literal["optuna", "pymoo", "surrogate"]
OptunaSampler = Literal["tpe", "nsga2", "gp", "random"]
BF16 = Union[bool, Literal["auto"]]  # shears.precision resolves auto
QuantScheme = Literal["none", "q8_0", "q4_0"]  # shears.qformat.SCHEMES, plus none


@dataclass
class DataConfig:
    train: Union[str, list[str]] = "builtin:arithmetic?n=2000&seed=0"  # one source or several (concatenated)
    data_dir: str = "../shared/data/llm-adapters"  # substituted for {data_dir} in paths; env SHEARS_DATA_DIR wins
    fields: dict[str, str] = field(default_factory=dict)  # our field name -> the file's
    train_limit: Optional[int] = None  # seeded subsample of each training source
    val_size: float = 64  # records carved out of training data for validation (count, or fraction < 1)
    val_seed: int = 0
    cutoff_len: int = 256
    train_on_inputs: bool = False
    # Multiple-choice records: "label" trains and scores the LLM-Adapters response ("the correct answer
    # is answer2"); "content" rewrites them so the response is the chosen option's text (data.to_answer_format).
    answer_format: AnswerFormat = "label"

    def sources(self) -> list[str]:
        data_dir = os.environ.get("SHEARS_DATA_DIR", self.data_dir)
        items = [self.train] if isinstance(self.train, str) else list(self.train)
        return [item.replace("{data_dir}", data_dir) for item in items]


@dataclass
class SparsityConfig:
    sparsity: float = 0.0  # 0 disables pruning
    pattern: str = "unstructured"  # unstructured | 2:4 | 4:8
    method: PruneMethod = "wanda"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    exclude: list[str] = field(default_factory=list)  # fnmatch patterns of module names left dense
    batch_size: int = 1  # calibration samples per block forward (memory, not the result)


@dataclass
class QuantizationConfig:
    """The base quantized to llama.cpp's Q8_0 / Q4_0 after pruning (python -m shears.quantize; RUN/quantized_base).
    Training then runs on its dequantized weights (quantization-aware NLS)."""
    scheme: QuantScheme = "none"  # none keeps the base in `dtype`
    # also the token embedding and the output layer (one tensor when tied), as llama.cpp's pure Q8_0/Q4_0 files
    # do; false keeps them at the base's precision (at 135M parameters they are a fifth of the model)
    embeddings: bool = True
    exclude: list[str] = field(default_factory=list)  # fnmatch patterns of decoder-block linears kept as they are


@dataclass
class WidthConfig:
    """Importance reordering of the base's elastic-width channels (used when the space has width groups)."""
    importance: Literal["taylor", "activation"] = "taylor"  # taylor: first-order loss change of dropping a channel
    nsamples: int = 32  # calibration windows from the training data
    seqlen: int = 256
    seed: int = 0


@dataclass
class DistillConfig:
    """Distillation from the uncompressed base (dense, full width, unquantized) while training the
    compressed super-network. Off while both distillation weights are 0 (shears.distill)."""
    teacher: Optional[str] = None  # a model with the student's architecture and vocabulary; unset: `model`
    teacher_adapter: Optional[str] = None  # a stock-PEFT adapter folder trained on the dense teacher, merged in
    logit_weight: float = 0.0  # KL(teacher || student) at temperature T, x T^2, on the labelled positions
    temperature: float = 1.0
    squarehead_weight: float = 0.0  # SquareHead: per block MSE(student, teacher) / MSE(teacher, 0), block mean
    ce_weight: float = 1.0  # the labels' cross-entropy

    @property
    def enabled(self) -> bool:
        return self.logit_weight > 0 or self.squarehead_weight > 0


@dataclass
class TrainingConfig:
    # uniform | sandwich: max + min + one random subnet per step, their gradients summed (BigNAS), so a
    # sandwich step costs three forward/backward passes and moves each subnet as a uniform step would
    strategy: Strategy = "uniform"
    sparse_adapter: bool = False  # SparsePEFT: mask the adapter update with the base's non-zeros
    # QA-SparsePEFT (needs quantization.scheme): the masked update is merged into the quantized base on its
    # frozen block scales at every step (straight-through gradient), so the merged model stays Q8_0/Q4_0
    qa_sparse_adapter: bool = False
    max_steps: int = -1  # > 0 overrides num_train_epochs
    num_train_epochs: float = 3.0
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-4
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0  # a count, or a fraction of training when below 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: Optional[int] = 2
    gradient_checkpointing: bool = False
    # bf16 autocast: auto = where the device has native bf16 (CUDA bf16, CPU AVX512-BF16/AMX), else fp32.
    # Adapter weights and optimizer state stay fp32. The Wanda calibration forward uses it too.
    bf16: BF16 = "auto"
    group_by_length: bool = True  # batches of similar lengths (less padding); order still seeded
    seed: int = 42
    val_limit: Optional[int] = 64  # validation examples for the end-of-training loss report
    # In-Squeeze (LoRA-Squeeze): r_max of each training stage, e.g. [64, 32]; it must end at the search
    # space's r_max. Training is split evenly over the stages; at each boundary the adapters are squeezed
    # (SVD) to the next rank and the optimiser restarts, while the data order and the learning-rate
    # schedule (one warm-up) continue as in a single stage. Empty: one stage at the space's r_max.
    rank_schedule: list[int] = field(default_factory=list)
    distill: DistillConfig = field(default_factory=DistillConfig)
    # In-place distillation (US-Nets/BigNAS), strategy sandwich only: the maximal subnet learns from the
    # labels, the minimal and random ones from its detached soft labels (KL) in the same step.
    inplace_distill: bool = False

    def validate_distillation(self) -> None:
        d = self.distill
        for key in ("logit_weight", "squarehead_weight", "ce_weight"):
            if getattr(d, key) < 0 or not math.isfinite(getattr(d, key)):
                raise ShearsError(f"training.distill.{key}={getattr(d, key)} is below 0: a loss weight is 0 (off) or more")
        if not d.temperature > 0:
            raise ShearsError(f"training.distill.temperature={d.temperature}: use a temperature above 0, e.g. 2")
        if self.inplace_distill and self.strategy != "sandwich":
            raise ShearsError(f"training.inplace_distill needs training.strategy=sandwich (got {self.strategy!r}): "
                              "set training.strategy=sandwich or training.inplace_distill=false")


@dataclass
class EvaluationConfig:
    task: Task = "math"
    max_new_tokens: int = 32
    batch_size: int = 16
    bf16: Optional[BF16] = None  # auto | true | false; unset: training.bf16 (evaluation and search)


@dataclass
class SearchConfig:
    backend: SearchBackend = "optuna"  # surrogate: a ridge predictor + NSGA-II on it
    sampler: OptunaSampler = "tpe"  # the optuna backend's sampler
    budget: int = 20  # full-set-equivalent evaluations (distinct subnets when rungs is empty)
    objectives: list[str] = field(default_factory=lambda: ["accuracy", "adapter_params"])
    eval_limit: Optional[int] = None
    storage: Optional[str] = None
    seed: int = 0
    # Multi-fidelity: validation records each candidate is first scored on, ascending, e.g. [16, 64];
    # only the best `keep` share of each rung is scored further. Empty: every candidate on the full set.
    rungs: list[int] = field(default_factory=list)
    keep: float = 0.34
    # Scores the search starts from: true imports training's scores of the maximal/heuristic/minimal subnets
    # (RUN/warm_start.jsonl, when they were measured as this search measures); a list of earlier
    # history.jsonl files (or search folders) imports their matching scores too; false imports none.
    warm_start: Union[bool, list[str]] = True
    latency_batch_size: int = 1  # the forward the latency objective times: batch x length tokens
    latency_seq_len: int = 256
    # Stop rule: end the search once this many full-set evaluations in a row moved the Pareto front by no
    # more than 2 paired standard errors of the quality (null: spend the whole budget). 10 is the smallest K
    # that gave up no held-out hypervolume in any of bench_search.py's six real-space searches (K=5 gave up
    # up to 0.0001), and it saved 12.5 of 40 evaluations where it fired (benchmarks/RESULTS.md).
    stop_when_flat: Optional[int] = 10


@dataclass
class ExportConfig:
    """What `python -m shears.export` writes by default; its flags override each key."""
    squeeze: bool = False  # re-factorise each module: to its smallest exact rank, or keeping `energy`
    energy: Optional[float] = None  # with squeeze: the share of each module's sum(sigma^2) kept
    merge: bool = False  # also write merged/: base + subnet as an HF model folder
    uniform_rank: bool = False  # zero-pad every module to the subnet's largest rank (SGLang, LoRAX, TGI)


@dataclass
class Recipe:
    model: str = "smollm2-135m"
    dtype: str = "float32"
    output_dir: str = "runs/default"
    search_space: Union[str, dict] = "llama"  # a name in search_spaces/, a path, or the space inline
    data: DataConfig = field(default_factory=DataConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    width: WidthConfig = field(default_factory=WidthConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def evaluation_bf16(self) -> BF16:
        """The precision setting evaluation and search use: evaluation.bf16, else training.bf16."""
        return self.training.bf16 if self.evaluation.bf16 is None else self.evaluation.bf16

    def validate(self) -> "Recipe":
        s = self.sparsity
        if not 0 <= s.sparsity < 1:
            raise ShearsError(f"sparsity.sparsity={s.sparsity} is outside [0, 1): use e.g. 0.5 for 50%")
        if self.training.qa_sparse_adapter and self.quantization.scheme == "none":
            raise ShearsError("training.qa_sparse_adapter merges into a quantized base: set quantization.scheme "
                              "to q8_0 or q4_0, or turn qa_sparse_adapter off")
        self.training.validate_distillation()
        return self  # choice-valued keys are Literal fields, checked as they are read (_coerce)


# --------------------------------------------------------------------------- YAML numbers

# PyYAML reads YAML 1.1, where `2:4` is the base-60 integer 124 and `3e-4` (no dot) is a string.
# Recipes hold N:M patterns and learning rates, so the loader reads numbers as YAML 1.2 does.
_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_INT = re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$")
_FLOAT = re.compile(r"^(?:[-+]?(?:(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[0-9]+[eE][-+]?[0-9]+)"
                    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_NUMBER_START = list("-+0123456789.")


class _Loader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2 numbers (resolvers set below)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_INT_TAG, _INT, _NUMBER_START)
_Loader.add_implicit_resolver(_FLOAT_TAG, _FLOAT, _NUMBER_START)


class _Dumper(yaml.SafeDumper):
    """Quotes every string that either reading (YAML 1.1 or ours) would take for a number."""


_Dumper.add_implicit_resolver(_FLOAT_TAG, _FLOAT, _NUMBER_START)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


# --------------------------------------------------------------------------- typed construction

def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:  # name the allowed values, e.g. 'auto'
        return " or ".join(repr(v) for v in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently convert) a YAML value against a dataclass field's type annotation."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and not isinstance(value, bool):
            return value
        choices = [str(v) for v in allowed]
        listed = ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]
        raise ShearsError(f"{where.removeprefix('recipe.')}={value!r}: use {listed}")
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ShearsError:
                continue
        raise ShearsError(f"{where}: {value!r} is not a {' or '.join(_type_name(o) for o in options)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ShearsError(f"{where}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}")
        return _build(tp, value, where)
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if isinstance(value, str):  # a command line writes a list as a,b,c
            pieces = [v.strip() for v in value.split(",") if v.strip()]
            value = pieces if item_type is str else [_parse_value(v) for v in pieces]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ShearsError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ShearsError(f"{where}: expected a mapping, got {value!r}")
        value_type = (typing.get_args(tp) or (str, Any))[1]
        return {str(k): _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ShearsError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ShearsError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # e.g. "3e-4" handed over in an overrides dict
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if math.isfinite(number):
                return number
        raise ShearsError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ShearsError(f"{where}: expected a string, got {value!r}")
    return value


def _build(cls: type, values: dict, where: str = "recipe"):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        prefix = "" if where == "recipe" else where.removeprefix("recipe.") + "."
        raise ShearsError(f"unknown recipe key '{prefix}{unknown[0]}': valid keys are "
                          f"{', '.join(prefix + k for k in sorted(known))}")
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in values.items()}
    return cls(**kwargs)


def recipe_from_dict(values: dict) -> Recipe:
    return _build(Recipe, values or {}).validate()


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            section = ".".join(keys[:depth + 1])
            raise ShearsError(f"cannot set {dotted}: {section} is a value, not a section; override {section} itself")
        node = child
    node[keys[-1]] = value


def _parse_value(raw: str) -> Any:
    """A command-line value as YAML (so 8, 0.5, true, [a, b] are typed); text YAML cannot read stays text."""
    if raw == "":
        return ""
    try:
        return _yaml_load(raw)
    except yaml.YAMLError:  # e.g. {data_dir}/x.json, which YAML takes for a broken mapping
        return raw


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`key=value` and `--key value` / `--key=value` pairs into {dotted key: YAML-parsed value}."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, raw = body.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                key, raw = body, args[i + 1]
                i += 1
            else:
                key, raw = body, "true"
        elif "=" in arg:
            key, raw = arg.split("=", 1)
        else:
            raise ShearsError(f"cannot read {arg!r}: write overrides as key=value or --key value")
        overrides[key.replace("-", "_")] = _parse_value(raw)
        i += 1
    return overrides


def load_recipe(path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None,
                sections: Sequence[str] | None = None) -> Recipe:
    """Read a recipe YAML (default: recipes/default.yaml) and apply dotted-key overrides; with `sections`,
    only keys of those sections may be overridden (a later stage must not change what training built)."""
    path = Path(path) if path else DEFAULT_RECIPE
    if not path.is_file() and not path.suffix and (RECIPES_DIR / f"{path}.yaml").is_file():
        path = RECIPES_DIR / f"{path}.yaml"  # a bare name picks a shipped recipe
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        raise ShearsError(f"recipe not found: {path} (shipped recipes: {shipped})")
    try:
        values = _yaml_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ShearsError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ShearsError(f"{path}: a recipe is a mapping of keys to values")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        if sections is not None and key.split(".")[0] not in sections:
            raise ShearsError(f"cannot override {key} here: this stage reads only "
                              f"{', '.join(f'{name}.*' for name in sections)} of the run's recipe")
        _set_dotted(values, key, value)
    return recipe_from_dict(values)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the fully resolved recipe (atomically)."""
    write_text(path, yaml.dump(recipe.to_dict(), Dumper=_Dumper, sort_keys=False))
