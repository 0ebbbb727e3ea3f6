"""shears.data: sources, the arithmetic generator, prompt/label masking, collation, splits, calibration.

`char_tokenizer()` is strictly character-level (one id per character), so the expected token ids are
written here independently as `[vocab[c] for c in text]`."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer, one_line_error
from tokenizers import Regex, pre_tokenizers, processors

from shears.data import (
    FIELDS,
    IGNORE_INDEX,
    Collator,
    TokenizedDataset,
    arithmetic_records,
    calibration_input_ids,
    format_example,
    format_prompt,
    load_records,
    split_validation,
    to_answer_format,
    tokenize_example,
)

RECORDS = [
    {"instruction": "What is 2 + 3?", "input": "", "output": "2 + 3 = 5. The answer is 5.", "answer": "5"},
    {"instruction": "Is the sky green?", "input": "Answer true or false.", "output": "the correct answer is false",
     "answer": "false"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue.", "answer": None},
]


def write_json(path, value):
    path.write_text(json.dumps(value))
    return path


def char_tokenizer():
    """conftest's tiny tokenizer with one token per character; its own splits on `.`, which skips
    newlines, so a run of newlines there becomes a single <unk>."""
    tokenizer = make_tiny_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return tokenizer


def char_ids(tokenizer, text):
    vocab = tokenizer.get_vocab()
    return [vocab[c] for c in text]


# ----------------------------------------------------------------------------- sources


def test_llm_adapters_json_list(tmp_path):
    raw = [dict(r) for r in RECORDS]
    raw[0]["answer"] = 5  # numbers become strings
    del raw[2]["input"]  # a missing input is the empty string
    records = load_records(write_json(tmp_path / "train.json", raw))
    assert records == [RECORDS[0], RECORDS[1], {**RECORDS[2], "input": ""}]
    assert all(set(r) == set(FIELDS) for r in records)


def test_json_object_with_data_list(tmp_path):
    assert load_records(write_json(tmp_path / "d.json", {"data": RECORDS})) == RECORDS


def renamed(record):
    return {"question": record["instruction"], "context": record["input"], "rationale": record["output"],
            "label": record["answer"], "extra": "ignored"}


FIELD_MAP = {"instruction": "question", "input": "context", "output": "rationale", "answer": "label"}


def test_json_with_fields_mapping(tmp_path):
    path = write_json(tmp_path / "qa.json", [renamed(r) for r in RECORDS])
    assert load_records(path, fields=FIELD_MAP) == RECORDS


def test_jsonl_with_fields_mapping_skips_blank_lines(tmp_path):
    lines = [json.dumps(renamed(r)) for r in RECORDS]
    path = tmp_path / "qa.jsonl"
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")
    assert load_records(path, fields=FIELD_MAP) == RECORDS


def test_csv_with_fields_mapping(tmp_path):
    path = tmp_path / "qa.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["question", "rationale", "label"])
        writer.writeheader()
        for r in RECORDS[:2]:
            writer.writerow({"question": r["instruction"], "rationale": r["output"], "label": r["answer"]})
    records = load_records(path, fields={"instruction": "question", "output": "rationale", "answer": "label"})
    assert records == [{**r, "input": ""} for r in RECORDS[:2]]


def test_several_sources_are_concatenated_in_order(tmp_path):
    a = write_json(tmp_path / "a.json", RECORDS[:1])
    b = write_json(tmp_path / "b.json", RECORDS[1:])
    assert load_records([a, str(b)]) == RECORDS


def test_limit_keeps_a_seeded_subset_in_original_order(tmp_path):
    raw = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(30)]
    path = write_json(tmp_path / "many.json", raw)
    full = load_records(path)
    subset = load_records(path, limit=7, seed=1)
    assert len(subset) == 7
    positions = [full.index(r) for r in subset]
    assert positions == sorted(positions) and len(set(positions)) == 7
    assert load_records(path, limit=7, seed=1) == subset
    assert load_records(path, limit=7, seed=2) != subset
    assert load_records(path, limit=100) == full


def test_limit_must_be_positive(tmp_path):
    path = write_json(tmp_path / "d.json", RECORDS)
    one_line_error(lambda: load_records(path, limit=0), "limit=0")


# ----------------------------------------------------------------------------- builtin:arithmetic

# Each generator template with the rule that answers it, written from the question text alone.
TEMPLATES = [
    (r"\w+ has (\d+) \w+ and gets (\d+) more\. How many \w+ does \w+ have now\?", lambda a, b: a + b),
    (r"\w+ has (\d+) \w+ and gives away (\d+)\. How many \w+ are left\?", lambda a, b: a - b),
    (r"\w+ buys (\d+) boxes with (\d+) \w+ in each box\. How many \w+ is that\?", lambda a, b: a * b),
    (r"\w+ buys (\d+) bags with (\d+) \w+ in each bag, then finds (\d+) more\. How many \w+ does \w+ have\?",
     lambda a, b, c: a * b + c),
]


def solve(question):
    for index, (pattern, rule) in enumerate(TEMPLATES):
        match = re.fullmatch(pattern, question)
        if match:
            return index, rule(*map(int, match.groups()))
    raise AssertionError(f"question matches no template: {question!r}")


def test_arithmetic_answers_are_correct():
    records = load_records("builtin:arithmetic?n=300&seed=5")
    assert len(records) == 300
    kinds = set()
    for r in records:
        kind, expected = solve(r["instruction"])
        kinds.add(kind)
        assert r["answer"] == str(expected)
        assert r["input"] == ""
        assert r["output"].endswith(f"The answer is {expected}.")
        for a, op, b, result in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", r["output"]):
            assert eval(f"{a} {op} {b}") == int(result)  # every step of the worked solution is true
    assert kinds == set(range(len(TEMPLATES)))  # all difficulties occur


def test_arithmetic_is_seeded():
    same = load_records("builtin:arithmetic?n=20&seed=3")
    assert load_records("builtin:arithmetic?seed=3&n=20") == same
    assert load_records("builtin:arithmetic?n=20&seed=4") != same
    assert load_records("builtin:arithmetic?n=20") == arithmetic_records(20, seed=0)
    assert len(load_records("builtin:arithmetic")) == 1000


def test_bad_builtin_sources():
    one_line_error(lambda: load_records("builtin:poetry"), "'poetry'", "builtin:arithmetic")
    one_line_error(lambda: load_records("builtin:arithmetic?n=many"), "builtin:arithmetic?n=many")
    one_line_error(lambda: load_records("builtin:arithmetic?size=3"), "builtin:arithmetic?size=3")
    one_line_error(lambda: load_records("builtin:arithmetic?n=0"), "no records")


# ----------------------------------------------------------------------------- hub:


def test_hub_unreachable_is_one_line_error(monkeypatch):
    import datasets
    import huggingface_hub

    # Offline mode is read once at import; set the variable and the already-imported flags alike.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    message = one_line_error(lambda: load_records("hub:shears-tests/no-such-dataset:train"),
                             "'shears-tests/no-such-dataset'", "pass the file")
    assert "Offline" in message or "reach" in message  # the cause, not only a type name


# ----------------------------------------------------------------------------- real LLM-Adapters files


@pytest.mark.parametrize("relative", ["math/train.json", "commonsense/boolq_train.json"])
def test_real_llm_adapters_files(llm_adapters_dir, relative):
    path = llm_adapters_dir / relative
    raw = json.loads(path.read_text())
    records = load_records(path)
    assert len(records) == len(raw) > 1000
    for record, item in zip(records, raw):
        assert set(record) == set(FIELDS)
        assert all(isinstance(record[f], str) for f in FIELDS)
        assert record["instruction"] and record["answer"]  # (a few math outputs are empty in the source)
        assert record == {f: str(item[f]) for f in FIELDS}


# ----------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    one_line_error(lambda: load_records(tmp_path / "nope.json"), "not found", "nope.json")


def test_empty_set(tmp_path):
    one_line_error(lambda: load_records(write_json(tmp_path / "empty.json", [])), "empty.json", "no records")
    (tmp_path / "empty.jsonl").write_text("\n")
    one_line_error(lambda: load_records(tmp_path / "empty.jsonl"), "empty.jsonl", "no records")
    one_line_error(lambda: load_records([]), "no data sources")


def test_record_not_an_object(tmp_path):
    path = write_json(tmp_path / "mixed.json", [RECORDS[0], ["a", "list"]])
    one_line_error(lambda: load_records(path), "mixed.json", "record 1", "list", "not an object")


def test_top_level_not_a_list(tmp_path):
    one_line_error(lambda: load_records(write_json(tmp_path / "d.json", {"a": 1})), "d.json", "JSON list")


def test_missing_field_names_file_record_and_field(tmp_path):
    raw = [RECORDS[0], RECORDS[1], {"instruction": "no output here"}]
    path = write_json(tmp_path / "gaps.json", raw)
    one_line_error(lambda: load_records(path), "gaps.json", "record 2", "'output'", "data.fields.output")
    mapped = write_json(tmp_path / "renamed.json", [renamed(RECORDS[0]), {"question": "q"}])
    one_line_error(lambda: load_records(mapped, fields=FIELD_MAP), "renamed.json", "record 1", "'rationale'")


def test_unknown_field_in_mapping(tmp_path):
    path = write_json(tmp_path / "d.json", RECORDS)
    one_line_error(lambda: load_records(path, fields={"instrution": "question"}), "'instrution'", "instruction")


def test_unknown_extension(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    one_line_error(lambda: load_records(tmp_path / "notes.txt"), "notes.txt", "'.txt'", ".jsonl")


def test_invalid_json_and_jsonl_name_the_line(tmp_path):
    (tmp_path / "bad.json").write_text('[{"instruction": "a",\n "output": }]')
    one_line_error(lambda: load_records(tmp_path / "bad.json"), "bad.json", "line 2")
    lines = [json.dumps(r) for r in RECORDS[:2]] + ["{not json"]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines))
    one_line_error(lambda: load_records(tmp_path / "bad.jsonl"), "bad.jsonl", "line 3")


# ----------------------------------------------------------------------------- prompts and tokens


def test_prompt_templates():
    plain, with_input = format_prompt(RECORDS[0]), format_prompt(RECORDS[1])
    assert plain.endswith("### Instruction:\nWhat is 2 + 3?\n\n### Response:\n")
    assert "### Input:" not in plain
    assert with_input.endswith("### Instruction:\nIs the sky green?\n\n### Input:\nAnswer true or false."
                               "\n\n### Response:\n")
    assert format_example(RECORDS[1]) == (with_input, RECORDS[1]["output"])


def bos_tokenizer():
    """The tiny tokenizer, but adding <s> in front like Llama's: the prompt then has one more token."""
    tokenizer = char_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    return tokenizer


