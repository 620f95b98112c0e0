"""Model-based quality scores: perplexity under an llmkit checkpoint, and a light quality classifier.

Perplexity filtering (Wenzek et al. 2020, CCNet) scores every document with a
language model trained on text we trust and drops the documents it finds least
likely. Scores are bits per byte, so they compare across tokenizers and lengths.

The classifier filter follows GPT-3 (Brown et al. 2020, appendix A): a linear
classifier on hashed word n-grams learns "reference" (curated text, label 1)
against the raw pool (label 0); its probability is the document's quality
score. scikit-learn provides the hashing vectoriser, logistic regression and
the held-out ROC AUC. The trained classifier is stored as plain arrays (an
``.npz`` read without pickle), so a work folder others can write to cannot make
the pipeline run their code.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from llmkit.config import check
from llmkit.errors import InputError
from llmkit.io import atomic_write_arrays, read_arrays


@dataclass
class ScoreBand:
    """Which scores to keep: absolute bounds and/or a band of the corpus's score quantiles."""

    minimum: float | None = field(default=None, metadata={"help": "drop documents scoring below this"})
    maximum: float | None = field(default=None, metadata={"help": "drop documents scoring above this"})
    lower_quantile: float = field(
        default=0.0, metadata={"help": "drop the documents below this quantile of the corpus's scores"}
    )
    upper_quantile: float = field(
        default=1.0, metadata={"help": "drop the documents above this quantile of the corpus's scores"}
    )

    def __post_init__(self) -> None:
        check(
            0 <= self.lower_quantile < self.upper_quantile <= 1,
            "lower_quantile",
            (self.lower_quantile, self.upper_quantile),
            "need 0 <= lower_quantile < upper_quantile <= 1",
        )
        check(
            self.minimum is None or self.maximum is None or self.minimum <= self.maximum,
            "minimum",
            (self.minimum, self.maximum),
            "minimum must not exceed maximum",
        )

    def bounds(self, scores: np.ndarray) -> tuple[float, float]:
        """The effective [low, high] interval for a corpus with these ``scores``."""
        low, high = -math.inf, math.inf
        finite = scores[np.isfinite(scores)]
        if len(finite):
            if self.lower_quantile > 0:
                low = float(np.quantile(finite, self.lower_quantile))
            if self.upper_quantile < 1:
                high = float(np.quantile(finite, self.upper_quantile))
        if self.minimum is not None:
            low = max(low, self.minimum)
        if self.maximum is not None:
            high = min(high, self.maximum)
        return low, high


@dataclass
class PerplexityConfig(ScoreBand):
    checkpoint: str = field(default="runs/base", metadata={"help": "llmkit checkpoint that scores the documents"})
    max_tokens: int = field(default=512, metadata={"help": "score at most this many leading tokens of each document"})
    batch_size: int = field(default=16, metadata={"help": "documents scored per forward pass"})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda or cuda:N"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.max_tokens >= 1, "max_tokens", self.max_tokens, "must be at least 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1")


class PerplexityScorer:
    """Bits per byte of each document's first ``max_tokens`` tokens under a checkpoint."""

    def __init__(self, config: PerplexityConfig):
        from llmkit.infer.engine import Engine, EngineConfig

        engine = Engine.from_config(EngineConfig(checkpoint=config.checkpoint, device=config.device))
        self.model, self.tokenizer, self.config = engine.model, engine.tokenizer, config
        # The document token opens every sequence, as documents follow it in the training shards.
        self.max_tokens = min(config.max_tokens, self.model.config.context_length - 1)

    @torch.inference_mode()
    def score(self, texts: Sequence[str]) -> np.ndarray:
        scores = np.full(len(texts), np.nan)
        encoded = [ids[: self.max_tokens] for ids in self.tokenizer.encode_batch(list(texts))]
        for start in range(0, len(texts), self.config.batch_size):
            batch = encoded[start : start + self.config.batch_size]
            longest = max(len(ids) for ids in batch)
            if longest == 0:
                continue
            eot = self.tokenizer.eot_id
            inputs = torch.full((len(batch), longest + 1), eot, dtype=torch.long)
            mask = torch.zeros(len(batch), longest, dtype=torch.bool)
            for row, ids in enumerate(batch):
                inputs[row, 1 : len(ids) + 1] = torch.tensor(ids, dtype=torch.long)
                mask[row, : len(ids)] = True
            device = self.model.token_embedding.weight.device
            logits = self.model(inputs[:, :-1].to(device)).float()
            nats = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), inputs[:, 1:].to(device), reduction="none"
            ).cpu()
            nats = (nats * mask).sum(dim=1)
            for row, ids in enumerate(batch):
                size = len(self.tokenizer.decode(ids).encode("utf-8"))
                if size:
                    scores[start + row] = float(nats[row]) / (size * math.log(2))
        return scores


