"""GGUF export for llama.cpp: the run's base as one GGUF, each subnet as a llama.cpp LoRA GGUF, merged GGUFs.

    python -m shears.export --run RUN (--front | --subnet ...) --format gguf [--dtype float16|bfloat16|float32]
                            [--merge] [--output DIR] [--force]

writes one folder (default RUN/gguf), whole or not at all:

    base.gguf                the run's base: float16 (default), bfloat16 or float32 weights, or, for a quantized
                             base folder (shears.qformat), its Q8_0/Q4_0 blocks byte for byte
    <subnet>/adapter.gguf    the subnet's LoRA, as llama.cpp's --lora reads it
    <subnet>/merged.gguf     (--merge) base + subnet as one model
    <subnet>/shears.json     the subnet's config, ranks and scale
    manifest.json, README.md the subnets and the llama-cli / llama-server / llama-cpp-python command lines

Tensor layouts are llama.cpp's own: the base goes through llama.cpp's convert_hf_to_gguf.py and each adapter
through its convert_lora_to_gguf.py, so the names and the q/k row permutation llama.cpp's Llama layout applies
are the converter's, for the base and the adapters alike. The converters come from the source distribution
of the installed llama-cpp-python (which vendors llama.cpp): fetched once with `pip download` into
$SHEARS_CACHE/llama.cpp/llama-cpp-python-<version>/, so the files are written by the llama.cpp that serves
them; SHEARS_LLAMA_CPP=<a llama.cpp checkout> uses that one instead (offline machines).

Scaling. llama.cpp has one alpha per adapter and reads each tensor's rank r, scaling B·A by alpha / r.
The super-network scales every module by lora_alpha / r_max whatever its rank, so each module's B is
multiplied by (lora_alpha / r_max) * r / alpha before conversion: llama.cpp's alpha / r then gives exactly
the super-network's update. alpha is the exported PEFT config's (that of the most common rank), so the
most common rank's B is unchanged.

A quantized base: its weights are dequantized (exactly d * q) into a scratch folder for the converter, and
in the converter's output every quantized weight's tensor is replaced by its blocks, the rows taken in the
order llama.cpp's converter puts them (shears/llama_cpp_rows.py asks the converter itself), and checked
against the converter's own values of that tensor. --merge merges in GGUF layout (base tensor + alpha / r *
B·A, as llama.cpp applies an adapter); a quantized weight keeps its block scales (qformat.requantize).

An elastic-width run exports each subnet as merged.gguf only, its smaller model converted as a stock
config; subnets whose blocks keep different widths are refused (llama.cpp needs one shape per tensor kind).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import qformat
from .atomic import atomic_folder, refuse_existing
from .elastic import SCALING_RULE, lora_config, merged_weight
from .errors import ShearsError
from .export import (EXPORT_FORMAT, Factors, load_merge_target, merge_into, smaller_model, squeeze_factors,
                     subnet_factors, write_subnet_adapter)
from .models import as_dtype, cache_dir, model_id, save_sliced_model
from .run import Run
from .rundir import SHEARS_RECORD, ExportFiles
from .search_space import Config
from .width import stock_config, width_spec

LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python the [gguf] extra pins; its vendored converters write the files
EXTRA_HINT = "pip install 'shears-nas[gguf]'"
CONVERTER_ENV = "SHEARS_LLAMA_CPP"  # a llama.cpp checkout to take the converters from instead
CONVERTER_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py", "LICENSE")
GGUF_FORMAT = "shears-gguf/1"
BASE_GGUF = "base.gguf"
ADAPTER_GGUF = "adapter.gguf"
MERGED_GGUF = "merged.gguf"
OUTTYPES = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}
LORA_ALPHA_KEY = "adapter.lora.alpha"
_SCRATCH = ".scratch"  # inside the export's temporary folder; removed before it becomes the output


# --------------------------------------------------------------------------- llama.cpp's converters

def llama_cpp_version() -> str:
    """The installed llama-cpp-python's version (it serves the files, so its converters write them)."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise ShearsError(f"--format gguf needs llama-cpp-python: {EXTRA_HINT}")
    return importlib.metadata.version("llama-cpp-python")


