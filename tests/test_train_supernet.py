"""NLS training: one subnet per optimizer step, frozen sparse base, resume, DDP, CLI run directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import train_two_processes
from shears.elastic import ElasticLoraLinear
from shears.errors import ShearsError
from shears.recipe import load_recipe
from shears.search_space import canonical
from shears.train_supernet import SubnetSampler, main, train_supernet

REPO = Path(__file__).resolve().parents[1]

TINY_SPACE = {
    "target_modules": ["q_proj", "v_proj", "up_proj"],
    "r_max": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "groups": [
        {"name": "qv", "modules": ["q_proj", "v_proj"], "choices": [8, 4, 2], "scope": "per_layer"},
        {"name": "up", "modules": ["up_proj"], "choices": [8, 2], "scope": "global"},
    ],
}


def tiny_recipe(model_dir: Path, tmp_path: Path, **training) -> Path:
    recipe = {
        "model": str(model_dir),
        "output_dir": str(tmp_path / "run"),
        "search_space": TINY_SPACE,
        "data": {"train": "builtin:arithmetic?n=48&seed=0", "val_size": 8, "cutoff_len": 320},
        "training": {"max_steps": 4, "per_device_train_batch_size": 2, "learning_rate": 1e-3,
                     "logging_steps": 1, "save_steps": 2, "val_limit": 4, "seed": 3, **training},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def record_active_ranks(model) -> list:
    """Forward hooks that log (module, active rank) on every call, recomputations included."""
    seen = []
    for name, module in model.named_modules():
        if isinstance(module, ElasticLoraLinear):
            module.register_forward_hook(lambda mod, args, out, name=name: seen.append((name, mod.active_rank)))
    return seen


def test_sampler_is_a_pure_function_of_seed_and_step(tiny_llama):
    from shears.search_space import SearchSpace

    space = SearchSpace.from_dict(TINY_SPACE).bind(tiny_llama)
    a, b = SubnetSampler(space, seed=1), SubnetSampler(space, seed=1)
    assert [canonical(a.configs_for_step(s)[0]) for s in range(20)] == \
           [canonical(b.configs_for_step(s)[0]) for s in range(20)]
    assert len({canonical(a.configs_for_step(s)[0]) for s in range(20)}) > 1
    maximal, minimal, random_one = SubnetSampler(space, "sandwich", seed=1).configs_for_step(5)
    assert maximal == space.maximal() and minimal == space.minimal()
    assert random_one == a.configs_for_step(5)[0]
    with pytest.raises(ShearsError, match="uniform"):
        SubnetSampler(space, "greedy")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_one_subnet_per_optimizer_step(tiny_model_dir, tmp_path, monkeypatch, checkpointing):
    """Under accumulation 4 (and gradient checkpointing, whose backward recomputes the forward),
    every forward of a step — recomputations included — runs the step's sampled subnet."""
    import shears.train_supernet as ts

    seen_by_step: dict[int, list] = {}
    original = ts.NLSTrainer.training_step

    def spy(self, model, inputs, num_items_in_batch=None):
        if not hasattr(self, "_hooked"):
            self._hooked = record_active_ranks(model)
        start = len(self._hooked)
        loss = original(self, model, inputs, num_items_in_batch)
        seen_by_step.setdefault(self.state.global_step, []).append(self._hooked[start:])
        return loss

    monkeypatch.setattr(ts.NLSTrainer, "training_step", spy)
    recipe = load_recipe(tiny_recipe(tiny_model_dir, tmp_path, max_steps=3, gradient_accumulation_steps=4,
                                     gradient_checkpointing=checkpointing))
    train_supernet(recipe, tmp_path / "run")
    run_space = json.loads((tmp_path / "run" / "supernet" / "search_space.json").read_text())
    from shears.search_space import BoundSpace

    sampler = SubnetSampler(BoundSpace.from_dict(run_space), seed=3)
    assert sorted(seen_by_step) == [0, 1, 2]
    for step, micro_batches in seen_by_step.items():
        assert len(micro_batches) == 4
        expected = sampler.space.module_ranks(sampler.configs_for_step(step)[0])
        for calls in micro_batches:
            n_modules = len(expected)
            # a checkpointed backward re-runs every layer's forward: twice the calls
            assert len(calls) == n_modules * (2 if checkpointing else 1)
            for name, rank in calls:
                key = name.removeprefix("base_model.model.")
                assert rank == expected[key], (step, name)