@pytest.mark.parametrize("make_tokenizer, specials", [(char_tokenizer, []), (bos_tokenizer, [1])])
def test_labels_mask_exactly_the_prompt(make_tokenizer, specials):
    tokenizer = make_tokenizer()
    record = RECORDS[1]
    prompt, response = format_example(record)
    prompt_ids = specials + char_ids(tokenizer, prompt)
    expected = prompt_ids + char_ids(tokenizer, response) + [tokenizer.eos_token_id]
    example = tokenize_example(tokenizer, record, cutoff_len=10_000)
    assert example["input_ids"] == expected
    assert example["attention_mask"] == [1] * len(expected)
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + expected[len(prompt_ids):]
    assert example["input_ids"][-1] == tokenizer.eos_token_id  # EOS ends the response
    assert tokenizer.decode(example["input_ids"][len(prompt_ids):-1]) == response

    on_inputs = tokenize_example(tokenizer, record, cutoff_len=10_000, train_on_inputs=True)
    assert on_inputs["input_ids"] == expected and on_inputs["labels"] == expected


def test_cutoff_len_truncates():
    tiny_tokenizer = char_tokenizer()
    record = RECORDS[0]
    prompt, response = format_example(record)
    full_ids = char_ids(tiny_tokenizer, prompt + response) + [tiny_tokenizer.eos_token_id]
    full_labels = [IGNORE_INDEX] * len(prompt) + full_ids[len(prompt):]
    for cutoff in (len(prompt) - 5, len(prompt) + 4, len(full_ids) - 1, len(full_ids)):
        example = tokenize_example(tiny_tokenizer, record, cutoff_len=cutoff)
        assert example["input_ids"] == full_ids[:cutoff]
        assert example["labels"] == full_labels[:cutoff]
        assert example["attention_mask"] == [1] * cutoff
    cut_in_prompt = tokenize_example(tiny_tokenizer, record, cutoff_len=len(prompt) - 5)
    assert set(cut_in_prompt["labels"]) == {IGNORE_INDEX}
    assert tokenize_example(tiny_tokenizer, record, cutoff_len=len(full_ids) - 1)["input_ids"][-1] != 2


