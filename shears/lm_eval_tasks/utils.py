"""lm-evaluation-harness hooks for the shears task configs in this folder: shears' prompt and labels.

Each question is scored exactly as `shears.evaluate --task choice` scores it: the context is
`shears.data.format_prompt(record)`, and the candidates are the record's own training response with
each label swapped in ("the correct answer is solution2"), so lm-eval's `acc` (the candidate of
highest summed log-likelihood) is shears' accuracy. The records come from local LLM-Adapters JSON
files (no hub): pass their folder as `--metadata '{"data_dir": "/path/to/llm-adapters/commonsense"}'`.
"""

from __future__ import annotations

import os
from pathlib import Path

from shears.data import format_prompt, load_records
from shears.errors import ShearsError
from shears.evaluate import choice_continuations, choice_labels


def load(data_dir: str | None = None, file: str | None = None, limit: int | None = None, **_metadata):
    """A DatasetDict with one `test` split: the records of DATA_DIR/FILE (a seeded subset when `limit`)."""
    import datasets

    data_dir = data_dir or os.environ.get("SHEARS_DATA_DIR")
    if not data_dir:
        raise ShearsError("the shears lm-eval tasks read local LLM-Adapters files: pass "
                          "--metadata '{\"data_dir\": \"/path/to/llm-adapters/commonsense\"}'")
    records = load_records(Path(data_dir) / file, limit=limit)
    columns = ("instruction", "input", "output", "answer")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(
        [{key: str(record.get(key) or "") for key in columns} for record in records])})


def doc_to_text(doc: dict) -> str:
    return format_prompt(doc)


def doc_to_choice(doc: dict) -> list[str]:
    return choice_continuations(doc, choice_labels(doc))


def doc_to_target(doc: dict) -> int:
    return choice_labels(doc).index(doc["answer"].strip())
