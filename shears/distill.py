"""Distillation while training the super-network: from the uncompressed base, and in place.

Why: pruning the base (and cutting its width) costs accuracy that cross-entropy on the labels alone
wins back slowly. Two remedies from the literature, both optional recipe keys of `training`:

* `training.distill` -- a dense teacher (Kurtic et al. 2023, "Sparse Fine-tuning for Inference
  Acceleration of LLMs"). The teacher is the uncompressed base: dense, full width, without the
  super-network's adapters, optionally with a dense adapter the user trained before (merged in). The
  loss of a subnet is

      ce_weight * CE(labels)
    + logit_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))   (labelled positions only)
    + squarehead_weight * mean over decoder blocks b of  MSE(student_b, teacher_b) / MSE(teacher_b, 0)

  where student_b / teacher_b are block b's output hidden states on the batch's real (non-pad)
  tokens: SquareHead's normalisation makes every block count alike whatever its activation scale.
* `training.inplace_distill` -- in-place distillation (US-Nets, BigNAS) with the sandwich rule: the
  maximal subnet learns from the labels; the minimal and the random one, in the same step and on
  the same batch, learn only from the maximal subnet's detached predictions, KL(max || subnet).

Token sums are divided by the accumulated batch's labelled-token count, exactly as the CE term is
(shears.train_supernet.NLSTrainer.response_loss), and the SquareHead ratio of a micro-batch is
weighted by its share of those tokens: so gradient accumulation and DDP give the gradient of one
large batch, as they do for CE.

Memory: the teacher is not a second model. It is the student's own model, run with the adapters
disabled, every elastic width at full width, and -- only where the teacher's weights differ from
the student's base (the pruned matrices; a merged teacher adapter's modules) -- the teacher's tensors
swapped in for the duration of its forward. Every tensor the two have in common (embeddings, norms,
the output layer, every unpruned matrix; a width space's whole un-sliced base) is shared.

Cost: the teacher forward runs once per micro-batch, under no_grad and in the run's precision, and
its outputs serve every subnet of a sandwich step. It is not cached per example: a cache still runs
the teacher once per record and saves only on records seen again, while a run of 300 x 16 examples
over ARC-e + OBQA sees a record 0.69 times, and the cache would take 4.4 MiB per record
(benchmarks/bench_distill.py; benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE_INDEX
from .elastic import SuperNet
from .errors import ShearsError
from .evaluate import scored_positions
from .models import decoder_layers, load_model, load_tokenizer
from .precision import autocast
from .recipe import DistillConfig
from .width import permute_channels


# --------------------------------------------------------------------------- the losses

def logit_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """sum over positions of T^2 * KL(softmax(teacher/T) || softmax(student/T)); [positions, vocab] each,
    computed in float32 (Hinton et al.'s T^2 keeps the gradient's scale independent of T)."""
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum() * temperature ** 2


def squarehead(student: list[torch.Tensor], teacher: list[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """SquareHead: the mean over blocks of MSE(student_b, teacher_b) / MSE(teacher_b, 0) on the tokens where
    `tokens` ([batch, seq] bool) is True. Each block's output is [batch, seq, hidden]."""
    if len(student) != len(teacher) or not student:
        raise ShearsError(f"SquareHead saw {len(student)} student and {len(teacher)} teacher block outputs: the "
                          "model's forward must call every decoder block once")
    ratios = []
    for s, t in zip(student, teacher):
        s, t = s[tokens].float(), t[tokens].float()
        ratios.append((s - t).pow(2).sum() / t.pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny))
    return torch.stack(ratios).mean()


def labelled_logits(logits: torch.Tensor, gathered: bool, labelled: torch.Tensor) -> torch.Tensor:
    """The logits of the labelled positions, [n, vocab] in row-major order: the output layer's own output when
    `scored_positions` gathered them, else picked from the full [batch, seq, vocab] logits."""
    return logits[0] if gathered else logits[:, :-1][labelled]


