"""Evaluation: every number checked against an independent, hand-written computation on tiny models.

The references below run the model the plainest way there is (one unpadded sequence, no cache, full
logits) so that batching, padding, row sharing, logits_to_keep and SuperNet slicing in
shears.evaluate each have something obviously correct to be compared with.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from conftest import ARCHITECTURES, make_tiny_model, make_tiny_tokenizer
from shears.data import format_prompt, to_answer_format
from shears.elastic import SuperNet
from shears.errors import ShearsError
from shears.evaluate import (
    Continuations,
    _candidate_rows,
    _shared_prompt,
    completion_finished,
    generate_completions,
    truncate_completion,
    score_continuations,
    choice_continuations,
    choice_labels,
    evaluate,
    extract_number,
    extract_option,
    gold_number,
    main,
    score_math,
)
from shears.precision import resolve_bf16
from shears.search_space import SearchSpace

REPO = Path(__file__).resolve().parents[1]


def tiny_model(arch="llama", seed=0):
    # initializer_range 0.5 (not 0.02): near-uniform logits would make every prompt generate the same
    # text, and then a padding or position bug could not change anything a test looks at.
    return make_tiny_model(arch, seed=seed, max_position_embeddings=1024, initializer_range=0.5)


TOKENIZER = make_tiny_tokenizer()

# ----------------------------------------------------------------------------- real-looking records

BOOLQ = {"instruction": "Please answer the following question with true or false, question: is the sun a star?"
                        "\n\nAnswer format: true/false",
         "input": "", "output": "the correct answer is true", "answer": "true"}
ARC = {"instruction": "Please choose the correct answer to the question: Which gas do plants take in?\n\n"
                      "Answer1: oxygen Answer2: carbon dioxide Answer3: helium Answer4: neon\n\n"
                      "Answer format: answer1/answer2/answer3/answer4",
       "input": "", "output": "the correct answer is answer2", "answer": "answer2"}
ARC5 = {"instruction": "Please choose the correct answer to the question: Which is a mammal?\n\n"
                       "Answer1: shark Answer2: whale Answer3: trout Answer4: frog Answer5: crab\n\n"
                       "Answer format: answer1/answer2/answer3/answer4/answer5",
        "input": "", "output": "the correct answer is answer2", "answer": "answer2"}
OBQA = {"instruction": "Please choose the correct answer to the question: The sun is responsible for\n\n"
                       "Answer1: puppies learning Answer2: kids aging Answer3: vases Answer4: plants sprouting\n\n"
                       "Answer format: answer1/answer2/answer3/answer4",
        "input": "", "output": "the correct answer is answer4", "answer": "answer4"}
PIQA = {"instruction": "Please choose the correct solution to the question: How do I dry a wet phone?\n\n"
                       "Solution1: Put it in rice.\n\nSolution2: Put it in soup.\n\nAnswer format: solution1/solution2",
        "input": "", "output": "the correct answer is solution1", "answer": "solution1"}
SIQA = {"instruction": "Please choose the correct answer to the question: Tracy stayed out. What does Tracy need?"
                       "\n\nAnswer1: a plan Answer2: go home Answer3: a place\n\nAnswer format: answer1/answer2/answer3",
        "input": "", "output": "the correct answer is answer3", "answer": "answer3"}
WINOGRANDE = {"instruction": "Please choose the correct answer to fill in the blank to complete the given sentence: "
                             "Sarah was a better surgeon than Maria so _ got the easier cases.\n\n"
                             "Option1: Sarah\n\nOption2: Maria\n\nAnswer format: option1/option2",
              "input": "", "output": "the correct answer is option2", "answer": "option2"}
CHOICE_RECORDS = [BOOLQ, ARC, ARC5, OBQA, PIQA, SIQA, WINOGRANDE,
                  {**BOOLQ, "instruction": BOOLQ["instruction"].replace("the sun a star", "ice hot"),
                   "output": "the correct answer is false", "answer": "false"}]

MATH_RECORDS = [
    {"instruction": "Tom has 5 apples and eats 2. How many are left?", "input": "", "output": "5 - 2 = 3. The answer is 3.",
     "answer": "3"},
    {"instruction": "What is 7 * 8?", "input": "", "output": "The answer is 56.", "answer": "56.0"},
    {"instruction": "Ana buys 3 bags with 4 pens each and finds 2 more pens on the way home from school.",
     "input": "", "output": "", "answer": "14"},
    {"instruction": "Add.", "input": "12 and 30", "output": "12 + 30 = 42.", "answer": "42"},
    {"instruction": "A train goes 60 km in an hour. How far in 2 hours?", "input": "", "output": "120 km.",
     "answer": "120"},
]


# ----------------------------------------------------------------------------- independent references


def prompt_ids(record):
    return TOKENIZER(format_prompt(record))["input_ids"]


@torch.no_grad()
def reference_logprob(model, record, continuation):
    """Sum of log p(continuation token | everything before it), one unpadded sequence."""
    context = prompt_ids(record)
    tokens = TOKENIZER(continuation, add_special_tokens=False)["input_ids"]
    logp = model(input_ids=torch.tensor([context + tokens])).logits[0].log_softmax(-1)
    return sum(float(logp[len(context) - 1 + j, t]) for j, t in enumerate(tokens))


@torch.no_grad()
def reference_losses(model, records, cutoff_len):
    """(per record: summed response-token NLL and its token count) on prompt + output + EOS cut to cutoff_len."""
    out = []
    for record in records:
        prompt = prompt_ids(record)
        response = TOKENIZER(record["output"], add_special_tokens=False)["input_ids"] + [TOKENIZER.eos_token_id]
        ids = (prompt + response)[:cutoff_len]
        targets = ids[len(prompt):]
        if not targets:
            out.append((0.0, 0))
            continue
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        nll = F.cross_entropy(logits[len(prompt) - 1:len(ids) - 1], torch.tensor(targets), reduction="sum")
        out.append((float(nll), len(targets)))
    return out


@torch.no_grad()
def reference_greedy(model, record, max_new_tokens):
    """Greedy decoding by hand: full forward pass per step, stop at EOS, once "###" appears, or once a
    line "The answer is ...<digit or option>..." has ended with a newline."""
    ids, new = prompt_ids(record), []
    for _ in range(max_new_tokens):
        token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        new.append(token)
        text = TOKENIZER.decode(new, skip_special_tokens=True)
        answer_line = re.search(r"(?i:the answer is)[^\n]*(\d|\([A-Ea-e]\)|\b[A-E]\b)[^\n]*\n", text)
        if token == TOKENIZER.eos_token_id or "###" in text or answer_line:
            break
    return TOKENIZER.decode(new, skip_special_tokens=True)


# ----------------------------------------------------------------------------- math extraction

MATH_CASES = [  # completion, gold answer, expected prediction, expected correct
    ("He had 5 and lost 8, so 5 - 8 = -3. The answer is -3.", "-3", -3.0, True),
    ("The temperature fell to -12.5 degrees", "-12.5", -12.5, True),
    ("Half of 7 is 3.5.", "3.5", 3.5, True),
    ("Each costs .25 dollars", "0.25", 0.25, True),
    ("In total the farm has 1,234 apples.", "1234", 1234.0, True),
    ("Together they pay $1,234.50 in all.", "1234.5", 1234.5, True),
    ("So she spends $12", "12", 12.0, True),
    ("So she spends $12", "$12", 12.0, True),
    ("He ends up with 12 apples", "12.0", 12.0, True),
    ("They walk 5 km.", "5", 5.0, True),
    ("The answer is 12.", "12", 12.0, True),
    ("The answer is 12.", "13", 12.0, False),
    ("3 + 4 = 7 and 7 * 2 = 14. The answer is 14.", "14.0", 14.0, True),
    ("The game ended 10-4", "4", 4.0, True),  # a hyphen between numbers is no minus sign
    ("One third of 0.5 is 0.1667", "0.16666666666666666", 0.1667, True),  # within the 1e-3 tolerance
    ("The answer is 12.01", "12", 12.01, False),  # outside it
    ("The answer is 4.\n\n### Instruction:\nWhat is 7 + 8?\n\n### Response:\n15", "4", 4.0, True),
    ("I am not sure how to solve this.", "4", None, False),
    ("", "4", None, False),
]

OPTION_CASES = [  # AQuA: completion, gold letter, expected prediction, expected correct
    ("A train covers 60 km in one hour, so in 2 hours it covers 120 km. The answer is C.", "C", "C", True),
    ("A man buys it. Among the options (B) looks close, but the answer is (D).", "D", "D", True),
    ("A quick check: 12 * 5 = 60, which is option (E).", "E", "E", True),
    ("A is tempting. All in all, B fits best.", "B", "B", True),
    ("The answer is a bit tricky; ruling out the rest leaves (B).", "B", "B", True),
    ("Answer: B", "(B)", "B", True),
    ("The answer is C.", "A", "C", False),
    ("I cannot decide.", "A", None, False),
]


@pytest.mark.parametrize("completion, gold, expected, correct", MATH_CASES)
def test_math_extraction(completion, gold, expected, correct):
    predicted, ok = score_math(completion, gold)
    if expected is None:
        assert predicted is None
    else:
        assert predicted == pytest.approx(expected, abs=1e-9)
    assert ok is correct


@pytest.mark.parametrize("completion, gold, expected, correct", OPTION_CASES)
def test_option_extraction_reads_the_final_answer_sentence(completion, gold, expected, correct):
    predicted, ok = score_math(completion, gold)
    assert predicted == expected
    assert ok is correct


def test_extractors_directly():
    assert extract_number("costs $1,234,567.5 in total") == 1234567.5
    assert extract_number("3,4 and 5") == 5.0  # not a thousands group
    assert extract_option("A cat sat.") == "A"  # the only option-like letter there is
    assert gold_number("1,000") == 1000.0 and gold_number("abc") is None
    with pytest.raises(ShearsError, match="neither a number nor an option"):
        score_math("The answer is 4.", "four")


# ----------------------------------------------------------------------------- choice candidates


@pytest.mark.parametrize("record, labels", [
    (BOOLQ, ["true", "false"]),
    (ARC, ["answer1", "answer2", "answer3", "answer4"]),
    (ARC5, ["answer1", "answer2", "answer3", "answer4", "answer5"]),
    (OBQA, ["answer1", "answer2", "answer3", "answer4"]),
    (PIQA, ["solution1", "solution2"]),
    (SIQA, ["answer1", "answer2", "answer3"]),
    (WINOGRANDE, ["option1", "option2"]),
    # no "Answer format" line: the gold label's family, counted from "AnswerK:" in the instruction
    ({**ARC5, "instruction": ARC5["instruction"].split("\n\nAnswer format")[0]},
     ["answer1", "answer2", "answer3", "answer4", "answer5"]),
    ({**BOOLQ, "instruction": "Is ice cold?"}, ["true", "false"]),
])
def test_choice_labels_and_continuations(record, labels):
    assert choice_labels(record) == labels
    assert choice_continuations(record, labels) == [f"the correct answer is {label}" for label in labels]


def test_choice_candidates_follow_the_record_output_and_explicit_choices():
    record = {**PIQA, "output": "Solution: solution1 (by common sense)"}
    assert choice_continuations(record, ["solution1", "solution2"]) == \
        ["Solution: solution1 (by common sense)", "Solution: solution2 (by common sense)"]
    assert choice_labels(ARC, ["x", "y"]) == ["x", "y"]
    with pytest.raises(ShearsError, match="--choices"):
        choice_labels({"instruction": "Pick one.", "input": "", "output": "it", "answer": "it"})


# ----------------------------------------------------------------------------- choice scoring


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_choice_scores_equal_hand_computed_loglikelihoods(arch):
    model = tiny_model(arch)
    result = evaluate(model, TOKENIZER, CHOICE_RECORDS, "choice", batch_size=3, progress=False)
    correct = correct_norm = 0
    right = []  # each question: answered right by the hand-computed sums?
    for record, pred in zip(CHOICE_RECORDS, result["predictions"]):
        labels = choice_labels(record)
        continuations = choice_continuations(record, labels)
        sums = [reference_logprob(model, record, c) for c in continuations]
        per_char = [s / len(c) for s, c in zip(sums, continuations)]
        assert pred["choices"] == labels
        torch.testing.assert_close(torch.tensor(pred["logprobs"]), torch.tensor(sums), rtol=1e-5, atol=1e-4)
        assert pred["prediction"] == labels[max(range(len(labels)), key=lambda k: sums[k])]
        assert pred["prediction_norm"] == labels[max(range(len(labels)), key=lambda k: per_char[k])]
        correct += pred["prediction"] == record["answer"]
        correct_norm += pred["prediction_norm"] == record["answer"]
        right.append(float(pred["prediction"] == record["answer"]))
    assert result["per_record"] == right
    assert result["accuracy"] == correct / len(CHOICE_RECORDS)
    assert result["accuracy_norm"] == correct_norm / len(CHOICE_RECORDS)
    assert result["n"] == len(CHOICE_RECORDS)


@torch.no_grad()
def reference_token_logprobs(model, context, tokens):
    """log p(token | everything before it) per continuation token: one unpadded sequence, no cache."""
    logp = model(input_ids=torch.tensor([context + tokens])).logits[0].float().log_softmax(-1)
    return torch.tensor([float(logp[len(context) - 1 + j, t]) for j, t in enumerate(tokens)])


def continuation_requests():
    """Contexts of different lengths sharing a template header; continuations of different lengths, some
    a prefix of another, some differing only in the last token, one a single token (the option-text case)."""
    requests = []
    for k, record in enumerate(CHOICE_RECORDS[:6]):
        texts = ["the correct answer is yes", "the correct answer is no, not at all", "the correct answer is",
                 "x", f"option {k}", f"option {k + 1}"][:3 + k % 4]
        requests.append(Continuations(prompt_ids(record), [TOKENIZER(t, add_special_tokens=False)["input_ids"]
                                                             for t in texts]))
    return requests


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("share_prompt", [True, False])
def test_continuation_scores_equal_one_sequence_references(arch, share_prompt):
    # gemma3 gets a window beyond these rows so that the cached layout runs on it too
    model = tiny_model(arch) if arch != "gemma3" else make_tiny_model(
        arch, max_position_embeddings=1024, initializer_range=0.5, sliding_window=1024)
    requests = continuation_requests()
    scored = score_continuations(model, requests, TOKENIZER.pad_token_id, batch_size=4, share_prompt=share_prompt)
    for request, logprobs in zip(requests, scored):
        assert len(logprobs) == len(request.continuations)
        for tokens, got in zip(request.continuations, logprobs):
            torch.testing.assert_close(got, reference_token_logprobs(model, request.context, tokens),
                                       rtol=1e-5, atol=1e-4)


def test_a_sliding_window_shorter_than_the_rows_falls_back_to_full_rows():
    model = make_tiny_model("gemma3", max_position_embeddings=1024, initializer_range=0.5)  # window 16
    requests = continuation_requests()[:3]
    for request, logprobs in zip(requests, score_continuations(model, requests, TOKENIZER.pad_token_id)):
        for tokens, got in zip(request.continuations, logprobs):
            torch.testing.assert_close(got, reference_token_logprobs(model, request.context, tokens),
                                       rtol=1e-5, atol=1e-4)


def test_shared_prompt_runs_each_context_once():
    """The point of sharing: the model sees each context token once (plus the shared header once), not
    once per candidate row."""
    model = tiny_model()
    requests = continuation_requests()
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    try:
        score_continuations(model, requests, TOKENIZER.pad_token_id, batch_size=len(requests))
    finally:
        hook.remove()
    header = 0
    while all(r.context[header] == requests[0].context[header] for r in requests):
        header += 1
    plain_rows = sum(sum(len(row) for row in _candidate_rows(r)[0]) for r in requests)
    assert seen[0] == header  # the template header, run once for the whole call
    assert len(seen) == 3  # then one pass over the contexts, one over the candidates' remainders
    assert sum(seen) < 0.5 * plain_rows


def test_length_normalised_choice_divides_by_characters():
    model = tiny_model()
    record = {"instruction": "Is the sky blue on a clear day?", "input": "", "output": "the correct answer is yes",
              "answer": "yes"}
    choices = ["yes", "no, not at all"]
    pred = evaluate(model, TOKENIZER, [record], "choice", choices=choices, progress=False)["predictions"][0]
    continuations = [f"the correct answer is {c}" for c in choices]
    sums = [reference_logprob(model, record, c) for c in continuations]
    per_char = [s / len(c) for s, c in zip(sums, continuations)]
    assert pred["prediction"] == choices[sums.index(max(sums))]
    assert pred["prediction_norm"] == choices[per_char.index(max(per_char))]
    assert pred["prediction"] != pred["prediction_norm"]  # this pair is one where the two rules disagree


CONTENT_RECORDS = to_answer_format([ARC, ARC5, OBQA, PIQA, SIQA, WINOGRANDE, BOOLQ], "content")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_content_choice_scores_each_option_text_as_the_continuation(arch):
    """Content format: the candidates are the option texts themselves, scored after the question's
    prompt; acc takes the highest sum of log-probs, acc_norm the highest per character (lm-eval's
    len(choice))."""
    model = tiny_model(arch)
    result = evaluate(model, TOKENIZER, CONTENT_RECORDS, "choice", batch_size=2, progress=False)
    correct = correct_norm = 0
    for record, pred in zip(CONTENT_RECORDS, result["predictions"]):
        texts = record["choices"]
        sums = [reference_logprob(model, record, text) for text in texts]
        per_char = [total / len(text) for total, text in zip(sums, texts)]
        assert pred["choices"] == texts
        torch.testing.assert_close(torch.tensor(pred["logprobs"]), torch.tensor(sums), rtol=1e-5, atol=1e-4)
        assert pred["prediction"] == texts[sums.index(max(sums))]
        assert pred["prediction_norm"] == texts[per_char.index(max(per_char))]
        assert pred["answer"] == record["output"]
        correct += pred["prediction"] == record["answer"]
        correct_norm += pred["prediction_norm"] == record["answer"]
    assert result["accuracy"] == correct / len(CONTENT_RECORDS)
    assert result["accuracy_norm"] == correct_norm / len(CONTENT_RECORDS)


def test_content_loss_covers_the_answer_span_only():
    """In the content format the response is the option text, so the loss task scores exactly its
    tokens (and EOS): none of the prompt's fixed words, none of "the correct answer is"."""
    model = tiny_model()
    result = evaluate(model, TOKENIZER, CONTENT_RECORDS, "loss", progress=False)
    for record, pred in zip(CONTENT_RECORDS, result["predictions"]):
        assert pred["tokens"] == len(TOKENIZER(record["choices"][record["choices"].index(record["answer"])],
                                               add_special_tokens=False)["input_ids"]) + 1
    reference = reference_losses(model, CONTENT_RECORDS, 1024)
    assert result["loss"] == pytest.approx(sum(n for n, _ in reference) / sum(t for _, t in reference), rel=1e-5)


