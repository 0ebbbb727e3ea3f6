"""A subnet's score: how the search measures it, and the record that keeps it.

Two stages score subnets of a run: the search, and training at its end (the maximal, heuristic and
minimal subnets, so that the search starts from them). Their scores are interchangeable only when
they are measured the same way, so that way is defined here, once:

    Scoring       the search's evaluation of a run: the records (the recipe's validation split, the
                  first search.eval_limit), the evaluation settings, the precision, and `fingerprint`,
                  a hash of all of them and of the super-network's adapter weights. Every score carries
                  its fingerprint; equal fingerprints score a config the same.
    score_record  one score as a line of a history file (search/history.py appends them to
                  RUN/search/history.jsonl; training writes RUN/warm_start.jsonl), read by read_history.

This module sits below training and the search (tests/test_imports.py), so both use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import write_text
from .evaluate import evaluate
from .precision import precision_name, resolve_bf16

WORKER = f"{socket.gethostname()}:{os.getpid()}"


def scorer_fingerprint(supernet, records: list[dict], *settings) -> str:
    """What a score means, as 12 hex digits: the super-network's adapter weights, the evaluation
    records and the evaluation settings (task, ...). Equal fingerprints score a config the same."""
    import torch
    from peft import get_peft_model_state_dict

    digest = hashlib.sha1(json.dumps([records, list(settings)], sort_keys=True, default=str).encode())
    for key, tensor in sorted(get_peft_model_state_dict(supernet.model).items()):
        digest.update(key.encode())
        digest.update(tensor.detach().to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class Scoring:
    """How the search scores a subnet of a run (see the module docstring); `run_scoring` builds it."""

    records: list[dict]
    task: str  # evaluation.task: what an accuracy objective measures (loss is measured whatever it is)
    batch_size: int
    max_new_tokens: int
    cutoff_len: int
    bf16: bool
    fingerprint: str

    @property
    def precision(self) -> str:
        return precision_name(self.bf16)

    def evaluate(self, supernet, tokenizer, task: str, n_examples: int | None = None,
                 progress: bool = False) -> dict:
        """shears.evaluate of the super-network's active subnet on the first `n_examples` records (all
        by default): the one call behind every score of the search and of training's warm start."""
        return evaluate(supernet, tokenizer, self.records, task, limit=n_examples, batch_size=self.batch_size,
                        max_new_tokens=self.max_new_tokens, cutoff_len=self.cutoff_len, progress=progress,
                        bf16=self.bf16)


def run_scoring(recipe, supernet, validation_records: list[dict], eval_limit: int | None,
                batch_size: int | None = None) -> Scoring:
    """The Scoring of a run's super-network: its recipe's evaluation settings on `validation_records`
    (the recipe's split) cut to `eval_limit`, in the precision evaluation.bf16 resolves to on the
    device the super-network is on."""
    evaluation = recipe.evaluation
    records = list(validation_records[:eval_limit] if eval_limit is not None else validation_records)
    device = next(supernet.model.parameters()).device
    bf16 = resolve_bf16(recipe.evaluation_bf16(), device, key="evaluation.bf16")
    settings = [evaluation.task, evaluation.max_new_tokens, recipe.data.cutoff_len, precision_name(bf16)]
    q = recipe.quantization
    if q.scheme != "none":  # the base's weights differ; an unquantized run keeps the fingerprint it had
        settings.append(["quantization", q.scheme, q.embeddings, list(q.exclude), recipe.training.qa_sparse_adapter])
    if device.type != "cpu":  # another device's kernels differ in the last bits; CPU fingerprints stay as they were
        settings.append(device.type)
    return Scoring(records, evaluation.task, batch_size or evaluation.batch_size, evaluation.max_new_tokens,
                   recipe.data.cutoff_len, bf16, scorer_fingerprint(supernet, records, *settings))


# ----------------------------------------------------------------------------- the record of a score


def score_record(config: dict, objectives: dict, seconds: float, backend: str, n: int, trial: int | None = None,
                 label: str | None = None, **extra: Any) -> dict:
    """One score as a history line: {"n", "config", "objectives", "seconds", "backend", "trial", "label",
    extra fields that are not None (n_examples, fidelity, scorer, precision, predicted, source),
    "worker", "time"}. The search adds "front_size" and "hypervolume" (search/history.py)."""
    return {"n": n, "config": dict(config), "objectives": dict(objectives), "seconds": round(seconds, 4),
            "backend": backend, "trial": trial, "label": label, **{k: v for k, v in extra.items() if v is not None},
            "worker": WORKER, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def parse_records(data: bytes) -> list[dict]:
    """The records of complete history lines; a line torn by a kill mid-write is skipped (it was
    never counted, and its config is evaluated again)."""
    records = []
    for line in data.splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def read_history(path: str | os.PathLike) -> list[dict]:
    """Every record of a history file, in file order, without checking objectives (for readers such
    as export that only look results up). A missing file holds none."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    return parse_records(data[: data.rfind(b"\n") + 1])


def write_history(path: str | os.PathLike, records: list[dict]) -> Path:
    """A whole history file of `records`, written atomically (the search appends to its own instead)."""
    return write_text(path, "".join(json.dumps(record) + "\n" for record in records))
