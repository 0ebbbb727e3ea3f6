"""Export against independent references: factors sliced by hand from RUN/supernet, a base merged by
hand, the SVD of the dense update, and stock PEFT loading the exported folders."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from peft.tuners.lora.layer import LoraLayer
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model, make_tiny_tokenizer
from shears.errors import ShearsError
from shears.export import export_subnets, main
from shears.recipe import load_recipe
from shears.run import load_run
from shears.search.history import History, write_front
from shears.search.objectives import Objective
from shears.train_supernet import train_supernet
from test_train_supernet import tiny_recipe

REPO = Path(__file__).resolve().parents[1]
SCALE = 16 / 8  # TINY_SPACE: lora_alpha 16, r_max 8
# TINY_SPACE configs: qv.<layer> sets q_proj and v_proj of that layer, up sets every up_proj
MAXIMAL = {"qv.0": 8, "qv.1": 8, "up": 8}
MINIMAL = {"qv.0": 2, "qv.1": 2, "up": 2}
MIXED = {"qv.0": 8, "qv.1": 4, "up": 2}  # q/v of layer 0 differ from layer 1's: keys must say which layer


def rank_of(module: str, config: dict) -> int:
    return config["up"] if module.endswith("up_proj") else config[f"qv.{module.split('.')[2]}"]


def module_of(key: str) -> str:
    return key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]


# --------------------------------------------------------------------------- tiny runs (trained once per module)

@dataclass
class TinyRun:
    path: Path
    base: Path  # the folder of the model the super-network sits on


def train_tiny_run(root: Path, arch: str, sparse: bool = False) -> TinyRun:
    model_dir = root / f"tiny-{arch}"
    make_tiny_model(arch, max_position_embeddings=512).save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    overrides = {"training.max_steps": 2, "training.save_steps": 100}
    if sparse:
        overrides |= {"sparsity.sparsity": 0.5, "sparsity.nsamples": 2, "sparsity.seqlen": 64,
                      "training.sparse_adapter": True}
    run = root / "run"
    train_supernet(load_recipe(tiny_recipe(model_dir, root), overrides), run)
    randomise_adapter(run, seed=len(arch))
    return TinyRun(run, run / "sparse_base" if sparse else model_dir)


def randomise_adapter(run: Path, seed: int, deficient: bool = False) -> None:
    """Two training steps move B barely off zero, too little for a wrong rank or alpha to show in the
    logits: give every factor O(0.1) entries. `deficient`: module i's A has rank 1 + i % 3 (its later
    rows mix its first ones), so a lossless squeeze must find that rank."""
    path = run / "supernet" / "adapter_model.safetensors"
    tensors = load_file(path)
    g = torch.Generator().manual_seed(seed)
    for i, key in enumerate(sorted(tensors)):
        t = 0.1 * torch.randn(tensors[key].shape, generator=g)
        if deficient and "lora_A" in key:
            k = 1 + i % 3
            t[k:] = torch.randn(t.shape[0] - k, k, generator=g) @ t[:k]
        tensors[key] = t.contiguous()
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory) -> TinyRun:
    return train_tiny_run(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def qwen2_run(tmp_path_factory) -> TinyRun:
    return train_tiny_run(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory) -> TinyRun:
    return train_tiny_run(tmp_path_factory.mktemp("sparse"), "llama", sparse=True)


def copy_run(run: TinyRun, tmp_path: Path) -> TinyRun:
    path = tmp_path / "run-copy"
    shutil.copytree(run.path, path, ignore=shutil.ignore_patterns("checkpoints"))
    base = path / "sparse_base" if run.base.name == "sparse_base" else run.base
    return TinyRun(path, base)


# --------------------------------------------------------------------------- references

INPUT_IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=INPUT_IDS).logits


def supernet_logits(run: TinyRun, configs: dict) -> dict[str, torch.Tensor]:
    loaded = load_run(run.path)
    out = {}
    for name, config in configs.items():
        loaded.supernet.activate(config)
        out[name] = logits(loaded.supernet.model)
    return out


def peft_logits(run: TinyRun, folder: Path) -> tuple[torch.Tensor, PeftModel]:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run.base), str(folder)).eval()
    return logits(model), model


def hand_merged_weights(run: TinyRun, config: dict, sparse: bool = False) -> dict[str, torch.Tensor]:
    """base weight + SCALE * B[:, :r] @ A[:r] (masked by the base's non-zeros under SparsePEFT)."""
    base = load_file(run.base / "model.safetensors")
    factors = load_file(run.path / "supernet" / "adapter_model.safetensors")
    merged = {}
    for key in factors:
        if "lora_A" in key:
            module = module_of(key)
            r = rank_of(module, config)
            W = base[f"{module}.weight"]
            delta = SCALE * factors[key.replace("lora_A", "lora_B")][:, :r] @ factors[key][:r]
            merged[f"{module}.weight"] = W + (delta * (W != 0) if sparse else delta)
    return merged


def hand_merged_logits(run: TinyRun, config: dict) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(run.base).eval()
    model.load_state_dict(hand_merged_weights(run, config), strict=False)
    return logits(model)


def error_lines(capsys) -> list[str]:
    """The CLI's error lines on stderr (progress bars of earlier calls share the stream)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# --------------------------------------------------------------------------- plain export

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_stock_peft_reproduces_every_subnet(arch, request, tmp_path):
    run = request.getfixturevalue(f"{arch}_run")
    configs = {"maximal": MAXIMAL, "minimal": MINIMAL, "mixed": MIXED}
    exported = export_subnets(run.path, configs, tmp_path / "export")
    assert [e.folder for e in exported] == [tmp_path / "export" / name for name in configs]
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == sorted(configs)  # no temp folders left
    full = load_file(run.path / "supernet" / "adapter_model.safetensors")
    reference = supernet_logits(run, configs)
    for name, config in configs.items():
        folder = tmp_path / "export" / name
        exported = load_file(folder / "adapter_model.safetensors")
        assert exported.keys() == full.keys()
        for key, tensor in full.items():
            r = rank_of(module_of(key), config)
            assert torch.equal(exported[key], tensor[:r] if "lora_A" in key else tensor[:, :r]), key

        adapter_config = json.loads((folder / "adapter_config.json").read_text())
        ranks = [rank_of(module_of(k), config) for k in full if "lora_A" in k]
        common = max(set(ranks), key=lambda r: (ranks.count(r), r))
        assert adapter_config["peft_type"] == "LORA"
        assert adapter_config["r"] == common and adapter_config["lora_alpha"] == pytest.approx(SCALE * common)

        ours, model = peft_logits(run, folder)
        for module_name, layer in model.get_base_model().named_modules():
            if isinstance(layer, LoraLayer):  # PEFT built each module at the subnet's rank and scale
                assert type(layer).__name__ == "Linear"  # the stock layer, not ours
                assert layer.r["default"] == rank_of(module_name, config), module_name
                assert layer.scaling["default"] == pytest.approx(SCALE)
        assert max_diff(ours, reference[name]) <= 1e-5, name
        assert max_diff(ours, hand_merged_logits(run, config)) <= 1e-5, name

        record = json.loads((folder / "shears.json").read_text())
        assert record["config"] == config and record["name"] == name
        assert record["adapter_params"] == record["exported_adapter_params"] == \
               sum(t.numel() for t in exported.values())
        assert record["objectives"] is None and record["squeeze"] is None and record["merged"] is None
        supernet_meta = json.loads((run.path / "supernet" / "shears.json").read_text())
        assert record["base_model"]["fingerprint"] == supernet_meta["fingerprint"]
        assert record["base_model"]["source"] == str(run.base) and record["base_model"]["sparsity"] is None
        assert record["run"] == str(run.path.resolve())
    # the subnets really differ, so a wrong rank or alpha would have shown above
    assert max_diff(reference["maximal"], reference["minimal"]) > 1e-2
    assert max_diff(reference["mixed"], reference["minimal"]) > 1e-2


def test_pattern_keys_each_match_exactly_one_module(llama_run, tmp_path):
    export_subnets(llama_run.path, {"mixed": MIXED}, tmp_path)
    adapter_config = json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())
    modules = [name for name, _ in make_tiny_model("llama").named_modules() if name]
    # MIXED: two modules each at 8 (layer 0's q/v), 4 (layer 1's q/v) and 2 (the up_projs); the tie goes
    # to the largest rank, so r = 8 and the other four modules are pinned by the patterns
    assert adapter_config["r"] == 8 and len(adapter_config["rank_pattern"]) == 4
    assert adapter_config["rank_pattern"].keys() == adapter_config["alpha_pattern"].keys()
    for key, rank in adapter_config["rank_pattern"].items():
        matched = [m for m in modules if get_pattern_key(adapter_config["rank_pattern"].keys(), m) == key]
        assert len(matched) == 1, (key, matched)
        assert rank == rank_of(matched[0], MIXED)
        assert adapter_config["alpha_pattern"][key] == pytest.approx(SCALE * rank)
    # why full keys: a short one would pin q_proj of both layers to one rank
    assert len([m for m in modules if re.match(r"(.*\.)?(q_proj)$", m)]) == 2


# --------------------------------------------------------------------------- squeeze

def test_squeeze_finds_each_modules_exact_rank_and_keeps_the_logits(llama_run, tmp_path):
    run = copy_run(llama_run, tmp_path)
    randomise_adapter(run.path, seed=7, deficient=True)
    configs = {"maximal": MAXIMAL, "mixed": MIXED}
    export_subnets(run.path, configs, tmp_path / "export", squeeze=True)
    full = load_file(run.path / "supernet" / "adapter_model.safetensors")
    reference = supernet_logits(run, configs)
    for name, config in configs.items():
        folder = tmp_path / "export" / name
        record = json.loads((folder / "shears.json").read_text())
        assert record["squeeze"]["rule"] == {"tol": pytest.approx(1e-5)}
        exported = load_file(folder / "adapter_model.safetensors")
        after = {}
        for m in record["squeeze"]["modules"]:
            a_key = f"base_model.model.{m['module']}.lora_A.weight"
            r = rank_of(m["module"], config)
            dense = SCALE * full[a_key.replace("lora_A", "lora_B")][:, :r].double() @ full[a_key][:r].double()
            assert m["rank_before"] == r
            # the factors are stored in fp32, so their mixed rows are dependent to fp32 precision only
            assert m["rank_after"] == int(torch.linalg.matrix_rank(dense, rtol=1e-6)) < r
            ours = SCALE * exported[a_key.replace("lora_A", "lora_B")].double() @ exported[a_key].double()
            assert exported[a_key].shape[0] == m["rank_after"]
            assert float((ours - dense).norm() / dense.norm()) <= 1e-5
            after[m["module"]] = m["rank_after"]
        assert record["module_ranks"] == after
        assert record["exported_adapter_params"] == sum(t.numel() for t in exported.values()) \
               < record["adapter_params"]
        ours, model = peft_logits(run, folder)
        for module_name, layer in model.get_base_model().named_modules():
            if isinstance(layer, LoraLayer):
                assert layer.r["default"] == after[module_name]
                assert layer.scaling["default"] == pytest.approx(SCALE)  # the scale is kept
        assert max_diff(ours, reference[name]) <= 1e-4, name


def test_squeeze_by_energy_keeps_the_top_of_each_spectrum(llama_run, tmp_path):
    energy = 0.8
    export_subnets(llama_run.path, {"maximal": MAXIMAL}, tmp_path, squeeze=True, energy=energy)
    record = json.loads((tmp_path / "maximal" / "shears.json").read_text())
    assert record["squeeze"]["rule"] == {"energy": energy}
    full = load_file(llama_run.path / "supernet" / "adapter_model.safetensors")
    exported = load_file(tmp_path / "maximal" / "adapter_model.safetensors")
    for m in record["squeeze"]["modules"]:
        a_key = f"base_model.model.{m['module']}.lora_A.weight"
        b_key = a_key.replace("lora_A", "lora_B")
        dense = SCALE * full[b_key].double() @ full[a_key].double()
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        power = (s ** 2).tolist()
        k = next(k for k in range(1, len(s) + 1) if sum(power[:k]) >= energy * sum(power))
        assert m["rank_after"] == k < 8
        best = (u[:, :k] * s[:k]) @ vh[:k]  # Eckart-Young
        ours = SCALE * exported[b_key].double() @ exported[a_key].double()
        assert float((ours - best).norm() / best.norm()) <= 1e-5


# --------------------------------------------------------------------------- merge

def test_merge_keeps_the_sparse_bases_zeros_and_the_supernets_logits(sparse_run, tmp_path, capsys):
    out = tmp_path / "export"
    main(["--run", str(sparse_run.path), "--subnet", "minimal", "--subnet", json.dumps(MIXED), "--merge",
          "--output", str(out)])
    printed = capsys.readouterr().out
    mixed_name = next(p.name for p in out.iterdir() if p.name.startswith("subnet-"))
    assert sorted(p.name for p in out.iterdir()) == sorted(["minimal", mixed_name])
    base = load_file(sparse_run.base / "model.safetensors")
    reference = supernet_logits(sparse_run, {"minimal": MINIMAL, "mixed": MIXED})
    for name, config in (("minimal", MINIMAL), ("mixed", MIXED)):
        folder = out / (name if name == "minimal" else mixed_name)
        assert str(folder) in printed
        merged_dir = folder / "merged"
        assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
        merged = load_file(merged_dir / "model.safetensors")
        expected = hand_merged_weights(sparse_run, config, sparse=True)
        for key, W in base.items():
            if key in expected:
                assert torch.equal(merged[key][W == 0], W[W == 0])  # every zero of the base stays exactly zero
                assert max_diff(merged[key], expected[key]) <= 1e-6
                assert max_diff(merged[key], W) > 1e-3  # the update did land
            else:
                assert torch.equal(merged[key], W), key
        model = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
        assert max_diff(logits(model), reference[name]) <= 1e-5

        record = json.loads((folder / "shears.json").read_text())
        zeros = sum(int((W == 0).sum()) for k, W in base.items() if k.startswith("model.layers.") and W.ndim == 2)
        assert record["merged"]["sparsity_before"]["zeros"] == record["merged"]["sparsity_after"]["zeros"] == zeros
        assert record["merged"]["base_zeros_kept"] is True
        assert record["sparse_adapter"] is True and record["adapter_reproduces_supernet"] is False
        assert record["base_model"]["sparsity"]["sparsity"] == 0.5
        assert record["base_model"]["source"] == str(sparse_run.base)
    assert "merged sparsity 50.0000% -> 50.0000%" in printed and "SparsePEFT" in printed


def test_merge_of_a_dense_adapter_gives_the_subnets_logits(llama_run, tmp_path):
    export_subnets(llama_run.path, {"mixed": MIXED}, tmp_path, merge=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "mixed" / "merged").eval()
    assert max_diff(logits(model), supernet_logits(llama_run, {"mixed": MIXED})["mixed"]) <= 1e-5
    assert max_diff(logits(model), hand_merged_logits(llama_run, MIXED)) <= 1e-5


# --------------------------------------------------------------------------- serving engines

EXPORT_MODES = {"plain": {}, "squeezed": {"squeeze": True}, "energy": {"squeeze": True, "energy": 0.9}}


def module_scales(adapter_config: dict, modules: list[str]) -> dict[str, float]:
    """alpha / r per module, resolved the way PEFT resolves its patterns."""
    out = {}
    for module in modules:
        rank_key = get_pattern_key(adapter_config["rank_pattern"].keys(), module)
        alpha_key = get_pattern_key(adapter_config["alpha_pattern"].keys(), module)
        out[module] = adapter_config["alpha_pattern"].get(alpha_key, adapter_config["lora_alpha"]) / \
                      adapter_config["rank_pattern"].get(rank_key, adapter_config["r"])
    return out


@pytest.mark.parametrize("mode", sorted(EXPORT_MODES))
def test_every_module_of_every_export_has_the_global_alpha_over_r(mode, llama_run, tmp_path):
    """Engines that ignore rank_pattern/alpha_pattern apply lora_alpha / r to every module: right only
    because each module's own alpha / r is that same number, in plain, squeezed and energy exports."""
    run = copy_run(llama_run, tmp_path)
    randomise_adapter(run.path, seed=11, deficient=True)  # squeezes give each module another rank
    export_subnets(run.path, {"mixed": MIXED}, tmp_path / "export", **EXPORT_MODES[mode])
    folder = tmp_path / "export" / "mixed"
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    record = json.loads((folder / "shears.json").read_text())
    modules = sorted(record["module_ranks"])
    if mode != "plain":  # the squeeze really made the ranks heterogeneous
        assert len(set(record["module_ranks"].values())) >= 2
    assert adapter_config["lora_alpha"] / adapter_config["r"] == pytest.approx(SCALE)
    assert module_scales(adapter_config, modules) == pytest.approx({m: SCALE for m in modules})
    _, model = peft_logits(run, folder)  # and PEFT itself built every layer at that scale
    scales = {name: layer.scaling["default"] for name, layer in model.get_base_model().named_modules()
              if isinstance(layer, LoraLayer)}
    assert sorted(scales) == modules and all(s == pytest.approx(SCALE) for s in scales.values())


def engine_view(folder: Path, out: Path, max_lora_rank: int) -> Path:
    """What an engine that knows one rank makes of an export: rank_pattern/alpha_pattern dropped, one
    global scale lora_alpha / r, every factor zero-padded to max_lora_rank (vLLM's --max-lora-rank).
    Written as a stock-PEFT folder at rank max_lora_rank with the same global scale."""
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    scale = adapter_config["lora_alpha"] / adapter_config["r"]
    padded = {}
    for key, t in load_file(folder / "adapter_model.safetensors").items():
        if "lora_A" in key:
            padded[key] = torch.zeros(max_lora_rank, t.shape[1]).index_copy_(0, torch.arange(t.shape[0]), t)
        else:
            padded[key] = torch.zeros(t.shape[0], max_lora_rank).index_copy_(1, torch.arange(t.shape[1]), t)
    out.mkdir()
    save_file(padded, out / "adapter_model.safetensors")
    adapter_config.update(r=max_lora_rank, lora_alpha=scale * max_lora_rank, rank_pattern={}, alpha_pattern={})
    (out / "adapter_config.json").write_text(json.dumps(adapter_config))
    return out


@pytest.mark.parametrize("mode", sorted(EXPORT_MODES))
def test_an_engine_that_ignores_patterns_and_pads_ranks_gets_identical_logits(mode, llama_run, tmp_path):
    run = copy_run(llama_run, tmp_path)
    randomise_adapter(run.path, seed=5, deficient=True)
    export_subnets(run.path, {"mixed": MIXED}, tmp_path / "export", **EXPORT_MODES[mode])
    folder = tmp_path / "export" / "mixed"
    reference, _ = peft_logits(run, folder)  # the export as stock PEFT reads it, patterns and all
    if mode != "energy":  # energy drops real directions, so only the lossless exports equal the super-network
        assert max_diff(reference, supernet_logits(run, {"mixed": MIXED})["mixed"]) <= 1e-5
    engine, model = peft_logits(run, engine_view(folder, tmp_path / "engine", max_lora_rank=16))
    assert {layer.r["default"] for layer in model.modules() if isinstance(layer, LoraLayer)} == {16}
    assert max_diff(engine, reference) <= 1e-5


@pytest.mark.parametrize("mode", sorted(EXPORT_MODES))
def test_uniform_rank_export_has_one_rank_no_patterns_and_the_same_logits(mode, llama_run, tmp_path):
    run = copy_run(llama_run, tmp_path)
    randomise_adapter(run.path, seed=3, deficient=True)
    export_subnets(run.path, {"mixed": MIXED}, tmp_path / "patterned", **EXPORT_MODES[mode])
    export_subnets(run.path, {"mixed": MIXED}, tmp_path / "uniform", uniform_rank=True, **EXPORT_MODES[mode])
    patterned, uniform = tmp_path / "patterned" / "mixed", tmp_path / "uniform" / "mixed"
    record = json.loads((uniform / "shears.json").read_text())
    largest = max(record["module_ranks"].values())
    assert record["uniform_rank"] == record["max_rank"] == largest
    assert record["module_ranks"] == json.loads((patterned / "shears.json").read_text())["module_ranks"]
    adapter_config = json.loads((uniform / "adapter_config.json").read_text())
    assert adapter_config["r"] == largest and adapter_config["lora_alpha"] == pytest.approx(SCALE * largest)
    assert not adapter_config["rank_pattern"] and not adapter_config["alpha_pattern"]
    tensors, original = load_file(uniform / "adapter_model.safetensors"), load_file(patterned / "adapter_model.safetensors")
    assert tensors.keys() == original.keys()
    for key, t in tensors.items():
        k = original[key].shape[0 if "lora_A" in key else 1]
        kept, pad = (t[:k], t[k:]) if "lora_A" in key else (t[:, :k], t[:, k:])
        assert t.shape[0 if "lora_A" in key else 1] == largest, key
        assert torch.equal(kept, original[key]) and not pad.any(), key
    assert record["exported_adapter_params"] == sum(t.numel() for t in tensors.values())
    ours, model = peft_logits(run, uniform)
    assert {layer.r["default"] for layer in model.modules() if isinstance(layer, LoraLayer)} == {largest}
    assert max_diff(ours, peft_logits(run, patterned)[0]) <= 1e-5
    if mode != "energy":
        assert max_diff(ours, supernet_logits(run, {"mixed": MIXED})["mixed"]) <= 1e-5


# --------------------------------------------------------------------------- the front

def write_search(run: TinyRun, points: list[tuple[dict, float]]) -> dict:
    """history.jsonl + front.json through the search's own writer; accuracy given, size = adapter params."""
    loaded = load_run(run.path)
    size = loaded.supernet.adapter_params
    objectives = (Objective("accuracy", True),
                  Objective("adapter_params", False, size(MINIMAL), size(MAXIMAL)))
    history = History(run.path / "search" / "history.jsonl", objectives)
    for config, accuracy in points:
        history.append(config, {"accuracy": accuracy, "adapter_params": size(config)}, 0.1, "test")
    write_front(history, run.path / "search")
    return json.loads((run.path / "search" / "front.json").read_text())


def test_front_exports_every_point_with_manifest_and_readme(llama_run, tmp_path, capsys):
    run = copy_run(llama_run, tmp_path)
    heuristic = {"qv.0": 4, "qv.1": 4, "up": 2}
    # MIXED is bigger than heuristic and less accurate: dominated, so not on the front
    front = write_search(run, [(MINIMAL, 0.2), (MIXED, 0.4), (heuristic, 0.5), (MAXIMAL, 0.7)])
    assert [row["config"] for row in front["front"]] == [MINIMAL, heuristic, MAXIMAL]
    main(["--run", str(run.path), "--front"])
    printed = capsys.readouterr().out
    out = run.path / "export"
    manifest = json.loads((out / "manifest.json").read_text())
    readme = (out / "README.md").read_text()
    folders = []
    for i, row in enumerate(front["front"]):
        matches = list(out.glob(f"front-{i}-*"))
        assert len(matches) == 1
        folder = matches[0]
        folders.append(folder.name)
        params = sum(t.numel() for t in load_file(folder / "adapter_model.safetensors").values())
        assert folder.name == f"front-{i}-{params}"
        record = json.loads((folder / "shears.json").read_text())
        assert record["config"] == row["config"] and record["objectives"] == row["objectives"]
        assert manifest["subnets"][i]["folder"] == folder.name
        assert manifest["subnets"][i]["objectives"] == row["objectives"]
        assert manifest["subnets"][i]["adapter_params"] == params
        assert folder.name in readme and str(folder) in printed
    assert len(manifest["subnets"]) == 3 and manifest["objectives"] == ["accuracy", "adapter_params"]
    # the largest rank on this front is 8: vLLM serves every folder with --max-lora-rank 8, SGLang & co need
    # the one-rank re-export
    assert "--max-lora-rank 8 " in readme and "--uniform-rank" in readme
    assert sorted(p.name for p in out.iterdir()) == sorted([*folders, "manifest.json", "README.md"])
    assert "manifest.json" in printed

    # a subnet off the front still gets its objectives from history.jsonl
    export_subnets(run.path, {"mixed": MIXED}, tmp_path / "other")
    assert json.loads((tmp_path / "other" / "mixed" / "shears.json").read_text())["objectives"] == \
           {"accuracy": 0.4, "adapter_params": front_size(run, MIXED)}

    # again: refused without --force, replaced with it
    with pytest.raises(SystemExit) as exit_info:
        main(["--run", str(run.path), "--front"])
    assert exit_info.value.code == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "--force" in lines[0]
    main(["--run", str(run.path), "--front", "--force"])
    assert sorted(p.name for p in out.iterdir()) == sorted([*folders, "manifest.json", "README.md"])


def front_size(run: TinyRun, config: dict) -> int:
    full = load_file(run.path / "supernet" / "adapter_model.safetensors")
    return sum(rank_of(module_of(k), config) * (t.shape[1] if "lora_A" in k else t.shape[0])
               for k, t in full.items())


def test_front_without_a_search_names_the_search_command(llama_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--run", str(llama_run.path), "--front"])
    assert exit_info.value.code == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "python -m shears.search --run" in lines[0]
    assert not (llama_run.path / "export").exists()


# --------------------------------------------------------------------------- refusals

def test_existing_folder_is_refused_without_force(llama_run, tmp_path):
    export_subnets(llama_run.path, {"minimal": MINIMAL}, tmp_path)
    marker = tmp_path / "minimal" / "marker"
    marker.write_text("an earlier export")
    with pytest.raises(ShearsError, match="--force") as err:
        export_subnets(llama_run.path, {"minimal": MAXIMAL}, tmp_path)
    assert "\n" not in str(err.value) and marker.exists()
    export_subnets(llama_run.path, {"minimal": MAXIMAL}, tmp_path, force=True)
    assert not marker.exists()
    assert json.loads((tmp_path / "minimal" / "shears.json").read_text())["config"] == MAXIMAL
    assert [p.name for p in tmp_path.iterdir()] == ["minimal"]


def test_a_base_with_another_fingerprint_is_refused(llama_run, tmp_path):
    run = copy_run(llama_run, tmp_path)
    meta_path = run.path / "supernet" / "shears.json"
    meta = json.loads(meta_path.read_text())
    meta["fingerprint"] = "0123456789abcdef"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ShearsError, match="fingerprint") as err:
        export_subnets(run.path, {"minimal": MINIMAL}, tmp_path / "export")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "export" / "minimal").exists()