def converter_dir() -> Path:
    """llama.cpp's converter folder: $SHEARS_LLAMA_CPP, else the cached copy matching the installed
    llama-cpp-python, fetched from its source distribution on first use."""
    override = os.environ.get(CONVERTER_ENV)
    if override:
        folder = Path(override).expanduser()
        if not (folder / "convert_hf_to_gguf.py").is_file():
            raise ShearsError(f"{CONVERTER_ENV}={override} holds no convert_hf_to_gguf.py: point it at a llama.cpp "
                              "checkout, or unset it")
        return folder
    version = llama_cpp_version()
    folder = cache_dir() / "llama.cpp" / f"llama-cpp-python-{version}"
    if not (folder / "convert_lora_to_gguf.py").is_file():
        fetch_converters(version, folder)
    return folder


def fetch_converters(version: str, folder: Path) -> None:
    """Download llama-cpp-python's sdist (pip, the package index) and keep llama.cpp's converters from it."""
    with tempfile.TemporaryDirectory() as download:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                                 f"llama-cpp-python=={version}", "-d", download], capture_output=True, text=True)
        sdists = sorted(Path(download).glob("*.tar.gz"))
        if result.returncode or not sdists:
            cause = (result.stderr.strip().splitlines() or ["no source distribution"])[-1]
            raise ShearsError(f"could not download llama-cpp-python {version}'s source, which holds llama.cpp's "
                              f"converters ({cause}): set {CONVERTER_ENV} to a llama.cpp checkout")
        with tarfile.open(sdists[0]) as tar, atomic_folder(folder, force=True) as tmp:
            members = []
            for member in tar.getmembers():
                parts = Path(member.name).parts  # llama_cpp_python-<v>/vendor/llama.cpp/<file>
                if len(parts) > 3 and parts[1:3] == ("vendor", "llama.cpp") and parts[3] in CONVERTER_FILES:
                    member.name = str(Path(*parts[3:]))
                    members.append(member)
            tar.extractall(tmp, members=members, filter="data")
            if not (tmp / "convert_lora_to_gguf.py").is_file():
                raise ShearsError(f"llama-cpp-python {version}'s source holds no llama.cpp converters: set "
                                  f"{CONVERTER_ENV} to a llama.cpp checkout")


def run_converter(converter: Path, script: str, args: list[str], what: str) -> None:
    """Run one of llama.cpp's converter scripts (with its own vendored gguf-py); one-line errors."""
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    result = subprocess.run([sys.executable, str(converter / script), *args], cwd=converter, env=env,
                            capture_output=True, text=True)
    if result.returncode:
        log = result.stdout + result.stderr
        unsupported = re.search(r"Model (\S+) is not supported", log)
        if unsupported:
            raise ShearsError(f"llama.cpp's converter does not support the architecture {unsupported.group(1)}: "
                              "export it with --format peft (stock PEFT) instead")
        if "No module named 'sentencepiece'" in log:
            raise ShearsError(f"llama.cpp's converter needs sentencepiece: {EXTRA_HINT}")
        last = next((line.strip() for line in reversed(log.splitlines()) if line.strip()), "no output")
        raise ShearsError(f"llama.cpp's {script} failed on {what}: {last}")


def converter_rows(converter: Path, folder: Path, shapes: dict[str, list[int]]) -> dict[str, list]:
    """{weight: [[gguf name, source rows or None], ...]}: where llama.cpp's converter puts each row."""
    shapes_file, out_file = folder / "shapes.json", folder / "rows.json"
    shapes_file.write_text(json.dumps(shapes))
    script = Path(__file__).with_name("llama_cpp_rows.py")
    run_converter(converter, str(script), [str(converter), str(folder), str(shapes_file), str(out_file)],
                  f"the layout of {folder.name}")
    return json.loads(out_file.read_text())


# --------------------------------------------------------------------------- GGUF files

def gguf_api():
    """The installed `gguf` package (a dependency of shears): it reads and writes every file here."""
    import gguf

    return gguf


def read_gguf(path: Path):
    return gguf_api().GGUFReader(str(path))


def write_gguf(reader, out: Path, tensors, file_type: int | None = None) -> None:
    """`out` = the metadata of `reader` (general.file_type replaced when given) + `tensors`, an iterable of
    (name, data, GGMLQuantizationType) with data as GGUFReader gives it (bytes for block types)."""
    gguf = gguf_api()
    writer = gguf.GGUFWriter(str(out), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":  # the header, and what the writer adds
            continue
        value = file_type if key == "general.file_type" and file_type is not None else field.contents()
        if key == "general.alignment":
            writer.data_alignment = value
        sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type)
    for name, data, qtype in tensors:
        writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tensor_values(tensor) -> np.ndarray:
    """A GGUFReader tensor as float32 [rows, cols] (the gguf package's own dequantization)."""
    gguf = gguf_api()
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)


FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SCHEME_TYPES = {"Q8_0": "q8_0", "Q4_0": "q4_0"}


def float_bytes(weight: torch.Tensor, qtype) -> np.ndarray:
    """`weight` rounded once to a float GGUF type, as the writer takes it."""
    rounded = weight.to(FLOAT_TYPES[qtype.name])
    if rounded.dtype == torch.bfloat16:  # numpy has no bfloat16: its bytes
        return rounded.view(torch.int16).numpy().view(np.uint8).reshape(rounded.shape[0], -1)
    return rounded.numpy()


# --------------------------------------------------------------------------- the base

def convert_model(folder: Path, out: Path, outtype: str, converter: Path, scratch: Path) -> dict:
    """A model folder as one GGUF. A quantized folder keeps its blocks; the rest is `outtype`."""
    if not qformat.is_quantized_folder(folder):
        run_converter(converter, "convert_hf_to_gguf.py", [str(folder), "--outtype", outtype, "--outfile", str(out)],
                      str(folder))
        return {"weights": outtype, "quantized": None}
    state = qformat.load_quantized_state(folder)
    work = scratch / "dequantized"
    work.mkdir(parents=True)
    for entry in folder.iterdir():  # config, tokenizer, generation config: what the converter reads besides weights
        if entry.is_file() and not entry.name.endswith((".safetensors", ".safetensors.index.json", qformat.QUANT_FILE)):
            shutil.copy2(entry, work / entry.name)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.state_dict(torch.float32).items()}, str(work / "model.safetensors"),
              metadata={"format": "pt"})
    rows = converter_rows(converter, work, {name: list(t.shape) for name, t in state.quantized.items()})
    plain = scratch / "plain.gguf"
    run_converter(converter, "convert_hf_to_gguf.py", [str(work), "--outtype", outtype, "--outfile", str(plain)],
                  str(folder))
    substitute_blocks(read_gguf(plain), out, state.quantized, rows)
    schemes = sorted({t.scheme for t in state.quantized.values()})
    return {"weights": outtype, "quantized": {"schemes": schemes, "tensors": len(state.quantized)}}


def substitute_blocks(reader, out: Path, quantized: dict[str, qformat.QuantizedTensor], rows: dict[str, list]) -> None:
    """`out` = `reader`'s GGUF with each quantized weight's tensor(s) replaced by its blocks, rows in the
    converter's order. Each replacement is checked against the converter's own values of that tensor (rounded to
    its float type), which a wrong row order would fail by whole weights."""
    gguf = gguf_api()
    blocks: dict[str, tuple[torch.Tensor, str]] = {}
    for name, places in rows.items():
        t = quantized[name]
        for gguf_name, order in places:
            if order is None:
                raise ShearsError(f"llama.cpp's converter reshapes {name} beyond choosing its rows, so its {t.scheme} "
                                  "blocks cannot be carried into the GGUF: export an unquantized base")
            blocks[gguf_name] = (t.blocks[torch.tensor(order, dtype=torch.long)], t.scheme)
    found = {t.name for t in reader.tensors}
    missing = sorted(set(blocks) - found)
    if missing:
        raise ShearsError(f"llama.cpp's converter wrote no tensor {missing[0]} for a quantized weight: export an "
                          "unquantized base")
    qtypes = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}

    def tensors():
        for tensor in reader.tensors:
            if tensor.name not in blocks:
                yield tensor.name, tensor.data, tensor.tensor_type
                continue
            packed, scheme = blocks[tensor.name]
            ours = qformat.dequantize(packed, scheme).numpy()
            theirs = tensor_values(tensor)
            if ours.shape != theirs.shape or np.abs(ours - theirs).max() > 2 ** -7 * max(np.abs(ours).max(), 1e-30):
                raise RuntimeError(f"the blocks placed in {tensor.name} do not hold the converter's values")
            yield tensor.name, packed.numpy(), qtypes[scheme]

    schemes = {scheme for _, scheme in blocks.values()}
    file_type = None
    if len(schemes) == 1:
        file_type = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[schemes.pop()]
    write_gguf(reader, out, tensors(), int(file_type) if file_type is not None else None)


# --------------------------------------------------------------------------- adapters and merging

def gguf_alpha(factors: Factors, lora_alpha: float, r_max: int) -> float:
    """The adapter's one alpha: that of the exported PEFT config (lora_alpha * r / r_max for its most common r)."""
    ranks = {module: A.shape[0] for module, (A, _) in factors.items()}
    return float(lora_config(ranks, lora_alpha, r_max, 0.0).lora_alpha)