def test_base_is_frozen_and_keeps_its_zeros(tiny_model_dir, tmp_path):
    recipe = load_recipe(tiny_recipe(tiny_model_dir, tmp_path), {"sparsity.sparsity": 0.5, "sparsity.nsamples": 2,
                                                                 "sparsity.seqlen": 64})
    run = tmp_path / "run"
    train_supernet(recipe, run)
    sparse = load_file(run / "sparse_base" / "model.safetensors")
    from shears.run import load_run

    loaded = load_run(run)
    base = loaded.supernet.model.get_base_model()
    for name, weight in sparse.items():
        if "layers" in name and name.endswith("proj.weight"):
            module = base.get_submodule(name.removesuffix(".weight"))
            current = getattr(module, "base_layer", module).weight
            assert torch.equal(current, weight), name
            assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_sparse_adapter_merge_keeps_exact_sparsity(tiny_model_dir, tmp_path):
    recipe = load_recipe(tiny_recipe(tiny_model_dir, tmp_path, sparse_adapter=True),
                         {"sparsity.sparsity": 0.5, "sparsity.nsamples": 2, "sparsity.seqlen": 64})
    train_supernet(recipe, tmp_path / "run")
    from shears.run import load_run

    run = load_run(tmp_path / "run")
    zeros_before = {n: (p == 0) for n, p in run.supernet.model.get_base_model().named_parameters()
                    if "base_layer" in n}
    run.supernet.activate(run.supernet.heuristic())
    merged = run.supernet.model.merge_and_unload()
    for name, was_zero in zeros_before.items():
        weight = merged.get_parameter(name.replace(".base_layer", ""))
        assert torch.equal(weight == 0, was_zero), name


