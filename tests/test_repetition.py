"""Gopher's repetition rules (table A1) on hand-made documents and against a naive n-gram reference."""

import math
import random
from collections import Counter

import pytest

from llmkit.config import build
from llmkit.data.filters import bare_word
from llmkit.data.repetition import GopherRepetitionConfig, gopher_repetition
from llmkit.errors import ConfigError

REPETITION_RULES_OFF = dict(
    max_duplicate_line_fraction=None,
    max_duplicate_paragraph_fraction=None,
    max_duplicate_line_character_fraction=None,
    max_duplicate_paragraph_character_fraction=None,
    max_top_ngram_character_fractions={},
    max_duplicate_ngram_character_fractions={},
)


def repetition_only(**thresholds) -> GopherRepetitionConfig:
    return GopherRepetitionConfig(**(REPETITION_RULES_OFF | thresholds))


def test_repetition_defaults_are_table_a1():
    config = GopherRepetitionConfig()
    assert (config.max_duplicate_line_fraction, config.max_duplicate_paragraph_fraction) == (0.30, 0.30)
    assert (config.max_duplicate_line_character_fraction, config.max_duplicate_paragraph_character_fraction) == (
        0.20,
        0.20,
    )
    assert config.max_top_ngram_character_fractions == {2: 0.20, 3: 0.18, 4: 0.16}
    assert config.max_duplicate_ngram_character_fractions == {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


@pytest.mark.parametrize("unit, separator", [("line", "\n"), ("paragraph", "\n\n")])
def test_duplicate_fraction_counts_every_copy(unit, separator):
    def document(copies_of_b: int) -> str:
        segments = ["segment A"] * 3 + ["segment B"] * copies_of_b
        return separator.join(segments + [f"unique segment {index}" for index in range(20 - len(segments))])

    name = f"max_duplicate_{unit}_fraction"
    assert gopher_repetition(document(3), repetition_only(**{name: 0.3})) is None  # 6 / 20
    assert (
        gopher_repetition(document(4), repetition_only(**{name: 0.3})) == f"gopher_repetition:duplicate_{unit}_fraction"
    )  # 7 / 20
    assert gopher_repetition(document(4), repetition_only(**{name: 0.35})) is None
    # Two copies of one segment among ten: both are duplicates (2 / 10), not just the second (1 / 10).
    pair = separator.join(["segment A"] * 2 + [f"unique segment {index}" for index in range(8)])
    assert gopher_repetition(pair, repetition_only(**{name: 0.15})) == f"gopher_repetition:duplicate_{unit}_fraction"
    assert gopher_repetition(pair, repetition_only(**{name: 0.2})) is None


@pytest.mark.parametrize("unit, separator", [("line", "\n"), ("paragraph", "\n\n")])
def test_duplicate_character_fraction(unit, separator):
    def document(unique_characters: int) -> str:
        # Two copies of a 4-character segment plus unique 4-character segments (the last one shorter).
        unique = [f"u{index:03d}" for index in range(unique_characters // 4)]
        if unique_characters % 4:
            unique.append("z" * (unique_characters % 4))
        return separator.join(["abcd", *unique, "  abcd  "])  # segments are compared and measured stripped

    name = f"max_duplicate_{unit}_character_fraction"
    assert gopher_repetition(document(32), repetition_only(**{name: 0.2})) is None  # 8 / 40
    assert (
        gopher_repetition(document(31), repetition_only(**{name: 0.2}))
        == f"gopher_repetition:duplicate_{unit}_character_fraction"
    )  # 8 / 39
    assert gopher_repetition(document(31), repetition_only(**{name: 0.21})) is None


def repeated_ngram_text(n: int, covered: int, total: int) -> str:
    """Two copies of one n-gram covering ``covered`` word characters, among unique filler words, ``total`` characters in
    all."""
    gram_characters = covered // 2
    lengths = [gram_characters // n + (index < gram_characters % n) for index in range(n)]
    gram = ["abcdefghij"[index] * length for index, length in enumerate(lengths)]
    filler_characters = total - covered
    fillers = [f"w{index:03d}" for index in range(filler_characters // 4)]
    if filler_characters % 4:
        fillers.append("z" * (filler_characters % 4))
    assert len(fillers) >= 2 and sum(map(len, gram * 2 + fillers)) == total
    # A filler after each copy keeps every other n-gram unique.
    return " ".join(gram + fillers[:1] + gram + fillers[1:])


TABLE_A1_NGRAM_LIMITS = [("top", 2, 0.20), ("top", 3, 0.18), ("top", 4, 0.16)] + [
    ("duplicate", n, limit) for n, limit in [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]
]


@pytest.mark.parametrize("kind, n, limit", TABLE_A1_NGRAM_LIMITS)
def test_ngram_character_fraction_limits(kind, n, limit):
    thresholds = f"max_{kind}_ngram_character_fractions"
    covered = round(200 * limit)
    config = repetition_only(**{thresholds: {n: limit}})
    assert gopher_repetition(repeated_ngram_text(n, covered, 200), config) is None
    assert (
        gopher_repetition(repeated_ngram_text(n, covered, 199), config)
        == f"gopher_repetition:{kind}_{n}gram_character_fraction"
    )
    assert (
        gopher_repetition(repeated_ngram_text(n, covered, 199), repetition_only(**{thresholds: {n: covered / 199}}))
        is None
    )
    # With all of table A1 on, the limit for this n is still the one that fires.
    assert (
        gopher_repetition(repeated_ngram_text(n, covered, 199), GopherRepetitionConfig())
        == f"gopher_repetition:{kind}_{n}gram_character_fraction"
    )


def test_overlapping_ngrams_count_each_character_once():
    # The 5-gram "aa bb aa bb aa" occurs at words 0 and 2: together they cover all 7 words (14 of 14
    # characters). Counting each occurrence in full would give 20 / 14; counting only the second copy, 10 / 14.
    text = "aa bb aa bb aa bb aa"
    assert gopher_repetition(text, repetition_only(max_duplicate_ngram_character_fractions={5: 1.0})) is None
    assert (
        gopher_repetition(text, repetition_only(max_duplicate_ngram_character_fractions={5: 0.99}))
        == "gopher_repetition:duplicate_5gram_character_fraction"
    )
    # "ha ha" occurs three times, overlapping, covering all 8 characters once.
    assert gopher_repetition("ha ha ha ha", repetition_only(max_top_ngram_character_fractions={2: 1.0})) is None
    assert (
        gopher_repetition("ha ha ha ha", repetition_only(max_top_ngram_character_fractions={2: 0.99}))
        == "gopher_repetition:top_2gram_character_fraction"
    )


def test_ngrams_match_ignoring_case_and_punctuation_and_unrepeated_ngrams_are_not_repetition():
    config = repetition_only(max_top_ngram_character_fractions={2: 0.5})
    assert gopher_repetition("Rain falls, rain falls.", config) == "gopher_repetition:top_2gram_character_fraction"
    assert (
        gopher_repetition("no bigram here repeats", repetition_only(max_top_ngram_character_fractions={2: 0.0})) is None
    )


def test_top_ngram_ties_go_to_the_most_key_characters_then_the_first():
    top_bigram = repetition_only(max_top_ngram_character_fractions={2: 0.5})
    # "aa bb" and "ccc ddd" both occur twice: "ccc ddd" has more key characters, and covers 12 of 23 characters.
    assert (
        gopher_repetition("aa bb x aa bb y ccc ddd z ccc ddd", top_bigram)
        == "gopher_repetition:top_2gram_character_fraction"
    )
    # Equal key characters: the first n-gram wins, "aa, bb," (12 of 23) here and "cc dd" (8 of 23) once swapped.
    assert (
        gopher_repetition("aa, bb, x aa, bb, y cc dd z cc dd", top_bigram)
        == "gopher_repetition:top_2gram_character_fraction"
    )
    assert gopher_repetition("cc dd z cc dd y aa, bb, x aa, bb,", top_bigram) is None


def reference_ngram_fractions(text: str, n: int) -> tuple[float, float]:
    """Naive top and duplicate n-gram character fractions: sets of covered word positions."""
    words = text.split()
    keys = [bare_word(word) for word in words]
    grams = [tuple(keys[start : start + n]) for start in range(len(keys) - n + 1)]
    counts = Counter(grams)  # in order of first appearance, so max() breaks the last ties by position

    def covered(starts) -> float:
        return sum(
            len(words[position]) for position in {start + offset for start in starts for offset in range(n)}
        ) / sum(map(len, words))

    repeated = [gram for gram in counts if counts[gram] > 1]
    if not repeated:
        return 0.0, 0.0
    top = max(repeated, key=lambda gram: (counts[gram], sum(map(len, gram))))
    return covered(start for start, gram in enumerate(grams) if gram == top), covered(
        start for start, gram in enumerate(grams) if counts[gram] > 1
    )


def repetitive_text(rng: random.Random) -> str:
    vocabulary = [
        rng.choice(["the", "The", "ha", "a", "cat", "sat", "-", "é"]) + rng.choice(["", "", ".", ",", "…"])
        for _ in range(rng.randint(2, 8))
    ]
    words = []
    while len(words) < 80:
        if words and rng.random() < 0.3:  # a copy of an earlier run, which may overlap itself
            start = rng.randrange(len(words))
            words += words[start : start + rng.randint(1, 12)]
        else:
            words.append(rng.choice(vocabulary))
    return " ".join(words)


@pytest.mark.parametrize("seed", range(3))
def test_ngram_character_fractions_match_a_naive_reference(seed):
    rng = random.Random(seed)
    for _ in range(10):
        text = repetitive_text(rng)
        for n in range(1, 9):
            for kind, fraction in zip(("top", "duplicate"), reference_ngram_fractions(text, n)):
                thresholds = f"max_{kind}_ngram_character_fractions"
                assert gopher_repetition(text, repetition_only(**{thresholds: {n: fraction}})) is None
                if fraction > 0:
                    just_below = repetition_only(**{thresholds: {n: math.nextafter(fraction, 0)}})
                    assert gopher_repetition(text, just_below) == f"gopher_repetition:{kind}_{n}gram_character_fraction"


@pytest.mark.parametrize(
    "thresholds, field",
    [
        ({"max_duplicate_line_fraction": -0.1}, "max_duplicate_line_fraction"),
        ({"max_top_ngram_character_fractions": {0: 0.2}}, "max_top_ngram_character_fractions"),
        ({"max_duplicate_ngram_character_fractions": {5: 1.5}}, "max_duplicate_ngram_character_fractions"),
    ],
)
def test_invalid_config_names_the_field(thresholds, field):
    with pytest.raises(ConfigError, match=f"'{field}'") as error:
        GopherRepetitionConfig(**thresholds)
    assert error.value.field == field


def test_config_builds_from_yaml_values():
    config = build(
        GopherRepetitionConfig, {"max_top_ngram_character_fractions": {"2": 0.25}, "max_duplicate_line_fraction": None}
    )
    assert config.max_top_ngram_character_fractions == {2: 0.25}
    assert config.max_duplicate_line_fraction is None