def fold_scales(factors: Factors, scale: float, alpha: float) -> Factors:
    """B of each module times scale * r / alpha, so that llama.cpp's alpha / r gives `scale` * B·A."""
    return {module: (A, B * (scale * A.shape[0] / alpha)) for module, (A, B) in factors.items()}


def convert_adapter(factors: Factors, alpha: float, base_folder: Path, out: Path, converter: Path,
                    scratch: Path) -> None:
    """The (already folded) factors as a llama.cpp LoRA GGUF of alpha `alpha`, via convert_lora_to_gguf.py."""
    peft = scratch / "peft"
    peft.mkdir(parents=True)
    ranks = {module: A.shape[0] for module, (A, _) in factors.items()}
    # a plain config at alpha: the converter reads lora_alpha only, and the ranks from the tensors
    config = lora_config(ranks, alpha, max(ranks.values()), 0.0, inference_mode=True)
    config.lora_alpha, config.rank_pattern, config.alpha_pattern = alpha, {}, {}
    write_subnet_adapter(peft, {m: (A.contiguous(), B.contiguous()) for m, (A, B) in factors.items()}, config)
    run_converter(converter, "convert_lora_to_gguf.py",
                  [str(peft), "--base", str(base_folder), "--outtype", "f32", "--outfile", str(out)], "the adapter")
    shutil.rmtree(peft)


def merge_gguf(base: Path, adapter: Path, out: Path, sparse_adapter: bool) -> None:
    """base + adapter as one GGUF, in GGUF layout: W + alpha / r * B·A per adapted tensor, as llama.cpp applies
    the adapter at run time (masked by W's non-zeros for a SparsePEFT run). Float weights are rounded once to
    their type; quantized ones keep their block scales."""
    reader, lora = read_gguf(base), read_gguf(adapter)
    alpha = float(lora.fields[LORA_ALPHA_KEY].contents())
    factors = {t.name: t for t in lora.tensors}

    def tensors():
        for tensor in reader.tensors:
            a, b = factors.get(f"{tensor.name}.lora_a"), factors.get(f"{tensor.name}.lora_b")
            if a is None or b is None:
                yield tensor.name, tensor.data, tensor.tensor_type
                continue
            A, B = torch.from_numpy(tensor_values(a).copy()), torch.from_numpy(tensor_values(b).copy())
            scale = alpha / B.shape[1] if alpha else 1.0  # llama.cpp: alpha / rank, the rank being B's columns
            scheme = SCHEME_TYPES.get(tensor.tensor_type.name)
            if scheme is not None:
                packed = torch.from_numpy(np.array(tensor.data, dtype=np.uint8))
                W = qformat.dequantize(packed, scheme)
                merged = merged_weight(W, A, B, scale, sparse_adapter)
                yield tensor.name, qformat.requantize(merged, packed, scheme).numpy(), tensor.tensor_type
            elif tensor.tensor_type.name in FLOAT_TYPES:
                W = torch.from_numpy(tensor_values(tensor).copy()).double()
                yield tensor.name, float_bytes(merged_weight(W, A, B, scale, sparse_adapter), tensor.tensor_type), \
                    tensor.tensor_type
            else:
                raise ShearsError(f"{tensor.name} is {tensor.tensor_type.name} in {base.name}: merging supports float, "
                                  "Q8_0 and Q4_0 bases")

    write_gguf(reader, out, tensors())


# --------------------------------------------------------------------------- the export

@dataclass
class GgufExport:
    """What one --format gguf export wrote."""
    folder: Path
    base: Path | None  # None for an elastic-width run (each subnet is its merged model)
    subnets: dict[str, dict]  # folder name -> shears.json record


def check_widths(run: Run, configs: dict[str, Config]) -> None:
    space = run.supernet.space
    for name, config in configs.items():
        if space.sites and stock_config(space, config) is None:
            raise ShearsError(f"subnet {name} keeps different widths in different blocks, and llama.cpp needs one "
                              "shape per tensor kind: export it with --format peft, or search one width per block")