def test_resume_continues_the_same_sampling_order(tiny_model_dir, tmp_path, monkeypatch):
    import shears.train_supernet as ts

    overrides = {"training.max_steps": 6, "training.save_steps": 3}
    full = tmp_path / "full"
    train_supernet(load_recipe(tiny_recipe(tiny_model_dir, tmp_path), overrides), full)

    # The same run killed during step 4 (its last checkpoint is step 3), then resumed.
    cut = tmp_path / "cut"
    original = ts.NLSTrainer.training_step

    def killed_at_step_4(self, *args, **kwargs):
        if self.state.global_step == 4:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ts.NLSTrainer, "training_step", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_supernet(load_recipe(tiny_recipe(tiny_model_dir, tmp_path), overrides), cut)
    monkeypatch.setattr(ts.NLSTrainer, "training_step", original)
    train_supernet(load_recipe(tiny_recipe(tiny_model_dir, tmp_path), overrides), cut, resume=True)

    def steps(run):
        return json.loads((run / "train_summary.json").read_text())["trained_configs"]

    # the summary and the trace of the resumed run cover every step, as the uninterrupted run's do
    assert steps(cut) == steps(full) and [s["step"] for s in steps(cut)] == list(range(6))
    assert (cut / "trace" / "rank0.jsonl").read_text() == (full / "trace" / "rank0.jsonl").read_text()
    a = load_file(full / "supernet" / "adapter_model.safetensors")
    b = load_file(cut / "supernet" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_cli_writes_a_run_directory_stock_peft_loads(tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    main(["--recipe", str(tiny_recipe(tiny_model_dir, tmp_path)), "--output", str(run), "training.max_steps=2"])
    out = capsys.readouterr().out
    assert "maximal" in out and "heuristic" in out and "minimal" in out and str(run / "supernet") in out
    assert load_recipe(run / "recipe.yaml").training.max_steps == 2
    summary = json.loads((run / "train_summary.json").read_text())
    assert set(summary["validation"]) == {"maximal", "heuristic", "minimal"}
    assert all(np.isfinite(v["loss"]) for v in summary["validation"].values())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "supernet")
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear"  # stock PEFT layer
    # A finished run is not overwritten without --force.
    with pytest.raises(SystemExit):
        main(["--recipe", str(tiny_recipe(tiny_model_dir, tmp_path)), "--output", str(run)])
    assert "--resume" in capsys.readouterr().err


def test_nan_loss_stops_with_one_line(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    broken = tmp_path / "broken"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    (broken / "tokenizer.json").write_bytes((tiny_model_dir / "tokenizer.json").read_bytes())
    for extra in ("tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_dir / extra).exists():
            (broken / extra).write_bytes((tiny_model_dir / extra).read_bytes())
    with pytest.raises(ShearsError, match="NaN|nan"):
        train_supernet(load_recipe(tiny_recipe(broken, tmp_path)), tmp_path / "run")


WIDTH_HEADS_SPACE = {**TINY_SPACE, "groups": [*TINY_SPACE["groups"], {
    "name": "mlp", "kind": "width", "modules": ["gate_proj", "up_proj"], "consumers": ["down_proj"],
    "choices": [1.0, 0.5]}, {
    "name": "attn", "kind": "heads", "modules": ["q_proj", "k_proj", "v_proj"], "consumers": ["o_proj"],
    "choices": [1.0, 0.5]}]}


@pytest.mark.slow
def test_two_process_ddp_trains_the_same_configs(tiny_model_dir, tmp_path):
    """Ranks with elastic width and heads: both processes train the same subnet -- its rank, width and head
    keys -- at every step, and the run keeps its channel order."""
    recipe = tiny_recipe(tiny_model_dir, tmp_path)
    data = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**data, "search_space": WIDTH_HEADS_SPACE,
                                      "width": {"nsamples": 4, "seqlen": 32}}))
    run = tmp_path / "run"
    train_two_processes(recipe, run)
    rank0 = (run / "trace" / "rank0.jsonl").read_text().splitlines()
    rank1 = (run / "trace" / "rank1.jsonl").read_text().splitlines()
    assert len(rank0) == 4 and rank0 == rank1
    assert {"mlp.0", "attn.1", "qv.0", "up"} <= set(json.loads(json.loads(rank0[0])["config"]))  # canonical(config)
    assert (run / "supernet" / "channel_order.safetensors").is_file()


# ---- In-Squeeze: rank annealing over training stages

def test_stage_space_scales_choices_and_alpha_so_every_subnet_keeps_its_scaling():
    from shears.search_space import SearchSpace
    from shears.train_supernet import stage_space

    space = SearchSpace.from_dict(TINY_SPACE)
    wide = stage_space(space, 16)
    assert wide.r_max == 16 and [g.choices for g in wide.groups] == [(16, 8, 4), (16, 4)]
    assert wide.lora_alpha / wide.r_max == space.lora_alpha / space.r_max
    with pytest.raises(ShearsError, match="multiples"):
        stage_space(SearchSpace.from_dict({**TINY_SPACE, "groups": [
            {"name": "qv", "modules": ["q_proj", "v_proj"], "choices": [8, 7], "scope": "per_layer"},
            {"name": "up", "modules": ["up_proj"], "choices": [8], "scope": "global"}]}), 2)


def test_squeeze_supernet_is_the_svd_truncation_of_each_update(tiny_llama):
    from shears.elastic import SuperNet
    from shears.search_space import SearchSpace
    from shears.train_supernet import squeeze_supernet, stage_space

    space = SearchSpace.from_dict(TINY_SPACE)
    torch.manual_seed(0)
    net = SuperNet.from_base(tiny_llama, stage_space(space, 16))
    for layer in net.layers.values():
        torch.nn.init.normal_(layer.lora_B["default"].weight)
    expected = {}
    for name, layer in net.layers.items():  # reference: truncated SVD of the dense update
        dense = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        u, s, vh = torch.linalg.svd(dense.double())
        expected[name] = (u[:, :8] * s[:8]) @ vh[:8]
    squeezed = squeeze_supernet(net, space)
    assert squeezed.space.r_max == 8
    for name, layer in squeezed.layers.items():
        got = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(got.double(), expected[name], rtol=0, atol=1e-5)


