"""Answers out of generated text: extraction, normalisation and the majority vote of self-consistency.

Every extractor has the shape ``extract(text, marked=False) -> str | None`` and returns a canonical
string, so two paths that reach the same answer in different words ("$1,000.00", "1000") vote together,
and None when the text holds no answer (such a path votes for nothing).

Where the answer sits in free text follows the conventions the prompts teach:

- an answer marker, the last ``####`` (GSM8K, Cobbe et al. 2021), ``answer is`` (the chain-of-thought
  demonstrations of Wei et al. 2022 end in "The answer is 42.") or ``answer:``: the answer is the first
  candidate after the last marker;
- ``marked=True``: the whole text already follows a marker, as the completion of zero-shot CoT's second
  prompt "Therefore, the answer is" does (Kojima et al. 2022), so its first candidate is taken;
- otherwise a fallback per kind: the last number of the text (the conclusion of a worked solution comes
  last), a choice letter given as the reply's first word or in parentheses.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from decimal import Decimal, InvalidOperation
from typing import Callable

Extractor = Callable[..., "str | None"]

_MARKER = re.compile(r"####|answer is|answer:", re.IGNORECASE)
# A number: optional sign and dollar sign, digits with thousands commas inside (never a trailing comma,
# which ends a list such as "1, 2, 3"), an optional decimal part.
_NUMBER = re.compile(r"(-?)\$?((?:\d(?:[\d,]*\d)?)(?:\.\d+)?|\.\d+)")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _after_marker(text: str, marked: bool) -> tuple[str, bool]:
    """The part of ``text`` that holds the answer, and whether a marker (or ``marked``) located it."""
    markers = list(_MARKER.finditer(text))
    if markers:
        return text[markers[-1].end() :], True
    return text, marked


def canonical_number(text: str) -> str | None:
    """ "1,000.50" -> "1000.5", "$42.00" -> "42", "-3" -> "-3"; None when ``text`` is not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_number(text: str, marked: bool = False) -> str | None:
    """The numeric answer: the first number after the last answer marker, else the last number."""
    region, located = _after_marker(text, marked)
    numbers = list(_NUMBER.finditer(region))
    if not numbers:
        return None
    chosen = numbers[0] if located else numbers[-1]
    return canonical_number(chosen.group(1) + chosen.group(2))


def extract_choice(text: str, marked: bool = False, letters: str = "ABCDE") -> str | None:
    """A multiple-choice letter, upper case only (so the article "a" is never read as choice A): after a
    marker the first standalone letter; otherwise a reply that opens with a letter closed by ")", ".",
    ":" or the end ("B", "B.", "(B)", "B) Paris", but not "A dog"), else the last parenthesised "(B)"."""
    region, located = _after_marker(text, marked)
    standalone = re.compile(rf"(?<![A-Za-z])\(?([{letters}])\)?(?![A-Za-z])")
    if located:
        match = standalone.search(region)
        return match.group(1) if match else None
    first_word = re.match(rf"\s*\(?([{letters}])(?:[).:]|\s*$)", region)
    if first_word:
        return first_word.group(1)
    parenthesised = re.findall(rf"\(([{letters}])\)", region)
    return parenthesised[-1] if parenthesised else None


def normalize_text(text: str) -> str:
    """SQuAD's answer normalisation (Rajpurkar et al. 2016, the official evaluation script): lower case,
    drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(character for character in text if character not in string.punctuation)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def extract_text(text: str, marked: bool = False) -> str | None:
    """A free-form answer: the first line after the last marker (else the first line), normalised."""
    region, _ = _after_marker(text, marked)
    lines = [line for line in region.strip().splitlines() if line.strip()]
    if not lines:
        return None
    return normalize_text(lines[0]) or None


EXTRACTORS: dict[str, Extractor] = {"number": extract_number, "choice": extract_choice, "text": extract_text}


def majority_vote(answers: list[str | None]) -> tuple[str | None, float]:
    """The most frequent answer and its vote share (votes / all paths, so paths without an answer count
    against confidence). A tie goes to the answer that appeared first: a deterministic rule that depends
    only on the order of the paths, which is the order of their seeds. (None, 0.0) when no path answered."""
    if not answers:
        raise ValueError("majority_vote needs at least one answer")
    counts = Counter(answer for answer in answers if answer is not None)
    if not counts:
        return None, 0.0
    # Counter keeps first-insertion order and max() returns the first maximal element: earliest wins ties.
    winner = max(counts, key=counts.__getitem__)
    return winner, counts[winner] / len(answers)
