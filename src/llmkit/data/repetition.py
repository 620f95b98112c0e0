"""Gopher's repetition removal (Rae et al. 2021, appendix A.1.1, thresholds of table A1) as a pure function.

Gopher drops documents that repeat themselves: :func:`gopher_repetition` measures the
fraction of duplicated lines and paragraphs, of the characters in them, of the word
characters covered by the most frequent 2-, 3- and 4-gram, and of those covered by
any repeated 5- to 10-gram, and returns the name of the first rule over its limit
(``"gopher_repetition:duplicate_line_fraction"``) or ``None`` when the document
passes. The defaults of :class:`GopherRepetitionConfig` are table A1's thresholds; a
threshold set to ``None`` (an n-gram size left out of its mapping) turns its rule off.

Words and lines are those of the quality filters (:func:`llmkit.data.filters.split_words`
and :func:`~llmkit.data.filters.split_lines`), and n-grams are matched as stop words
are, ignoring case and the punctuation around a word (:func:`~llmkit.data.filters.bare_word`).
Counting n-grams is the costly part: each size looks only where the size before
repeated, and n-grams are numbered exactly rather than hashed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from llmkit.config import check
from llmkit.data.filters import above_limit, bare_word, check_fractions, ratio, split_lines, split_words

# Paragraphs are separated by blank lines (lines of whitespace count as blank).
PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


@dataclass
class GopherRepetitionConfig:
    """Rae et al. 2021 (Gopher), appendix A.1.1 "repetition removal", thresholds of table A1."""

    max_duplicate_line_fraction: float | None = field(
        default=0.30, metadata={"help": "drop documents with a larger fraction of lines that occur more than once"}
    )
    max_duplicate_paragraph_fraction: float | None = field(
        default=0.30, metadata={"help": "drop documents with a larger fraction of paragraphs that occur more than once"}
    )
    max_duplicate_line_character_fraction: float | None = field(
        default=0.20, metadata={"help": "drop documents with a larger fraction of characters in duplicated lines"}
    )
    max_duplicate_paragraph_character_fraction: float | None = field(
        default=0.20, metadata={"help": "drop documents with a larger fraction of characters in duplicated paragraphs"}
    )
    max_top_ngram_character_fractions: dict[int, float] = field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16},
        metadata={"help": "n -> largest fraction of word characters covered by the most frequent n-gram"},
    )
    max_duplicate_ngram_character_fractions: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        metadata={"help": "n -> largest fraction of word characters covered by n-grams that occur more than once"},
    )

    def __post_init__(self) -> None:
        check_fractions(
            self,
            "max_duplicate_line_fraction",
            "max_duplicate_paragraph_fraction",
            "max_duplicate_line_character_fraction",
            "max_duplicate_paragraph_character_fraction",
        )
        self.max_top_ngram_character_fractions = _ngram_thresholds(self, "max_top_ngram_character_fractions")
        self.max_duplicate_ngram_character_fractions = _ngram_thresholds(
            self, "max_duplicate_ngram_character_fractions"
        )


def gopher_repetition(text: str, config: GopherRepetitionConfig) -> str | None:
    """Gopher's repetition rules, in the order of table A1; the first one failed, or None.

    The paper leaves open whether the first copy of a repeated line counts as a
    duplicate. Here every copy does (as in Dolma; datatrove counts only the later
    copies), the reading that agrees with "characters contained within all duplicate
    n-grams". Character fractions are over the characters of the lines, paragraphs or
    words themselves, so whitespace and layout do not dilute them. N-grams are runs of
    n words compared as :func:`bare_word` keys and measured as written; where copies
    overlap ("ha ha ha" holds "ha ha" twice) each character counts once, so every
    fraction stays in [0, 1]. A document without a repeated n-gram has fraction 0.
    """
    for name, value, limit in _repetition_measures(text, config):
        if above_limit(value, limit):
            return f"gopher_repetition:{name}"
    return None


def _duplicate_fractions(segments: list[str]) -> tuple[float, float]:
    """Fraction of segments, and of their characters, in segments that occur more than once (every copy counted)."""
    counts = Counter(segments)
    duplicated = [segment for segment in segments if counts[segment] > 1]
    return ratio(len(duplicated), len(segments)), ratio(sum(map(len, duplicated)), sum(map(len, segments)))


def _repetition_measures(text: str, config: GopherRepetitionConfig) -> Iterator[tuple[str, float, float | None]]:
    """(rule, measured fraction, limit) in the order of table A1, each measured only once the rules before it passed."""
    lines = split_lines(text)
    paragraphs = [paragraph.strip() for paragraph in PARAGRAPH_BREAK.split(text) if paragraph.strip()]
    line_fraction, line_character_fraction = _duplicate_fractions(lines)
    paragraph_fraction, paragraph_character_fraction = _duplicate_fractions(paragraphs)
    yield "duplicate_line_fraction", line_fraction, config.max_duplicate_line_fraction
    yield "duplicate_paragraph_fraction", paragraph_fraction, config.max_duplicate_paragraph_fraction
    yield "duplicate_line_character_fraction", line_character_fraction, config.max_duplicate_line_character_fraction
    yield (
        "duplicate_paragraph_character_fraction",
        paragraph_character_fraction,
        config.max_duplicate_paragraph_character_fraction,
    )
    ngrams = _RepeatedNgrams(split_words(text))
    for n, limit in sorted(config.max_top_ngram_character_fractions.items()):
        yield f"top_{n}gram_character_fraction", ngrams.covered_fraction(ngrams.most_frequent(n), n), limit
    for n, limit in sorted(config.max_duplicate_ngram_character_fractions.items()):
        # "Taking care not to count characters that occur in overlapping n-grams more than once."
        starts, _ = ngrams.repeated(n)
        yield f"duplicate_{n}gram_character_fraction", ngrams.covered_fraction(starts, n), limit


class _RepeatedNgrams:
    """The n-grams of one document that occur more than once, found for n = 1, 2, ... as they are asked for.

    Each distinct word key gets a number, and each n-gram the rank of the pair (number of
    its first n - 1 words, number of its last word): exact numbers, so unlike hashed
    n-grams two different n-grams never collide. An n-gram can only repeat where the
    (n - 1)-grams at its first and second word both repeat, so each size looks only at the
    repeats of the size before, which thin out fast in natural text.
    """

    def __init__(self, words: list[str]):
        # Each distinct word is normalised and measured once.
        word_numbers, distinct_words = _numbered(words)
        key_numbers, distinct_keys = _numbered(list(map(bare_word, distinct_words)))
        self.keys = key_numbers[word_numbers]
        self.lengths = _lengths(distinct_words)[word_numbers]
        self.total = int(self.lengths.sum())
        # Key characters before each word: an n-gram's key characters are a difference of two.
        self.key_characters_before = np.concatenate(([0], np.cumsum(_lengths(distinct_keys)[self.keys])))
        repeated = np.flatnonzero(np.bincount(self.keys)[self.keys] > 1)
        self._by_size = [(repeated, self.keys[repeated])]

    def repeated(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The starts (ascending) of the n-grams that occur more than once, and each one's n-gram number."""
        while len(self._by_size) < n:
            starts, numbers = self._by_size[-1]
            size = len(self._by_size) + 1
            if len(starts):  # else no n-gram repeats, nor any longer one
                is_repeat_start = np.zeros(len(self.keys) + 1, dtype=bool)
                is_repeat_start[starts] = True
                followed_by_repeat = is_repeat_start[starts + 1]
                starts, numbers = starts[followed_by_repeat], numbers[followed_by_repeat]
                # Numbers and keys are below the word count, so the pair's code is exact.
                pairs = numbers * len(self.keys) + self.keys[starts + size - 1]
                _, numbers, counts = np.unique(pairs, return_inverse=True, return_counts=True)
                repeats = counts[numbers] > 1
                starts, numbers = starts[repeats], numbers[repeats]
            self._by_size.append((starts, numbers))
        return self._by_size[n - 1]

    def most_frequent(self, n: int) -> np.ndarray:
        """The starts of the repeated n-gram with the most copies (none when no n-gram repeats)."""
        starts, numbers = self.repeated(n)
        if not len(starts):
            return starts
        grams, first_copies, counts = np.unique(numbers, return_index=True, return_counts=True)
        first_starts = starts[first_copies]
        key_characters = self.key_characters_before[first_starts + n] - self.key_characters_before[first_starts]
        # Ties go to the n-gram of most key characters, the strictest reading, then to the first one in the text.
        best = np.lexsort((-first_starts, key_characters, counts))[-1]
        return starts[numbers == grams[best]]

    def covered_fraction(self, starts: np.ndarray, n: int) -> float:
        """Fraction of the words' characters in n-grams starting at ``starts``, each word counted once."""
        if not len(starts):
            return 0.0
        # +1 where an n-gram begins, -1 one word past its end: a word is covered where the running sum is positive.
        size = len(self.keys) + 1
        covering = np.cumsum(np.bincount(starts, minlength=size) - np.bincount(starts + n, minlength=size))
        return ratio(int(self.lengths[covering[:-1] > 0].sum()), self.total)


