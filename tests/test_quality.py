"""Model-based quality scores (perplexity, classifier, stored without pickle), score bands, and the
mixture/curriculum arithmetic."""

import json
import math
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_config

from llmkit.data.mixture import mixture_epochs, order_documents, sample_mixture
from llmkit.data.pipeline import PipelineConfig, run_pipeline
from llmkit.data.quality import ClassifierConfig, PerplexityConfig, PerplexityScorer, QualityClassifier, ScoreBand
from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer
from llmkit.errors import ConfigError, InputError
from llmkit.model import Transformer
from llmkit.model.checkpoint import write_model
from llmkit.token_data import load_manifest
from llmkit.tokenizer import Tokenizer

TEXTS = ["the river runs to the sea", "a b c d e f g", "zzzz qqqq xxxx", "hello world, hello river", "x"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny model with a character tokenizer, saved as a checkpoint."""
    directory = tmp_path_factory.mktemp("checkpoint")
    (directory / "corpus.txt").write_text(" ".join(TEXTS) + " abcdefghijklmnopqrstuvwxyz,")
    train_tokenizer(
        TokenizerConfig(
            source=str(directory / "corpus.txt"), out=str(directory), kind="char", vocab_size=64, held_out_fraction=0
        )
    )
    tokenizer = Tokenizer.load(directory)
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size, context_length=32))
    write_model(directory, model.state_dict(), model.config, {"tokenizer_sha256": tokenizer.sha256})
    return directory


def reference_bits_per_byte(model, tokenizer, text: str, max_tokens: int) -> float:
    """One document at a time, no padding: -sum log2 p(token | <|endoftext|> + previous) / UTF-8 bytes."""
    ids = tokenizer.encode(text)[:max_tokens]
    inputs = torch.tensor([[tokenizer.eot_id] + ids])
    with torch.no_grad():
        log_probabilities = torch.log_softmax(model(inputs[:, :-1]).double(), dim=-1)[0]
    nats = -sum(log_probabilities[position, token].item() for position, token in enumerate(ids))
    return nats / math.log(2) / len(tokenizer.decode(ids).encode("utf-8"))


def test_batched_perplexity_scores_equal_one_document_at_a_time(checkpoint):
    scorer = PerplexityScorer(PerplexityConfig(checkpoint=str(checkpoint), max_tokens=12, batch_size=3))
    scores = scorer.score(TEXTS + [""])
    expected = [reference_bits_per_byte(scorer.model, scorer.tokenizer, text, 12) for text in TEXTS]
    np.testing.assert_allclose(scores[:-1], expected, rtol=1e-4)
    assert np.isnan(scores[-1])  # nothing to score


def test_score_band_combines_quantiles_and_absolute_bounds():
    scores = np.arange(101, dtype=float)
    assert ScoreBand(upper_quantile=0.9).bounds(scores) == (-math.inf, 90.0)
    assert ScoreBand(lower_quantile=0.1, maximum=50).bounds(scores) == (10.0, 50)
    assert ScoreBand(minimum=95, upper_quantile=0.9).bounds(scores) == (95, 90.0)  # an empty band: nothing is kept
    with pytest.raises(ConfigError, match="lower_quantile"):
        ScoreBand(lower_quantile=0.5, upper_quantile=0.5)


def prose(rng: random.Random) -> str:
    words = "the river garden morning letter window story music family friend teacher village bridge summer".split()
    return " ".join(f"The {rng.choice(words)} and the {rng.choice(words)} were {rng.choice(words)}." for _ in range(6))


def junk(rng: random.Random) -> str:
    return " ".join(
        rng.choice(["click", "here", "buy", "now", "$$$", "free", "win", ">>>", "casino", "!!!"]) for _ in range(30)
    )


def test_classifier_separates_reference_text_from_junk_with_a_high_held_out_auc():
    rng = random.Random(0)
    good = [prose(rng) for _ in range(60)]
    pool = [junk(rng) for _ in range(40)] + [prose(rng) for _ in range(20)]
    classifier, metrics = QualityClassifier.train(good, pool, ClassifierConfig(reference="unused", features=2**12))
    # A perfect junk detector scores AUC 40/60 * 1 + 20/60 * 0.5 = 0.83: a third of the pool is prose like the
    # reference.
    assert 0.75 < metrics["held_out_auc"] < 0.95 and metrics["held_out_documents"] == 24
    scores = classifier.score([prose(rng) for _ in range(10)] + [junk(rng) for _ in range(10)])
    assert scores[:10].min() > scores[10:].max()


class Planted:
    """A pickle whose loading creates ``marker``: the code a shared work folder could plant."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_the_classifier_round_trips_as_arrays_and_never_reads_a_pickle(tmp_path, monkeypatch):
    rng = random.Random(3)
    classifier, _ = QualityClassifier.train(
        [prose(rng) for _ in range(30)],
        [junk(rng) for _ in range(30)],
        ClassifierConfig(reference="unused", features=2**12, ngram=3),
    )
    classifier.save(tmp_path / "05_classifier_model.pkl")  # the pipeline step's name for it
    assert os.listdir(tmp_path) == ["05_classifier_model.npz"]
    marker = tmp_path / "code_ran"
    (tmp_path / "05_classifier_model.pkl").write_bytes(pickle.dumps(Planted(marker)))
    monkeypatch.setattr(pickle, "load", None)  # any unpickling below fails loudly
    monkeypatch.setattr(pickle, "loads", None)
    loaded = QualityClassifier.load(tmp_path / "05_classifier_model.pkl")
    texts = [prose(rng) for _ in range(5)] + [junk(rng) for _ in range(5)] + ["", "Mixed: the river and $$$ casino"]
    assert np.array_equal(loaded.score(texts), classifier.score(texts))
    assert loaded.vectorizer.get_params() == classifier.vectorizer.get_params()
    (tmp_path / "05_classifier_model.npz").write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(InputError, match="05_classifier_model.npz: not a valid quality classifier"):
        QualityClassifier.load(tmp_path / "05_classifier_model.pkl")
    assert not marker.exists()


def test_roc_auc_matches_the_pairwise_definition():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels, scores = rng.integers(0, 2, 200), rng.random(200)
    positives, negatives = scores[labels == 1], scores[labels == 0]
    pairwise = np.mean([(p > n) + 0.5 * (p == n) for p in positives for n in negatives])
    assert roc_auc_score(labels, scores) == pytest.approx(pairwise)


def test_classifier_and_perplexity_steps_in_a_pipeline(tmp_path, checkpoint):
    rng = random.Random(1)
    reference = tmp_path / "reference.jsonl"
    reference.write_text("\n".join(json.dumps({"text": prose(rng)}) for _ in range(60)) + "\n")
    raw = tmp_path / "raw.jsonl"
    raw.write_text(
        "\n".join(
            json.dumps({"text": text}) for text in [prose(rng) for _ in range(10)] + [junk(rng) for _ in range(50)]
        )
        + "\n"
    )
    out = tmp_path / "data"
    summary = run_pipeline(
        PipelineConfig(
            sources=[str(raw)],
            tokenizer=str(checkpoint),
            out=str(out),
            workers=1,
            val_fraction=0.0,
            documents_per_shard=16,
            steps=[
                {"classifier": {"reference": str(reference), "features": 4096}},
                {"perplexity": {"checkpoint": str(checkpoint), "upper_quantile": 0.5}},
            ],
            curriculum="perplexity",
        )
    )
    # the pool is the raw corpus: a perfect junk detector scores AUC 50/60 + 10/60 * 0.5 = 0.92 against it
    assert summary["classifier_held_out_auc"] > 0.85
    manifest = load_manifest(out)
    statistics = manifest["filter_statistics"]
    assert statistics["classifier"]["removed"]["classifier:below_band"]["documents"] == 50  # every junk document
    # the perplexity band keeps the better half of what is left
    assert statistics["perplexity"]["removed"]["perplexity:above_band"]["documents"] == 5
    kept = [
        json.loads(line)
        for path in sorted((out / "work" / "phase_2").glob("*.kept.jsonl"))
        for line in path.read_text().splitlines()
    ]
    assert len(kept) == 5 and all(
        record["meta"]["bits_per_byte"] <= manifest["step_decisions"]["perplexity"]["keep_high"] for record in kept
    )


def test_mixture_epochs_follow_the_weights():
    assert mixture_epochs({"a": 100, "b": 300}, {"a": None, "b": None}) == {"a": 1.0, "b": 1.0}
    # a gets 3/4 of 400 bytes = 300 from 100 (3 epochs), b gets 100 of its 300 (1/3 epoch)
    assert mixture_epochs({"a": 100, "b": 300}, {"a": 3.0, "b": 1.0}) == pytest.approx({"a": 3.0, "b": 1 / 3})
    assert mixture_epochs({"a": 100, "b": 300}, {"a": 1.0, "b": 1.0}, total_bytes=800) == pytest.approx(
        {"a": 4.0, "b": 4 / 3}
    )
    # a source the filters emptied gets no epochs; the others split the whole mixture
    assert mixture_epochs({"a": 100, "b": 0}, {"a": 1.0, "b": 3.0}) == {"a": 1.0, "b": 0.0}
    with pytest.raises(ConfigError, match="missing for b"):
        mixture_epochs({"a": 100, "b": 300}, {"a": 1.0, "b": None})


def test_sample_mixture_repeats_whole_epochs_and_samples_the_fraction_by_bytes():
    sources = ["a"] * 4 + ["b"] * 10
    sizes = [10] * 14
    chosen = sample_mixture(sources, sizes, {"a": 2.5, "b": 0.3}, seed=0)
    counts = np.bincount(chosen, minlength=14)
    assert sorted(counts[:4]) == [2, 2, 3, 3]  # two epochs plus half of a's bytes
    assert counts[4:].sum() == 3 and counts[4:].max() == 1  # 30 % of b's 100 bytes, no repeats
    assert sample_mixture(sources, sizes, {"a": 2.5, "b": 0.3}, seed=0) == chosen


def test_order_documents_shuffles_then_sorts_easy_first():
    metas = [{"bytes": size, "quality_score": size / 10} for size in (5, 3, 9, 1, 7)]
    assert sorted(order_documents(list(range(5)), metas, "none", seed=1)) == list(range(5))
    assert order_documents(list(range(5)), metas, "length", seed=1) == [3, 1, 0, 4, 2]
    assert order_documents(list(range(5)), metas, "quality", seed=1) == [2, 4, 0, 1, 3]