def export_gguf(run: Run, configs: dict[str, Config], output: Path, dtype: str | None = None, merge: bool = False,
                squeeze: bool = False, energy: float | None = None, force: bool = False,
                objectives: dict | None = None) -> GgufExport:
    """Write the run's base and each {name: config} as GGUF into `output`, atomically as one folder."""
    files = ExportFiles(Path(output))
    refuse_existing(files.folder, force)
    outtype = OUTTYPES.get(as_dtype(dtype or "float16"))
    if outtype is None:
        raise ShearsError(f"--dtype {dtype} has no GGUF type here: use float16, bfloat16 or float32")
    check_widths(run, configs)
    converter = converter_dir()
    supernet, space = run.supernet, run.supernet.space
    scale = space.space.lora_alpha / space.r_max
    base_folder = Path(run.base_source)
    if not (base_folder / "config.json").is_file():  # a hub id or the alias: the folder it was loaded from
        from .models import resolve_model_path

        base_folder = Path(resolve_model_path(run.base_source))
    width = bool(space.sites)
    target = load_merge_target(run) if width else None
    records = {}
    with atomic_folder(files.folder, force) as tmp:
        scratch = tmp / _SCRATCH
        base_record = None
        if not width:
            base_record = convert_model(base_folder, tmp / BASE_GGUF, outtype, converter, scratch / "base")
        for name, config in tqdm(configs.items(), desc="gguf export", unit="subnet"):
            folder = tmp / name
            folder.mkdir()
            factors = subnet_factors(supernet, config)
            if squeeze:
                factors, _ = squeeze_factors(factors, scale, energy)
            record = {"format": GGUF_FORMAT, "export_format": EXPORT_FORMAT, "name": name, "config": config,
                      "module_ranks": {m: A.shape[0] for m, (A, _) in factors.items()},
                      "adapter_params": supernet.adapter_params(config), "objectives": (objectives or {}).get(name),
                      "scale": scale, "scaling": SCALING_RULE, "sparse_adapter": supernet.sparse_adapter,
                      "adapter": None, "merged": None, "base": None if width else f"../{BASE_GGUF}"}
            if width:
                merge_into(target.model, supernet, factors, scale)
                model_dir = scratch / name
                model = smaller_model(target.model, space, config)
                save_sliced_model(model, width_spec(space, config), model_dir, run.tokenizer,
                                  stock_config(space, config))
                convert_model(model_dir, folder / MERGED_GGUF, outtype, converter, scratch / f"{name}-merged")
                record.update(merged=MERGED_GGUF, params=sum(p.numel() for p in model.parameters()),
                              widths=space.site_widths(config))
            else:
                alpha = gguf_alpha(factors, space.space.lora_alpha, space.r_max)
                convert_adapter(fold_scales(factors, scale, alpha), alpha, base_folder, folder / ADAPTER_GGUF,
                                converter, scratch / name)
                record.update(adapter=ADAPTER_GGUF, lora_alpha=alpha)
                if merge:
                    merge_gguf(tmp / BASE_GGUF, folder / ADAPTER_GGUF, folder / MERGED_GGUF, supernet.sparse_adapter)
                    record["merged"] = MERGED_GGUF
            (folder / SHEARS_RECORD).write_text(json.dumps(record, indent=1) + "\n")
            records[name] = record
        shutil.rmtree(scratch, ignore_errors=True)
        manifest = {"format": GGUF_FORMAT, "base_model": model_id(run.recipe.model),
                    "base": None if width else {"file": BASE_GGUF, **base_record},
                    "sparse_adapter": supernet.sparse_adapter, "elastic_width": width,
                    "subnets": [{"folder": name, **{k: r[k] for k in ("adapter", "merged", "objectives",
                                                                       "adapter_params")}}
                                for name, r in records.items()]}
        (tmp / files.manifest.name).write_text(json.dumps(manifest, indent=1) + "\n")
        (tmp / files.readme.name).write_text(gguf_readme(manifest))
    return GgufExport(files.folder, None if width else files.folder / BASE_GGUF, records)


# --------------------------------------------------------------------------- how to serve it

def serve_commands(folder: str, subnet: dict, base: str | None) -> list[str]:
    """llama-cli, llama-server and llama-cpp-python lines for one subnet (paths relative to the export)."""
    if subnet["adapter"] and base:
        model, lora = f"{base}", f"{folder}/{subnet['folder']}/{subnet['adapter']}"
        return [f"llama-cli -m {model} --lora {lora} -p 'PROMPT' -n 64",
                f"llama-server -m {model} --lora {lora}",
                f"python -c \"from llama_cpp import Llama; print(Llama('{model}', lora_path='{lora}')('PROMPT'))\""]
    merged = f"{folder}/{subnet['folder']}/{subnet['merged']}"
    return [f"llama-cli -m {merged} -p 'PROMPT' -n 64", f"llama-server -m {merged}",
            f"python -c \"from llama_cpp import Llama; print(Llama('{merged}')('PROMPT'))\""]


