"""Export subnets of a trained super-network as ordinary stock-PEFT LoRA adapters.

A subnet of the super-network is a rank per adapted module; its LoRA factors are the leading slices
A[:r] and B[:, :r] of the super-network's, and its scale is lora_alpha / r_max whatever r is. PEFT
computes the scale as alpha / r, so a module exported at rank r carries alpha = lora_alpha * r / r_max.
The ranks differ per module, so they go into `rank_pattern` / `alpha_pattern`, keyed by each
module's full anchored path: PEFT takes the first key k with re.match(rf"(.*\\.)?({k})$", module), so
a short key such as `q_proj` would pin every layer's q_proj to one rank. `r` / `lora_alpha` hold the
most common rank, which keeps the patterns short.

Every module of every export has the same alpha / r (the super-network's lora_alpha / r_max, which
a squeeze keeps), so an engine that ignores the patterns and applies one global lora_alpha / r --
vLLM before it read rank_pattern -- still scales each module correctly. Engines that need one rank
per adapter (SGLang, LoRAX, TGI) get --uniform-rank: every module zero-padded to the subnet's
largest rank, [A; 0] and [B, 0], which leaves B·A unchanged, with no patterns at all.

    python -m shears.export --run RUN (--front | --subnet maximal|heuristic|minimal|<config json>)
                            [--squeeze [--energy E]] [--uniform-rank] [--merge] [--output DIR] [--force]

--squeeze, --energy, --uniform-rank and --merge default to the run's recipe (its `export:` section);
a flag overrides it, and --no-squeeze / --no-merge / --no-uniform-rank turn a recipe's default off.

--squeeze re-factorises every exported module with shears.squeeze: to the smallest rank that keeps
its update exact (tol mode), or to the rank keeping a share E of its energy, at the same scale.
--merge also writes merged/, an HF model folder of base + subnet. A SparsePEFT run (sparse_adapter)
masks its update with the base's non-zeros; that masked update is not low-rank, so its adapter
folder holds the unmasked factors and only merged/ reproduces the super-network (keeping the base's
zeros exactly). A QA-SparsePEFT run (training.qa_sparse_adapter, on RUN/quantized_base) writes merged/ as a
quantized folder on the base's frozen grid: the merged weights requantized with the base's block scales
(shears.quantize.write_on_grid), exactly the weights it trained on, still Q8_0/Q4_0 with the same zeros.

RUN/export/<name>/ = adapter_model.safetensors + adapter_config.json + shears.json [+ merged/];
--front adds manifest.json and README.md listing every point of RUN/search/front.json.

A super-network with elastic base width (width groups in its search space) exports each subnet as
merged/ only: base + LoRA merged, channels in importance order, every MLP cut to the subnet's widths,
so the folder is a physically smaller model. One width in every block gives a stock config
(intermediate_size reduced; AutoModelForCausalLM.from_pretrained loads it); per-block widths add
shears_widths.json, read by shears.models.load_model. No adapter folder is written: the adapter's
channels are in the reordered base's order, and a stock adapter cannot drop channels. A --front
export's manifest.json names each merged/ model's loader, and its README.md shows the snippet that
loads each kind.

Merged weights are computed in float64 and rounded once to the base's dtype. How close an export is
to its subnet is measured in float64 too: on a 30-block model two correct fp32 evaluations of one
function differ by ~1e-4 in the logits (summation order; smollm2-135m alone is ~7e-5 from its own
float64 logits), while in float64 merge + slice equal the subnet exactly and the fp32-stored export
is ~3e-5 from it (tests/test_width_export.py, benchmarks/bench_width.py).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from . import flags
from .elastic import SCALING_RULE, SuperNet, grid_merged_weight, lora_config, merged_weight
from .errors import ShearsError, cli_errors
from .memory import MERGED_SHARD_BYTES
from .model_card import CardContext, rank_summary, subnet_card
from .models import (WIDTH_FILE, decoder_layers, linear_names, load_model, model_id, save_config, save_sliced_model,
                     slice_linears)
from .qformat import load_quantized_state
from .quantize import write_on_grid
from .progress import progress
from .atomic import atomic_folder, refuse_existing, write_text
from .recipe import ExportConfig
from .run import Run, load_run, load_run_recipe, subnet_config
from .rundir import README, SHEARS_RECORD, SPARSE_BASE, ExportFiles, RunDir
from .search.history import read_front as read_search_front, recorded_scores
from .search_space import ANCHORS, Config, canonical
from .sparsity import SPARSITY_JSON, sparsity_report
from .width import permute_channels, stock_config, uniform_widths, width_spec
from .squeeze import (ADAPTER_WEIGHTS, PEFT_PREFIX, DEFAULT_TOL,
                      lora_factor_keys, squeeze_lora)

EXPORT_FORMAT = "shears-export/1"
MERGED = "merged"  # the merged model's folder inside a subnet's folder

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A [r, in], B [out, r])


# --------------------------------------------------------------------------- which subnets

def named_subnets(supernet: SuperNet, subnets: list[str]) -> dict[str, Config]:
    """--subnet values -> {folder name: config}: an anchor keeps its label, a .json file its stem,
    inline JSON becomes subnet-<adapter_params>."""
    named = {}
    for subnet in subnets:
        config = supernet.space.validate(subnet_config(supernet, subnet))
        if subnet in ANCHORS:
            name = subnet
        elif subnet.endswith(".json") and Path(subnet).is_file():
            name = Path(subnet).stem
        else:
            name = f"subnet-{supernet.adapter_params(config)}"
        if name in named:
            raise ShearsError(f"two --subnet values both export to the folder {name!r}: pass each subnet once")
        named[name] = config
    return named


def read_front(run_dir: RunDir) -> dict:
    front = read_search_front(run_dir.search.folder)
    if front is None:
        raise ShearsError(f"{run_dir.search.front_json} not found: run python -m shears.search --run {run_dir} "
                          "--budget N first")
    return front


def front_subnets(supernet: SuperNet, front: dict) -> dict[str, Config]:
    """{front-<i>-<adapter_params>: config} for every point of front.json, in its order (size ascending)."""
    if not front.get("front"):
        raise ShearsError("front.json holds no points: run python -m shears.search with a larger --budget")
    return {f"front-{i}-{supernet.adapter_params(row['config'])}": supernet.space.validate(row["config"])
            for i, row in enumerate(front["front"])}


# --------------------------------------------------------------------------- one subnet's adapter

def subnet_factors(supernet: SuperNet, config: Config) -> Factors:
    tensors = supernet.subnet_state_dict(config)
    return {module: (tensors[a], tensors[b]) for module, a, b in lora_factor_keys(tensors)}


def squeeze_factors(factors: Factors, scale: float, energy: float | None) -> tuple[Factors, list[dict]]:
    """Each module re-factorised at the same scale: exact (tol mode) or keeping `energy` of sum(σ²)."""
    rule = {"energy": energy} if energy is not None else {"tol": DEFAULT_TOL}
    squeezed, records = {}, []
    for module, (A, B) in factors.items():
        result = squeeze_lora(A, B, scale, **rule)
        squeezed[module] = (result.A.contiguous(), result.B.contiguous())
        records.append({"module": module, "rank_before": A.shape[0], "rank_after": result.rank,
                        "rel_error": result.rel_error})
    return squeezed, records


def pad_factors(factors: Factors, rank: int) -> Factors:
    """Every module at `rank`: A gains zero rows and B zero columns, so B·A -- the update -- is unchanged."""
    padded = {}
    for module, (A, B) in factors.items():
        extra = rank - A.shape[0]
        padded[module] = (torch.cat([A, A.new_zeros(extra, A.shape[1])]).contiguous(),
                          torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1).contiguous())
    return padded


def global_scale(config: dict) -> float:
    """lora_alpha / r of an adapter_config, after checking every pattern entry has that same ratio: the
    invariant that lets an engine applying one global scale serve our per-module ranks."""
    scale = config["lora_alpha"] / config["r"]
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for key in ranks.keys() | alphas.keys():
        ratio = alphas.get(key, config["lora_alpha"]) / ranks.get(key, config["r"])
        if abs(ratio - scale) > 1e-9 * max(1.0, abs(scale)):
            raise ValueError(f"module {key!r} has alpha/r {ratio} but the adapter's is {scale}")
    return scale


def write_subnet_adapter(folder: Path, factors: Factors, config: LoraConfig) -> None:
    tensors = {}
    for module, (A, B) in factors.items():
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = A
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = B
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config.save_pretrained(str(folder))


# --------------------------------------------------------------------------- merging

def sparsity_summary(model: torch.nn.Module) -> dict:
    report = sparsity_report(model)
    return {key: report[key] for key in ("total", "zeros", "params")}


def keeps_zeros(merged: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether every zero of the base is still exactly zero in the merged weight."""
    return not bool(merged.ne(0).logical_and_(base == 0).any())