def test_rank_schedule_trains_in_stages_and_ends_at_r_max(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    train_supernet(load_recipe(tiny_recipe(tiny_model_dir, tmp_path, rank_schedule=[16, 8])), run)
    summary = json.loads((run / "train_summary.json").read_text())
    assert [s["step"] for s in summary["trained_configs"]] == [0, 1, 2, 3]
    # steps 0-1 train the stage at r_max 16 (choices doubled), steps 2-3 the squeezed one at 8
    for entry, up_choices in zip(summary["trained_configs"], ({16, 4}, {16, 4}, {8, 2}, {8, 2})):
        assert entry["config"]["up"] in up_choices
    assert json.loads((run / "supernet" / "adapter_config.json").read_text())["r"] == 8
    assert (run / "checkpoints" / "stage-0" / "end" / "adapter_model.safetensors").is_file()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run / "supernet")
    with pytest.raises(ShearsError, match="rank_schedule"):
        train_supernet(load_recipe(tiny_recipe(tiny_model_dir, tmp_path, rank_schedule=[16, 4])), tmp_path / "r2")


def kill_at_step(monkeypatch, step: int):
    """Make NLSTrainer raise KeyboardInterrupt (a stand-in for kill -9) when it reaches its global `step`."""
    import shears.train_supernet as ts

    original = ts.NLSTrainer.training_step

    def killed(self, *args, **kwargs):
        if self.step_offset + self.state.global_step == step:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ts.NLSTrainer, "training_step", killed)
    return lambda: monkeypatch.setattr(ts.NLSTrainer, "training_step", original)


