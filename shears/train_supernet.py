"""Train an elastic-LoRA super-network once (Neural Low-rank adapter Search), on HF Trainer.

    python -m shears.train_supernet [--recipe recipes/X.yaml] [key=value ...] [--output RUN] [--resume]
    python -m shears.train_supernet --recipe recipes/X.yaml --plan [--device-memory 24GiB]   # memory per stage

The run: (1) prune the base when the recipe asks (cached in RUN/sparse_base), then quantize it when the
recipe's `quantization.scheme` asks (RUN/quantized_base; training runs on its dequantized weights, loaded
once: quantization-aware NLS, or QA-SparsePEFT with training.qa_sparse_adapter), (2) when the search
space has width groups, order each block's MLP channels by importance on calibration windows of the
training data (recipe section `width`; kept in RUN/channel_order.safetensors), (3) wrap it in a
SuperNet, (3) train with HF Trainer, activating one sampled subnet per optimizer step, (4) save
RUN/supernet (a stock-PEFT adapter at r_max plus the search space) and report the validation loss of
the maximal, heuristic and minimal subnets; when the search will optimise loss, also score those
three exactly as the search does (RUN/warm_start.jsonl), so that the search starts from them.

Which subnet trains at step t is a pure function of (seed, t). It is drawn once per optimizer step,
so every gradient-accumulation micro-batch and every activation recomputation under gradient
checkpointing sees the same subnet; every DDP process draws the same one, so gradients average over
one architecture; and a resumed run continues the exact sampling order of an uninterrupted one.

Which records train at step t is a pure function of (seed, t) too (`TrainingOrder`): one endless
stream of seeded permutations of the training set, read a step's worth at a time. In-Squeeze stages
(training.rank_schedule) each run their own Trainer, but stage i starts reading the stream -- and the
learning-rate schedule -- at its first global step, so a run in stages sees exactly the batches and
learning rates of a run in one stage; only the adapters are squeezed and the optimiser restarted at
each boundary. A resumed run, at any step of any stage, trains and reports what an uninterrupted run
does.
Because this is ordinary Trainer, mixed precision, gradient checkpointing, `accelerate launch` /
torchrun DDP and FSDP work unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler
from transformers import Trainer, TrainingArguments, get_scheduler, set_seed

from . import flags
from .atomic import write_json, write_text
from .data import IGNORE_INDEX, Collator, TokenizedDataset, calibration_input_ids
from .distill import Distillation, build_distillation, labelled_logits
from .elastic import SuperNet
from .errors import ShearsError, cli_errors
from .evaluate import scored_positions
from .memory import fit_advice, make_plan, parse_memory, refuse_unless_fits
from .models import load_model, load_tokenizer
from .precision import precision_name, resolve_bf16
from .qformat import QuantizedTensor
from .quantize import quantize_to_folder
from .progress import interactive
from .recipe import Recipe, Strategy, load_recipe, parse_overrides, save_recipe
from .run import grid_blocks, recipe_splits
from .rundir import RunDir
from .noise import PerRecord
from .scores import run_scoring, score_record, write_history
from .search_space import WIDTH_KINDS, BoundSpace, SearchSpace, canonical, recipe_search_space
from .sparsity import prune_to_folder
from .squeeze import squeeze_lora_layer
from .width import ChannelOrder, width_order

STRATEGIES = typing.get_args(Strategy)  # the recipe's Literal: one definition


class SubnetSampler:
    """The subnets trained at an optimizer step: a pure function of (seed, step)."""

    def __init__(self, space: BoundSpace, strategy: str = "uniform", seed: int = 0):
        if strategy not in STRATEGIES:
            raise ShearsError(f"unknown NLS strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
        self.space, self.strategy, self.seed = space, strategy, seed

    def configs_for_step(self, step: int) -> list[dict]:
        rng = np.random.default_rng([self.seed, step])
        # Sandwich (BigNAS): the largest, the smallest and one random subnet, each a full forward/backward on
        # the step's batch. Their gradients are summed, not averaged -- as BigNAS accumulates them -- so each
        # subnet gets the step a uniform-strategy run would give it, and one optimizer step follows.
        if self.strategy == "sandwich":
            return [self.space.maximal(), self.space.minimal(), self.space.sample(rng)]
        return [self.space.sample(rng)]


    def trained(self, step: int) -> list[tuple[int, str]]:
        """(step, canonical config) of every subnet trained at `step`, as the trace records them."""
        return [(step, canonical(config)) for config in self.configs_for_step(step)]


@dataclass(frozen=True)
class TrainingOrder:
    """Which training records each optimizer step reads: a pure function of (seed, step).

    The order is one endless stream: permutation 0 of range(size), then permutation 1, ... (each
    seeded by (seed, k)), read `samples_per_step` = per-device batch x accumulation x processes
    records per optimizer step. An epoch, as Trainer counts it, is `steps_per_epoch` full steps of
    the stream, so a step never straddles a partial batch and step t always starts at sample
    t * samples_per_step -- which is what lets a later In-Squeeze stage continue where the last one
    stopped."""
    size: int
    seed: int
    samples_per_step: int
    # Length grouping (as HF's LengthGroupedSampler): each permutation is cut into chunks of
    # `group_steps` steps' samples and each chunk sorted longest first, so a step's batch holds
    # records of similar length (little padding) while every cycle is still a permutation of all.
    lengths: tuple[int, ...] = ()
    group_steps: int = 50

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.size / self.samples_per_step)

    @property
    def epoch_length(self) -> int:
        return self.steps_per_epoch * self.samples_per_step

    def _permutation(self, cycle: int) -> np.ndarray:
        permutation = np.random.default_rng([self.seed, cycle]).permutation(self.size)
        if self.lengths:
            lengths, chunk = np.asarray(self.lengths), self.group_steps * self.samples_per_step
            for start in range(0, self.size, chunk):
                part = permutation[start:start + chunk]
                permutation[start:start + chunk] = part[np.argsort(-lengths[part], kind="stable")]
        return permutation

    def epoch_indices(self, epoch: int, start_step: int) -> list[int]:
        """The records of `epoch` (counted from `start_step`, where the stage starts) in order."""
        position = start_step * self.samples_per_step + epoch * self.epoch_length
        end = position + self.epoch_length
        out: list[int] = []
        while position < end:
            cycle, offset = divmod(position, self.size)
            taken = self._permutation(cycle)[offset:offset + end - position]
            out += taken.tolist()
            position += len(taken)
        return out


class StreamSampler(Sampler[int]):
    """A Trainer sampler reading `TrainingOrder` from a stage's first global step; Trainer (and
    accelerate) call set_epoch, and a resume skips the batches already trained, as with any sampler."""

    def __init__(self, order: TrainingOrder, start_step: int):
        self.order, self.start_step, self.epoch = order, start_step, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.order.epoch_length

    def __iter__(self):
        return iter(self.order.epoch_indices(self.epoch, self.start_step))


class NLSTrainer(Trainer):
    """HF Trainer whose training step activates the step's sampled subnet(s) before forward/backward.

    A stage of an In-Squeeze run is one NLSTrainer whose global steps start at `step_offset`: it
    samples subnets, reads records (TrainingOrder) and follows the learning-rate schedule of the
    whole run (`total_steps`) from there."""

    def __init__(self, *args, supernet: SuperNet, sampler: SubnetSampler, order: TrainingOrder,
                 step_offset: int = 0, total_steps: int | None = None, distillation: Distillation | None = None,
                 **kwargs):
        super().__init__(*args, compute_loss_func=self.response_loss, **kwargs)
        self.distillation = distillation  # shears.distill: teacher / in-place terms added to each subnet's loss
        self._distilling = False  # set only inside training_step: the validation loss stays plain CE
        self._student_blocks: list[torch.Tensor] = []
        self._gathered: list[bool] = []  # set by compute_loss: did the output layer get only the labelled positions?
        self.supernet, self.sampler, self.order = supernet, sampler, order
        self.step_offset = step_offset  # steps of earlier In-Squeeze stages
        self.total_steps = total_steps if total_steps is not None else step_offset + self.args.max_steps
        self.trained_configs: list[tuple[int, str]] = []  # (step, canonical config) as trained, for provenance
        self._last_params = 0
        self._tokens, self._since = 0, time.perf_counter()  # real (non-pad) tokens trained since the last log

    def _get_train_sampler(self, train_dataset=None) -> Sampler:
        return StreamSampler(self.order, self.step_offset)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The whole run's schedule (warm-up once, one decay over every stage), entered at step_offset."""
        if self.lr_scheduler is None and (self.step_offset or self.total_steps != num_training_steps):
            optimizer = optimizer if optimizer is not None else self.optimizer
            whole = get_scheduler(self.args.lr_scheduler_type, optimizer=optimizer,
                                  num_warmup_steps=self.args.get_warmup_steps(self.total_steps),
                                  num_training_steps=self.total_steps,
                                  scheduler_specific_kwargs=self.args.lr_scheduler_kwargs)
            if not isinstance(whole, torch.optim.lr_scheduler.LambdaLR):
                raise ShearsError(f"training.lr_scheduler_type={self.args.lr_scheduler_type!r} cannot span "
                                  "training.rank_schedule stages: use linear, cosine, constant or polynomial")
            offset = self.step_offset
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, [lambda step, f=f: f(step + offset) for f in whole.lr_lambdas])
            self._created_lr_scheduler = True  # as Trainer marks its own: a second train() makes a fresh one
        return super().create_scheduler(num_training_steps, optimizer)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Trainer's compute_loss, with the output layer given only the positions whose next token is a
        label: the response tokens, not the prompt (train_on_inputs: false) or the padding. The
        49k-vocabulary projection, its float32 log-softmax and their backward over every position were
        waste on all of those; `response_loss` then reads the labelled positions' logits."""
        labels = inputs.get("labels")
        if labels is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        rows, columns = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
        unwrapped = self.accelerator.unwrap_model(model)
        blocks = self.distillation.capture(unwrapped) if self._distilling else contextlib.nullcontext([])
        with scored_positions(unwrapped, rows, columns) as gathered, blocks as self._student_blocks:
            self._gathered = gathered  # filled during the forward, read by response_loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def response_loss(self, outputs, labels, num_items_in_batch=None):
        """The causal-LM loss as transformers computes it (token i+1 is predicted at position i; a sum over
        labelled tokens divided by `num_items_in_batch`, the accumulated batch's count, else their mean),
        from the logits of the labelled positions alone when compute_loss could gather them."""
        wanted = labels[:, 1:] != IGNORE_INDEX
        logits = labelled_logits(outputs.logits, bool(self._gathered), wanted)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][wanted], reduction="sum")
        count = num_items_in_batch if num_items_in_batch is not None else wanted.sum()
        if self._distilling:
            return self.distillation.loss(loss, logits, self._student_blocks, int(wanted.sum()), count)
        return loss / count

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward/backward of every subnet of the step on `inputs`: gradients add up (a sandwich step
        applies the sum of three subnets' gradients); the returned loss, for logging, is their mean."""
        step = self.step_offset + self.state.global_step
        configs = self.sampler.configs_for_step(step)
        total = None
        mask = inputs.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        if self.distillation is not None:  # the teacher once per micro-batch, for every subnet of the step
            self._prepare_distillation(inputs)
        for index, config in enumerate(configs):
            self.supernet.activate(config)
            self._tokens += tokens
            if self.distillation is not None:
                self.distillation.subnet_index = index
            self._distilling = self.distillation is not None
            try:
                loss = super().training_step(model, inputs, num_items_in_batch)
            finally:
                self._distilling = False
            if not torch.isfinite(loss).all():  # Trainer's log would silently filter it out
                raise ShearsError(f"the training loss became {loss.item()} at step {step}: lower "
                                  "training.learning_rate (or disable bf16); checkpoints so far are kept")
            total = loss if total is None else total + loss
        if not self.trained_configs or self.trained_configs[-1][0] != step:  # once per step, not per micro-batch
            self.trained_configs += [(step, canonical(config)) for config in configs]
        self._last_params = self.supernet.adapter_params(configs[-1])
        return total / len(configs)

    def _prepare_distillation(self, inputs) -> None:
        inputs = self._prepare_inputs(inputs)
        rows, columns = (inputs["labels"][:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
        self.distillation.prepare(inputs, rows, columns)

    def stage_trained(self) -> list[tuple[int, str]]:
        """Every (step, config) of this stage. Steps before a resume were trained by the killed process;
        sampling is a pure function of (seed, step), so they are recomputed, exactly as it trained them."""
        first = self.trained_configs[0][0] if self.trained_configs else self.step_offset + self.state.global_step
        earlier = [entry for step in range(self.step_offset, first) for entry in self.sampler.trained(step)]
        return earlier + self.trained_configs

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            logs["subnet_params"] = self._last_params
            now = time.perf_counter()
            # this process's forward+backward throughput on real tokens (padding excluded)
            logs["tokens_per_second"] = round(self._tokens / max(now - self._since, 1e-9), 1)
            self._tokens, self._since = 0, now
        super().log(logs, *args, **kwargs)


# --------------------------------------------------------------------------- the run

def resolve_search_space(recipe: Recipe) -> SearchSpace:
    return recipe_search_space(recipe.search_space)


def prepare_base(recipe: Recipe, run_dir: RunDir, train_records: list[dict], bf16: bool = False):
    """The frozen base: the recipe's model, pruned into RUN/sparse_base first when sparsity > 0
    (its Wanda calibration forward in the training precision, `bf16`), then quantized into
    RUN/quantized_base when quantization.scheme is set, and loaded (dequantized, once). Loading, and the
    pruning's writing, keep the recipe's dtype: a bf16 base is never upcast."""
    source = recipe.model
    if recipe.sparsity.sparsity > 0:
        source = str(prune_to_folder(recipe.model, run_dir.sparse_base, recipe.sparsity,
                                     calibration_records=train_records, dtype=recipe.dtype, bf16=bf16))
    if recipe.quantization.scheme != "none":
        source = str(quantize_to_folder(source, run_dir.quantized_base, recipe.quantization))
    return load_model(source, dtype=recipe.dtype), load_tokenizer(source), source


@dataclass
class Stage:
    """One stretch of training at a fixed r_max (a single stage unless the recipe anneals ranks)."""
    index: int
    space: SearchSpace
    step_offset: int  # global step at which the stage starts
    max_steps: int
    checkpoints: Path


def stage_space(space: SearchSpace, r_max: int) -> SearchSpace:
    """`space` at another r_max: choices scaled by r_max / space.r_max, and alpha too, so that the scaling
    alpha / r_max -- and so the function of every subnet -- is the same at every stage."""
    factor = r_max / space.r_max
    data = space.to_dict()
    data.update(r_max=r_max, lora_alpha=space.lora_alpha * factor)
    for group in data["groups"]:
        if group.get("kind") in WIDTH_KINDS:  # channel and head counts do not scale with the rank
            continue
        group["choices"] = [max(1, round(c * factor)) for c in group["choices"]]
        if len(set(group["choices"])) < len(group["choices"]):
            raise ShearsError(f"training.rank_schedule stage r={r_max} maps group {group['name']!r}'s choices to "
                              f"duplicates {group['choices']}: use stage ranks that are multiples of r_max")
    return SearchSpace.from_dict(data, source=f"{space.source} at r_max={r_max}")


def plan_stages(recipe: Recipe, space: SearchSpace, run_dir: RunDir, steps_per_epoch: int) -> list[Stage]:
    """The run's stages, with their global steps: training.max_steps, or num_train_epochs of
    `steps_per_epoch`, split evenly (the last stage takes the remainder)."""
    t = recipe.training
    schedule = list(t.rank_schedule) or [space.r_max]
    if schedule != sorted(set(schedule), reverse=True) or schedule[-1] != space.r_max:
        raise ShearsError(f"training.rank_schedule {schedule} must strictly decrease and end at the search space's "
                          f"r_max ({space.r_max}), e.g. [{4 * space.r_max}, {2 * space.r_max}, {space.r_max}]")
    n = len(schedule)
    total = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)
    if total < n:
        raise ShearsError(f"training of {total} steps cannot be split over {n} rank stages: raise training.max_steps "
                          "or training.num_train_epochs")
    steps = [total // n + (total % n if i == n - 1 else 0) for i in range(n)]
    return [Stage(i, stage_space(space, r), sum(steps[:i]), steps[i], run_dir.stage_checkpoints(i, n))
            for i, r in enumerate(schedule)]


def squeeze_supernet(supernet: SuperNet, space: SearchSpace,
                     quantized: dict[str, QuantizedTensor] | None = None) -> SuperNet:
    """In-Squeeze: the super-network re-factorised at the smaller r_max of `space`.

    Each module's update is truncated to its best rank-r_max approximation (shears.squeeze) at the same
    scaling, with directions in descending singular value -- so the elastic slices A[:r], B[:, :r] of
    the next stage start from the update's most important directions. The new adapters are new
    tensors: the next stage's optimiser starts fresh for them."""
    factors = {}
    for name, layer in supernet.layers.items():
        factors[name] = squeeze_lora_layer(layer, rank=space.r_max)
    net = SuperNet.from_base(supernet.unload(), space, sparse_adapter=supernet.sparse_adapter,
                             channel_order=supernet.channel_order, quantized=quantized)
    with torch.no_grad():
        for name, squeezed in factors.items():
            rank = squeezed.rank  # < r_max only where the update itself had lower rank
            layer = net.layers[name]
            layer.lora_A["default"].weight.zero_()[:rank].copy_(squeezed.A)
            layer.lora_B["default"].weight.zero_()[:, :rank].copy_(squeezed.B)
    return net


def distillation_for(recipe: Recipe, supernet: SuperNet, tokenizer, bf16: bool) -> Distillation | None:
    """training.distill / training.inplace_distill of the recipe (None when it asks for neither)."""
    t = recipe.training
    distillation = build_distillation(t.distill, t.inplace_distill, supernet, recipe.model, tokenizer, recipe.dtype, bf16)
    if distillation is not None and distillation.teacher is not None and is_main_process():
        print(distillation.teacher.describe())
    return distillation


def channel_order(recipe: Recipe, space: SearchSpace, base, tokenizer, train_records: list[dict],
                  run_dir: RunDir) -> ChannelOrder | None:
    """The importance order of the width channels (None for a rank-only space), computed once per run:
    a resumed run reuses RUN/channel_order.safetensors, so its channels match its checkpoints."""
    if not space.width_groups:
        return None
    from safetensors.torch import load_file, save_file

    path = run_dir.channel_order
    if path.is_file():
        return load_file(path)
    w = recipe.width
    ids = calibration_input_ids(tokenizer, train_records, w.nsamples, w.seqlen, w.seed)
    order, _ = width_order(base, space.bind(base), ids, w.importance)
    if is_main_process():
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({k: v.contiguous() for k, v in order.items()}, str(tmp))
        os.replace(tmp, path)
    return order


def training_arguments(recipe: Recipe, stage: Stage, bf16: bool) -> TrainingArguments:
    """`bf16`: the resolved recipe setting (`shears.precision.resolve_bf16`)."""
    t = recipe.training
    distributed = world_size() > 1
    on_cpu = not torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(stage.checkpoints),
        max_steps=stage.max_steps,  # epochs are converted to steps by plan_stages
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
        activation_checkpointing=t.gradient_checkpointing,  # transformers 5 name of gradient checkpointing
        # Non-reentrant checkpointing recomputes with the same module attributes (the active ranks),
        # and needs no input-requires-grad trick for a frozen base.
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        # Trainer's bf16 is autocast over fp32 weights and fp32 optimizer state; on a CPU it needs
        # use_cpu, or it refuses bf16 as "gpu only".
        bf16=bf16,
        use_cpu=bf16 and on_cpu,
        dataloader_pin_memory=not on_cpu,  # pinned memory only speeds host-to-GPU copies; torch warns without one
        seed=t.seed,
        data_seed=t.seed,
        report_to=[],
        remove_unused_columns=False,
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        ddp_find_unused_parameters=False,
        # Trainer's bar on a terminal; in a log its PrinterCallback instead: one line per logging step
        disable_tqdm=not interactive(),
        prediction_loss_only=True,  # the validation loss is all the evaluation reads: keep no logits
    )


def complete_checkpoint(folder: Path) -> bool:
    """Trainer writes trainer_state.json last: a checkpoint killed mid-save lacks it (or has it torn)."""
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def last_checkpoint(checkpoints_dir: Path) -> str | None:
    """The newest complete checkpoint; one a kill tore mid-save is skipped (its step is trained again)."""
    checkpoints = sorted((p for p in checkpoints_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                         key=lambda p: int(p.name.split("-")[-1]))
    complete = [p for p in checkpoints if complete_checkpoint(p)]
    return str(complete[-1]) if complete else None


def check_run_dir(run_dir: RunDir, recipe: Recipe, resume: bool, force: bool) -> None:
    """Never destroy earlier results: refuse a finished run unless --force, and resume only a matching recipe."""
    saved = run_dir.recipe
    if resume:
        if not saved.is_file():
            raise ShearsError(f"nothing to resume in {run_dir}: it has no {saved.name} (drop --resume to start)")
        previous = load_recipe(saved)
        for section in ("model", "search_space", "data", "sparsity", "quantization", "width", "training"):
            if getattr(previous, section) != getattr(recipe, section):
                raise ShearsError(f"--resume with a recipe whose {section!r} differs from {saved}: resume with the "
                                  "same recipe, or start a new --output")
        return
    if run_dir.holds_training():
        if not force:
            raise ShearsError(f"{run_dir} already holds a super-network or checkpoints: pass --resume to continue, "
                              "--force to start over, or choose another --output")
        run_dir.discard_training()


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def train_supernet(recipe: Recipe, run_dir: str | Path, resume: bool = False, force: bool = False) -> Path:
    """Run the whole stage; returns RUN/supernet."""
    run_dir = RunDir(run_dir)
    check_run_dir(run_dir, recipe, resume, force)
    if is_main_process():
        save_recipe(recipe, run_dir.recipe)

    d = recipe.data
    bf16 = resolve_bf16(recipe.training.bf16, key="training.bf16")  # before any work: a bad setting fails now
    train_records, val_records = recipe_splits(recipe)
    base, tokenizer, base_source = prepare_base(recipe, run_dir, train_records, bf16)
    grid = grid_blocks(recipe, base_source)

    space = resolve_search_space(recipe)
    train_set = TokenizedDataset(tokenizer, train_records, d.cutoff_len, d.train_on_inputs)
    unlabelled = train_set.drop_unlabelled()
    if not len(train_set):
        raise ShearsError(f"none of the {unlabelled} training records keeps a response token within "
                          f"data.cutoff_len={d.cutoff_len}: raise data.cutoff_len")
    if unlabelled and is_main_process():
        print(f"{unlabelled} of {len(train_records)} training records have no response token within "
              f"data.cutoff_len={d.cutoff_len} and are left out (raise data.cutoff_len to train on them)")
    val_set = TokenizedDataset(tokenizer, val_records[: recipe.training.val_limit], d.cutoff_len, d.train_on_inputs)
    t = recipe.training
    order = TrainingOrder(len(train_set), t.seed,
                          t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size(),
                          lengths=tuple(len(x["input_ids"]) for x in train_set.examples) if t.group_by_length else ())
    stages = plan_stages(recipe, space, run_dir, order.steps_per_epoch)
    trained: list[tuple[int, str]] = []
    supernet = trainer = distillation = None
    for stage in stages:
        finished = stage.checkpoints / "end"  # a completed stage of a multi-stage run, for --resume
        if resume and (finished / "trained.json").is_file():
            supernet = SuperNet.load(finished, base if supernet is None else supernet.unload(), grid)
            trained = [tuple(x) for x in json.loads((finished / "trained.json").read_text())]
            continue
        if supernet is None:
            channels = channel_order(recipe, space, base, tokenizer, train_records, run_dir)
            set_seed(recipe.training.seed)  # the adapters' initial weights, identical across runs and processes
            supernet = SuperNet.from_base(base, stage.space, sparse_adapter=recipe.training.sparse_adapter,
                                          channel_order=channels, quantized=grid)
        elif supernet.space.r_max != stage.space.r_max:
            supernet = squeeze_supernet(supernet, stage.space, grid)
        if distillation is None:  # the teacher's tensors are the base's: they outlive a stage's re-wrapping
            distillation = distillation_for(recipe, supernet, tokenizer, bf16)
        trainer = NLSTrainer(
            model=supernet.model, args=training_arguments(recipe, stage, bf16), train_dataset=train_set,
            eval_dataset=val_set, data_collator=Collator(tokenizer), supernet=supernet,
            sampler=SubnetSampler(supernet.space, t.strategy, seed=t.seed), order=order,
            step_offset=stage.step_offset, total_steps=sum(s.max_steps for s in stages), distillation=distillation)
        trainer.train(resume_from_checkpoint=last_checkpoint(stage.checkpoints) if resume else None)
        trained += trainer.stage_trained()
        if stage.checkpoints != run_dir.checkpoints and is_main_process():
            supernet.save(finished, force=True)
            write_json(finished / "trained.json", trained)

    if trainer is None:  # every stage was already finished: a trainer only to evaluate
        trainer = Trainer(model=supernet.model, args=training_arguments(recipe, stage, bf16), eval_dataset=val_set,
                          data_collator=Collator(tokenizer))
    anchors = {"maximal": supernet.maximal(), "heuristic": supernet.heuristic(), "minimal": supernet.minimal()}
    summary = {name: _val_loss(trainer, supernet, config) for name, config in anchors.items()}
    scores = score_anchors_for_search(recipe, trainer, supernet, tokenizer, val_records, anchors)
    out = run_dir.supernet
    if is_main_process():
        supernet.activate(supernet.maximal())
        supernet.save(out, force=True)  # check_run_dir already refused to clobber a finished run
        write_json(run_dir.train_summary, {
            "base": base_source, "steps": len({step for step, _ in trained}), "precision": precision_name(bf16),
            "quantization": quantization_summary(recipe),
            "train_records": len(train_set), "train_records_without_response_token": unlabelled,
            "validation": summary,
            "trained_configs": [{"step": s, "config": json.loads(c)} for s, c in trained]})
        if scores:
            write_history(run_dir.warm_start, scores)
        else:  # a resumed run whose search objectives changed: an older file would describe other weights
            run_dir.warm_start.unlink(missing_ok=True)
        _print_summary(run_dir, summary, scores)
    _write_trace(run_dir, trained)
    return out


def quantization_summary(recipe: Recipe) -> dict | None:
    """What train_summary.json says of the base's quantization: the scheme, and how the adapter meets it."""
    q = recipe.quantization
    if q.scheme == "none":
        return None
    return {"scheme": q.scheme, "embeddings": q.embeddings, "exclude": list(q.exclude),
            "adapter": "QA-SparsePEFT: merged onto the frozen grid" if recipe.training.qa_sparse_adapter
            else "QA-NLS: separate, trained on the dequantized base"}


def _val_loss(trainer: Trainer, supernet: SuperNet, config: dict) -> dict:
    supernet.activate(config)
    loss = trainer.evaluate(metric_key_prefix="val")["val_loss"]
    return {"loss": loss, "adapter_params": supernet.adapter_params(config)}


def score_anchors_for_search(recipe: Recipe, trainer: Trainer, supernet: SuperNet, tokenizer, val_records: list[dict],
                             anchors: dict[str, dict]) -> list[dict]:
    """The `anchors` (maximal, heuristic, minimal) scored exactly as `python -m shears.search` with the
    recipe's defaults scores them -- its Scoring (shears.scores): the first search.eval_limit validation
    records, the answer-span loss, its precision, its fingerprint -- as history records, which the search
    imports instead of measuring them again. Only when the recipe's search objectives include loss
    (accuracy would mean generating): three evaluations, beside the Trainer's own val loss above, which
    is measured on other records (training.val_limit) by another loop, and so cannot stand in."""
    if "loss" not in recipe.search.objectives:
        return []
    # Trainer's accelerate wrapped the model's forward in its mixed-precision autocast; the search runs
    # the bare model, in the precision evaluation.bf16 says, and so must these scores.
    trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    scoring = run_scoring(recipe, supernet, val_records, recipe.search.eval_limit)
    records = []  # every process scores (a sharded model runs a forward only on all of them); the main one writes
    for label, config in anchors.items():
        supernet.activate(config)
        start = time.perf_counter()
        result = scoring.evaluate(supernet, tokenizer, "loss", progress=is_main_process())
        noise = PerRecord.from_result(result)  # the per-record losses: the search judges its front by their noise
        records.append(score_record(config, {"loss": float(result["loss"])}, time.perf_counter() - start,
                                    "train_supernet", len(records), label=label, scorer=scoring.fingerprint,
                                    precision=scoring.precision, n_examples=len(scoring.records),
                                    source="train_supernet", per_record={"loss": noise.to_json()},
                                    se={"loss": round(noise.se(), 8)}))
    return records


def _write_trace(run_dir: RunDir, trained: list[tuple[int, str]]) -> None:
    """Each process writes the configs it trained (under DDP the files must be identical), atomically."""
    rank = int(os.environ.get("RANK", "0"))
    write_text(run_dir.trace_file(rank), "".join(json.dumps({"step": step, "config": config}) + "\n"
                                                 for step, config in trained))


def _print_summary(run_dir: RunDir, summary: dict, scores: list[dict]) -> None:
    print("\nvalidation loss of the super-network's reference subnets:")
    for name, row in summary.items():
        print(f"  {name:<9}  loss {row['loss']:.4f}   adapter params {row['adapter_params']:,}")
    if scores:
        print(f"scored for the search (loss on {scores[0]['n_examples']} records, {scores[0]['precision']}, "
              f"scorer {scores[0]['scorer']}): " + ", ".join(f"{r['label']} {r['objectives']['loss']:.4f}" for r in scores))
    print(f"\nwrote {run_dir.supernet} (stock-PEFT adapter at r_max + search_space.json), "
          f"{run_dir.recipe}, {run_dir.train_summary}, {run_dir.trace}"
          + (f", {run_dir.warm_start}" if scores else "")
          + (f", {run_dir.sparse_base}" if run_dir.sparse_base.exists() else "")
          + (f", {run_dir.quantized_base}" if run_dir.quantized_base.exists() else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shears.train_supernet", description=__doc__.split("\n\n")[0],
                                     epilog=flags.OVERRIDES_EPILOG)
    flags.add_recipe(parser)
    flags.add_output(parser, "run directory (default: the recipe's output_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    flags.add_force(parser, "start over in a run directory that holds results")
    # the shared flags, each the recipe key it names
    flags.add_model(parser, "default: the recipe's model")
    flags.add_dtype(parser, "default: the recipe's dtype")
    flags.add_bf16(parser, "training and Wanda calibration; default: the recipe's training.bf16")
    flags.add_seed(parser, "training: subnet sampling, data order, initialisation (default: training.seed)")
    parser.add_argument("--plan", action="store_true",
                        help="print what each stage will need in memory and exit (reads config.json only)")
    parser.add_argument("--device-memory", type=parse_memory, metavar="SIZE",
                        help="memory of the device training runs on, e.g. 24GiB (default: detected)")
    return parser


FLAG_KEYS = {"model": "model", "dtype": "dtype", "bf16": "training.bf16", "seed": "training.seed"}


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args, rest = build_parser().parse_known_args(argv)
    overrides = {**parse_overrides(rest), **{key: getattr(args, flag) for flag, key in FLAG_KEYS.items()
                                             if getattr(args, flag) is not None}}
    recipe = load_recipe(args.recipe, overrides)
    if args.output:
        recipe.output_dir = args.output
    if args.plan:
        print_plan(recipe, args.device_memory)
        return
    check_memory(recipe, args.device_memory)
    train_supernet(recipe, recipe.output_dir, resume=args.resume, force=args.force)


def print_plan(recipe: Recipe, device_memory: int | None) -> None:
    """--plan: every stage's estimate, and the setting that makes a stage fit where one does not."""
    plan = make_plan(recipe, device_memory)
    print(plan.format())
    for need in plan.needs:
        if not plan.fits(need):
            print(f"will not fit: {fit_advice(recipe, plan, need)[0]}")


def check_memory(recipe: Recipe, device_memory: int | None) -> None:
    """Refuse, before anything is loaded or written, a run whose pruning or training cannot fit its device.
    A model whose config cannot be read here is left to load_model, which says why."""
    try:
        plan = make_plan(recipe, device_memory)
    except ShearsError:
        return
    run_dir = RunDir(recipe.output_dir)  # a finished pruning or quantization is reused, not redone
    done = {"prune": run_dir.sparse_base.exists(), "quantize": run_dir.quantized_base.exists()}
    refuse_unless_fits(recipe, plan, tuple(s for s in ("prune", "quantize", "train") if not done.get(s)))


if __name__ == "__main__":
    main(sys.argv[1:])