def gguf_readme(manifest: dict) -> str:
    base = manifest["base"]
    lines = [f"# {manifest['base_model']} subnets for llama.cpp", ""]
    if base:
        quantized = base["quantized"]
        weights = (f"the quantized base's {'/'.join(s.upper() for s in quantized['schemes'])} blocks (other weights "
                   f"{base['weights']})" if quantized else f"{base['weights']} weights")
        lines += [f"`{BASE_GGUF}` is the base ({weights}); each folder's `{ADAPTER_GGUF}` is one subnet as a llama.cpp "
                  "LoRA adapter (per-module ranks, each module's scale folded into B so llama.cpp's one alpha / r "
                  f"reproduces the super-network). Folders with `{MERGED_GGUF}` also hold base + subnet as one model.",
                  "", "One base serves every subnet: load several adapters and pick one per request "
                  "(llama-server: `--lora A --lora B --lora-init-without-apply`, then `\"lora\": [{\"id\": 0, "
                  "\"scale\": 1.0}]` in a request; llama-cpp-python: `llama_adapter_lora_init` once per adapter and "
                  "`llama_set_adapters_lora` on the context).", ""]
    else:
        lines += [f"The base has an elastic width: each folder's `{MERGED_GGUF}` is the subnet's smaller model "
                  "(LoRA merged, every block cut to the subnet's width), served on its own.", ""]
    if manifest["sparse_adapter"]:
        lines += ["This run trained a SparsePEFT adapter, masked by the base's zeros; a LoRA adapter cannot apply a "
                  f"mask, so only `{MERGED_GGUF}` (--merge) reproduces the searched subnet.", ""]
    for subnet in manifest["subnets"]:
        lines += [f"## {subnet['folder']}", "", "```sh", *serve_commands(".", subnet, BASE_GGUF if base else None),
                  "```", ""]
    return "\n".join(lines)


def best_subnet(front: dict) -> int:
    """Index of the front's most accurate point (lowest loss), else its largest."""
    rows = front["front"]
    for objective, pick in (("accuracy", max), ("loss", min)):
        if all(objective in row.get("objectives", {}) for row in rows):
            return rows.index(pick(rows, key=lambda row: row["objectives"][objective]))
    return len(rows) - 1


def serving_hint(run_dir, folder_name: str, width: bool) -> str:
    """Two lines: the export command and the llama.cpp command line for one front folder."""
    out = f"{run_dir}/gguf"
    model = (f"{out}/{folder_name}/{MERGED_GGUF}" if width
             else f"{out}/{BASE_GGUF} --lora {out}/{folder_name}/{ADAPTER_GGUF}")
    return (f"serve it on a CPU with llama.cpp ({EXTRA_HINT} first): python -m shears.export --run {run_dir} "
            f"--front --format gguf\n  then: llama-cli -m {model} -p 'PROMPT'")


# --------------------------------------------------------------------------- CLI (python -m shears.export --format gguf)

def run_cli(run_dir, args, settings, front: bool, subnets: list[str] | None) -> GgufExport:
    """export.main's --format gguf: the subnets named as a PEFT export names them, into RUN/gguf or --output."""
    from .export import front_subnets, named_subnets, read_front
    from .run import load_run

    llama_cpp_version()  # before minutes of loading: a missing extra, or an existing output, is said first
    output = Path(args.output) if args.output else run_dir.gguf.folder
    refuse_existing(output, args.force)
    run = load_run(run_dir)
    objectives = None
    if front:
        rows = read_front(run_dir)
        configs = front_subnets(run.supernet, rows)
        objectives = {name: row.get("objectives") for name, row in zip(configs, rows["front"])}
    else:
        configs = named_subnets(run.supernet, subnets)
    exported = export_gguf(run, configs, output, args.dtype, settings.merge, settings.squeeze, settings.energy,
                           args.force, objectives)
    files = [p for p in sorted(exported.folder.rglob("*.gguf"))]
    for path in files:
        print(f"{path.relative_to(exported.folder)}  {path.stat().st_size / 2**20:,.1f} MiB")
    print(f"wrote {len(files)} GGUF file(s) for {len(exported.subnets)} subnet(s) + manifest.json, README.md "
          f"(llama.cpp command lines) to {exported.folder}")
    return exported