@torch.no_grad()
def merge_into(target: torch.nn.Module, supernet: SuperNet, factors: Factors, scale: float) -> bool:
    """target's adapted weights := the super-network's untouched base merged with `factors` (elastic.merged_weight),
    so one target serves every subnet. Returns whether every zero of the base stayed exactly zero."""
    zeros_kept = True
    for module, (A, B) in factors.items():
        layer = supernet.layers[module]
        base = layer.get_base_layer().weight
        if supernet.qa_scheme:  # onto the quantized base's frozen grid, as training merged it at every step
            merged = grid_merged_weight(base, A, B, scale, layer.grid_scales, layer.grid_scheme).to(base.dtype)
        else:
            merged = merged_weight(base, A, B, scale, supernet.sparse_adapter)
        zeros_kept &= keeps_zeros(merged, base)
        target.get_submodule(module).weight.copy_(merged)
    return zeros_kept


def base_tensors(supernet: SuperNet):
    """(name, tensor) of the super-network's base as save_pretrained would name them, in state-dict order,
    no adapter tensors: PEFT's `.base_layer.` dropped, a tensor tied to an earlier one (a tied output
    layer) left out, as save_pretrained leaves it out."""
    seen = set()
    for key, tensor in supernet.model.get_base_model().state_dict().items():
        if ".lora_" in key:
            continue
        storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if storage in seen:
            continue
        seen.add(storage)
        yield key.replace(".base_layer.", "."), tensor


