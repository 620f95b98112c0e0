"""BLEU and ROUGE against values worked by hand on a two-sentence corpus."""

import json
import math

import pytest
from eval_fakes import ScriptedEngine

from llmkit.errors import InputError
from llmkit.eval.text_metrics import corpus_bleu, evaluate_bleu_rouge, load_reference_pairs, rouge_scores

HYPOTHESES = ["the cat sat on the mat", "a dog runs"]
REFERENCES = ["the cat sat on a mat", "a dog runs fast"]


def test_corpus_bleu_sums_ngram_counts_over_sentences():
    # Matched / total n-grams, n = 1..4: sentence 1 has 5/6, 3/5, 2/4, 1/3; sentence 2 has 3/3, 2/2, 1/1, 0/0.
    precisions = [8 / 9, 5 / 7, 3 / 5, 1 / 3]
    brevity_penalty = math.exp(1 - 10 / 9)  # 9 hypothesis words against 10 reference words
    expected = 100 * brevity_penalty * math.exp(sum(map(math.log, precisions)) / 4)
    result = corpus_bleu(HYPOTHESES, REFERENCES)
    assert result["bleu"] == pytest.approx(expected, rel=1e-9)
    assert result["brevity_penalty"] == pytest.approx(brevity_penalty)
    assert result["precisions"] == pytest.approx([100 * p for p in precisions])


def test_rouge_f1_by_hand():
    first, second = rouge_scores(HYPOTHESES, REFERENCES)
    # Sentence 1: 5 of 6 unigrams shared ("the" counted once), 3 of 5 bigrams, LCS "the cat sat on mat" = 5.
    assert first == pytest.approx({"rouge1": 5 / 6, "rouge2": 3 / 5, "rougeL": 5 / 6})
    # Sentence 2: precision 1, recall 3/4 for unigrams and LCS, 2/3 for bigrams.
    f1 = lambda precision, recall: 2 * precision * recall / (precision + recall)  # noqa: E731
    assert second == pytest.approx({"rouge1": f1(1, 3 / 4), "rouge2": f1(1, 2 / 3), "rougeL": f1(1, 3 / 4)})


def test_rouge_stems_words():
    assert rouge_scores(["running dogs"], ["run dog"])[0] == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    )


def test_evaluation_generates_one_line_and_scores_it(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "Describe the cat:", "reference": REFERENCES[0]},
        {"prompt": "Describe the dog:", "completion": REFERENCES[1]},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    replies = {"Describe the cat:": " the cat sat on the mat", "Describe the dog:": " a dog runs"}
    engine = ScriptedEngine(lambda prompt, config: replies[prompt])
    result = evaluate_bleu_rouge(engine, load_reference_pairs(path))
    assert all(config.stop == ["\n"] and config.temperature == 0 for config in engine.calls[0]["configs"])
    assert result["bleu"] == pytest.approx(corpus_bleu(HYPOTHESES, REFERENCES)["bleu"])
    assert result["rouge1"] == pytest.approx((5 / 6 + 6 / 7) / 2)
    assert [record["output"] for record in result["per_example"]] == HYPOTHESES


def test_a_pair_without_reference_is_refused(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(InputError, match="pairs.jsonl:1"):
        load_reference_pairs(path)