def test_choice_refuses_a_gold_label_outside_the_candidates():
    with pytest.raises(ShearsError, match="not among the candidates"):
        evaluate(tiny_model(), TOKENIZER, [{**ARC, "answer": "answer9"}], "choice", progress=False)


# ----------------------------------------------------------------------------- loss


@pytest.mark.parametrize("cutoff_len", [1024, 200])
def test_loss_equals_hand_computed_mean_response_token_loss(cutoff_len):
    model = tiny_model()
    records = MATH_RECORDS + CHOICE_RECORDS[:2]
    reference = reference_losses(model, records, cutoff_len)
    if cutoff_len == 200:  # the cut must leave some records partly scored and some not at all
        assert any(n == 0 for _, n in reference) and any(n > 0 for _, n in reference)
    result = evaluate(model, TOKENIZER, records, "loss", batch_size=3, cutoff_len=cutoff_len, progress=False)
    total, tokens = sum(s for s, _ in reference), sum(n for _, n in reference)
    assert result["tokens"] == tokens
    assert result["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(torch.tensor(total / tokens).exp().item(), rel=1e-5)
    for pred, (s, n) in zip(result["predictions"], reference):
        assert pred["tokens"] == n
        assert (pred["loss"] is None) if n == 0 else pred["loss"] == pytest.approx(s / n, rel=1e-5)
    # the per-record values behind the score: each record's mean loss, weighted by its tokens
    assert result["per_record_weights"] == [n for _, n in reference]
    for value, (s, n) in zip(result["per_record"], reference):
        assert value == (0.0 if n == 0 else pytest.approx(s / n, rel=1e-5))
    weighted = sum(v * w for v, w in zip(result["per_record"], result["per_record_weights"])) / tokens
    assert weighted == pytest.approx(result["loss"], rel=1e-6)  # float32 per-record means


class CountingHead(torch.nn.Linear):
    """An output layer that records the [batch, positions] of every input (not a plain Linear, so
    float32_logits leaves it in place and its own forward runs)."""

    seen: list

    def forward(self, hidden):
        self.seen.append(tuple(hidden.shape[:2]))
        return super().forward(hidden)


def test_the_output_layer_sees_only_the_scored_positions():
    """The vocabulary projection is the costly part of a loss evaluation: it is given exactly one
    position per scored response token (padding and prompt positions never reach it), on a SuperNet
    as a search scores it, and the loss still equals the reference."""
    model = tiny_model()
    records = MATH_RECORDS + CHOICE_RECORDS[:2]
    reference = reference_losses(model, records, 1024)
    head = CountingHead(model.lm_head.in_features, model.lm_head.out_features, bias=False)
    head.weight, head.seen = model.lm_head.weight, []
    model.set_output_embeddings(head)
    net = SuperNet.from_base(model, SearchSpace.from_dict(SPACE))
    result = evaluate(net, TOKENIZER, records, "loss", batch_size=3, progress=False)
    assert len(head.seen) == -(-len(records) // 3) and all(rows == 1 for rows, _ in head.seen)  # each batch gathered
    assert sum(n for _, n in head.seen) == result["tokens"] == sum(n for _, n in reference)
    assert result["loss"] == pytest.approx(sum(s for s, _ in reference) / result["tokens"], rel=1e-5)


class HeadHidden(torch.nn.Module):
    """A model that offers no get_output_embeddings: its logits come back whole."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def test_a_model_without_a_reachable_output_layer_is_scored_from_its_full_logits():
    model = tiny_model()
    records = MATH_RECORDS + CHOICE_RECORDS[:2]
    reference = reference_losses(model, records, 1024)
    result = evaluate(HeadHidden(model), TOKENIZER, records, "loss", batch_size=3, progress=False)
    assert result["loss"] == pytest.approx(sum(s for s, _ in reference) / sum(n for _, n in reference), rel=1e-5)


# ----------------------------------------------------------------------------- batching


@torch.no_grad()
def reference_greedy_tokens(model, ids, max_new_tokens, stop_token):
    new = []
    for _ in range(max_new_tokens):
        new.append(int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax()))
        if new[-1] == stop_token:
            break
    return new


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_generation_drops_finished_rows_and_equals_the_reference_loop(arch):
    model = tiny_model(arch) if arch != "gemma3" else make_tiny_model(
        arch, max_position_embeddings=1024, initializer_range=0.5, sliding_window=1024)
    prompts = [prompt_ids(r) for r in MATH_RECORDS]
    # A token the model emits often stands in for EOS, so that rows finish at different steps.
    free = [reference_greedy_tokens(model, p, 16, None) for p in prompts]
    stop = max(set(sum(free, [])), key=lambda t: len({f.index(t) if t in f else None for f in free}))
    tokenizer = make_tiny_tokenizer()
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(stop)
    expected = [tokenizer.decode(reference_greedy_tokens(model, p, 16, stop), skip_special_tokens=True)
                for p in prompts]
    widths = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: widths.append(args[0].shape[0]))
    try:
        with torch.inference_mode():
            got = generate_completions(model, tokenizer, prompts, 16, _shared_prompt(model, prompts, 200))
    finally:
        hook.remove()
    assert got == expected
    if arch == "gemma3":  # its tiny random config greedy-decodes one token forever: every row stops at once
        return
    assert len({len(tokenizer(e, add_special_tokens=False)["input_ids"]) for e in expected}) > 1
    assert widths[0] == 1  # the shared template header, run once
    assert widths[1] == len(prompts) > widths[-1] and widths[1:] == sorted(widths[1:], reverse=True)  # it shrinks


@pytest.mark.parametrize("text, finished, kept", [
    ("3 + 4 = 7. The answer is 7.", False, "3 + 4 = 7. The answer is 7."),  # the line may still go on
    ("3 + 4 = 7. The answer is 7.\nNow 8 + 1 = 9.", True, "3 + 4 = 7. The answer is 7.\n"),
    ("The answer is (C).\nOr (D).", True, "The answer is (C).\n"),
    ("the answer is a bit tricky:\n2 + 2 = 4", False, "the answer is a bit tricky:\n2 + 2 = 4"),
    ("4\n\n### Instruction:\nAdd", True, "4\n\n"),
])
def test_a_completed_final_answer_line_ends_the_completion(text, finished, kept):
    assert completion_finished(text) is finished
    assert truncate_completion(text) == kept


def test_batched_math_generation_equals_unbatched_and_hand_greedy():
    model = tiny_model()
    records = MATH_RECORDS  # prompts of different lengths: the batch is left-padded
    assert len({len(prompt_ids(r)) for r in records}) == len(records)
    batched = evaluate(model, TOKENIZER, records, "math", batch_size=5, max_new_tokens=12, progress=False)
    single = evaluate(model, TOKENIZER, records, "math", batch_size=1, max_new_tokens=12, progress=False)
    expected = [reference_greedy(model, r, 12) for r in records]
    assert [p["completion"] for p in batched["predictions"]] == expected
    assert batched["predictions"] == single["predictions"]
    assert len(set(expected)) > 1  # the prompts matter, so a padding bug would show
    for record, pred in zip(records, batched["predictions"]):
        assert (pred["prediction"], pred["correct"]) == score_math(pred["completion"], record["answer"])
    assert batched["accuracy"] == sum(p["correct"] for p in batched["predictions"]) / len(records)
    assert batched["per_record"] == [float(ok) for _, ok in (score_math(e, r["answer"]) for e, r in zip(expected, records))]


@pytest.mark.parametrize("task", ["choice", "loss"])
def test_batched_scoring_equals_unbatched(task):
    model = tiny_model("qwen2")
    records = CHOICE_RECORDS
    batched = evaluate(model, TOKENIZER, records, task, batch_size=8, progress=False)
    single = evaluate(model, TOKENIZER, records, task, batch_size=1, progress=False)
    key = "logprobs" if task == "choice" else "loss"
    for b, s in zip(batched["predictions"], single["predictions"]):
        torch.testing.assert_close(torch.tensor(b[key]), torch.tensor(s[key]), rtol=1e-5, atol=1e-5)
        assert {k: v for k, v in b.items() if k != key} == {k: v for k, v in s.items() if k != key}


# ----------------------------------------------------------------------------- SuperNet subnets

SPACE = {"target_modules": ["q_proj", "v_proj", "down_proj"], "r_max": 8, "lora_alpha": 16, "lora_dropout": 0.1,
         "groups": [{"name": "qv", "modules": ["q_proj", "v_proj"], "choices": [8, 4, 2]},
                    {"name": "down", "modules": ["down_proj"], "choices": [8, 6, 3], "scope": "global"}]}


def stock_peft_subnet(net, config):
    """get_peft_model with per-module rank_pattern/alpha_pattern, the slices A[:r], B[:, :r] copied in by hand."""
    ranks = net.space.module_ranks(config)
    r_max, alpha = SPACE["r_max"], SPACE["lora_alpha"]
    anchored = {f"^{re.escape(name)}$": r for name, r in ranks.items()}
    lora = LoraConfig(r=r_max, lora_alpha=alpha, target_modules=list(ranks), rank_pattern=anchored,
                      alpha_pattern={key: alpha * r / r_max for key, r in anchored.items()})
    ref = get_peft_model(tiny_model(), lora).eval()
    with torch.no_grad():
        for name, r in ranks.items():
            ours, theirs = net.layers[name], ref.get_base_model().get_submodule(name)
            assert theirs.r["default"] == r and theirs.scaling["default"] == pytest.approx(alpha / r_max)
            theirs.lora_A["default"].weight.copy_(ours.lora_A["default"].weight[:r])
            theirs.lora_B["default"].weight.copy_(ours.lora_B["default"].weight[:, :r])
    return ref


def test_supernet_config_evaluates_as_its_stock_peft_equivalent():
    net = SuperNet.from_base(tiny_model(), SearchSpace.from_dict(SPACE))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # PEFT zero-initialises B, which would hide every slicing bug
        for layer in net.layers.values():
            layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=gen))
    config = {"qv.0": 2, "qv.1": 8, "down": 3}
    net.activate(config)
    net.model.train()  # evaluate must switch dropout off itself, and hand the mode back
    ref = stock_peft_subnet(net, config)
    records = CHOICE_RECORDS[:4]
    for task, key in (("loss", "loss"), ("choice", "logprobs")):
        ours = evaluate(net, TOKENIZER, records, task, batch_size=4, progress=False)
        theirs = evaluate(ref, TOKENIZER, records, task, batch_size=4, progress=False)
        assert net.model.training
        for a, b in zip(ours["predictions"], theirs["predictions"]):
            torch.testing.assert_close(torch.tensor(a[key]), torch.tensor(b[key]), rtol=1e-5, atol=1e-4)
        if task == "choice":
            assert [p["prediction"] for p in ours["predictions"]] == [p["prediction"] for p in theirs["predictions"]]
        else:
            assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
            net.activate(net.maximal())  # another subnet gives another loss: the active config is what counts
            assert evaluate(net, TOKENIZER, records, "loss", progress=False)["loss"] != pytest.approx(ours["loss"])
            net.activate(config)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, message", [
    ({"task": "accuracy"}, "unknown task"),
    ({"task": "loss", "batch_size": 0}, "at least 1"),
    ({"task": "loss", "limit": 0}, "limit must be at least 1"),
])
def test_evaluate_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ShearsError, match=message):
        evaluate(tiny_model(), TOKENIZER, MATH_RECORDS, progress=False, **kwargs)


def test_math_refuses_records_without_an_answer():
    with pytest.raises(ShearsError, match="no `answer`"):
        evaluate(tiny_model(), TOKENIZER, [{**MATH_RECORDS[0], "answer": None}], "math", progress=False)


# ----------------------------------------------------------------------------- CLI


def write_records(path, records):
    path.write_text(json.dumps(records))
    return path


def test_cli_writes_per_example_predictions(tiny_model_dir, tmp_path, capsys):
    from shears.models import load_model

    data = write_records(tmp_path / "test.json", CHOICE_RECORDS)
    out = tmp_path / "out" / "result.json"
    main(["--model", str(tiny_model_dir), "--data", str(data), "--task", "choice", "--limit", "3",
          "--batch-size", "2", "--output", str(out)])
    printed = capsys.readouterr().out
    assert f"wrote 3 predictions to {out}" in printed
    written = json.loads(out.read_text())
    assert written["task"] == "choice" and written["n"] == 3 and len(written["predictions"]) == 3
    bf16 = resolve_bf16("auto")  # the CLI's default precision without a run's recipe
    expected = evaluate(load_model(tiny_model_dir), make_tiny_tokenizer(), CHOICE_RECORDS[:3], "choice", progress=False,
                        bf16=bf16)
    assert written["precision"] == expected["precision"] == ("bf16-autocast" if bf16 else "fp32")
    for ours, theirs in zip(written["predictions"], expected["predictions"]):
        assert ours["index"] == theirs["index"] and ours["prediction"] == theirs["prediction"]
        assert ours["logprobs"] == pytest.approx(theirs["logprobs"], abs=1e-4)
    assert written["accuracy"] == expected["accuracy"]
    assert [p.name for p in out.parent.iterdir()] == ["result.json"]  # no temporary file left behind

    content = tmp_path / "out" / "content.json"  # --answer-format content scores the option texts
    main(["--model", str(tiny_model_dir), "--data", str(data), "--task", "choice", "--limit", "3",
          "--answer-format", "content", "--output", str(content)])
    expected = evaluate(load_model(tiny_model_dir), make_tiny_tokenizer(), to_answer_format(CHOICE_RECORDS[:3], "content"),
                        "choice", progress=False)
    written = json.loads(content.read_text())
    assert [p["choices"] for p in written["predictions"]] == [p["choices"] for p in expected["predictions"]]
    assert written["accuracy_norm"] == expected["accuracy_norm"]

    with pytest.raises(SystemExit) as exit_info:  # never overwrites silently
        main(["--model", str(tiny_model_dir), "--data", str(data), "--task", "choice", "--output", str(out)])
    assert exit_info.value.code == 2
    assert "--force" in capsys.readouterr().err
    # --force replaces it, as in every stage's CLI; --overwrite, its old name, still works
    for flag in ("--force", "--overwrite"):
        main(["--model", str(tiny_model_dir), "--data", str(data), "--task", "choice", "--output", str(out), flag])


@pytest.mark.parametrize("argv, message", [
    (["--data", "{tmp}/missing.json", "--task", "choice"], "error: data file not found"),
    (["--data", "{tmp}/test.json", "--task", "accuracy"], "error: unknown task 'accuracy'"),
    (["--data", "{tmp}/test.json", "--task", "choice", "--limit", "0"], "error: --limit must be at least 1"),
    (["--data", "{tmp}/test.json", "--answer-format", "text"], "error: unknown --answer-format 'text'"),
    (["--data", "{tmp}/math.json", "--answer-format", "content"], "error: record 0 ("),
])
def test_cli_bad_input_is_one_line_error(tiny_model_dir, tmp_path, capsys, argv, message):
    write_records(tmp_path / "test.json", CHOICE_RECORDS)
    write_records(tmp_path / "math.json", MATH_RECORDS)
    argv = ["--model", str(tiny_model_dir)] + [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_cli_as_a_module_exits_2_with_one_line(tmp_path):
    data = write_records(tmp_path / "test.json", CHOICE_RECORDS)
    done = subprocess.run([sys.executable, "-m", "shears.evaluate", "--model", str(tmp_path / "no-model"),
                           "--data", str(data), "--task", "nonsense"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: unknown task 'nonsense': use --task math | choice | loss"]


# ----------------------------------------------------------------------------- real data


def test_real_commonsense_files_give_sane_candidates(llm_adapters_dir):
    files = sorted((llm_adapters_dir / "commonsense").glob("*_test.json"))
    assert files
    for path in files:
        for record in json.loads(path.read_text())[:5]:
            labels = choice_labels(record)
            assert record["answer"] in labels, path.name
            if labels != ["true", "false"]:  # numbered options: one label per "AnswerK:" / "SolutionK:" line
                stem = re.fullmatch(r"([a-z]+)\d+", labels[0]).group(1)
                named = re.findall(rf"\b{stem}(\d+):", record["instruction"], re.IGNORECASE)
                assert labels == [f"{stem}{k}" for k in range(1, len(named) + 1)], path.name
            continuations = choice_continuations(record, labels)
            assert record["output"] in continuations, path.name
            assert len(set(continuations)) == len(labels)


@torch.no_grad()
def test_bf16_scoring_takes_the_logits_in_float32():
    """Under bf16 autocast the scores equal: body in bf16, then the output projection in float32 —
    not bf16 logits, whose rounding step ties close options (the reference with bf16 logits differs)."""
    model = tiny_model("llama").eval()
    record = ARC
    continuations = choice_continuations(record, choice_labels(record))
    context = prompt_ids(record)
    scored = evaluate(model, TOKENIZER, [record], "choice", bf16=True, progress=False)["predictions"][0]["logprobs"]

    def reference(fp32_head: bool) -> list[float]:
        sums = []
        for text in continuations:
            tokens = TOKENIZER(text, add_special_tokens=False)["input_ids"]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ids = torch.tensor([context + tokens])
                if fp32_head:
                    hidden = model.model(input_ids=ids).last_hidden_state
                    with torch.autocast("cpu", enabled=False):
                        logits = hidden.float() @ model.lm_head.weight.float().T
                else:
                    logits = model(input_ids=ids).logits
            logp = logits[0].float().log_softmax(-1)
            sums.append(sum(float(logp[len(context) - 1 + j, t]) for j, t in enumerate(tokens)))
        return sums

    torch.testing.assert_close(torch.tensor(scored), torch.tensor(reference(True)), rtol=0, atol=1e-4)
    assert (torch.tensor(scored) - torch.tensor(reference(False))).abs().max() > 1e-3  # the check can fail
    assert type(model.get_output_embeddings()) is torch.nn.Linear  # the head is put back


@torch.no_grad()
def test_frozen_weights_cast_once_give_autocasts_numbers_and_come_back():
    from shears.precision import bf16_weights

    base = tiny_model("llama")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    ids = torch.tensor([prompt_ids(ARC)])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=ids).logits
        with bf16_weights(model):
            frozen = [n for n, p in model.named_parameters() if p.dtype == torch.bfloat16]
            got = model(input_ids=ids).logits
    assert frozen and all("lora_" not in n and "lm_head" not in n and "embed" not in n for n in frozen)
    assert any("base_layer" in n for n in frozen)  # the frozen Linear under a LoRA layer too
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n