def test_resume_inside_an_early_rank_stage_gives_the_later_stages_their_true_step_offset(
        tiny_model_dir, tmp_path, monkeypatch):
    recipe = lambda: load_recipe(tiny_recipe(tiny_model_dir, tmp_path, rank_schedule=[16, 8], save_steps=1))
    full, cut = tmp_path / "full", tmp_path / "cut"
    train_supernet(recipe(), full)
    restore = kill_at_step(monkeypatch, 1)  # inside stage 0 (steps 0-1), after its checkpoint-1
    with pytest.raises(KeyboardInterrupt):
        train_supernet(recipe(), cut)
    restore()
    train_supernet(recipe(), cut, resume=True)

    def summary(run):
        return json.loads((run / "train_summary.json").read_text())

    assert summary(cut)["trained_configs"] == summary(full)["trained_configs"]
    assert [s["step"] for s in summary(cut)["trained_configs"]] == [0, 1, 2, 3]
    assert (cut / "trace" / "rank0.jsonl").read_text() == (full / "trace" / "rank0.jsonl").read_text()
    a = load_file(full / "supernet" / "adapter_model.safetensors")
    b = load_file(cut / "supernet" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def record_training_batches(monkeypatch) -> list:
    """(input_ids, learning rate) of every optimizer step's batch, in training order, across stages."""
    import shears.train_supernet as ts

    seen = []
    original = ts.NLSTrainer.training_step

    def recording(self, model, inputs, *args, **kwargs):
        seen.append((inputs["input_ids"].clone(), self.lr_scheduler.get_last_lr()[0]))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(ts.NLSTrainer, "training_step", recording)
    return seen


def test_rank_stages_continue_the_data_order_and_the_learning_rate_schedule(tiny_model_dir, tmp_path, monkeypatch):
    # 6 steps of 2 records over 40 training records: the whole run is shorter than an epoch, so a stage
    # that restarted the data order would replay the first stage's batches.
    training = {"max_steps": 6, "warmup_steps": 2, "save_steps": 100}
    seen = record_training_batches(monkeypatch)
    train_supernet(load_recipe(tiny_recipe(tiny_model_dir, tmp_path, **training)), tmp_path / "one")
    one_stage = list(seen)
    seen.clear()
    train_supernet(load_recipe(tiny_recipe(tiny_model_dir, tmp_path, rank_schedule=[32, 16, 8], **training)),
                   tmp_path / "three")
    assert len(seen) == len(one_stage) == 6
    for (ids, lr), (ids_one, lr_one) in zip(seen, one_stage):
        assert torch.equal(ids, ids_one)  # the same batches in the same order: no stage replays another's
        assert lr == pytest.approx(lr_one)  # one warm-up, one decay over the whole run
    assert len({tuple(ids.flatten().tolist()) for ids, _ in seen}) == 6


def test_an_epoch_based_run_sees_every_training_record_once_per_epoch(tiny_model_dir, tmp_path, monkeypatch):
    from shears.train_supernet import TrainingOrder

    order = TrainingOrder(size=10, seed=3, samples_per_step=4)
    stream = [i for epoch in range(3) for i in order.epoch_indices(epoch, start_step=0)]
    assert order.steps_per_epoch == 3 and len(stream) == 36
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    # a later stage starting at step 2 reads the same stream from sample 8 on
    assert order.epoch_indices(0, start_step=2) == stream[8:20]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU case: Trainer then needs use_cpu to accept bf16")
def test_bf16_training_arguments_are_accepted_on_a_cpu(tmp_path):
    """training.bf16=true on a machine without a GPU: HF Trainer autocasts on the CPU instead of refusing."""
    from shears.rundir import RunDir
    from shears.search_space import load_search_space
    from shears.train_supernet import plan_stages, training_arguments

    recipe = load_recipe(None, {"training.bf16": True, "training.max_steps": 1})
    (stage,) = plan_stages(recipe, load_search_space("llama"), RunDir(tmp_path), steps_per_epoch=1)
    args = training_arguments(recipe, stage, bf16=True)
    assert args.bf16 and args.use_cpu


def test_training_setup_raises_no_deprecation_warning_from_our_calls(tiny_model_dir, tmp_path):
    import warnings

    from shears.elastic import SuperNet
    from shears.rundir import RunDir
    from shears.search.optuna_backend import open_storage
    from shears.train_supernet import plan_stages, resolve_search_space, training_arguments

    recipe = load_recipe(tiny_recipe(tiny_model_dir, tmp_path, gradient_checkpointing=True))
    space = resolve_search_space(recipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        args = training_arguments(recipe, plan_stages(recipe, space, RunDir(tmp_path / "run"), 10)[0], bf16=False)
        SuperNet.from_base(make_tiny_model_for_warnings(), space)
        open_storage(f"sqlite:///{tmp_path}/study.db")
    assert args.activation_checkpointing


def make_tiny_model_for_warnings():
    from conftest import make_tiny_model

    return make_tiny_model("llama")


def test_pyproject_license_is_an_spdx_string():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert not any(c.startswith("License ::") for c in project.get("classifiers", []))


def test_a_sandwich_step_sums_the_gradients_of_its_three_subnets(tiny_model_dir, tmp_path):
    from transformers import TrainingArguments

    from shears.data import Collator, TokenizedDataset, load_records
    from shears.elastic import SuperNet
    from shears.models import load_model, load_tokenizer
    from shears.search_space import SearchSpace
    from shears.train_supernet import NLSTrainer, TrainingOrder

    tokenizer = load_tokenizer(tiny_model_dir)
    data = TokenizedDataset(tokenizer, load_records("builtin:arithmetic?n=4&seed=0"), 320)
    net = SuperNet.from_base(load_model(tiny_model_dir), SearchSpace.from_dict(TINY_SPACE))
    for layer in net.layers.values():  # B = 0 at init would give A no gradient at all
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    batch = Collator(tokenizer)([data[i] for i in range(2)])
    sampler = SubnetSampler(net.space, "sandwich", seed=0)
    trainer = NLSTrainer(model=net.model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
                         train_dataset=data, data_collator=Collator(tokenizer), supernet=net, sampler=sampler,
                         order=TrainingOrder(len(data), 0, 2))
    params = [p for p in net.model.parameters() if p.requires_grad]

    def gradients_of(config) -> list[torch.Tensor]:  # the reference: one subnet's loss, backward by hand
        net.model.zero_grad()
        net.activate(config)
        net.model(**batch).loss.backward()
        return [p.grad.clone() for p in params]

    expected = [sum(g) for g in zip(*(gradients_of(c) for c in sampler.configs_for_step(0)))]
    net.model.zero_grad()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before each step
    trainer.training_step(net.model, dict(batch))
    for got, want in zip((p.grad for p in params), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_the_training_loss_projects_only_labelled_positions_and_equals_transformers_loss(tiny_model_dir, tmp_path):
    """NLSTrainer gives the output layer only the positions whose next token is a label (no prompt, no
    padding); its loss and gradients equal transformers' own causal-LM loss on the full logits, both as a
    mean and as a sum over an accumulated batch's token count (num_items_in_batch)."""
    from transformers import TrainingArguments

    from shears.data import IGNORE_INDEX, Collator, TokenizedDataset, load_records
    from shears.elastic import SuperNet
    from shears.models import load_model, load_tokenizer
    from shears.search_space import SearchSpace
    from shears.train_supernet import NLSTrainer, TrainingOrder

    tokenizer = load_tokenizer(tiny_model_dir)
    data = TokenizedDataset(tokenizer, load_records("builtin:arithmetic?n=6&seed=1"), 320)
    net = SuperNet.from_base(load_model(tiny_model_dir), SearchSpace.from_dict(TINY_SPACE))
    for layer in net.layers.values():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    batch = Collator(tokenizer)([data[i] for i in range(3)])
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert labelled < batch["attention_mask"].sum() - 3  # prompts are masked: the check can fail
    trainer = NLSTrainer(model=net.model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
                         train_dataset=data, data_collator=Collator(tokenizer), supernet=net,
                         sampler=SubnetSampler(net.space, "uniform", seed=0), order=TrainingOrder(len(data), 0, 3))
    params = [p for p in net.model.parameters() if p.requires_grad]
    head = net.model.get_output_embeddings()
    for items in (None, 2 * labelled):  # a mean; a sum over a 2-micro-batch accumulated count
        extra = {} if items is None else {"num_items_in_batch": torch.tensor(items)}
        net.model.zero_grad()
        want = net.model(**batch, **extra).loss
        want.backward()
        expected = [p.grad.clone() for p in params]
        net.model.zero_grad()
        seen = []
        handle = head.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape[:2])))
        got = trainer.compute_loss(net.model, dict(batch), num_items_in_batch=extra.get("num_items_in_batch"))
        handle.remove()
        got.backward()
        assert seen == [(1, labelled)]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for g, e in zip((p.grad for p in params), expected):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


