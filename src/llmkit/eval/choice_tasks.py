"""Multiple-choice evaluation sets: HellaSwag, ARC, MMLU and a plain JSONL format, read into one shape.

Every loader yields :class:`ChoiceExample` records holding the *raw* question text (no "Question:"
decoration), so the same records serve scoring (:mod:`llmkit.eval.choice` adds the prompt template
named by ``task``) and the decontamination check (which wants the text as it appears in the wild).

Formats (``load_choice_task(path, format="auto")`` picks one from the suffix and the first record):

* ``hellaswag`` JSONL: ``endings`` + ``label`` with either ``ctx`` or the ``activity_label`` +
  ``ctx_a`` + ``ctx_b`` form of the official files. The text is cleaned exactly as lm-evaluation-
  harness's ``hellaswag/utils.py`` does (WikiHow ``[title]``/``[header]`` artefacts removed), so
  scores are comparable with published HellaSwag numbers.
* ``arc`` JSONL (AI2 ARC release files): ``question.stem``, ``question.choices[{text, label}]``,
  ``answerKey`` (a label: usually A-D, sometimes 1-4; 3 to 5 choices).
* ``mmlu`` CSV: ``question,A,B,C,D,answer`` with the answer a letter or a 0-based index; the
  original files have no header, the Hugging Face re-exports start with one (detected and skipped).
  The subject is the file name minus ``_dev``/``_val``/``_test``.
* ``jsonl``: ``question``, ``choices`` (a list of strings), ``answer`` (0-based index or a letter).

A malformed row raises :class:`~llmkit.errors.InputError` naming the file and line.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llmkit.errors import InputError
from llmkit.io import iter_jsonl

FORMATS = ("hellaswag", "arc", "mmlu", "jsonl")
LETTERS = "ABCDEFGHIJ"


@dataclass
class ChoiceExample:
    id: str
    context: str  # the question / sentence start, undecorated
    choices: list[str]
    answer: int  # index of the correct choice
    task: str  # the format it came from; picks the default prompt template in llmkit.eval.choice


class _RowError(ValueError):
    """A problem with one row; the loader adds the file and line to the message."""


def load_choice_task(path: str | Path, format: str = "auto") -> list[ChoiceExample]:
    """Every example of ``path`` in file order; ``format`` is one of :data:`FORMATS` or ``"auto"``."""
    path = Path(path)
    if format not in (*FORMATS, "auto"):
        raise InputError(
            f"{path}: unknown multiple-choice format {format!r} (expected auto or one of {', '.join(FORMATS)})"
        )
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if format == "mmlu" or (format == "auto" and path.suffix.lower() == ".csv"):
        examples = _load_mmlu(path)
    else:
        examples = _load_jsonl(path, format)
    if not examples:
        raise InputError(f"{path}: no examples")
    return examples


def _load_jsonl(path: Path, format: str) -> list[ChoiceExample]:
    examples: list[ChoiceExample] = []
    for line_number, record in iter_jsonl(path):
        if format == "auto":
            format = _detect(record)
            if format is None:
                raise InputError(
                    f"{path}:{line_number}: cannot tell the format from the keys {sorted(record)}; expected "
                    "HellaSwag (ctx/endings/label), ARC (question.stem/answerKey) or question/choices/answer"
                )
        try:
            examples.append(_JSONL_PARSERS[format](record, f"{path.stem}/{line_number}"))
        except _RowError as error:
            raise InputError(f"{path}:{line_number}: {error}") from None
    return examples


def _detect(record: dict) -> str | None:
    if "endings" in record:
        return "hellaswag"
    if isinstance(record.get("question"), dict):
        return "arc"
    if "question" in record and "choices" in record:
        return "jsonl"
    return None


def _field(record: dict, name: str, kind: type):
    if name not in record:
        raise _RowError(f"missing field '{name}'")
    value = record[name]
    if not isinstance(value, kind):
        raise _RowError(f"field '{name}' should be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _text_list(value, name: str) -> list[str]:
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(item, str) for item in value):
        raise _RowError(f"field '{name}' should be a list of at least two strings, got {value!r}")
    return value


def _answer_index(value, count: int, name: str) -> int:
    """A 0-based index (int or digit string) or a letter A, B, ... into ``count`` choices."""
    index = value
    if isinstance(value, str) and value.strip().isdigit():
        index = int(value.strip())
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        index = LETTERS.index(value.strip().upper())
    if isinstance(index, bool) or not isinstance(index, int):
        raise _RowError(f"field '{name}' = {value!r} is neither a choice index nor a letter")
    if not 0 <= index < count:
        raise _RowError(f"field '{name}' = {value!r} is out of range for {count} choices")
    return index


def _hellaswag_clean(text: str) -> str:
    # lm-evaluation-harness tasks/hellaswag/utils.py: brackets are WikiHow artefacts.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _parse_hellaswag(record: dict, default_id: str) -> ChoiceExample:
    endings = _text_list(record.get("endings"), "endings")
    if "ctx_a" in record:
        # The official layout: the context is split before the sentence the endings complete.
        context = _field(record, "ctx_a", str) + " " + _field(record, "ctx_b", str).capitalize()
    else:
        context = _field(record, "ctx", str)
    label = record.get("activity_label")
    if isinstance(label, str) and label:
        context = f"{label}: {context}"
    if "label" not in record:
        raise _RowError("missing field 'label'")
    answer = _answer_index(record["label"], len(endings), "label")
    return ChoiceExample(
        str(record.get("ind", default_id)),
        _hellaswag_clean(context),
        [_hellaswag_clean(ending) for ending in endings],
        answer,
        "hellaswag",
    )


def _parse_arc(record: dict, default_id: str) -> ChoiceExample:
    question = _field(record, "question", dict)
    stem = _field(question, "stem", str)
    options = _field(question, "choices", list)
    if len(options) < 2 or not all(
        isinstance(option, dict) and isinstance(option.get("text"), str) and "label" in option for option in options
    ):
        raise _RowError(f"'question.choices' should be at least two {{text, label}} objects, got {options!r}")
    labels = [str(option["label"]) for option in options]
    if "answerKey" not in record:
        raise _RowError("missing field 'answerKey'")
    answer_key = str(record["answerKey"])
    if answer_key not in labels:
        raise _RowError(f"answerKey {answer_key!r} is not one of the choice labels {labels}")
    return ChoiceExample(
        str(record.get("id", default_id)), stem, [option["text"] for option in options], labels.index(answer_key), "arc"
    )


def _parse_plain(record: dict, default_id: str) -> ChoiceExample:
    question = _field(record, "question", str)
    choices = _text_list(record.get("choices"), "choices")
    if "answer" not in record:
        raise _RowError("missing field 'answer'")
    return ChoiceExample(
        str(record.get("id", default_id)),
        question,
        choices,
        _answer_index(record["answer"], len(choices), "answer"),
        "jsonl",
    )


_JSONL_PARSERS: dict[str, Callable[[dict, str], ChoiceExample]] = {
    "hellaswag": _parse_hellaswag,
    "arc": _parse_arc,
    "jsonl": _parse_plain,
}


def _load_mmlu(path: Path) -> list[ChoiceExample]:
    subject = re.sub(r"_(dev|val|test)$", "", path.stem)
    examples: list[ChoiceExample] = []
    try:
        with open(path, encoding="utf-8", newline="") as file:
            reader = csv.reader(file)
            for row in reader:
                line_number = reader.line_num  # the line the row ends on (fields may span lines)
                if not row or not any(cell.strip() for cell in row):
                    continue
                if not examples and [cell.strip().lower() for cell in row[-1:]] == ["answer"]:
                    continue  # the header of the Hugging Face re-exports
                if len(row) != 6:
                    raise InputError(
                        f"{path}:{line_number}: expected 6 columns (question, 4 choices, answer), got {len(row)}"
                    )
                try:
                    answer = _answer_index(row[5], 4, "answer")
                except _RowError as error:
                    raise InputError(f"{path}:{line_number}: {error}") from None
                examples.append(ChoiceExample(f"{subject}/{len(examples)}", row[0], row[1:5], answer, "mmlu"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not valid UTF-8") from None
    except csv.Error as error:
        raise InputError(f"{path}: not valid CSV ({error})") from None
    return examples
