"""An outside evaluator agrees with ours: lm-evaluation-harness, run through its Python API with the
task configs in shears/lm_eval_tasks/ on an exported adapter, picks the same answer to every question
as shears.evaluate (and so gets the same accuracy)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: pip install -e '.[lm-eval]'")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from shears.evaluate import evaluate  # noqa: E402
from shears.export import export_subnets  # noqa: E402
from shears.models import load_tokenizer  # noqa: E402
from conftest import make_tiny_model, make_tiny_tokenizer  # noqa: E402
from shears.recipe import load_recipe  # noqa: E402
from shears.train_supernet import train_supernet  # noqa: E402
from test_export import MIXED, randomise_adapter  # noqa: E402
from test_train_supernet import tiny_recipe  # noqa: E402

TASKS_DIR = Path(__file__).resolve().parents[1] / "shears" / "lm_eval_tasks"

BOOLQ = [("is the sky blue on a clear day", "true"), ("do fish breathe air through lungs", "false"),
         ("is ice colder than steam", "true"), ("can a cat fly without help", "false"),
         ("is paris in france", "true"), ("is seven an even number", "false")]
PIQA = [("keep bread fresh", "store it in a sealed bag", "leave it in the rain", "solution1"),
        ("dry wet shoes", "fill them with ice", "stuff them with newspaper", "solution2"),
        ("open a jar", "run the lid under hot water", "freeze the jar overnight", "solution1"),
        ("cool soup fast", "stir it in a cold water bath", "cover it with a blanket", "solution1"),
        ("light a dark room", "close the curtains", "switch on a lamp", "solution2")]


def write_data(folder: Path) -> dict[str, list[dict]]:
    """Records in the LLM-Adapters commonsense format, under the file names the task configs read."""
    boolq = [{"instruction": f"Please answer the following question with true or false, question: {q}?\n\n"
                             "Answer format: true/false", "input": "", "output": f"the correct answer is {a}",
              "answer": a} for q, a in BOOLQ]
    piqa = [{"instruction": f"Please choose the correct solution to the question: {goal}\n\nSolution1: {s1}\n\n"
                            f"Solution2: {s2}\n\nAnswer format: solution1/solution2", "input": "",
             "output": f"the correct answer is {a}", "answer": a} for goal, s1, s2, a in PIQA]
    folder.mkdir()
    (folder / "boolq_test.json").write_text(json.dumps(boolq))
    (folder / "piqa_test.json").write_text(json.dumps(piqa))
    return {"shears_boolq": boolq, "shears_piqa": piqa}


def tiny_run(root: Path) -> tuple[Path, Path]:
    """(run, base) of a 2-step super-network on a tiny Llama whose vocabulary is exactly its tokenizer's:
    given a PEFT adapter, lm-eval resizes the embeddings to len(tokenizer), which would renormalise
    every log-probability of a model with spare vocabulary rows."""
    tokenizer = make_tiny_tokenizer()
    base = root / "tiny-llama"
    make_tiny_model("llama", max_position_embeddings=512, vocab_size=len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    run = root / "run"
    train_supernet(load_recipe(tiny_recipe(base, root), {"training.max_steps": 2, "training.save_steps": 100}), run)
    randomise_adapter(run, seed=1)  # factors of O(0.1): the adapter changes the answers
    return run, base


def test_lm_eval_picks_the_same_answers_as_shears_evaluate(tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    run, base = tiny_run(tmp_path)
    adapter = export_subnets(run, {"mixed": MIXED}, tmp_path / "export")[0].folder
    data = write_data(tmp_path / "commonsense")

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    tokenizer = load_tokenizer(str(base))
    ours = {task: evaluate(model, tokenizer, records, "choice", progress=False) for task, records in data.items()}

    lm = HFLM(pretrained=str(base), peft=str(adapter), device="cpu", batch_size=4, dtype="float32")
    manager = TaskManager(include_path=str(TASKS_DIR), metadata={"data_dir": str(tmp_path / "commonsense")})
    theirs = simple_evaluate(model=lm, tasks=sorted(data), task_manager=manager, log_samples=True,
                             bootstrap_iters=0)
    base_answers = 0
    for task, records in data.items():
        samples = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert len(samples) == len(records)
        for sample, prediction in zip(samples, ours[task]["predictions"]):
            logliks = [float(resp[0][0]) for resp in sample["resps"]]
            pick = prediction["choices"][max(range(len(logliks)), key=logliks.__getitem__)]
            assert pick == prediction["prediction"], (task, sample["doc_id"], logliks, prediction["logprobs"])
            # lm-eval moves the prompt's trailing newline into every candidate: its log-likelihoods are ours
            # plus that one token's log-prob, the same for each candidate of a question
            shifts = [a - b for a, b in zip(logliks, prediction["logprobs"])]
            assert max(shifts) < 0 and max(shifts) - min(shifts) < 1e-3, (task, sample["doc_id"], shifts)
            base_answers += pick == prediction["answer"]
        assert theirs["results"][task]["acc,none"] == pytest.approx(ours[task]["accuracy"])
    assert 0 < base_answers < sum(len(r) for r in data.values())  # answers are neither all right nor all wrong