def test_tokenized_dataset_matches_tokenize_example(tiny_tokenizer):
    dataset = TokenizedDataset(tiny_tokenizer, RECORDS, cutoff_len=64, train_on_inputs=True)
    assert len(dataset) == len(RECORDS)
    for index, record in enumerate(RECORDS):
        assert dataset[index] == tokenize_example(tiny_tokenizer, record, 64, train_on_inputs=True)


def test_collator_right_pads(tiny_tokenizer):
    features = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {"input_ids": [8, 9, 10, 11, 12, 13, 14], "attention_mask": [1] * 7, "labels": [-100] * 4 + [12, 13, 14]},
        {"input_ids": [15, 16], "attention_mask": [1, 1]},  # no labels: the ids are the labels
    ]
    batch = Collator(tiny_tokenizer, pad_to_multiple_of=None)(features)
    pad = tiny_tokenizer.pad_token_id
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7] + [pad] * 4, [8, 9, 10, 11, 12, 13, 14], [15, 16] + [pad] * 5]
    assert batch["attention_mask"].tolist() == [[1] * 3 + [0] * 4, [1] * 7, [1] * 2 + [0] * 5]
    assert batch["labels"].tolist() == [[-100, 6, 7] + [-100] * 4, [-100] * 4 + [12, 13, 14],
                                        [15, 16] + [-100] * 5]