@contextlib.contextmanager
def block_outputs(model: nn.Module):
    """For the duration, the output hidden states of every decoder block of `model` (a PeftModel or an HF
    causal LM), in call order, are appended to the yielded list."""
    _, blocks = decoder_layers(model.get_base_model() if hasattr(model, "get_base_model") else model)
    seen: list[torch.Tensor] = []

    def keep(module, args, output):
        seen.append(output[0] if isinstance(output, (tuple, list)) else output)

    handles = [block.register_forward_hook(keep) for block in blocks]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------- the teacher

def _peft_name(name: str) -> str:
    """A base parameter's name once PEFT wrapped its module: q_proj.weight -> q_proj.base_layer.weight."""
    module, _, leaf = name.rpartition(".")
    return f"{module}.base_layer.{leaf}"


@dataclass
class DenseTeacher:
    """The teacher as the student's model plus the tensors where the two differ (see the module doc)."""
    supernet: SuperNet
    held: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)  # (student's tensor, teacher's)
    shared: int = 0  # base tensors the teacher reads from the student

    @classmethod
    def build(cls, supernet: SuperNet, source: str, student_tokenizer, adapter: str | None = None,
              dtype: str = "float32") -> "DenseTeacher":
        """Load the teacher `source` (+ `adapter` merged in), refuse another vocabulary, put its channels in the
        super-network's importance order, and keep only the tensors that differ from the student's base."""
        tokenizer = load_tokenizer(source)
        if tokenizer.get_vocab() != student_tokenizer.get_vocab():
            raise ShearsError(f"the teacher {source} has another tokenizer vocabulary than the student: distil from "
                              "the student's own uncompressed base (unset training.distill.teacher)")
        teacher = load_model(source, dtype=dtype)
        student = supernet.model.get_base_model()
        if teacher.config.vocab_size != student.config.vocab_size:
            raise ShearsError(f"the teacher {source} has a vocabulary of {teacher.config.vocab_size} tokens, the "
                              f"student {student.config.vocab_size}: distil from the student's own uncompressed base")
        if adapter is not None:
            teacher = _merged(teacher, adapter)
        if supernet.channel_order is not None:
            permute_channels(teacher, supernet.space.sites, supernet.channel_order)
        params = dict(student.named_parameters())
        out = cls(supernet)
        for name, tensor in teacher.named_parameters():
            mine = params.get(name, params.get(_peft_name(name)))
            if mine is None or mine.shape != tensor.shape:
                raise ShearsError(f"the teacher {source} does not have the student's architecture ({name} "
                                  f"{tuple(tensor.shape)}): the teacher is the uncompressed base of the student")
            tensor = tensor.detach().to(mine.device, mine.dtype)
            if torch.equal(mine, tensor):
                out.shared += 1
            else:
                out.held.append((mine, tensor))
        return out

    @property
    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.held)

    def describe(self) -> str:
        return (f"teacher: shares {self.shared} base tensors with the student and holds {len(self.held)} of its own "
                f"({self.held_bytes / 2**20:.1f} MiB)")

    @contextlib.contextmanager
    def active(self):
        """For the duration, the model computes the teacher: adapters off, full width, the teacher's tensors in,
        eval mode (no dropout); everything restored after."""
        net, model = self.supernet, self.supernet.model
        widths = dict(net.width.widths) if net.width is not None else None
        was_training = model.training
        for param, tensor in self.held:
            param.data, tensor.data = tensor.data, param.data  # a swap: no copy, and undone the same way
        try:
            if net.width is not None:
                net.width.activate(net.space.site_widths(net.space.maximal()))
            model.eval()
            with model.disable_adapter():
                yield model
        finally:
            model.train(was_training)
            if widths is not None:
                net.width.activate(widths)
            for param, tensor in self.held:
                param.data, tensor.data = tensor.data, param.data


def _merged(teacher: nn.Module, adapter: str) -> nn.Module:
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ShearsError(f"training.distill.teacher_adapter {adapter} is not a PEFT adapter folder (no "
                          "adapter_config.json): point it at a folder save_pretrained wrote")
    return PeftModel.from_pretrained(teacher, adapter).merge_and_unload()