@dataclass
class ClassifierConfig(ScoreBand):
    reference: str = field(
        default="",
        metadata={"help": "source of 'good' reference text (llmkit source syntax: file, folder, .jsonl, ...)"},
    )
    reference_text_field: str = field(
        default="text", metadata={"help": "JSONL key / Parquet column of the reference text"}
    )
    max_documents: int = field(default=20_000, metadata={"help": "documents per class used for training"})
    ngram: int = field(default=2, metadata={"help": "word n-grams up to this length are features"})
    features: int = field(default=2**20, metadata={"help": "hashed feature dimensions"})
    held_out_fraction: float = field(default=0.2, metadata={"help": "fraction kept aside to measure the ROC AUC"})
    seed: int = field(default=0, metadata={"help": "sampling and split seed"})

    def __post_init__(self) -> None:
        if self.minimum is None and self.lower_quantile == 0:
            self.minimum = 0.5  # more likely reference than pool
        super().__post_init__()
        check(bool(self.reference), "reference", self.reference, "name the 'good' reference source")
        check(self.max_documents >= 2, "max_documents", self.max_documents, "must be at least 2")
        check(1 <= self.ngram <= 5, "ngram", self.ngram, "must be in 1..5")
        check(self.features >= 16, "features", self.features, "must be at least 16")
        check(0 < self.held_out_fraction < 1, "held_out_fraction", self.held_out_fraction, "must be in (0, 1)")


class QualityClassifier:
    """Hashed word n-grams -> logistic regression probability of being reference text."""

    def __init__(self, vectorizer, model=None):
        self.vectorizer, self.model = vectorizer, model

    @classmethod
    def train(
        cls, good: Sequence[str], pool: Sequence[str], config: ClassifierConfig
    ) -> tuple["QualityClassifier", dict]:
        """Fit on ``good`` (label 1) against ``pool`` (label 0); return the classifier and its held-out metrics."""
        from sklearn.feature_extraction.text import HashingVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score

        if len(good) < 2 or len(pool) < 2:
            raise InputError(
                f"classifier: need at least 2 reference and 2 pool documents (got {len(good)} and {len(pool)})"
            )
        classifier = cls(
            HashingVectorizer(
                ngram_range=(1, config.ngram),
                n_features=config.features,
                alternate_sign=False,
                norm="l2",
                lowercase=True,
            )
        )
        texts = list(good) + list(pool)
        labels = np.array([1] * len(good) + [0] * len(pool))
        order = list(range(len(texts)))
        random.Random(config.seed).shuffle(order)
        held = max(2, int(len(order) * config.held_out_fraction))
        test, train = order[:held], order[held:]
        if len(set(labels[train])) < 2 or len(set(labels[test])) < 2:
            raise InputError("classifier: the training or held-out split lacks one of the classes; give more documents")
        features = classifier.vectorizer.transform(texts)
        classifier.model = LogisticRegression(max_iter=1000, class_weight="balanced").fit(
            features[train], labels[train]
        )
        held_out_scores = classifier.model.predict_proba(features[test])[:, 1]
        metrics = {
            "held_out_auc": float(roc_auc_score(labels[test], held_out_scores)),
            "train_documents": len(train),
            "held_out_documents": len(test),
            "reference_documents": len(good),
            "pool_documents": len(pool),
        }
        return classifier, metrics

    def score(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.predict_proba(self.vectorizer.transform(list(texts)))[:, 1]

    def save(self, path: str | Path) -> None:
        """``path`` with the suffix ``.npz``: the model's coefficients, intercept and classes, and every
        setting of the vectoriser (JSON) but its dtype (the default, float64)."""
        settings = {name: value for name, value in self.vectorizer.get_params().items() if name != "dtype"}
        atomic_write_arrays(
            _arrays_path(path),
            coef=self.model.coef_,
            intercept=self.model.intercept_,
            classes=self.model.classes_,
            vectorizer=np.array(json.dumps(settings)),
        )

    @classmethod
    def load(cls, path: str | Path) -> "QualityClassifier":
        """The classifier :meth:`save` wrote, rebuilt as the same scikit-learn objects (same predictions)."""
        from sklearn.feature_extraction.text import HashingVectorizer
        from sklearn.linear_model import LogisticRegression

        path = _arrays_path(path)
        arrays = read_arrays(path, "quality classifier", ("coef", "intercept", "classes", "vectorizer"))
        try:
            settings = json.loads(str(arrays["vectorizer"]))
            vectorizer = HashingVectorizer(**{**settings, "ngram_range": tuple(settings["ngram_range"])})
        except (ValueError, TypeError, KeyError) as error:
            raise InputError(f"{path}: not a valid quality classifier (vectoriser settings: {error})") from None
        if (
            arrays["coef"].shape != (1, vectorizer.n_features)
            or arrays["intercept"].shape != (1,)
            or arrays["classes"].shape != (2,)
        ):
            raise InputError(f"{path}: not a valid quality classifier (arrays of the wrong shapes)")
        model = LogisticRegression()
        model.coef_, model.intercept_, model.classes_ = arrays["coef"], arrays["intercept"], arrays["classes"]
        model.n_features_in_ = vectorizer.n_features
        return cls(vectorizer, model)


def _arrays_path(path: str | Path) -> Path:
    # Whatever suffix the caller names: work folders of earlier versions hold a pickle under ".pkl",
    # which must never be read.
    return Path(path).with_suffix(".npz")
