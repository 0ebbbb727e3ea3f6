"""Train an elastic-LoRA super-network once (Neural Low-rank adapter Search), on HF Trainer.

    python -m shears.train_supernet [--recipe recipes/X.yaml] [key=value ...] [--output RUN] [--resume]

The run: (1) prune the base when the recipe asks (cached in RUN/sparse_base), (2) wrap it in a
SuperNet, (3) train with HF Trainer, activating one sampled subnet per optimizer step, (4) save
RUN/supernet (a stock-PEFT adapter at r_max plus the search space) and report the validation loss of
the maximal, heuristic and minimal subnets.

Which subnet trains at step t is a pure function of (seed, t). It is drawn once per optimizer step,
so every gradient-accumulation micro-batch and every activation recomputation under gradient
checkpointing sees the same subnet; every DDP process draws the same one, so gradients average over
one architecture; and a resumed run continues the exact sampling order of an uninterrupted one.
Because this is ordinary Trainer, mixed precision, gradient checkpointing, `accelerate launch` /
torchrun DDP and FSDP work unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainingArguments, set_seed

from .atomic import write_json, write_text
from .data import Collator, TokenizedDataset
from .elastic import SuperNet
from .errors import ShearsError, cli_errors
from .models import load_model, load_tokenizer
from .recipe import Recipe, load_recipe, save_recipe
from .run import recipe_splits
from .rundir import RunDir
from .search_space import BoundSpace, SearchSpace, canonical, load_search_space
from .sparsity import prune_to_folder
from .squeeze import squeeze_lora

STRATEGIES = ("uniform", "sandwich")


class SubnetSampler:
    """The subnets trained at an optimizer step: a pure function of (seed, step)."""

    def __init__(self, space: BoundSpace, strategy: str = "uniform", seed: int = 0):
        if strategy not in STRATEGIES:
            raise ShearsError(f"unknown NLS strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
        self.space, self.strategy, self.seed = space, strategy, seed

    def configs_for_step(self, step: int) -> list[dict]:
        rng = np.random.default_rng([self.seed, step])
        if self.strategy == "sandwich":  # BigNAS/OFA: the largest, the smallest and one random subnet
            return [self.space.maximal(), self.space.minimal(), self.space.sample(rng)]
        return [self.space.sample(rng)]


class NLSTrainer(Trainer):
    """HF Trainer whose training step activates the step's sampled subnet(s) before forward/backward."""

    def __init__(self, *args, supernet: SuperNet, sampler: SubnetSampler, step_offset: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.supernet, self.sampler = supernet, sampler
        self.step_offset = step_offset  # steps of earlier In-Squeeze stages: sampling continues across stages
        self.trained_configs: list[tuple[int, str]] = []  # (step, canonical config), for provenance
        self._last_params = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.step_offset + self.state.global_step
        configs = self.sampler.configs_for_step(step)
        total = None
        for config in configs:
            self.supernet.activate(config)
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not torch.isfinite(loss).all():  # Trainer's log would silently filter it out
                raise ShearsError(f"the training loss became {loss.item()} at step {step}: lower "
                                  "training.learning_rate (or disable bf16); checkpoints so far are kept")
            total = loss if total is None else total + loss
            if not self.trained_configs or self.trained_configs[-1] != (step, canonical(config)):
                self.trained_configs.append((step, canonical(config)))
        self._last_params = self.supernet.adapter_params(configs[-1])
        return total / len(configs)

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            logs["subnet_params"] = self._last_params
        super().log(logs, *args, **kwargs)


# --------------------------------------------------------------------------- the run

def resolve_search_space(recipe: Recipe) -> SearchSpace:
    if isinstance(recipe.search_space, dict):
        return SearchSpace.from_dict(recipe.search_space, source="recipe.search_space")
    return load_search_space(recipe.search_space)


def prepare_base(recipe: Recipe, run_dir: RunDir, train_records: list[dict]):
    """The frozen base: the recipe's model, pruned into RUN/sparse_base first when sparsity > 0."""
    s = recipe.sparsity
    source = recipe.model
    if s.sparsity > 0:
        source = str(prune_to_folder(
            recipe.model, run_dir.sparse_base, sparsity=s.sparsity, pattern=s.pattern, method=s.method,
            calibration_records=train_records, nsamples=s.nsamples, seqlen=s.seqlen, seed=s.seed,
            exclude=s.exclude))
    return load_model(source, dtype=recipe.dtype), load_tokenizer(source), source


@dataclass
class Stage:
    """One stretch of training at a fixed r_max (a single stage unless the recipe anneals ranks)."""
    index: int
    space: SearchSpace
    max_steps: int
    num_train_epochs: float
    checkpoints: Path


def stage_space(space: SearchSpace, r_max: int) -> SearchSpace:
    """`space` at another r_max: choices scaled by r_max / space.r_max, and alpha too, so that the scaling
    alpha / r_max -- and so the function of every subnet -- is the same at every stage."""
    factor = r_max / space.r_max
    data = space.to_dict()
    data.update(r_max=r_max, lora_alpha=space.lora_alpha * factor)
    for group in data["groups"]:
        group["choices"] = [max(1, round(c * factor)) for c in group["choices"]]
        if len(set(group["choices"])) < len(group["choices"]):
            raise ShearsError(f"training.rank_schedule stage r={r_max} maps group {group['name']!r}'s choices to "
                              f"duplicates {group['choices']}: use stage ranks that are multiples of r_max")
    return SearchSpace.from_dict(data, source=f"{space.source} at r_max={r_max}")


def plan_stages(recipe: Recipe, space: SearchSpace, run_dir: RunDir) -> list[Stage]:
    t = recipe.training
    schedule = list(t.rank_schedule) or [space.r_max]
    if schedule != sorted(set(schedule), reverse=True) or schedule[-1] != space.r_max:
        raise ShearsError(f"training.rank_schedule {schedule} must strictly decrease and end at the search space's "
                          f"r_max ({space.r_max}), e.g. [{4 * space.r_max}, {2 * space.r_max}, {space.r_max}]")
    n = len(schedule)
    if n > 1 and 0 < t.max_steps < n:
        raise ShearsError(f"training.max_steps={t.max_steps} cannot be split over {n} rank stages: raise it")
    steps = [t.max_steps // n + (t.max_steps % n if i == n - 1 else 0) for i in range(n)] if t.max_steps > 0 \
        else [-1] * n
    return [Stage(i, stage_space(space, r), steps[i], t.num_train_epochs / n, run_dir.stage_checkpoints(i, n))
            for i, r in enumerate(schedule)]


def squeeze_supernet(supernet: SuperNet, space: SearchSpace) -> SuperNet:
    """In-Squeeze: the super-network re-factorised at the smaller r_max of `space`.

    Each module's update is truncated to its best rank-r_max approximation (shears.squeeze) at the same
    scaling, with directions in descending singular value -- so the elastic slices A[:r], B[:, :r] of
    the next stage start from the update's most important directions. The new adapters are new
    tensors: the next stage's optimiser starts fresh for them."""
    factors = {}
    for name, layer in supernet.layers.items():
        squeezed = squeeze_lora(layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                layer.scaling["default"], rank=space.r_max)
        factors[name] = squeezed
    net = SuperNet.from_base(supernet.model.unload(), space, sparse_adapter=supernet.sparse_adapter)
    with torch.no_grad():
        for name, squeezed in factors.items():
            rank = squeezed.rank  # < r_max only where the update itself had lower rank
            layer = net.layers[name]
            layer.lora_A["default"].weight.zero_()[:rank].copy_(squeezed.A)
            layer.lora_B["default"].weight.zero_()[:, :rank].copy_(squeezed.B)
    return net


def training_arguments(recipe: Recipe, stage: Stage) -> TrainingArguments:
    t = recipe.training
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return TrainingArguments(
        output_dir=str(stage.checkpoints),
        max_steps=stage.max_steps,
        num_train_epochs=stage.num_train_epochs,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        gradient_checkpointing=t.gradient_checkpointing,
        # Non-reentrant checkpointing recomputes with the same module attributes (the active ranks),
        # and needs no input-requires-grad trick for a frozen base.
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        bf16=t.bf16,
        seed=t.seed,
        data_seed=t.seed,
        report_to=[],
        remove_unused_columns=False,
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )


def last_checkpoint(checkpoints_dir: Path) -> str | None:
    checkpoints = sorted(checkpoints_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(checkpoints[-1]) if checkpoints else None


def check_run_dir(run_dir: RunDir, recipe: Recipe, resume: bool, force: bool) -> None:
    """Never destroy earlier results: refuse a finished run unless --force, and resume only a matching recipe."""
    saved = run_dir.recipe
    if resume:
        if not saved.is_file():
            raise ShearsError(f"nothing to resume in {run_dir}: it has no {saved.name} (drop --resume to start)")
        previous = load_recipe(saved)
        for section in ("model", "search_space", "data", "sparsity", "training"):
            if getattr(previous, section) != getattr(recipe, section):
                raise ShearsError(f"--resume with a recipe whose {section!r} differs from {saved}: resume with the "
                                  "same recipe, or start a new --output")
        return
    if run_dir.holds_training():
        if not force:
            raise ShearsError(f"{run_dir} already holds a super-network or checkpoints: pass --resume to continue, "
                              "--force to start over, or choose another --output")
        run_dir.discard_training()


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def train_supernet(recipe: Recipe, run_dir: str | Path, resume: bool = False, force: bool = False) -> Path:
    """Run the whole stage; returns RUN/supernet."""
    run_dir = RunDir(run_dir)
    check_run_dir(run_dir, recipe, resume, force)
    if is_main_process():
        save_recipe(recipe, run_dir.recipe)

    d = recipe.data
    train_records, val_records = recipe_splits(recipe)
    base, tokenizer, base_source = prepare_base(recipe, run_dir, train_records)

    space = resolve_search_space(recipe)
    train_set = TokenizedDataset(tokenizer, train_records, d.cutoff_len, d.train_on_inputs)
    val_set = TokenizedDataset(tokenizer, val_records[: recipe.training.val_limit], d.cutoff_len, d.train_on_inputs)
    trained: list[tuple[int, str]] = []
    supernet = trainer = None
    for stage in plan_stages(recipe, space, run_dir):
        finished = stage.checkpoints / "end"  # a completed stage of a multi-stage run, for --resume
        if resume and (finished / "trained.json").is_file():
            supernet = SuperNet.load(finished, base if supernet is None else supernet.model.unload())
            trained = [tuple(x) for x in json.loads((finished / "trained.json").read_text())]
            continue
        if supernet is None:
            set_seed(recipe.training.seed)  # the adapters' initial weights, identical across runs and processes
            supernet = SuperNet.from_base(base, stage.space, sparse_adapter=recipe.training.sparse_adapter)
        elif supernet.space.r_max != stage.space.r_max:
            supernet = squeeze_supernet(supernet, stage.space)
        trainer = NLSTrainer(
            model=supernet.model, args=training_arguments(recipe, stage), train_dataset=train_set,
            eval_dataset=val_set, data_collator=Collator(tokenizer), supernet=supernet,
            sampler=SubnetSampler(supernet.space, recipe.training.strategy, seed=recipe.training.seed),
            step_offset=len({step for step, _ in trained}))  # steps of the earlier stages
        trainer.train(resume_from_checkpoint=last_checkpoint(stage.checkpoints) if resume else None)
        trained += trainer.trained_configs
        if stage.checkpoints != run_dir.checkpoints and is_main_process():
            supernet.save(finished, overwrite=True)
            write_json(finished / "trained.json", trained)

    if trainer is None:  # every stage was already finished: a trainer only to evaluate
        trainer = Trainer(model=supernet.model, args=training_arguments(recipe, stage), eval_dataset=val_set,
                          data_collator=Collator(tokenizer))
    summary = {name: _val_loss(trainer, supernet, config)
               for name, config in (("maximal", supernet.maximal()), ("heuristic", supernet.heuristic()),
                                    ("minimal", supernet.minimal()))}
    out = run_dir.supernet
    if is_main_process():
        supernet.activate(supernet.maximal())
        supernet.save(out, overwrite=True)  # check_run_dir already refused to clobber a finished run
        write_json(run_dir.train_summary, {
            "base": base_source, "steps": len({step for step, _ in trained}), "validation": summary,
            "trained_configs": [{"step": s, "config": json.loads(c)} for s, c in trained]})
        _print_summary(run_dir, summary)
    _write_trace(run_dir, trained)
    return out


def _val_loss(trainer: Trainer, supernet: SuperNet, config: dict) -> dict:
    supernet.activate(config)
    loss = trainer.evaluate(metric_key_prefix="val")["val_loss"]
    return {"loss": loss, "adapter_params": supernet.adapter_params(config)}


def _write_trace(run_dir: RunDir, trained: list[tuple[int, str]]) -> None:
    """Each process writes the configs it trained (under DDP the files must be identical), atomically."""
    rank = int(os.environ.get("RANK", "0"))
    write_text(run_dir.trace_file(rank), "".join(json.dumps({"step": step, "config": config}) + "\n"
                                                 for step, config in trained))


def _print_summary(run_dir: RunDir, summary: dict) -> None:
    print("\nvalidation loss of the super-network's reference subnets:")
    for name, row in summary.items():
        print(f"  {name:<9}  loss {row['loss']:.4f}   adapter params {row['adapter_params']:,}")
    print(f"\nwrote {run_dir.supernet} (stock-PEFT adapter at r_max + search_space.json), "
          f"{run_dir.recipe}, {run_dir.train_summary}, {run_dir.trace}"
          + (f", {run_dir.sparse_base}" if run_dir.sparse_base.exists() else ""))


@cli_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m shears.train_supernet", description=__doc__.split("\n\n")[0],
        epilog="Any recipe key can be overridden: training.max_steps=50 or --training.max_steps 50.")
    parser.add_argument("--recipe", default=None, help="recipe YAML (default: recipes/default.yaml)")
    parser.add_argument("--output", default=None, help="run directory (default: the recipe's output_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    parser.add_argument("--force", action="store_true", help="start over in a run directory that holds results")
    args, overrides = parser.parse_known_args(argv)
    recipe = load_recipe(args.recipe, overrides)
    if args.output:
        recipe.output_dir = args.output
    train_supernet(recipe, recipe.output_dir, resume=args.resume, force=args.force)


if __name__ == "__main__":
    main(sys.argv[1:])