def test_bad_arguments_are_one_line_errors(llama_run, tmp_path):
    with pytest.raises(ShearsError, match="squeeze"):
        export_subnets(llama_run.path, {"minimal": MINIMAL}, tmp_path, energy=0.9)
    with pytest.raises(ShearsError, match="energy"):
        export_subnets(llama_run.path, {"minimal": MINIMAL}, tmp_path, squeeze=True, energy=1.5)
    with pytest.raises(ShearsError, match="folder name"):
        export_subnets(llama_run.path, {"../up": MINIMAL}, tmp_path)
    with pytest.raises(ShearsError):
        export_subnets(llama_run.path, {"bad": {"qv.0": 3, "qv.1": 2, "up": 2}}, tmp_path)  # 3 is no choice
    assert not any(tmp_path.iterdir())


def test_module_help_runs():
    result = subprocess.run([sys.executable, "-m", "shears.export", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--front" in result.stdout and "--squeeze" in result.stdout and "--merge" in result.stdout


def test_an_export_names_the_original_model_not_this_machines_path(llama_run, sparse_run, tmp_path):
    from shears.models import model_id

    assert model_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model_id("org/name") == "org/name"
    for run in (llama_run, sparse_run):
        out = tmp_path / run.path.parent.name
        export_subnets(run.path, {"minimal": MINIMAL}, out)
        recipe = load_recipe(run.path / "recipe.yaml")
        adapter_config = json.loads((out / "minimal" / "adapter_config.json").read_text())
        assert adapter_config["base_model_name_or_path"] == model_id(recipe.model) == Path(recipe.model).name
        assert str(tmp_path.parent) not in (out / "minimal" / "adapter_config.json").read_text()
        record = json.loads((out / "minimal" / "shears.json").read_text())
        assert record["base_model"]["model_id"] == model_id(recipe.model)


def test_a_sparse_adapter_front_says_its_folders_are_unmasked_and_points_to_the_merged_export(
        sparse_run, llama_run, tmp_path):
    for run, sparse in ((copy_run(sparse_run, tmp_path / "sparse"), True), (copy_run(llama_run, tmp_path / "dense"), False)):
        write_search(run, [(MINIMAL, 0.2), (MAXIMAL, 0.7)])
        export_front_of(run.path)
        manifest = json.loads((run.path / "export" / "manifest.json").read_text())
        readme = (run.path / "export" / "README.md").read_text()
        assert manifest["sparse_adapter"] is sparse and manifest["adapter_reproduces_supernet"] is not sparse
        if sparse:
            assert "unmasked" in readme and "--merge" in readme and "merged/" in readme
        else:
            assert "unmasked" not in readme


def export_front_of(run_path: Path) -> None:
    from shears.export import export_front

    export_front(run_path)


def test_the_recipes_export_section_sets_the_clis_defaults_and_flags_override_it(llama_run, tmp_path):
    from shears.recipe import save_recipe

    run = copy_run(llama_run, tmp_path)
    recipe = load_recipe(run.path / "recipe.yaml")
    recipe.export.squeeze = True
    save_recipe(recipe, run.path / "recipe.yaml")
    main(["--run", str(run.path), "--subnet", "minimal", "--output", str(tmp_path / "by-recipe")])
    assert json.loads((tmp_path / "by-recipe" / "minimal" / "shears.json").read_text())["squeeze"] is not None
    main(["--run", str(run.path), "--subnet", "minimal", "--no-squeeze", "--output", str(tmp_path / "by-flag")])
    assert json.loads((tmp_path / "by-flag" / "minimal" / "shears.json").read_text())["squeeze"] is None


def test_each_subnet_folder_carries_a_model_card_the_hub_reads(llama_run, sparse_run, tmp_path):
    """The YAML header, read by huggingface_hub's own parser: base model id, library, tags, the ranks
    (counted here from the adapter's weights), the search's scores and how many records scored them."""
    from huggingface_hub import ModelCard

    from shears.models import model_id

    for source in (llama_run, sparse_run):
        run = copy_run(source, tmp_path / source.path.parent.name)
        size = load_run(run.path).supernet.adapter_params
        history = History(run.path / "search" / "history.jsonl",
                          (Objective("accuracy", True), Objective("adapter_params", False, size(MINIMAL), size(MAXIMAL))))
        history.append(MIXED, {"accuracy": 0.375, "adapter_params": size(MIXED)}, 0.1, "test", n_examples=32)
        write_front(history, run.path / "search")
        main(["--run", str(run.path), "--front"])
        export_subnets(run.path, {"unscored": MINIMAL}, run.path / "export")
        (folder,) = (run.path / "export").glob("front-0-*")
        text = (folder / "README.md").read_text()
        card = ModelCard.load(folder / "README.md")
        header = yaml.safe_load(text.split("---\n")[1])
        weights = load_file(folder / "adapter_model.safetensors")
        ranks = Counter(t.shape[0] for key, t in weights.items() if "lora_A" in key)

        assert card.data.base_model == model_id(load_recipe(run.path / "recipe.yaml").model)
        assert card.data.library_name == "peft" and "shears" in card.data.tags
        assert ("pruned" in card.data.tags) == (source is sparse_run)
        assert header["shears"]["ranks"] == dict(sorted(ranks.items(), reverse=True))
        assert header["shears"]["max_rank"] == max(ranks) == 8
        assert header["shears"]["scores"] == {"accuracy": 0.375, "adapter_params": size(MIXED)}
        assert header["shears"]["records"] == 32 and header["shears"]["run"] == run.path.name
        (result,) = card.data.eval_results
        assert (result.metric_type, result.metric_value) == ("accuracy", 0.375) and "32 records" in result.metric_name
        # nothing of this machine's paths, in the cards or the front's README
        for readme in (folder / "README.md", run.path / "export" / "unscored" / "README.md",
                       run.path / "export" / "README.md"):
            assert str(tmp_path) not in readme.read_text()
        unscored = yaml.safe_load((run.path / "export" / "unscored" / "README.md").read_text().split("---\n")[1])
        assert unscored["shears"]["scores"] == {} and unscored["shears"]["records"] is None
        assert "model-index" not in unscored
