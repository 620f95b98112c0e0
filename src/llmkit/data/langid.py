"""Language identification, offline, with langid.py (Lui & Baldwin 2012).

langid.py is a naive Bayes classifier over byte n-grams for 97 languages; its
model ships inside the package, so no download is needed. The model is decoded
once per process (one to a few seconds) and shared; restricting the candidate
languages gives a shallow copy whose arrays are trimmed, so configs can coexist.

Scores are probabilities normalised over the candidate languages: restricting
the candidates raises the scores of the ones left. A naive Bayes classifier is
over-confident on long texts (scores saturate near 1.0), so ``min_score``
mostly removes short, mixed-language or non-linguistic documents (code, tables,
lists of numbers). The default 0.65 is FineWeb's (Penedo et al. 2024), set
there for fastText's scores; the two models are not calibrated alike.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

from langid.langid import LanguageIdentifier, model

from llmkit.config import check

# Classification cost is linear in the text (a Python loop over its bytes), and
# a prefix decides as well as the whole text. Measured on 105 documents of about
# 8,000 characters in 28 languages (the translations of the Vim tutor): the label
# of a 2,000-character prefix equals the whole text's on 105/105 (1,000: 104/105,
# 500: 101/105), at 1.2 ms per document instead of 2.3 ms; a 100 KB page costs
# about 20 ms in full.
DEFAULT_MAX_CHARACTERS = 2000


@dataclass
class LanguageConfig:
    keep: list[str] = field(
        default_factory=lambda: ["en"],
        metadata={"help": "ISO 639-1 codes of the languages to keep (empty: keep every language)"},
    )
    min_score: float = field(
        default=0.65, metadata={"help": "drop documents whose language probability is below this (FineWeb: 0.65)"}
    )
    candidates: list[str] | None = field(
        default=None, metadata={"help": "restrict the model to these ISO 639-1 codes (None: all 97 of its languages)"}
    )
    max_characters: int | None = field(
        default=DEFAULT_MAX_CHARACTERS,
        metadata={"help": "classify only this many leading characters (None: the whole text)"},
    )

    def __post_init__(self) -> None:
        check(0 <= self.min_score <= 1, "min_score", self.min_score, "must be a probability in [0, 1]")
        check(
            self.max_characters is None or self.max_characters >= 1,
            "max_characters",
            self.max_characters,
            "must be at least 1, or None for the whole text",
        )
        check(
            self.candidates is None or len(self.candidates) > 0,
            "candidates",
            self.candidates,
            "must list at least one language, or be None for all",
        )
        known = supported_languages()
        for name, codes in (("keep", self.keep), ("candidates", self.candidates or [])):
            for code in codes:
                check(code in known, name, code, f"is not a language of the langid model (it knows {', '.join(known)})")
        if self.candidates is not None:
            for code in self.keep:
                check(
                    code in self.candidates, "keep", code, "is not among the candidates, so it can never be identified"
                )


def supported_languages() -> list[str]:
    """The ISO 639-1 codes the langid model can identify, sorted."""
    return sorted(_full_identifier().nb_classes)


def identify_language(text: str, config: LanguageConfig) -> tuple[str, float]:
    """``(ISO 639-1 code, probability)`` of the most likely language of ``text``'s first ``max_characters``
    characters."""
    identifier = _identifier(tuple(sorted(config.candidates)) if config.candidates is not None else None)
    language, score = identifier.classify(text[: config.max_characters])
    return language, score


def language_filter(text: str, config: LanguageConfig) -> tuple[str | None, str, float]:
    """``(reason or None, language, score)``: ``language:<code>`` when the language is not kept, ``language:low_score``
    when it is but too uncertain."""
    language, score = identify_language(text, config)
    if config.keep and language not in config.keep:
        return f"language:{language}", language, score
    if score < config.min_score:
        return "language:low_score", language, score
    return None, language, score


@functools.lru_cache(maxsize=None)
def _full_identifier() -> LanguageIdentifier:
    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


@functools.lru_cache(maxsize=None)
def _identifier(candidates: tuple[str, ...] | None) -> LanguageIdentifier:
    if candidates is None:
        return _full_identifier()
    # set_languages replaces the copy's arrays with trimmed ones and keeps the full
    # model it was built from, so the shared identifier is left as it was.
    restricted = copy.copy(_full_identifier())
    restricted.set_languages(list(candidates))
    return restricted
