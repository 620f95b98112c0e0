"""The pipeline's steps: one small adapter per cleaning, filtering, de-duplication or masking rule.

A *document step* looks at one document at a time: it may rewrite the text
(cleaning, PII masking, C4's line rules), record what it learned in
``document.meta`` and return a reason to drop the document. A *corpus step*
needs the whole corpus before deciding (de-duplication, score quantiles): it
``measure``\\ s every shard in parallel, ``decide``\\ s once in the driver from all
measurements (saving the decision beside the work files), then ``apply``\\ s the
decision per document in the next parallel pass. The rules themselves live in
their own modules (``clean``, ``filters``, ``repetition``, ``langid``, ``dedup``,
``pii``, ``decontam``, ``quality``); this file only wires them to documents.

Every step names the document profiles it applies to: prose rules (Gopher, C4,
language) leave source code alone, the code rules leave prose alone.
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import ClassVar

import numpy as np

from llmkit.config import build, check
from llmkit.data import clean, decontam, dedup, filters, langid, pii, quality, repetition
from llmkit.data.sources import Document, iter_documents
from llmkit.errors import ConfigError
from llmkit.io import atomic_write_arrays, atomic_write_json, read_arrays, read_json

PROFILES = ("prose", "code")


@dataclass
class NoOptions:
    """A step without options."""


class Step:
    name: ClassVar[str]
    config_class: ClassVar[type] = NoOptions
    profiles: ClassVar[tuple[str, ...]] = PROFILES

    def __init__(self, config, artifacts: Path):
        # ``artifacts`` is this step's file prefix in the work directory (decisions, models, indexes).
        self.config, self.artifacts = config, artifacts
        self.counts: collections.Counter = collections.Counter()  # what it changed, for the report

    def setup(self, pool: list[Document]) -> dict:
        """Driver-side preparation before any shard runs (train a model, build an index); returns report metrics."""
        return {}

    def apply(self, document: Document) -> str | None:
        """Change ``document`` in place; return why it must be dropped, or ``None`` to keep it."""
        return None


class CorpusStep(Step):
    def measure(self, documents: list[Document]) -> dict[str, np.ndarray]:
        """Per-shard measurements of the documents kept so far; must include their ``keys``."""
        raise NotImplementedError

    def decide(self, measurements: dict[str, np.ndarray]) -> dict:
        """Decide from the whole corpus's measurements (concatenated in corpus order); save it; return report
        metrics."""
        raise NotImplementedError


def _keys(documents: list[Document]) -> np.ndarray:
    return np.array([document.meta["key"] for document in documents], dtype=np.int64)


# ---------------------------------------------------------------------------- document steps
class Clean(Step):
    name = "clean"
    config_class = clean.CleanConfig

    def __init__(self, config, artifacts):
        super().__init__(config, artifacts)
        # Templates and JSX open many lines with tags: source code is never treated as an HTML page unless asked.
        self.code_config = dataclasses.replace(config, html="never") if config.html == "auto" else config

    def apply(self, document):
        config = self.code_config if document.meta["profile"] == "code" else self.config
        text, reason = clean.clean_text(document.text, config)
        if text is not None and text != document.text:
            self.counts["modified_documents"] += 1
            document.text = text
        return reason


class Language(Step):
    name = "language"
    config_class = langid.LanguageConfig
    profiles = ("prose",)

    def apply(self, document):
        reason, language, score = langid.language_filter(document.text, self.config)
        document.meta["language"], document.meta["language_score"] = language, round(score, 4)
        return reason


class RuleFilter(Step):
    """A pure ``rule(text, config) -> reason | None`` (:mod:`llmkit.data.filters`, :mod:`llmkit.data.repetition`)."""

    rule: ClassVar

    def apply(self, document):
        return type(self).rule(document.text, self.config)


class GopherQuality(RuleFilter):
    name, config_class, profiles, rule = (
        "gopher_quality",
        filters.GopherQualityConfig,
        ("prose",),
        filters.gopher_quality,
    )


class GopherRepetition(RuleFilter):
    name, config_class, profiles, rule = (
        "gopher_repetition",
        repetition.GopherRepetitionConfig,
        ("prose",),
        repetition.gopher_repetition,
    )


class Keyword(RuleFilter):
    name, config_class, profiles, rule = "keyword", filters.KeywordConfig, ("prose",), filters.keyword_filter


class CodeQuality(RuleFilter):
    name, config_class, profiles, rule = "code_quality", filters.CodeConfig, ("code",), filters.code_quality


class C4(Step):
    name = "c4"
    config_class = filters.C4Config
    profiles = ("prose",)

    def apply(self, document):
        result = filters.c4(document.text, self.config)
        if result.reason is None and result.text != document.text:
            self.counts["modified_documents"] += 1
            self.counts.update({f"lines_removed_{rule}": count for rule, count in result.lines_removed.items()})
            document.text = result.text
        return result.reason


class PII(Step):
    name = "pii"
    config_class = pii.PIIConfig

    def apply(self, document):
        text, found = pii.mask_pii(document.text, self.config)
        if found:
            self.counts["modified_documents"] += 1
            self.counts.update({f"masked_{kind}": count for kind, count in found.items()})
            document.text = text
        return None


@dataclass
class DecontaminationOptions(decontam.DecontaminationConfig):
    drop: bool = True  # False only reports the contaminated documents (meta + counts) and keeps them


class Decontaminate(Step):
    name = "decontaminate"
    config_class = DecontaminationOptions

    def setup(self, pool):
        index = decontam.ContaminationIndex.from_files(
            self.config.sets, ngram=self.config.ngram, min_words=self.config.min_words
        )
        index.save(self._index_path())
        return {"evaluation_sets": [decontam.set_name(path) for path in self.config.sets]}

    def _index_path(self) -> Path:
        return self.artifacts.with_name(self.artifacts.name + "_index.npz")

    def apply(self, document):
        if not hasattr(self, "index"):
            self.index = decontam.ContaminationIndex.load(self._index_path())
        matches = self.index.matches(document.text)
        if not self.config.is_contaminated(matches):
            return None
        document.meta["contamination"] = matches
        self.counts.update({f"contaminated_{name}": 1 for name in matches})
        return f"decontaminate:{max(matches, key=matches.get)}" if self.config.drop else None


# ---------------------------------------------------------------------------- corpus steps
class DropKeys(CorpusStep):
    """A corpus step whose decision is a set of document keys to drop."""

    def _decision_path(self) -> Path:
        return self.artifacts.with_name(self.artifacts.name + "_drop.npz")

    def _save_drops(self, keys: np.ndarray) -> None:
        atomic_write_arrays(self._decision_path(), keys=np.sort(keys.astype(np.int64)))

    def apply(self, document):
        if not hasattr(self, "dropped"):
            self.dropped = set(
                read_arrays(self._decision_path(), "de-duplication decision", ("keys",))["keys"].tolist()
            )
        return self.name if document.meta["key"] in self.dropped else None


class ExactDedup(DropKeys):
    name = "exact_dedup"

    def measure(self, documents):
        digests = [np.frombuffer(dedup.exact_fingerprint(document.text), dtype=np.uint8) for document in documents]
        return {"keys": _keys(documents), "digests": np.stack(digests) if digests else np.zeros((0, 16), np.uint8)}

    def decide(self, measurements):
        keys, digests = measurements["keys"], measurements["digests"]
        # np.unique returns the first index of each distinct digest; corpus order makes it the first copy.
        _, first = np.unique(digests, axis=0, return_index=True)
        keep = np.zeros(len(keys), dtype=bool)
        keep[first] = True
        self._save_drops(keys[~keep])
        return {"duplicates": int((~keep).sum())}


class MinHashDedup(DropKeys):
    name = "minhash_dedup"
    config_class = dedup.MinHashConfig

    def measure(self, documents):
        signatures = dedup.minhash_signatures([document.text for document in documents], self.config)
        return {"keys": _keys(documents), "signatures": signatures}

    def decide(self, measurements):
        keys = measurements["keys"]
        representatives = dedup.near_duplicate_clusters(measurements["signatures"], self.config)
        duplicate = representatives != np.arange(len(keys))
        self._save_drops(keys[duplicate])
        return {
            "near_duplicates": int(duplicate.sum()),
            "clusters_with_duplicates": int(len(np.unique(representatives[duplicate]))),
        }


@dataclass
class LineDedupOptions:
    min_documents: int = 2  # a line is repeated when this many documents hold it; the first one keeps it
    min_line_characters: int = dedup.MIN_LINE_CHARACTERS  # shorter lines ("}", "Thanks!") are never removed

    def __post_init__(self):
        check(self.min_documents >= 2, "min_documents", self.min_documents, "must be at least 2")
        check(self.min_line_characters >= 1, "min_line_characters", self.min_line_characters, "must be at least 1")


class LineDedup(CorpusStep):
    name = "line_dedup"
    config_class = LineDedupOptions
    # Lines such as "return None" legitimately repeat across source files; removing them would break the code.
    profiles = ("prose",)

    def _decision_path(self) -> Path:
        return self.artifacts.with_name(self.artifacts.name + "_lines.npz")

    def measure(self, documents):
        documents = [document for document in documents if document.meta["profile"] in self.profiles]
        hashes = [dedup.line_hashes(document.text, self.config.min_line_characters) for document in documents]
        keys = np.repeat(_keys(documents), [len(h) for h in hashes])
        return {"keys": keys, "hashes": np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)}

    def decide(self, measurements):
        repeated = dedup.RepeatedLines.find(measurements["keys"], measurements["hashes"], self.config.min_documents)
        repeated.save(self._decision_path())
        return {"repeated_lines": len(repeated)}

    def apply(self, document):
        if not hasattr(self, "repeated"):
            self.repeated = dedup.RepeatedLines.load(self._decision_path())
        text, removed = self.repeated.remove(document.text, document.meta["key"])
        if removed:
            self.counts["modified_documents"] += 1
            self.counts["lines_removed"] += removed
            document.text = text
        return None if text.strip() else "line_dedup:empty"


class ScoreStep(CorpusStep):
    """Score every document (kept in ``meta[meta_key]``), then keep a band of scores fixed on the whole corpus."""

    meta_key: ClassVar[str]

    def _decision_path(self) -> Path:
        return self.artifacts.with_name(self.artifacts.name + "_band.json")

    def scores(self, documents: list[Document]) -> np.ndarray:
        raise NotImplementedError

    def measure(self, documents):
        scores = self.scores(documents) if documents else np.zeros(0)
        for document, score in zip(documents, scores):
            document.meta[self.meta_key] = None if np.isnan(score) else round(float(score), 5)
        return {"keys": _keys(documents), "scores": scores}

    def decide(self, measurements):
        low, high = self.config.bounds(measurements["scores"])
        atomic_write_json(self._decision_path(), {"low": low, "high": high})
        return {"keep_low": low, "keep_high": high}

    def apply(self, document):
        if not hasattr(self, "band"):
            band = read_json(self._decision_path())
            self.band = (band["low"], band["high"])
        score = document.meta.get(self.meta_key)
        if score is None:
            return None  # nothing to score (no tokens): left to the other filters
        if score < self.band[0]:
            return f"{self.name}:below_band"
        if score > self.band[1]:
            return f"{self.name}:above_band"
        return None


class Perplexity(ScoreStep):
    name, config_class, meta_key = "perplexity", quality.PerplexityConfig, "bits_per_byte"

    def setup(self, pool):
        from llmkit.model.checkpoint import resolve_checkpoint

        return {"checkpoint": str(resolve_checkpoint(self.config.checkpoint))}

    def scores(self, documents):
        if not hasattr(self, "scorer"):
            self.scorer = quality.PerplexityScorer(self.config)
        return self.scorer.score([document.text for document in documents])


class Classifier(ScoreStep):
    name, config_class, meta_key = "classifier", quality.ClassifierConfig, "quality_score"

    def _model_path(self) -> Path:
        return self.artifacts.with_name(self.artifacts.name + "_model.npz")

    def setup(self, pool):
        documents = iter_documents(self.config.reference, self.config.reference_text_field)
        good = [document.text for document in islice(documents, self.config.max_documents)]
        model, metrics = quality.QualityClassifier.train(
            good, [document.text for document in pool[: self.config.max_documents]], self.config
        )
        model.save(self._model_path())
        return metrics

    def scores(self, documents):
        if not hasattr(self, "model"):
            self.model = quality.QualityClassifier.load(self._model_path())
        return self.model.score([document.text for document in documents])


STEPS: dict[str, type[Step]] = {
    step.name: step
    for step in (
        Clean,
        Language,
        GopherQuality,
        GopherRepetition,
        C4,
        Keyword,
        CodeQuality,
        Perplexity,
        Classifier,
        ExactDedup,
        MinHashDedup,
        LineDedup,
        PII,
        Decontaminate,
    )
}


def parse_steps(entries: list, source: str) -> list[tuple[str, object]]:
    """``["clean", {"minhash_dedup": {"threshold": 0.7}}, ...]`` -> ``[(name, config), ...]``, each config validated."""
    parsed = []
    for position, entry in enumerate(entries):
        if isinstance(entry, str):
            name, options = entry, {}
        elif isinstance(entry, dict) and len(entry) == 1:
            name, options = next(iter(entry.items()))
            options = options or {}
        else:
            raise ConfigError(
                f"steps[{position}]", entry, "expected a step name or a one-key mapping {name: {options}}"
            )
        if name not in STEPS:
            raise ConfigError(f"steps[{position}]", name, f"unknown step; known: {', '.join(STEPS)}")
        if not isinstance(options, dict):
            raise ConfigError(f"steps[{position}].{name}", options, "expected a mapping of options")
        try:
            parsed.append((name, build(STEPS[name].config_class, options, source=f"{source} steps[{position}].{name}")))
        except ConfigError as error:  # name the step, not only its option
            raise ConfigError(f"steps[{position}].{name}.{error.field}", error.value, error.reason) from None
    return parsed
