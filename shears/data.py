"""Data: where records come from, how they become prompts and token ids, and the validation split.

A record is the LLM-Adapters instruction format the Shears/LoNAS/SQFT papers train on:

    {"instruction": str, "input": str, "output": str, "answer": str | None[, "choices": list[str]]}

`output` is the target completion; `answer` the gold label that evaluation compares against;
`choices`, present only in the content answer format (`to_answer_format`), the option texts.
Sources (`load_records`):
  - a .json (list of objects), .jsonl or .csv file, with optional field renaming;
  - `builtin:arithmetic[?n=N&seed=S]`: seeded, offline arithmetic word problems (the demo task);
  - `hub:NAME[:SPLIT]`: a `datasets` hub data set, where the hub is reachable.
"""

from __future__ import annotations

import csv
import json
import random
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import parse_qsl

import numpy as np
import torch

from .errors import ShearsError
from .recipe import AnswerFormat

FIELDS = ("instruction", "input", "output", "answer")
REQUIRED = ("instruction", "output")
ANSWER_FORMATS = typing.get_args(AnswerFormat)  # the recipe's Literal: one definition
IGNORE_INDEX = -100  # label value HF losses skip

# The Alpaca template, as LLM-Adapters (and so the Shears/SQFT papers) use it.
PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


# --------------------------------------------------------------------------- sources

def load_records(source: str | Path | Sequence[str | Path], fields: dict[str, str] | None = None,
                 limit: int | None = None, seed: int = 0) -> list[dict]:
    """Records from one source or a list of them (concatenated). `fields` maps our field names to the
    source's (e.g. {"instruction": "question"}). `limit` keeps a seeded random subset per source."""
    if limit is not None and limit < 1:
        raise ShearsError(f"limit={limit} keeps no records: set a positive data.train_limit, or none for all records")
    unknown = sorted(set(fields or {}) - set(FIELDS))
    if unknown:
        raise ShearsError(f"data.fields maps unknown field {unknown[0]!r}: map any of {', '.join(FIELDS)}")
    if isinstance(source, (list, tuple)):
        if not source:
            raise ShearsError("no data sources given: list at least one file, builtin: or hub: source")
        records: list[dict] = []
        for one in source:
            records.extend(load_records(one, fields, limit, seed))
        return records
    source = str(source)
    if source.startswith("builtin:"):
        raw, where = _builtin(source), source
    elif source.startswith("hub:"):
        raw, where = _hub(source[4:]), source
    else:
        raw, where = _read_file(Path(source)), source
    records = [_normalise(item, index, where, fields or {}) for index, item in enumerate(raw)]
    if not records:
        raise ShearsError(f"{where} holds no records: point the recipe at a non-empty data set")
    if limit is not None and limit < len(records):
        keep = sorted(random.Random(seed).sample(range(len(records)), limit))
        records = [records[i] for i in keep]
    return records