def test_collator_pads_to_multiple_of_8_by_default(tiny_tokenizer):
    collate = Collator(tiny_tokenizer)
    assert collate([{"input_ids": [5] * 7, "attention_mask": [1] * 7}])["input_ids"].shape == (1, 8)
    assert collate([{"input_ids": [5] * 8, "attention_mask": [1] * 8}])["input_ids"].shape == (1, 8)
    assert collate([{"input_ids": [5] * 9, "attention_mask": [1] * 9}])["input_ids"].shape == (1, 16)


def test_padding_leaves_the_loss_unchanged(tiny_tokenizer):
    """Right padding with masked attention and -100 labels: each example's loss is what it is alone."""
    model = make_tiny_model("llama")
    examples = [tokenize_example(tiny_tokenizer, r, cutoff_len=256) for r in RECORDS]
    batch = Collator(tiny_tokenizer)(examples)
    assert len({len(e["input_ids"]) for e in examples}) > 1  # padding really happens
    assert all(set(e["labels"]) != {IGNORE_INDEX} for e in examples)  # every example has response tokens
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for row, example in enumerate(examples):
            alone = torch.tensor([example["input_ids"]])
            expected = model(input_ids=alone, labels=torch.tensor([example["labels"]])).loss
            labels = batch["labels"][row, 1:]
            keep = labels != IGNORE_INDEX
            got = torch.nn.functional.cross_entropy(logits[row, :-1][keep], labels[keep])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- validation split


def numbered(n):
    return [{"instruction": f"q{i}", "input": "", "output": f"a{i}", "answer": str(i)} for i in range(n)]


def ids(records):
    return [int(r["answer"]) for r in records]


def test_a_prefix_of_the_validation_split_samples_every_file_not_the_first():
    # two "files" back to back, as load_records joins them: a prefix of the split (eval_limit, rungs)
    # must hold both, in about their shares, where the files' order would give the first file only
    first, second = numbered(300), [{**r, "answer": str(1000 + int(r["answer"]))} for r in numbered(300)]
    _, val = split_validation(first + second, 200, seed=0)
    prefix = ids(val[:50])
    from_second = sum(i >= 1000 for i in prefix)
    assert 10 <= from_second <= 40, prefix  # binomial(50, 1/2): outside [10, 40] has probability < 1e-5


