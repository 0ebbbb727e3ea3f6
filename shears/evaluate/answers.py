"""Answers: what a completion says and what the gold answer is, as text (no model).

  math    the answer is the last number of the completion, correct within 1e-3 of the gold number
          (the LLM-Adapters convention). When the gold is an option letter (AQuA), the letter comes
          from the final answer sentence, not from the first A-E anywhere in the text, which would be
          the article "A" half of the time. A completion is cut at a hallucinated "###" block or after
          its first completed final-answer line (`truncate_completion`).
  choice  the candidate labels of a record and the continuation scored for each.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from ..errors import ShearsError

TOLERANCE = 1e-3  # |prediction - gold| within this counts as correct (LLM-Adapters)
STOP_STRING = "###"  # an untuned model goes on to write the next "### Instruction:" block; cut it there

# --------------------------------------------------------------------------- answer extraction

# A number: optional sign (only when the minus is not part of "5-3"), optional $, then either a
# thousands-grouped integer ("1,234,567"), a plain integer, with optional decimals, or ".5".
_NUMBER = re.compile(r"(?<![\w.])(-)?\$?(\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
# "answer" in any case, but the letter itself a capital (or parenthesised): "the answer is a 12" names no option.
_OPTION_AFTER_ANSWER = re.compile(r"(?i:answer\s*(?:is|:)?\s*:?\s*(?:option\s*)?)(?:\(([A-Ea-e])\)|([A-E])(?![A-Za-z]))")
_OPTION_IN_PARENS = re.compile(r"\(([A-E])\)")
_OPTION_ALONE = re.compile(r"(?<![A-Za-z])([A-E])(?![A-Za-z])")
_SENTENCE_END = re.compile(r"(?<=[.!?\n])(?!\d)")  # a period inside "13.5" ends no sentence


# A completed final-answer line: "The answer is 42." (or "... is (C)") and the newline that ends it.
_FINAL_ANSWER_LINE = re.compile(r"(?i:\bthe answer is\b)[^\n]*?(?:\d|\([A-Ea-e]\)|(?<![A-Za-z])[A-E](?![A-Za-z]))[^\n]*\n")


def truncate_completion(text: str) -> str:
    """The response proper: the text before a hallucinated next "###" block, and at most up to the end
    of the first completed final-answer line ("The answer is 42.\n"): what the model committed to.
    Generation stops there too (`completion_finished`), so nothing after it is generated or scored."""
    text = text.split(STOP_STRING, 1)[0]
    line = _FINAL_ANSWER_LINE.search(text)
    return text[:line.end()] if line else text


def completion_finished(text: str) -> bool:
    """Whether generating more could not change what `truncate_completion` keeps."""
    return STOP_STRING in text or _FINAL_ANSWER_LINE.search(text) is not None


def extract_number(text: str) -> float | None:
    """The last number in `text` ("$1,234.50" -> 1234.5, "-3" -> -3.0), or None when there is none."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    sign, digits = matches[-1]
    value = float(digits.replace(",", ""))
    return -value if sign else value


def extract_option(text: str) -> str | None:
    """The option letter A-E a completion settles on, read from its final answer sentence.

    Order of trust: the last "answer is (X)" / "answer: X"; else the last sentence that names an
    option, where a parenthesised "(X)" beats a bare capital (which may be the article "A")."""
    after_answer = _OPTION_AFTER_ANSWER.findall(text)
    if after_answer:
        return "".join(after_answer[-1]).upper()
    for sentence in reversed([s for s in _SENTENCE_END.split(text) if s.strip()]):
        for pattern in (_OPTION_IN_PARENS, _OPTION_ALONE):
            found = pattern.findall(sentence)
            if found:
                return found[-1]
    return None


def gold_option(answer: str) -> str | None:
    """The letter when the gold answer is an option ("C", "(C)"), else None."""
    match = re.fullmatch(r"\(?\s*([A-E])\s*\)?", str(answer).strip())
    return match.group(1) if match else None


def gold_number(answer: str) -> float | None:
    try:
        return float(str(answer).strip().replace(",", "").lstrip("$"))
    except ValueError:
        return None


def score_math(completion: str, answer: str) -> tuple[Any, bool]:
    """(the prediction extracted from a completion, whether it matches the gold answer)."""
    completion = truncate_completion(completion)
    letter = gold_option(answer)
    if letter is not None:
        predicted = extract_option(completion)
        return predicted, predicted == letter
    gold = gold_number(answer)
    if gold is None:
        raise ShearsError(f"math answer {answer!r} is neither a number nor an option letter A-E: "
                          "fix the data's `answer` field or use --task choice/loss")
    predicted = extract_number(completion)
    return predicted, predicted is not None and abs(predicted - gold) <= TOLERANCE


# --------------------------------------------------------------------------- choice candidates

_ANSWER_FORMAT = re.compile(r"Answer format:\s*([^\s/]+(?:\s*/\s*[^\s/]+)+)", re.IGNORECASE)
_LABEL_FAMILY = re.compile(r"([A-Za-z]+)(\d+)")
# The LLM-Adapters response wording, used only when a record's own `output` does not show it.
RESPONSE_TEMPLATE = "the correct answer is {label}"


def choice_labels(record: dict, choices: Sequence[str] | None = None) -> list[str]:
    """The candidate labels of a record: `choices` when given, else the instruction's
    "Answer format: a/b/c" line, else the family of the gold label ("answer2" -> answer1..answerK,
    K counted from "Answer1:".. in the instruction; "true"/"false")."""
    if choices:
        return list(choices)
    formats = _ANSWER_FORMAT.findall(record.get("instruction") or "")
    if formats:
        return [label.strip().rstrip(".") for label in formats[-1].split("/")]
    answer = str(record.get("answer") or "").strip()
    if answer.lower() in ("true", "false"):
        return ["true", "false"]
    family = _LABEL_FAMILY.fullmatch(answer)
    if family:
        stem = family.group(1)
        numbers = {int(n) for n in re.findall(rf"\b{stem}(\d+)\s*:", record.get("instruction") or "", re.IGNORECASE)}
        count = max(numbers | {int(family.group(2))})
        return [f"{stem}{k}" for k in range(1, count + 1)]
    raise ShearsError(f"cannot tell the candidate answers of the record {str(record.get('instruction'))[:60]!r}: "
                      "pass them with --choices a,b,c (choices=[...])")


def choice_continuations(record: dict, labels: Sequence[str]) -> list[str]:
    """The continuation to score for each label: the record's training response with the label swapped in.

    Why the response text and not the option's own words: a fine-tuned adapter learnt to answer
    "the correct answer is answer3", so the likelihood of exactly that string is what its training
    changed; scoring the option text would measure the base model's prior instead. The shared
    prefix "the correct answer is " adds the same log-prob to every candidate, so the decision rests
    on the label tokens alone, conditioned on the format the adapter was taught."""
    output, answer = str(record.get("output") or ""), str(record.get("answer") or "")
    at = output.rfind(answer) if answer else -1
    if at >= 0:
        template = output[:at].replace("{", "{{").replace("}", "}}") + "{label}" + \
            output[at + len(answer):].replace("{", "{{").replace("}", "}}")
    else:
        template = RESPONSE_TEMPLATE
    return [template.format(label=label) for label in labels]