def _numbered(items: list[str]) -> tuple[np.ndarray, list[str]]:
    """Each item's number (distinct items numbered in order of first appearance) and the distinct items."""
    numbers: dict[str, int] = {}
    item_numbers = np.array([numbers.setdefault(item, len(numbers)) for item in items], dtype=np.int64)
    return item_numbers, list(numbers)


def _lengths(items: list[str]) -> np.ndarray:
    return np.fromiter(map(len, items), dtype=np.int64, count=len(items))


def _ngram_thresholds(config, name: str) -> dict[int, float]:
    """``{n: fraction}`` with n >= 1 and fractions in [0, 1]; YAML may spell the keys as strings."""
    value = getattr(config, name)
    check(isinstance(value, dict), name, value, "must map n-gram sizes to fractions, e.g. {2: 0.2}")
    thresholds = {}
    for n, limit in value.items():
        size = int(n) if isinstance(n, str) and n.strip().isdigit() else n
        check(
            isinstance(size, int) and not isinstance(size, bool) and size >= 1,
            name,
            value,
            f"n-gram size {n!r} must be a whole number >= 1",
        )
        check(
            isinstance(limit, (int, float)) and not isinstance(limit, bool) and 0 <= limit <= 1,
            name,
            value,
            f"the fraction for {size}-grams must be in [0, 1]",
        )
        thresholds[size] = float(limit)
    return thresholds