def test_split_validation_sizes_disjoint_ordered():
    records = numbered(50)
    train, val = split_validation(records, 10, seed=3)
    assert len(train) == 40 and len(val) == 10
    assert set(ids(train)).isdisjoint(ids(val))
    assert sorted(ids(train) + ids(val)) == list(range(50))
    assert ids(train) == sorted(ids(train))  # training keeps the files' order
    assert ids(val) == np.random.default_rng(3).permutation(50)[:10].tolist()  # validation: the seeded draw's
    assert split_validation(records, 10, seed=3) == (train, val)
    assert ids(split_validation(records, 10, seed=4)[1]) != ids(val)
    assert len(split_validation(records, 0.2, seed=3)[1]) == 10  # a fraction below 1
    assert len(split_validation(records, 10.0, seed=3)[1]) == 10  # recipes hold val_size as a float
    assert split_validation(records, 0, seed=3) == (records, [])


@pytest.mark.parametrize("val_size", [50, 51, 1000])
def test_split_validation_refuses_to_leave_no_training_data(val_size):
    one_line_error(lambda: split_validation(numbered(50), val_size), "50 records", "data.val_size")


@pytest.mark.parametrize("val_size", [-1, 2.5])
def test_split_validation_refuses_meaningless_sizes(val_size):
    one_line_error(lambda: split_validation(numbered(50), val_size), str(val_size), "data.val_size")


# ----------------------------------------------------------------------------- calibration


def test_calibration_windows():
    tiny_tokenizer = char_tokenizer()
    records = load_records("builtin:arithmetic?n=40&seed=1")
    eos = tiny_tokenizer.eos_token_id
    texts = [tuple(char_ids(tiny_tokenizer, "".join(format_example(r)))) for r in records]
    ids = calibration_input_ids(tiny_tokenizer, records, nsamples=6, seqlen=300, seed=7)
    assert ids.shape == (6, 300) and ids.dtype == torch.long
    assert torch.equal(ids, calibration_input_ids(tiny_tokenizer, records, 6, 300, seed=7))
    assert not torch.equal(ids, calibration_input_ids(tiny_tokenizer, records, 6, 300, seed=8))
    # Every window is a stretch of whole examples joined by EOS: inner pieces are complete examples,
    # the first piece ends one, the last piece starts one.
    for row in ids.tolist():
        pieces, piece = [], []
        for token in row:
            if token == eos:
                pieces.append(tuple(piece))
                piece = []
            else:
                piece.append(token)
        pieces.append(tuple(piece))
        assert len(pieces) >= 2  # 300 tokens span more than one example
        assert any(t[len(t) - len(pieces[0]):] == pieces[0] for t in texts)
        assert all(p in texts for p in pieces[1:-1])
        assert any(t[:len(pieces[-1])] == pieces[-1] for t in texts)


def test_calibration_errors(tiny_tokenizer):
    one_line_error(lambda: calibration_input_ids(tiny_tokenizer, [], 4, 16), "calibration set is empty")
    one_line_error(lambda: calibration_input_ids(tiny_tokenizer, RECORDS, 0, 16), "nsamples > 0")
    one_line_error(lambda: calibration_input_ids(tiny_tokenizer, RECORDS[:1], 2, 5000), "seqlen=5000")


# --------------------------------------------------------------------------- answer formats

ARC_RECORD = {"instruction": "Please choose the correct answer to the question: Which gas do plants take in?\n\n"
                             "Answer1: oxygen Answer2: carbon dioxide: CO2 Answer3: helium Answer4: neon\n\n"
                             "Answer format: answer1/answer2/answer3/answer4",
              "input": "", "output": "the correct answer is answer2", "answer": "answer2"}
BOOLQ_RECORD = {"instruction": "Please answer the following question with true or false, question: is ice hot?"
                               "\n\nAnswer format: true/false",
                "input": "", "output": "the correct answer is false", "answer": "false"}
PIQA_RECORD = {"instruction": "Please choose the correct solution to the question: How do I dry a wet phone?\n\n"
                              "Solution1: Put it in rice.\n\nSolution2: Put it in soup.\n\n"
                              "Answer format: solution1/solution2",
               "input": "", "output": "the correct answer is solution1", "answer": "solution1"}
WINOGRANDE_RECORD = {"instruction": "Please choose the correct answer to fill in the blank to complete the given "
                                    "sentence: Sarah was a better surgeon than Maria so _ got the easier cases.\n\n"
                                    "Option1: Sarah\nOption2: Maria Answer format: option1/option2",
                     "input": "", "output": "the correct answer is option2", "answer": "option2"}