def _read_file(path: Path) -> list[Any]:
    if not path.is_file():
        raise ShearsError(f"data file not found: {path} (check the recipe's data paths / data_dir)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise ShearsError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
            return data
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                return list(csv.DictReader(handle))
    except json.JSONDecodeError as err:
        raise ShearsError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except UnicodeDecodeError:
        raise ShearsError(f"{path}: not UTF-8 text; re-save it as UTF-8") from None
    raise ShearsError(f"{path}: unsupported data format {suffix!r}: use .json, .jsonl or .csv")


def _read_jsonl(path: Path) -> list[Any]:
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as err:  # json counts lines within the one line it saw
                raise ShearsError(f"{path}: line {lineno} is not valid JSON ({err.msg}, column {err.colno})") from None
    return items


def _hub(spec: str) -> list[Any]:
    name, _, split = spec.partition(":")
    try:
        import datasets

        return list(datasets.load_dataset(name, split=split or "train"))
    except Exception as err:  # the hub raises many types; all mean the same to the user
        cause = (str(err).strip().splitlines() or [""])[0][:200]
        raise ShearsError(f"could not load hub data set {name!r} ({type(err).__name__}: {cause}): the hub may be "
                          "unreachable here; download it where it is reachable and pass the file") from None


def _normalise(item: Any, index: int, where: str, fields: dict[str, str]) -> dict:
    if not isinstance(item, dict):
        raise ShearsError(f"{where}: record {index} is a {type(item).__name__}, not an object")
    record = {}
    for field in FIELDS:
        key = fields.get(field, field)
        value = item.get(key)
        if value is None and field in REQUIRED:
            raise ShearsError(f"{where}: record {index} has no field {key!r} (map it with data.fields.{field})")
        record[field] = "" if value is None and field == "input" else value
        if record[field] is not None and not isinstance(record[field], str):
            record[field] = str(record[field])
    choices = item.get("choices")
    if choices is not None:  # a content-format record written to a file reads back as one
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise ShearsError(f"{where}: record {index} field 'choices' is not a list of strings")
        record["choices"] = list(choices)
    return record


# --------------------------------------------------------------------------- answer formats

# LLM-Adapters multiple-choice instructions: a lead-in, the question, the options as "Answer1: ..
# Answer2: .." (Solution1/Option1/Ending1 in PIQA/WinoGrande/HellaSwag), then "Answer format: a/b/..".
_FORMAT_LINE = re.compile(r"answer format:", re.IGNORECASE)
_NUMBERED = re.compile(r"([A-Za-z]+)(\d+)")
# Lead-ins that only announce "here is a question"; the content format drops them so the prompt is
# the question itself (as lm-eval prompts ARC/OBQA). Lead-ins that carry information ("with true or
# false", "fill in the blank") stay.
_BARE_LEAD_INS = re.compile(r"^\s*please choose the correct (?:answer|solution) to the question:\s*", re.IGNORECASE)


def parse_choices(record: dict) -> tuple[str, list[str], int]:
    """(question, option texts, index of the gold option) of an LLM-Adapters multiple-choice record.

    The options are located by their numbered markers ("Answer1:", "Answer2:", ...) in order, each
    text running to the next marker, so an option may contain any words, colons included. Labels
    that are not numbered (BoolQ's true/false) are their own texts."""
    instruction = record.get("instruction") or ""
    found = list(_FORMAT_LINE.finditer(instruction))
    if not found:
        raise ShearsError("no 'Answer format: a/b' line")
    body, format_line = instruction[:found[-1].start()], instruction[found[-1].end():]
    labels = [label.strip().rstrip(".") for label in format_line.strip().split("/")]
    if len(labels) < 2 or not all(labels):
        raise ShearsError(f"the answer format {format_line.strip()!r} lists fewer than two labels")
    gold = str(record.get("answer") or "").strip().lower()
    lowered = [label.lower() for label in labels]
    if gold not in lowered:
        raise ShearsError(f"the gold answer {gold!r} is not among the labels {'/'.join(labels)}")
    numbered = [_NUMBERED.fullmatch(label) for label in labels]
    if not all(numbered):
        return _BARE_LEAD_INS.sub("", body).strip(), labels, lowered.index(gold)
    starts, ends, position = [], [], 0
    for match in numbered:  # each marker searched after the previous one: option text cannot fake one
        marker = re.compile(rf"(?<![A-Za-z0-9]){re.escape(match.group(1))}{match.group(2)}\s*:", re.IGNORECASE)
        hit = marker.search(body, position)
        if hit is None:
            raise ShearsError(f"option {match.group(0)!r} of the answer format is missing from the instruction")
        starts.append(hit.start())
        ends.append(hit.end())
        position = hit.end()
    texts = [body[end:start].strip() for end, start in zip(ends, starts[1:] + [len(body)])]
    empty = [labels[k] for k, text in enumerate(texts) if not text]
    if empty:
        raise ShearsError(f"option {empty[0]!r} has no text")
    question = _BARE_LEAD_INS.sub("", body[:starts[0]]).strip()
    if not question:
        raise ShearsError("no question before the options")
    return question, texts, lowered.index(gold)


def to_answer_format(records: Sequence[dict], answer_format: str) -> list[dict]:
    """Records in the answer format training and scoring use.

    "label" leaves LLM-Adapters records as they are (the response names a label: "the correct answer
    is answer2"). "content" rewrites each multiple-choice record so that the prompt is the question
    alone and the response is the gold option's own text, with the option texts kept in `choices`:
    the lm-eval way of scoring, which a small model can learn where the label indirection is beyond it."""
    if answer_format not in ANSWER_FORMATS:
        raise ShearsError(f"unknown answer format {answer_format!r}: set data.answer_format to label or content")
    if answer_format == "label":
        return list(records)
    rewritten = []
    for index, record in enumerate(records):
        if record.get("choices"):  # already in the content format
            rewritten.append(dict(record))
            continue
        try:
            question, texts, gold = parse_choices(record)
        except ShearsError as err:
            raise ShearsError(f"record {index} ({str(record.get('instruction'))[:50]!r}) cannot be rewritten to the "
                              f"content answer format ({err}): use data.answer_format=label for this "
                              "data") from None
        rewritten.append({"instruction": question, "input": record.get("input") or "", "output": texts[gold],
                          "answer": texts[gold], "choices": texts})
    return rewritten


# --------------------------------------------------------------------------- built-in task

_ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "stamps"]
_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo"]