# ---- precision and padding

def test_bf16_true_without_native_bf16_is_one_line_error_naming_auto(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import shears.precision

    monkeypatch.setattr(shears.precision, "_cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["--recipe", str(tiny_recipe(tiny_model_dir, tmp_path)), "training.bf16=true"])
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "training.bf16=auto" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any work


@pytest.mark.parametrize("setting, expected", [("true", "bf16-autocast"), ("false", "fp32")])
def test_training_precision_is_autocast_over_fp32_adapters_and_recorded(tiny_model_dir, tmp_path, monkeypatch,
                                                                        setting, expected):
    from shears.precision import native_bf16

    if setting == "true" and not native_bf16("cpu"):
        pytest.skip("this CPU has no native bf16 (avx512_bf16 / amx_bf16)")
    import shears.train_supernet as ts

    seen = []
    original = ts.SuperNet.from_base

    def from_base(*args, **kwargs):  # observe the first q_proj's matmul output dtype during training steps
        net = original(*args, **kwargs)
        layer = next(iter(net.layers.values()))
        # the base layer's output: the elastic layer itself returns fp32 under autocast (its update is added
        # in fp32, see elastic._autocast_output)
        layer.base_layer.register_forward_hook(lambda mod, a, out: seen.append(
            (out.dtype, layer.lora_A["default"].weight.dtype) if torch.is_grad_enabled() else None))
        return net

    monkeypatch.setattr(ts.SuperNet, "from_base", from_base)
    train_supernet(load_recipe(tiny_recipe(tiny_model_dir, tmp_path, bf16=setting == "true", max_steps=2)),
                   tmp_path / "run")
    trained = [s for s in seen if s is not None]
    compute = torch.bfloat16 if setting == "true" else torch.float32
    assert trained and all(s == (compute, torch.float32) for s in trained)  # adapter weights stay fp32
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["precision"] == expected


def test_length_grouped_batches_pad_less_than_random_ones(tiny_model_dir, tmp_path):
    def padded_share(group_by_length: bool) -> float:
        from shears.train_supernet import NLSTrainer

        shares = []
        step = NLSTrainer.training_step

        def counting(self, model, inputs, num_items_in_batch=None):
            mask = inputs["attention_mask"]
            shares.append((int(mask.numel()), int(mask.sum())))
            return step(self, model, inputs, num_items_in_batch)

        NLSTrainer.training_step = counting
        try:
            out = tmp_path / f"run-{group_by_length}"
            train_supernet(load_recipe(tiny_recipe(tiny_model_dir, tmp_path, group_by_length=group_by_length,
                                                   max_steps=6, save_steps=100, per_device_train_batch_size=4),
                                       {"data.train": "builtin:arithmetic?n=400&seed=0"}), out)
        finally:
            NLSTrainer.training_step = step
        return 1 - sum(real for _, real in shares) / sum(total for total, _ in shares)

    assert padded_share(True) < padded_share(False)


def test_length_grouping_keeps_every_cycle_a_permutation_and_pads_less():
    from shears.train_supernet import TrainingOrder

    lengths = tuple(int(x) for x in np.random.default_rng(0).integers(10, 200, size=40))
    plain = TrainingOrder(size=40, seed=3, samples_per_step=4)
    grouped = TrainingOrder(size=40, seed=3, samples_per_step=4, lengths=lengths, group_steps=5)
    stream = grouped.epoch_indices(0, start_step=0) + grouped.epoch_indices(1, start_step=0)
    assert sorted(stream[:40]) == list(range(40)) and sorted(stream[40:80]) == list(range(40))
    assert grouped.epoch_indices(0, start_step=3) == stream[12:52]  # still a pure function of the step

    def padded(order):
        ids = order.epoch_indices(0, start_step=0)
        steps = [ids[i:i + 4] for i in range(0, len(ids), 4)]
        return sum(max(lengths[i] for i in s) * len(s) - sum(lengths[i] for i in s) for s in steps)

    assert padded(grouped) < 0.5 * padded(plain)


def test_records_without_a_response_token_are_left_out_not_a_nan_batch(tiny_model_dir, tmp_path, capsys):
    """A prompt that fills cutoff_len leaves no label token; length grouping batches the longest prompts
    together, and a batch of only those had no loss at all (NaN, seen on ARC-e at cutoff 128). Such
    records are left out of training, counted and recorded; if none is left, one line says what to raise."""
    from shears.data import split_validation

    long = [{"instruction": "Explain " + "why the sky is blue and the grass is green " * 8, "input": "",
             "output": "Because."} for _ in range(8)]
    short = [{"instruction": f"Add {i} and {i}.", "input": "", "output": str(2 * i)} for i in range(8)]
    records = [r for pair in zip(long, short) for r in pair]
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(records))
    overrides = {"data.train": str(data), "data.val_size": 2, "data.cutoff_len": 200, "training.group_by_length": True,
                 "training.per_device_train_batch_size": 2, "training.max_steps": 6, "training.save_steps": 100}
    recipe = load_recipe(tiny_recipe(tiny_model_dir, tmp_path), overrides)
    train_supernet(recipe, tmp_path / "run")
    expected = sum(r in long for r in split_validation(records, 2, recipe.data.val_seed)[0])
    assert expected > 0
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["train_records_without_response_token"] == expected
    assert summary["train_records"] == 14 - expected
    assert f"{expected} of 14 training records have no response token within data.cutoff_len=200" in capsys.readouterr().out
    with pytest.raises(ShearsError, match="raise data.cutoff_len"):
        data.write_text(json.dumps(long))
        train_supernet(load_recipe(tiny_recipe(tiny_model_dir, tmp_path), overrides), tmp_path / "run2")