@pytest.mark.parametrize("record, question, choices, gold", [
    # an option holding a colon stays whole: markers are found in order, not by splitting on ":"
    (ARC_RECORD, "Which gas do plants take in?", ["oxygen", "carbon dioxide: CO2", "helium", "neon"], 1),
    # true/false are their own texts; the informative lead-in stays
    (BOOLQ_RECORD, "Please answer the following question with true or false, question: is ice hot?",
     ["true", "false"], 1),
    (PIQA_RECORD, "How do I dry a wet phone?", ["Put it in rice.", "Put it in soup."], 0),
    (WINOGRANDE_RECORD, "Please choose the correct answer to fill in the blank to complete the given sentence: "
                        "Sarah was a better surgeon than Maria so _ got the easier cases.", ["Sarah", "Maria"], 1),
])
def test_content_format_makes_the_gold_option_text_the_response(record, question, choices, gold):
    (rewritten,) = to_answer_format([record], "content")
    assert rewritten == {"instruction": question, "input": "", "output": choices[gold], "answer": choices[gold],
                         "choices": choices}
    assert to_answer_format([record], "label") == [record]  # the default leaves records untouched
    assert to_answer_format([rewritten], "content") == [rewritten]  # idempotent


def test_content_records_round_trip_through_a_file(tmp_path):
    rewritten = to_answer_format([ARC_RECORD, BOOLQ_RECORD], "content")
    path = tmp_path / "content.json"
    write_json(path, rewritten)
    assert load_records(path) == rewritten


@pytest.mark.parametrize("record, why", [
    ({**ARC_RECORD, "instruction": "Which gas do plants take in? Answer1: oxygen Answer2: neon"}, "Answer format"),
    ({**ARC_RECORD, "instruction": ARC_RECORD["instruction"].replace("Answer3: helium ", "")}, "'answer3' of the"),
    ({**ARC_RECORD, "answer": "answer7"}, "not among the labels"),
    ({**ARC_RECORD, "instruction": ARC_RECORD["instruction"].replace("neon", "")}, "'answer4' has no text"),
    ({**ARC_RECORD, "instruction": "Answer1: a Answer2: b\n\nAnswer format: answer1/answer2", "answer": "answer1"},
     "no question"),
])
def test_a_record_that_cannot_be_rewritten_is_a_one_line_error(record, why):
    one_line_error(lambda: to_answer_format([ARC_RECORD, record], "content"), "record 1", why,
                   "data.answer_format=label")


def test_unknown_answer_format_is_refused():
    one_line_error(lambda: to_answer_format([ARC_RECORD], "text"), "label or content")


def test_recipe_splits_apply_the_answer_format(tmp_path):
    from shears.recipe import load_recipe
    from shears.run import recipe_splits

    path = tmp_path / "mc.json"
    write_json(path, [ARC_RECORD, BOOLQ_RECORD, PIQA_RECORD, WINOGRANDE_RECORD])
    train, val = recipe_splits(load_recipe(None, {"data.train": str(path), "data.val_size": 1,
                                                  "data.answer_format": "content"}))
    assert len(train) == 3 and len(val) == 1
    assert all(r["output"] == r["answer"] and r["answer"] in r["choices"] for r in train + val)
    one_line_error(lambda: load_recipe(None, {"data.answer_format": "text"}), "data.answer_format", "label or content")


def test_real_multiple_choice_files_rewrite_completely(llm_adapters_dir):
    """Every record of every LLM-Adapters commonsense file rewrites, with one text per listed label,
    the gold text in its place, and no option text swallowing a following marker."""
    for path in sorted((llm_adapters_dir / "commonsense").glob("*.json")):
        records = load_records(path)
        for record, rewritten in zip(records, to_answer_format(records, "content")):
            labels = record["instruction"].rsplit("Answer format:", 1)[1].strip().split("/")
            assert len(rewritten["choices"]) == len(labels), path.name
            assert rewritten["choices"][labels.index(record["answer"])] == rewritten["output"], path.name
            assert not any(re.search(r"(?i)\b(answer|solution|option)\d+\s*:", text) for text in rewritten["choices"])
            assert "Answer format" not in rewritten["instruction"] and rewritten["instruction"]