def arithmetic_records(n: int = 1000, seed: int = 0) -> list[dict]:
    """Seeded arithmetic word problems with a numeric answer (the offline demo task).

    Three difficulties — one addition or subtraction, one multiplication, two steps — so that a
    subnet's capacity shows in its accuracy rather than every subnet scoring the same."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        kind = rng.choice(("add", "sub", "mul", "two_step"))
        if kind == "add":
            a, b = rng.randint(2, 60), rng.randint(2, 60)
            question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
            work, answer = f"{a} + {b} = {a + b}", a + b
        elif kind == "sub":
            a = rng.randint(10, 90)
            b = rng.randint(1, a - 1)
            question = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
            work, answer = f"{a} - {b} = {a - b}", a - b
        elif kind == "mul":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            question = f"{name} buys {a} boxes with {b} {item} in each box. How many {item} is that?"
            work, answer = f"{a} * {b} = {a * b}", a * b
        else:
            a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 30)
            question = (f"{name} buys {a} bags with {b} {item} in each bag, then finds {c} more. "
                        f"How many {item} does {name} have?")
            work, answer = f"{a} * {b} = {a * b}, and {a * b} + {c} = {a * b + c}", a * b + c
        records.append({"instruction": question, "input": "",
                        "output": f"{work}. The answer is {answer}.", "answer": str(answer)})
    return records


_BUILTINS = {"arithmetic": arithmetic_records}


def _builtin(source: str) -> list[dict]:
    name, _, query = source[len("builtin:"):].partition("?")
    if name not in _BUILTINS:
        raise ShearsError(f"unknown built-in data set {name!r}: use one of "
                          f"{', '.join('builtin:' + b for b in _BUILTINS)}")
    try:
        kwargs = {key: int(value) for key, value in parse_qsl(query)}
        return _BUILTINS[name](**kwargs)
    except (TypeError, ValueError) as err:
        raise ShearsError(f"bad options in {source!r} ({err}): use e.g. builtin:{name}?n=1000&seed=0") from None


# --------------------------------------------------------------------------- prompts and tokens

def format_prompt(record: dict) -> str:
    """The Alpaca prompt for a record, ending exactly where the response begins."""
    if record.get("input"):
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT.format(instruction=record["instruction"])


def format_example(record: dict) -> tuple[str, str]:
    return format_prompt(record), record["output"]


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def tokenize_example(tokenizer, record: dict, cutoff_len: int, train_on_inputs: bool = False) -> dict:
    """Token ids of prompt + response + EOS, cut to `cutoff_len`, labels masked on the prompt.

    Prompt and response are tokenised separately and concatenated, so the prompt tokens are exactly
    those that evaluation feeds the model before generating (no merge across the boundary)."""
    prompt, response = format_example(record)
    prompt_ids = _ids(tokenizer, prompt, special=True)
    response_ids = _ids(tokenizer, response, special=False)
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:cutoff_len]
    labels = list(input_ids) if train_on_inputs else ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:cutoff_len]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


@dataclass
class Collator:
    """Right-pads a list of tokenised examples into a batch (labels padded with -100)."""

    tokenizer: Any
    pad_to_multiple_of: int | None = 8

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            gap = longest - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [pad_id] * gap)
            batch["attention_mask"].append(list(f["attention_mask"]) + [0] * gap)
            batch["labels"].append(list(f.get("labels", f["input_ids"])) + [IGNORE_INDEX] * gap)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


class TokenizedDataset(torch.utils.data.Dataset):
    """Records tokenised once, up front (the sets here are small; lazy tokenising buys nothing)."""

    def __init__(self, tokenizer, records: Sequence[dict], cutoff_len: int, train_on_inputs: bool = False):
        self.examples = [tokenize_example(tokenizer, r, cutoff_len, train_on_inputs) for r in records]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]

    def drop_unlabelled(self) -> int:
        """Remove the examples with no label token left (a prompt that fills cutoff_len); how many went.

        Such an example teaches nothing, and a batch made only of them has no loss at all (0 / 0 = NaN):
        length grouping puts exactly the longest prompts together."""
        kept = [x for x in self.examples if any(label != IGNORE_INDEX for label in x["labels"])]
        dropped, self.examples = len(self.examples) - len(kept), kept
        return dropped


# --------------------------------------------------------------------------- splits and calibration

def split_validation(records: Sequence[dict], val_size: int | float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministically carve a validation set out of training records: (train, val).

    `val_size` is a count, or a fraction when below 1. The training part keeps the records' original
    order (the trainer shuffles it); the validation part is in the seeded random order that chose it, so
    any prefix of it -- what search.eval_limit, the multi-fidelity rungs and training.val_limit score -- is
    a random sample of the split, not the first training file's records."""
    n = len(records)
    if val_size < 0 or (val_size > 1 and val_size != int(val_size)):
        raise ShearsError(f"validation size {val_size} is neither a count nor a fraction below 1: "
                          "set data.val_size to e.g. 64 or 0.05")
    count = int(round(val_size * n)) if 0 < val_size < 1 else int(val_size)
    if count >= n:
        raise ShearsError(f"validation size {val_size} leaves no training data out of {n} records: lower data.val_size")
    picked = np.random.default_rng(seed).permutation(n)[:count].tolist()
    chosen = set(picked)
    train = [r for i, r in enumerate(records) if i not in chosen]
    val = [records[i] for i in picked]
    return train, val


def calibration_input_ids(tokenizer, records: Iterable[dict], nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens from the records' formatted text ([nsamples, seqlen]).

    As Wanda samples C4: the examples (prompt + response) are shuffled and joined into one token
    stream, separated by EOS, and windows start at seeded random offsets."""
    records = list(records)
    if not records or nsamples <= 0 or seqlen <= 0:
        raise ShearsError("the calibration set is empty: pass --calibration DATA with records, nsamples > 0 "
                          "and seqlen > 0")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for i in order:
        prompt, response = format_example(records[i])
        stream += _ids(tokenizer, prompt + response, special=False) + sep
        if len(stream) >= nsamples * seqlen * 2:  # enough text for distinct windows; stop tokenising
            break
    if len(stream) < seqlen:
        raise ShearsError(f"the calibration data holds only {len(stream)} tokens, fewer than seqlen={seqlen}: "
                          "lower --seqlen or give more data")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(stream) - seqlen) for _ in range(nsamples)]
    return torch.tensor([stream[s:s + seqlen] for s in starts], dtype=torch.long)