def block_linear_weights(supernet: SuperNet) -> set[str]:
    """Tensor names of the decoder-block linears' weights: what sparsity_report counts."""
    base = supernet.model.get_base_model()
    layers_name, blocks = decoder_layers(base)
    return {f"{layers_name}.{i}.{name.replace('.base_layer', '')}.weight"
            for i, block in enumerate(blocks) for name in linear_names(block) if "lora_" not in name}


def _zeros_summary(zeros: int, params: int) -> dict:
    return {"total": zeros / max(params, 1), "zeros": zeros, "params": params}


@torch.no_grad()
def stream_merged(folder: Path, supernet: SuperNet, factors: Factors, scale: float, tokenizer,
                 shard_bytes: int = MERGED_SHARD_BYTES) -> dict:
    """merged/: the super-network's base with `factors` merged (elastic.merged_weight), as an HF folder,
    computed one matrix at a time and written a shard at a time; the base itself is never changed, so
    it serves every subnet. A finished shard's merged matrices are freed before the next are computed, so
    this costs the base plus one shard of `shard_bytes` and one matrix's float64 merge, never two models.
    Returns the sparsity of the decoder-block linears before and after, and whether every zero of the
    base stayed exactly zero."""
    from huggingface_hub import split_torch_state_dict_into_shards

    base = supernet.model.get_base_model()
    folder.mkdir(parents=True)
    save_config(base, folder)
    tensors = dict(base_tensors(supernet))
    plan = split_torch_state_dict_into_shards(tensors, max_shard_size=shard_bytes)
    counted = block_linear_weights(supernet)
    zeros_before = zeros_after = params = 0
    zeros_kept = True
    for file, names in progress(plan.filename_to_tensors.items(), desc="writing merged shards", unit="shard"):
        shard = {}
        for name in names:
            tensor = tensors[name]
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and module in factors:
                A, B = factors[module]
                merged = merged_weight(tensor, A, B, scale, supernet.sparse_adapter)
                zeros_kept &= keeps_zeros(merged, tensor)
            else:
                merged = tensor
            if name in counted:
                zeros_before += tensor.numel() - int(torch.count_nonzero(tensor))
                zeros_after += merged.numel() - int(torch.count_nonzero(merged))
                params += tensor.numel()
            shard[name] = merged.contiguous()
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        del shard
    if plan.is_sharded:
        index = {"metadata": {"total_size": plan.metadata["total_size"]}, "weight_map": plan.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return {"sparsity_before": _zeros_summary(zeros_before, params),
            "sparsity_after": _zeros_summary(zeros_after, params), "base_zeros_kept": zeros_kept}


# --------------------------------------------------------------------------- the stage

@dataclass
class MergeTarget:
    """A plain copy of the base model that a width subnet's smaller merged/ model is cut from, or that a quantized
    (QA-SparsePEFT) merge is requantized from."""
    model: torch.nn.Module
    sparsity_before: dict  # of the base, measured before any merge


def load_merge_target(run: Run) -> MergeTarget:
    param = next(run.supernet.model.parameters())
    model = load_model(run.base_source, dtype=param.dtype, device=param.device).eval()
    if run.supernet.channel_order is not None:  # the merged weights are in the super-network's channel order
        permute_channels(model, run.supernet.space.sites, run.supernet.channel_order)
    return MergeTarget(model, sparsity_summary(model))


def base_name(run: Run) -> str:
    """What an export calls its base: the original model's id (shears.models.model_id), never a path of
    this machine -- the adapter config, README and manifest travel with the folders."""
    return model_id(run.recipe.model)


def card_context(run: Run) -> CardContext:
    """What every subnet's model card says of the run: its folder's name (never its path), the search's
    task and the training data by name."""
    return CardContext(run.path.name, run.recipe.evaluation.task,
                       [model_id(source.split("?")[0]) if not source.startswith("builtin:") else source
                        for source in run.recipe.data.sources()])


def smaller_model(target: torch.nn.Module, space, config: Config) -> torch.nn.Module:
    """A copy of the merged target cut to the config's widths: the model merged/ holds."""
    model = copy.deepcopy(target)
    slice_linears(model, width_spec(space, config))
    return model


def write_sliced(folder: Path, target: torch.nn.Module, space, config: Config, tokenizer) -> dict:
    """merged/ as a physically smaller model: a copy of the merged target cut to the config's widths."""
    model = smaller_model(target, space, config)
    stock = save_sliced_model(model, width_spec(space, config), folder, tokenizer, stock_config(space, config))
    return {"widths": space.site_widths(config), "uniform": uniform_widths(space, config),
            "stock_config": stock, "params": sum(p.numel() for p in model.parameters())}


def base_record(run: Run) -> dict:
    """Where the base came from, its fingerprint, and how it was pruned (RUN/sparse_base/sparsity.json)."""
    sparsity_file = Path(run.base_source) / SPARSITY_JSON
    sparsity = None
    if sparsity_file.is_file():  # the settings and overall numbers, not the per-module maps
        sparsity = {k: v for k, v in json.loads(sparsity_file.read_text()).items() if k not in ("layers", "modules")}
    source = Path(run.base_source)  # where this machine loaded it from: provenance, not for loading elsewhere
    return {"model_id": base_name(run), "source": str(source.resolve()) if source.exists() else run.base_source,
            "fingerprint": run.supernet.fingerprint, "pruned": sparsity is not None, "sparsity": sparsity}


def export_one(run: Run, name: str, config: Config, folder: Path, objectives: dict | None,
               squeeze: bool, energy: float | None, merge: bool, target: MergeTarget | None = None,
               uniform_rank: bool = False) -> dict:
    """Write one subnet into the fresh temporary `folder`; returns its shears.json record."""
    supernet, space = run.supernet, run.supernet.space
    scale = space.space.lora_alpha / space.r_max
    factors = subnet_factors(supernet, config)
    squeeze_record = None
    if squeeze:
        factors, modules = squeeze_factors(factors, scale, energy)
        squeeze_record = {"rule": {"energy": energy} if energy is not None else {"tol": DEFAULT_TOL},
                          "rank_before": sum(m["rank_before"] for m in modules),
                          "rank_after": sum(m["rank_after"] for m in modules), "modules": modules}
    ranks = {module: A.shape[0] for module, (A, _) in factors.items()}
    padded_to = max(ranks.values()) if uniform_rank else None
    written = pad_factors(factors, padded_to) if uniform_rank else factors
    adapter = lora_config({m: A.shape[0] for m, (A, _) in written.items()}, space.space.lora_alpha, space.r_max,
                          space.space.lora_dropout, base_model_name_or_path=base_name(run), inference_mode=True)
    global_scale(adapter.to_dict())  # the invariant, checked on what is written
    if not space.sites:
        write_subnet_adapter(folder, written, adapter)
    merge_record = None
    if merge and (space.sites or supernet.qa_scheme):  # into a copy of the base, then cut or requantized
        zeros_kept = merge_into(target.model, supernet, factors, scale)
        width_record = None
        if space.sites:
            width_record = write_sliced(folder / MERGED, target.model, space, config, run.tokenizer)
        else:
            write_on_grid(folder / MERGED, target.model, load_quantized_state(run.base_source), run.tokenizer,
                          Path(run.base_source))
        merge_record = {"folder": MERGED, "sparsity_before": target.sparsity_before,
                        "sparsity_after": sparsity_summary(target.model), "base_zeros_kept": zeros_kept,
                        "width": width_record, "quantized": supernet.qa_scheme}
    elif merge:
        merge_record = {"folder": MERGED, **stream_merged(folder / MERGED, supernet, factors, scale, run.tokenizer),
                        "width": None, "quantized": None}
    record = {
        "format": EXPORT_FORMAT, "name": name, "config": config,
        "adapter_params": supernet.adapter_params(config),
        "exported_adapter_params": sum(A.numel() + B.numel() for A, B in written.values()),
        "module_ranks": ranks, "max_rank": max(ranks.values()), "uniform_rank": padded_to,
        "objectives": objectives,
        "base_model": base_record(run), "run": str(run.path.resolve()),
        "r_max": space.r_max, "lora_alpha": space.space.lora_alpha, "scaling": SCALING_RULE,
        "sparse_adapter": supernet.sparse_adapter,
        # SparsePEFT masks the update; a stock adapter can only apply the unmasked factors. An elastic-width
        # subnet is a smaller model: merged/ only, no adapter folder
        "adapter": None if space.sites else ADAPTER_WEIGHTS,
        "adapter_reproduces_supernet": not supernet.sparse_adapter and not space.sites,
        "squeeze": squeeze_record, "merged": merge_record,
    }
    (folder / SHEARS_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return record


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or Path(name).name != name:
        raise ShearsError(f"subnet name {name!r} is not a plain folder name: use letters, digits, - and _")


@dataclass
class Exported:
    """One written subnet folder and its shears.json record."""
    folder: Path
    record: dict


def export_subnets(run: Run | str | Path, configs: dict[str, Config], output: str | Path, squeeze: bool = False,
                   energy: float | None = None, merge: bool = False, force: bool = False,
                   uniform_rank: bool = False) -> list[Exported]:
    """Export each {name: config} as the stock-PEFT folder OUTPUT/name (each written atomically);
    uniform_rank zero-pads every module to the subnet's largest rank (one rank, no patterns)."""
    if energy is not None and not squeeze:
        raise ShearsError("energy sets the squeezed rank: pass squeeze=True as well (--squeeze --energy E)")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ShearsError(f"--energy must be in (0, 1], got {energy}")
    if not configs:
        raise ShearsError("no subnets to export: pass --front or --subnet")
    files = ExportFiles(Path(output))
    for name in configs:
        _check_name(name)
        refuse_existing(files.subnet(name), force)
    run = run if isinstance(run, Run) else load_run(run)
    configs = {name: run.supernet.space.validate(config) for name, config in configs.items()}
    scores = recorded_scores(run.dir.search.folder)
    card = card_context(run)
    merge = merge or bool(run.supernet.space.sites)  # a width subnet exists only as a smaller model
    target = load_merge_target(run) if run.supernet.space.sites or run.supernet.qa_scheme else None
    files.folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, config in progress(configs.items(), desc="export", unit="subnet"):
        score = scores.get(canonical(config), {})
        with atomic_folder(files.subnet(name), force) as tmp:
            record = export_one(run, name, config, tmp, score.get("objectives"), squeeze, energy, merge, target,
                                uniform_rank)
            (tmp / README).write_text(subnet_card(record, card, score.get("n_examples")))
        written.append(Exported(files.subnet(name), record))
    return written


# --------------------------------------------------------------------------- the front

def export_front(run: Run | str | Path, output: str | Path | None = None, squeeze: bool = False,
                 energy: float | None = None, merge: bool = False, force: bool = False,
                 uniform_rank: bool = False) -> list[Exported]:
    """Export every point of RUN/search/front.json to OUTPUT/front-<i>-<adapter_params>/ (default
    OUTPUT: RUN/export), plus manifest.json and README.md listing them."""
    run_dir = run.dir if isinstance(run, Run) else RunDir(run)
    front = read_front(run_dir)
    files = ExportFiles(Path(output)) if output is not None else run_dir.export
    refuse_existing(files.manifest, force)
    run = run if isinstance(run, Run) else load_run(run_dir)
    configs = front_subnets(run.supernet, front)
    old_folders = _manifest_folders(files)
    exported = export_subnets(run, configs, files.folder, squeeze, energy, merge, force, uniform_rank)
    width = bool(run.supernet.space.sites)
    manifest = {"format": EXPORT_FORMAT, "run": str(run_dir.root.resolve()), "objectives": front.get("objectives"),
                "hypervolume": front.get("hypervolume"), "uniform_rank": uniform_rank,
                "base_model": base_record(run), "sparse_adapter": run.supernet.sparse_adapter,
                # SparsePEFT masks the update; the folders' stock adapters apply the unmasked factors. An
                # elastic-width run writes no adapter: each folder's merged/ is the subnet
                "adapter_reproduces_supernet": not run.supernet.sparse_adapter and not width,
                "elastic_width": width,
                "subnets": [{"folder": e.folder.name, "config": e.record["config"],
                             "ranks": rank_summary(e.record["module_ranks"]), "max_rank": e.record["max_rank"],
                             "objectives": e.record["objectives"], "adapter_params": e.record["adapter_params"],
                             "exported_adapter_params": e.record["exported_adapter_params"],
                             **({"model": smaller_model_record(e)} if width else {})} for e in exported]}
    write_text(files.manifest, json.dumps(manifest, indent=1) + "\n")
    write_text(files.readme, width_front_readme(manifest) if width else front_readme(manifest))
    _remove_stale(files, old_folders - {e.folder.name for e in exported})
    return exported


def _manifest_folders(files: ExportFiles) -> set[str]:
    try:
        return {s["folder"] for s in json.loads(files.manifest.read_text())["subnets"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _remove_stale(files: ExportFiles, names: set[str]) -> None:
    """Folders of an earlier front export that the new front no longer has (ours: they hold shears.json)."""
    for name in names:
        folder = files.subnet(name)
        if Path(name).name == name and (folder / SHEARS_RECORD).is_file():
            shutil.rmtree(folder, ignore_errors=True)


def front_title(manifest: dict) -> str:
    """The run by its folder's name and its base by id: the README travels, the machine's paths do not."""
    return f"the run `{Path(manifest['run']).name}` ({manifest['base_model']['model_id']})"


def front_readme(manifest: dict) -> str:
    base = manifest["base_model"]
    # a pruned base is RUN/sparse_base: the model these adapters were trained on, shipped with the run
    load_from = SPARSE_BASE if base["pruned"] else base["model_id"]
    names = manifest["objectives"] or sorted({k for s in manifest["subnets"] for k in s["objectives"]})
    names = [n for n in names if n != "adapter_params"]  # already its own column
    lines = [f"# Pareto-front subnets of {front_title(manifest)}", "",
             f"{len(manifest['subnets'])} non-dominated subnets (hypervolume {manifest['hypervolume']}), "
             "smallest first. Each folder is a stock PEFT LoRA adapter with per-module ranks:", "",
             "| folder | adapter params | " + " | ".join(names) + " | ranks (rank x modules) |",
             "|---|---:|" + "---:|" * len(names) + "---|"]
    for s in manifest["subnets"]:
        values = " | ".join(f"{s['objectives'].get(n, float('nan')):.6g}" for n in names)
        lines.append(f"| {s['folder']} | {s['exported_adapter_params']:,} | {values} | {s['ranks']} |")
    lines += ["", "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM", "",
              f"base = AutoModelForCausalLM.from_pretrained({load_from!r})"
              + (f"  # the pruned base of {base['model_id']}: RUN/{SPARSE_BASE}" if base["pruned"] else ""),
              f"model = PeftModel.from_pretrained(base, \"{manifest['subnets'][0]['folder']}\")", "```", ""]
    if manifest["sparse_adapter"]:
        lines += ["**This run trained a sparse (SparsePEFT) adapter.** Its update is masked by the base's zeros, "
                  "(B·A) ⊙ mask, and a stock PEFT adapter cannot apply a mask: `PeftModel.from_pretrained` on "
                  "these folders applies the unmasked factors B·A, a dense-where-pruned model that differs from "
                  "the subnet the search scored. To get the searched model, use the merged export: "
                  "`python -m shears.export --run RUN --front --merge` writes each folder's merged/, an ordinary "
                  "HF model folder of base + masked update that keeps the base's zeros.", ""]
    lines += engine_notes(manifest, load_from)
    return "\n".join(lines)


# How a width export's merged/ loads: a stock config needs transformers only; per-block widths need shears
STOCK_LOADER = "transformers.AutoModelForCausalLM.from_pretrained"
SHEARS_LOADER = "shears.models.load_model"
LOAD_SNIPPETS = {
    STOCK_LOADER: ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                   'model = AutoModelForCausalLM.from_pretrained("{folder}")',
                   'tokenizer = AutoTokenizer.from_pretrained("{folder}")'],
    SHEARS_LOADER: ["from shears.models import load_model, load_tokenizer", "",
                    'model = load_model("{folder}")  # reads {widths_file}: each block\'s widths',
                    'tokenizer = load_tokenizer("{folder}")'],
}


def smaller_model_record(exported: Exported) -> dict:
    """A width export's manifest entry for its merged/ model: where, how big, and what loads it."""
    width = exported.record["merged"]["width"]
    return {"folder": f"{exported.folder.name}/{MERGED}", "params": width["params"],
            "widths": width_summary(width["widths"]),
            "loader": STOCK_LOADER if width["stock_config"] else SHEARS_LOADER}


def width_summary(widths: dict[str, int]) -> str:
    """"mlp 1152x20 768x10, attn 3x30": per width group, how many blocks keep each width, widest first
    (`widths`: site name "group.layer" -> channels, or key/value heads for a heads group)."""
    by_group: dict[str, Counter] = {}
    for site, width in widths.items():
        by_group.setdefault(site.rpartition(".")[0], Counter())[width] += 1
    return ", ".join(f"{group} " + " ".join(f"{w}x{counts[w]}" for w in sorted(counts, reverse=True))
                     for group, counts in by_group.items())


def width_front_readme(manifest: dict) -> str:
    """The README of an elastic-width front: every folder's merged/ is a smaller model, loaded without PEFT."""
    names = manifest["objectives"] or sorted({k for s in manifest["subnets"] for k in s["objectives"]})
    names = [n for n in names if n != "params"]  # already its own column, measured on the written model
    lines = [f"# Pareto-front subnets of {front_title(manifest)}", "",
             f"{len(manifest['subnets'])} non-dominated subnets (hypervolume {manifest['hypervolume']}), "
             f"smallest first. The base ({manifest['base_model']['model_id']}) has an elastic width: each folder's "
             f"`{MERGED}/` is a physically smaller model, the subnet's LoRA merged into the base and every MLP cut "
             "to the subnet's width. There is no adapter to put on a base (`PeftModel` does not apply); load "
             f"`{MERGED}/` as a model, from this folder:", "",
             "| model folder | params | " + " | ".join(names) + " | widths (width x blocks) | loads with |",
             "|---|---:|" + "---:|" * len(names) + "---|---|"]
    for s in manifest["subnets"]:
        values = " | ".join(f"{s['objectives'].get(n, float('nan')):.6g}" for n in names)
        lines.append(f"| {s['model']['folder']} | {s['model']['params']:,} | {values} | {s['model']['widths']} | "
                     f"`{s['model']['loader']}` |")
    for loader, explanation in ((STOCK_LOADER, "One width in every block: a stock config (`intermediate_size` "
                                 "reduced), so transformers alone loads it, and so does anything that loads the "
                                 "base's architecture:"),
                                (SHEARS_LOADER, f"Per-block widths: the folder's `{WIDTH_FILE}` names each block's "
                                 "width, which a stock config cannot say, so shears loads it (shapes that disagree "
                                 "with the file are refused):")):
        first = next((s for s in manifest["subnets"] if s["model"]["loader"] == loader), None)
        if first is not None:
            snippet = [line.format(folder=first["model"]["folder"], widths_file=WIDTH_FILE)
                       for line in LOAD_SNIPPETS[loader]]
            lines += ["", explanation, "", "```python", *snippet, "```"]
    return "\n".join(lines) + "\n"


VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that holds `rank` (None: larger than vLLM allows)."""
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)


def engine_notes(manifest: dict, load_from: str) -> list[str]:
    """Which folders suit which serving engine, and the vLLM flag that serves all of them."""
    largest = max(s["max_rank"] for s in manifest["subnets"])
    flag = vllm_max_lora_rank(largest)
    vllm = (f"`--enable-lora --max-lora-rank {flag}` (every folder here has rank <= {largest})" if flag else
            f"no --max-lora-rank holds rank {largest} (vLLM allows up to {VLLM_MAX_LORA_RANKS[-1]}): "
            "export with --squeeze --energy E")
    folders = ("every module zero-padded to its subnet's largest rank, no rank_pattern" if manifest["uniform_rank"]
               else "per-module ranks in rank_pattern/alpha_pattern")
    lines = ["## Serving engines", "",
             f"These folders hold {folders}. Every module has the same `lora_alpha / r`, so an engine that applies "
             "one global scale still scales each module correctly.", "",
             "| engine | these folders | how |", "|---|---|---|",
             "| PEFT / transformers | yes | `PeftModel.from_pretrained` (above) |",
             f"| vLLM | yes | {vllm} |"]
    if manifest["uniform_rank"]:
        lines += ["| SGLang, LoRAX, TGI | yes | one rank per adapter, as these engines require |"]
    else:
        lines += ["| SGLang, LoRAX, TGI | no: they need one rank per adapter | re-export with "
                  "`python -m shears.export --run RUN --front --uniform-rank --output DIR` |"]
    lines += ["", f"vLLM example: `vllm serve {load_from} --enable-lora --max-lora-rank {flag or largest} "
              f"--lora-modules {manifest['subnets'][0]['folder']}=PATH/{manifest['subnets'][0]['folder']}`", ""]
    return lines


# --------------------------------------------------------------------------- CLI

def format_table(exported: list[Exported]) -> str:
    header = ["subnet", "ranks", "adapter params", "squeezed rank", "merged sparsity", "folder"]
    rows = []
    for e in exported:
        folder, r = e.folder, e.record
        squeezed = f"{r['squeeze']['rank_before']} -> {r['squeeze']['rank_after']}" if r["squeeze"] else "-"
        merged = r["merged"]
        sparsity = (f"{merged['sparsity_before']['total']:.2%} -> {merged['sparsity_after']['total']:.2%}"
                    if merged else "-")
        ranks = rank_summary(r["module_ranks"]) + (f" (padded to {r['uniform_rank']})" if r.get("uniform_rank") else "")
        rows.append([r["name"], ranks, f"{r['exported_adapter_params']:,}", squeezed,
                     sparsity, str(folder)])
    widths = [max(len(row[j]) for row in [header, *rows]) for j in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shears.export", description=__doc__.split("\n\n")[0],
                                epilog="key=value arguments override the run's recipe's export: section, e.g. "
                                       "export.squeeze=true.")
    flags.add_run(p, required=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--front", action="store_true", help="every point of RUN/search/front.json")
    which.add_argument("--subnet", action="append",
                       help="maximal | heuristic | minimal | a JSON config or .json file (repeatable)")
    # --squeeze/--energy/--uniform-rank/--merge default to the run's recipe (its export: section)
    p.add_argument("--squeeze", action=argparse.BooleanOptionalAction,
                   help="re-factorise each module to its smallest exact rank")
    p.add_argument("--energy", type=float, help="with --squeeze: keep this share of each module's sum(σ²) instead")
    p.add_argument("--uniform-rank", action=argparse.BooleanOptionalAction,
                   help="zero-pad every module to the subnet's largest rank, no rank_pattern (SGLang, LoRAX, TGI)")
    p.add_argument("--merge", action=argparse.BooleanOptionalAction,
                   help="also write merged/: base + subnet as an HF model folder")
    p.add_argument("--format", choices=("peft", "gguf"), default="peft",
                   help="peft: stock PEFT folders; gguf: base + LoRA GGUF files for llama.cpp (shears.gguf_export)")
    flags.add_dtype(p, "--format gguf: the base's GGUF weights, default float16; a quantized base keeps its blocks")
    flags.add_output(p, "output folder (default RUN/export, --format gguf: RUN/gguf)")
    flags.add_force(p, "overwrite existing subnet folders")
    return p


def export_settings(recipe_section: ExportConfig, args: argparse.Namespace) -> ExportConfig:
    """The recipe's export: section with every flag that was given laid over it."""
    given = {key: getattr(args, key) for key in ("squeeze", "energy", "merge", "uniform_rank")
             if getattr(args, key) is not None}
    return dataclasses.replace(recipe_section, **given)


@cli_errors
def main(argv=None) -> None:
    args, overrides = build_parser().parse_known_args(argv)
    run_dir = RunDir(args.run)
    files = ExportFiles(Path(args.output)) if args.output else run_dir.export
    settings = export_settings(load_run_recipe(run_dir, overrides, ("export",)).export, args)
    if settings.energy is not None and not settings.squeeze:
        raise ShearsError("--energy sets the squeezed rank: add --squeeze (or export.squeeze: true in the recipe)")
    if args.format == "gguf":
        from . import gguf_export  # same floor; needs the [gguf] extra, so only imported here

        gguf_export.run_cli(run_dir, args, settings, args.front, args.subnet)
        return
    options = dict(squeeze=settings.squeeze, energy=settings.energy, merge=settings.merge, force=args.force,
                   uniform_rank=settings.uniform_rank)
    if args.front:
        exported = export_front(run_dir, files.folder, **options)
    else:
        run = load_run(run_dir)
        exported = export_subnets(run, named_subnets(run.supernet, args.subnet), files.folder, **options)
    print(format_table(exported))
    if exported[0].record["sparse_adapter"]:
        print("note: this run trained a SparsePEFT (masked) adapter; the adapter folders hold its unmasked "
              "factors, and only merged/ (--merge) reproduces the super-network exactly")
    for e in exported:
        merged = e.record["merged"]
        if merged:
            print(f"{e.folder.name}: merged sparsity {merged['sparsity_before']['total']:.4%} -> "
                  f"{merged['sparsity_after']['total']:.4%} (base zeros kept: {merged['base_zeros_kept']})")
            width = merged.get("width")
            if width:
                how = ("stock config, AutoModelForCausalLM.from_pretrained loads it" if width["stock_config"]
                       else "per-block widths, load it with shears.models.load_model")
                print(f"{e.folder.name}: {MERGED}/ is a smaller model of {width['params']:,} parameters ({how})")
    extras = f" + {files.manifest.name}, {files.readme.name}" if args.front else ""
    print(f"wrote {len(exported)} subnet folder(s){extras} to {files.folder}")
    if args.front:
        from .gguf_export import best_subnet, serving_hint  # same floor; imports no llama.cpp

        best = exported[best_subnet(read_front(run_dir))]
        print(f"best subnet: {best.folder.name}; " + serving_hint(run_dir, best.folder.name, not best.record["adapter"]))


if __name__ == "__main__":
    main()