# --------------------------------------------------------------------------- one training step's distillation

@dataclass
class TeacherTargets:
    logits: torch.Tensor | None  # [labelled positions, vocab], float32
    blocks: list[torch.Tensor]  # per decoder block, [batch, seq, hidden]
    tokens: torch.Tensor  # [batch, seq] bool: the real (non-pad) tokens SquareHead compares


@dataclass
class Distillation:
    """What NLSTrainer adds to a subnet's CE loss (see the module doc). `prepare` runs once per micro-batch,
    before its subnets; `subnet_index` says which of the step's subnets is training (0 = the maximal one in
    a sandwich step)."""
    config: DistillConfig
    teacher: DenseTeacher | None
    inplace: bool = False
    bf16: bool = False
    targets: TeacherTargets | None = field(default=None, repr=False)
    soft_labels: torch.Tensor | None = field(default=None, repr=False)  # the maximal subnet's, in place
    subnet_index: int = 0

    @property
    def wants_blocks(self) -> bool:
        return self.teacher is not None and self.config.squarehead_weight > 0

    def prepare(self, inputs: dict, rows: torch.Tensor, columns: torch.Tensor) -> None:
        """The teacher's outputs on this micro-batch (nothing without a teacher)."""
        self.targets, self.soft_labels = None, None
        if self.teacher is None:
            return
        labelled = inputs["labels"][:, 1:] != IGNORE_INDEX
        mask = inputs.get("attention_mask")
        tokens = mask.bool() if mask is not None else torch.ones_like(inputs["input_ids"], dtype=torch.bool)
        forward = {k: v for k, v in inputs.items() if k != "labels"}
        with self.teacher.active() as teacher, torch.no_grad(), autocast(self.bf16, tokens.device), \
                block_outputs(teacher) as blocks, scored_positions(teacher, rows, columns) as gathered:
            logits = teacher(**forward, use_cache=False).logits
        logits = labelled_logits(logits, bool(gathered), labelled).float() if self.config.logit_weight > 0 else None
        self.targets = TeacherTargets(logits, [b.detach() for b in blocks] if self.wants_blocks else [], tokens)

    def capture(self, model: nn.Module):
        """Around the student's forward: its block outputs (for SquareHead), else nothing."""
        return block_outputs(model) if self.wants_blocks else contextlib.nullcontext([])

    def loss(self, ce_sum: torch.Tensor, logits: torch.Tensor, blocks: list[torch.Tensor], labelled: int,
             count) -> torch.Tensor:
        """The subnet's loss: `ce_sum` (CE summed over its `labelled` positions), its labelled `logits`, its
        block outputs, `count` the accumulated batch's labelled tokens that token sums are divided by."""
        c = self.config
        if self.inplace and self.subnet_index > 0:
            if self.soft_labels is None:
                raise ShearsError("in-place distillation needs the maximal subnet first in each step: use "
                                  "training.strategy=sandwich")
            total = logit_kl(logits, self.soft_labels)  # the labels are the maximal subnet's predictions
        else:
            total = c.ce_weight * ce_sum
            if self.inplace:
                self.soft_labels = logits.detach()
        if self.targets is not None and self.targets.logits is not None:
            total = total + c.logit_weight * logit_kl(logits, self.targets.logits, c.temperature)
        total = total / count
        if self.wants_blocks:
            share = labelled / count
            total = total + c.squarehead_weight * share * squarehead(blocks, self.targets.blocks, self.targets.tokens)
        return total


def build_distillation(config: DistillConfig, inplace: bool, supernet: SuperNet, model_source: str, tokenizer,
                       dtype: str, bf16: bool) -> Distillation | None:
    """The run's Distillation (None when the recipe asks for none)."""
    if not config.enabled and not inplace:
        return None
    teacher = None
    if config.enabled:
        teacher = DenseTeacher.build(supernet, config.teacher or model_source, tokenizer, config.teacher_adapter, dtype)
    return Distillation(config, teacher, inplace, bf16)
