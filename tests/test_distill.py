"""Distillation: the losses against torch's own definitions, the shared-weight teacher against the dense
model run on its own, NLSTrainer's distilled and in-place steps against losses written out by hand,
bad input, and kill -9 + --resume / DDP of a distilled run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import train_two_processes
from shears.distill import Distillation, DenseTeacher, logit_kl, squarehead
from shears.errors import ShearsError
from shears.recipe import DistillConfig, load_recipe
from test_train_supernet import TINY_SPACE, WIDTH_HEADS_SPACE, tiny_recipe



# --------------------------------------------------------------------------- the losses

def test_logit_kl_is_torch_kl_div_times_t_squared():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    for T in (1.0, 2.5):
        want = F.kl_div(F.log_softmax(student / T, -1), F.log_softmax(teacher / T, -1), log_target=True,
                        reduction="sum") * T * T
        torch.testing.assert_close(logit_kl(student, teacher, T), want)
    assert float(logit_kl(teacher, teacher, 2.0)) == pytest.approx(0, abs=1e-6)


def test_squarehead_is_the_block_mean_of_normalised_mse_on_real_tokens():
    g = torch.Generator().manual_seed(1)
    student = [torch.randn(2, 4, 3, generator=g) for _ in range(3)]
    teacher = [torch.randn(2, 4, 3, generator=g) * (b + 1) for b in range(3)]
    tokens = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    want = 0.0
    for s, t in zip(student, teacher):
        pairs = [(s[i, j], t[i, j]) for i in range(2) for j in range(4) if tokens[i, j]]
        want += sum(float(((a - b) ** 2).mean()) for a, b in pairs) / sum(float((b ** 2).mean()) for _, b in pairs) / 3
    assert float(squarehead(student, teacher, tokens)) == pytest.approx(want, rel=1e-5)
    student[0][1, 3] += 100  # a pad position: ignored
    assert float(squarehead(student, teacher, tokens)) == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- the teacher shares weights

def sparse_width_supernet(model_dir: Path, sparsity: float = 0.5, space=WIDTH_HEADS_SPACE):
    """The student as training builds it: a pruned copy of the base, channels in importance order, wrapped."""
    from shears.elastic import SuperNet
    from shears.models import load_model
    from shears.search_space import SearchSpace
    from shears.sparsity import wanda_prune
    from shears.width import width_order

    base = load_model(model_dir)
    if sparsity:
        wanda_prune(base, sparsity=sparsity, method="magnitude")
    bound = SearchSpace.from_dict(space).bind(base)
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    order = width_order(base, bound, ids)[0] if bound.sites else None
    net = SuperNet.from_base(base, SearchSpace.from_dict(space), sparse_adapter=True, channel_order=order)
    for layer in net.layers.values():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)  # the adapters change the function
    return net


def test_the_teacher_is_the_dense_full_width_base_and_shares_every_common_tensor(tiny_model_dir):
    from shears.models import load_model, load_tokenizer

    net = sparse_width_supernet(tiny_model_dir)
    net.activate(net.minimal())  # a narrow, low-rank subnet is active when the teacher runs
    teacher = DenseTeacher.build(net, str(tiny_model_dir), load_tokenizer(tiny_model_dir))
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        student_before = net.model(input_ids=ids).logits
        with teacher.active() as model:
            got = model(input_ids=ids).logits
        student_after = net.model(input_ids=ids).logits
        want = load_model(tiny_model_dir)(input_ids=ids).logits  # the dense base on its own, unpermuted
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(student_before, student_after)  # everything restored: width, adapters, weights
    assert not torch.allclose(student_before, want, atol=1e-3)  # the check can fail
    student = net.model.get_base_model()
    held = {id(p) for p, _ in teacher.held}
    pruned = {id(m.base_layer.weight) for m in net.layers.values()} | {
        id(m.weight) for n, m in student.named_modules() if n.endswith(("k_proj", "o_proj", "gate_proj", "down_proj"))}
    assert held == pruned  # only the pruned matrices are the teacher's own
    assert id(student.get_input_embeddings().weight) not in held
    dense_bytes = sum(p.numel() * p.element_size() for p in load_model(tiny_model_dir).parameters())
    assert teacher.held_bytes < dense_bytes


def test_a_dense_student_shares_its_whole_base_with_the_teacher(tiny_model_dir):
    from shears.models import load_tokenizer

    net = sparse_width_supernet(tiny_model_dir, sparsity=0.0)
    teacher = DenseTeacher.build(net, str(tiny_model_dir), load_tokenizer(tiny_model_dir))
    assert teacher.held == [] and teacher.held_bytes == 0


def test_a_teacher_adapter_is_merged_into_the_teacher(tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from shears.models import load_model, load_tokenizer

    dense = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    for name, p in dense.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    dense.save_pretrained(tmp_path / "teacher_adapter")
    net = sparse_width_supernet(tiny_model_dir)
    teacher = DenseTeacher.build(net, str(tiny_model_dir), load_tokenizer(tiny_model_dir), str(tmp_path / "teacher_adapter"))
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), teacher.active() as model:
        got = model(input_ids=ids).logits
    want = PeftModel.from_pretrained(load_model(tiny_model_dir), tmp_path / "teacher_adapter")(input_ids=ids).logits
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the distilled training step

def trainer_with(model_dir: Path, tmp_path: Path, distill: DistillConfig, strategy: str = "uniform",
                 inplace: bool = False, sparsity: float = 0.5):
    from transformers import TrainingArguments

    from shears.data import Collator, TokenizedDataset, load_records
    from shears.models import load_tokenizer
    from shears.train_supernet import NLSTrainer, SubnetSampler, TrainingOrder

    tokenizer = load_tokenizer(model_dir)
    data = TokenizedDataset(tokenizer, load_records("builtin:arithmetic?n=4&seed=0"), 320)
    net = sparse_width_supernet(model_dir, sparsity, TINY_SPACE)
    teacher = DenseTeacher.build(net, str(model_dir), tokenizer) if distill.enabled else None
    trainer = NLSTrainer(model=net.model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
                         train_dataset=data, data_collator=Collator(tokenizer), supernet=net,
                         sampler=SubnetSampler(net.space, strategy, seed=0), order=TrainingOrder(len(data), 0, 2),
                         distillation=Distillation(distill, teacher, inplace))
    trainer.current_gradient_accumulation_steps = 1
    batch = Collator(tokenizer)([data[i] for i in range(2)])
    return trainer, net, batch


def block_outputs_of(model, batch):
    from shears.distill import block_outputs

    with block_outputs(model) as blocks:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits, list(blocks)


def test_a_distilled_step_has_the_gradient_of_the_loss_written_out(tiny_model_dir, tmp_path):
    """CE + logit KL (T=2) + SquareHead, against the same loss built from full forwards of the student and
    of the dense base loaded on its own (no shared-weight teacher, no position gathering)."""
    from shears.models import load_model

    distill = DistillConfig(logit_weight=0.7, temperature=2.0, squarehead_weight=0.3, ce_weight=0.5)
    trainer, net, batch = trainer_with(tiny_model_dir, tmp_path, distill)
    params = [p for p in net.model.parameters() if p.requires_grad]
    labels = batch["labels"][:, 1:]
    wanted = labels != -100
    tokens = batch["attention_mask"].bool()
    with torch.no_grad():
        t_logits, t_blocks = block_outputs_of(load_model(tiny_model_dir), batch)
    net.activate(trainer.sampler.configs_for_step(0)[0])
    net.model.zero_grad()
    s_logits, s_blocks = block_outputs_of(net.model, batch)
    s, t = s_logits[:, :-1][wanted], t_logits[:, :-1][wanted]
    n = wanted.sum()
    want = (0.5 * F.cross_entropy(s, labels[wanted], reduction="sum")
            + 0.7 * 4 * F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="sum")
            ) / n + 0.3 * squarehead(s_blocks, t_blocks, tokens)
    want.backward()
    expected = [p.grad.clone() for p in params]
    net.model.zero_grad()
    got = trainer.training_step(net.model, dict(batch))
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    for g, e in zip((p.grad for p in params), expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    assert float(trainer.evaluate(eval_dataset=trainer.train_dataset)["eval_loss"]) > 0  # validation: plain CE


def test_inplace_distillation_teaches_min_and_random_from_the_detached_maximal(tiny_model_dir, tmp_path):
    trainer, net, batch = trainer_with(tiny_model_dir, tmp_path, DistillConfig(), "sandwich", inplace=True)
    params = [p for p in net.model.parameters() if p.requires_grad]
    labels = batch["labels"][:, 1:]
    wanted = labels != -100
    n = wanted.sum()
    configs = trainer.sampler.configs_for_step(0)
    net.model.zero_grad()
    net.activate(configs[0])
    top = net.model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1][wanted]
    (F.cross_entropy(top, labels[wanted], reduction="sum") / n).backward()
    for config in configs[1:]:
        net.activate(config)
        small = net.model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1][wanted]
        (F.kl_div(F.log_softmax(small, -1), F.log_softmax(top.detach(), -1), log_target=True, reduction="sum") / n
         ).backward()
    expected = [p.grad.clone() for p in params]
    net.model.zero_grad()
    trainer.training_step(net.model, dict(batch))
    for g, e in zip((p.grad for p in params), expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_logit_kd_over_accumulated_micro_batches_is_the_one_batch_gradient(tiny_model_dir, tmp_path):
    """Gradient accumulation: two micro-batches, each divided by the accumulated label count, sum to the
    gradient of the one batch holding both (CE and logit KL are token sums)."""
    trainer, net, batch = trainer_with(tiny_model_dir, tmp_path, DistillConfig(logit_weight=1.0, temperature=2.0))
    params = [p for p in net.model.parameters() if p.requires_grad]
    items = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()))
    net.model.zero_grad()
    trainer.training_step(net.model, dict(batch), num_items_in_batch=items)
    whole = [p.grad.clone() for p in params]
    net.model.zero_grad()
    for row in range(2):
        part = {k: v[row:row + 1, :int(batch["attention_mask"][row].sum())] for k, v in batch.items()}
        trainer.training_step(net.model, part, num_items_in_batch=items)
    for g, e in zip((p.grad for p in params), whole):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- bad input

def test_a_teacher_with_another_vocabulary_is_one_line(tiny_model_dir, tmp_path):
    from conftest import make_tiny_model, make_tiny_tokenizer

    from shears.models import load_tokenizer

    other = tmp_path / "other"
    make_tiny_model("llama", vocab_size=160).save_pretrained(other)
    tokenizer = make_tiny_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other)
    net = sparse_width_supernet(tiny_model_dir, space=TINY_SPACE)
    with pytest.raises(ShearsError, match="another tokenizer vocabulary") as info:
        DenseTeacher.build(net, str(other), load_tokenizer(tiny_model_dir))
    assert "\n" not in str(info.value)
    make_tiny_tokenizer().save_pretrained(other)  # the same tokenizer, a model with a larger vocabulary
    with pytest.raises(ShearsError, match="vocabulary of 160 tokens"):
        DenseTeacher.build(net, str(other), load_tokenizer(tiny_model_dir))


@pytest.mark.parametrize("override,message", [
    ({"training.distill.logit_weight": -0.1}, "training.distill.logit_weight=-0.1 is below 0"),
    ({"training.distill.squarehead_weight": -1}, "training.distill.squarehead_weight=-1.0 is below 0"),
    ({"training.distill.ce_weight": -2}, "training.distill.ce_weight=-2.0 is below 0"),
    ({"training.distill.temperature": 0}, "use a temperature above 0"),
    ({"training.inplace_distill": True}, "needs training.strategy=sandwich"),
])
def test_bad_distillation_settings_are_one_line(override, message):
    with pytest.raises(ShearsError, match=message.replace(".", r"\.").replace("(", r"\(")) as info:
        load_recipe(None, override)
    assert "\n" not in str(info.value)
    load_recipe(None, {"training.inplace_distill": True, "training.strategy": "sandwich"})  # the valid pairing


# --------------------------------------------------------------------------- faults and processes

DISTILLED = {"strategy": "sandwich", "inplace_distill": True,
             "distill": {"logit_weight": 1.0, "temperature": 2.0, "squarehead_weight": 1.0}}


def distilled_recipe(model_dir: Path, tmp_path: Path, space=TINY_SPACE, **training) -> Path:
    path = tiny_recipe(model_dir, tmp_path, **{**DISTILLED, **training})
    data = yaml.safe_load(path.read_text())
    data.update(search_space=space, sparsity={"sparsity": 0.5, "method": "wanda", "nsamples": 4, "seqlen": 32},
                width={"nsamples": 4, "seqlen": 32})
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_a_distilled_run_killed_then_resumed_equals_an_uninterrupted_one(tiny_model_dir, tmp_path):
    """kill -9 inside step 3 of a sparse, width+heads, sandwich run with teacher KD, SquareHead and in-place
    distillation, then --resume: the same adapter and validation losses, bit for bit."""
    from killable import kill_at
    from test_faults import assert_same_adapter, cli

    recipe = distilled_recipe(tiny_model_dir, tmp_path, WIDTH_HEADS_SPACE, max_steps=5, save_steps=2,
                              gradient_accumulation_steps=2, per_device_train_batch_size=1)
    from shears.train_supernet import train_supernet

    full = tmp_path / "full"
    train_supernet(load_recipe(recipe), full)
    cut = tmp_path / "cut"
    kill_at("step:3", "shears.train_supernet", "--recipe", str(recipe), "--output", str(cut), tmp_path=tmp_path)
    assert not (cut / "supernet").exists()
    result = cli("shears.train_supernet", "--recipe", str(recipe), "--output", str(cut), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "teacher: shares" in result.stdout
    assert_same_adapter(full, cut)
    summary = {run: json.loads((run / "train_summary.json").read_text()) for run in (full, cut)}
    assert summary[cut]["validation"] == summary[full]["validation"]


@pytest.mark.slow
def test_a_distilled_two_process_ddp_run_trains_the_same_subnets(tiny_model_dir, tmp_path):
    recipe = distilled_recipe(tiny_model_dir, tmp_path, WIDTH_HEADS_SPACE, max_steps=3)
    run = tmp_path / "run"
    train_two_processes(recipe, run)
    rank0 = (run / "trace" / "rank0.jsonl").read_text().splitlines()
    assert len(rank0) == 9 and rank0 == (run / "trace" / "rank1.jsonl").read_text().splitlines()  # 3 x sandwich
    losses = json.loads((run / "train_summary.json").read_text())["validation"]
    assert all(torch.isfinite(torch.tensor(v["loss"])) for v in losses.values())
