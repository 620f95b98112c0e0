"""BM25 against hand-worked values and a direct evaluation of the formula; the corpus loader's inputs and errors."""

import json
import math

import pytest

from llmkit.errors import ConfigError, InputError
from llmkit.infer.retrieval import BM25, load_corpus, tokenize

CORPUS = ["The cat sat", "the dog sat on the mat", "cat, cat... dog!"]


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("Cat, CAT... dog_2!  Été") == ["cat", "cat", "dog_2", "été"]


def test_single_term_scores_match_hand_worked_values():
    # N = 3 documents of lengths 3, 6, 3 -> avgdl 4. "cat" is in 2 of them:
    # idf = ln((3 - 2 + 0.5) / (2 + 0.5) + 1) = ln(1.6).
    # Length norm of a 3-token document: 1 - 0.75 + 0.75 * 3 / 4 = 0.8125, so k1 * norm = 1.21875.
    # Document 0 has cat once:  ln(1.6) * 1 * 2.5 / (1 + 1.21875) = ln(1.6) * 2.5 / 2.21875
    # Document 2 has cat twice: ln(1.6) * 2 * 2.5 / (2 + 1.21875) = ln(1.6) * 5 / 3.21875
    scores = BM25(CORPUS).scores("cat")
    assert scores == pytest.approx([math.log(1.6) * 2.5 / 2.21875, 0.0, math.log(1.6) * 5 / 3.21875], rel=1e-12)


def naive_bm25(documents, query, k1, b):
    """The formula evaluated literally, document by document, without an index."""
    tokenized = [tokenize(document) for document in documents]
    average = sum(map(len, tokenized)) / len(tokenized)
    results = []
    for words in tokenized:
        total = 0.0
        for term in tokenize(query):
            containing = sum(term in other for other in tokenized)
            idf = math.log((len(tokenized) - containing + 0.5) / (containing + 0.5) + 1)
            count = words.count(term)
            if count:  # an absent term adds nothing (and with k1 = 0 the formula would be 0/0)
                total += idf * count * (k1 + 1) / (count + k1 * (1 - b + b * len(words) / average))
        results.append(total)
    return results


@pytest.mark.parametrize("k1, b", [(1.5, 0.75), (1.2, 0.0), (0.0, 1.0), (2.0, 0.3)])
@pytest.mark.parametrize("query", ["the dog sat", "cat cat mat", "unknown words only", "sat"])
def test_scores_match_a_literal_evaluation_of_the_formula(query, k1, b):
    assert BM25(CORPUS, k1=k1, b=b).scores(query) == pytest.approx(
        naive_bm25(CORPUS, query, k1, b), rel=1e-12, abs=1e-15
    )


def test_top_ranks_best_first_and_breaks_ties_by_index():
    index = BM25(["apple banana", "cherry", "apple banana", "banana apple apple", "cherry"])
    assert index.top("apple", 2) == [3, 0]
    assert index.top("cherry", 5) == [1, 4, 0, 2, 3]  # the zero scores follow in corpus order
    assert index.top("nothing matches", 3) == [0, 1, 2]
    assert index.top("apple", 0) == []


def test_a_term_in_most_documents_still_counts_positively():
    # Textbook idf log((N - n + 0.5) / (n + 0.5)) is negative for a term in 3 of 4 documents.
    scores = BM25(["x y", "x", "x z", "w"]).scores("x")
    assert all(score > 0 for score in scores[:3]) and scores[3] == 0


def test_bad_parameters_and_empty_corpus_are_refused():
    with pytest.raises(ConfigError, match="b"):
        BM25(CORPUS, b=1.5)
    with pytest.raises(ConfigError, match="k1"):
        BM25(CORPUS, k1=-1)
    with pytest.raises(InputError, match="empty"):
        BM25([])
    assert BM25(["", "  "]).scores("anything") == [0.0, 0.0]


def test_load_corpus_reads_txt_jsonl_and_directories(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph\nstill first.\n\n  \nSecond one.\n\n\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(
        json.dumps({"text": "from jsonl"}) + "\n\n" + json.dumps({"text": "  ", "id": 2}) + "\n", encoding="utf-8"
    )
    (tmp_path / "ignored.md").write_text("not a corpus file", encoding="utf-8")
    assert load_corpus(tmp_path / "a.txt") == ["First paragraph\nstill first.", "Second one."]
    assert load_corpus(tmp_path / "sub" / "b.jsonl") == ["from jsonl"]
    assert load_corpus(tmp_path) == ["First paragraph\nstill first.", "Second one.", "from jsonl"]


def test_load_corpus_errors_name_the_file_and_problem(tmp_path):
    with pytest.raises(InputError, match="missing.txt: corpus not found"):
        load_corpus(tmp_path / "missing.txt")
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    with pytest.raises(InputError, match="must end in .txt or .jsonl"):
        load_corpus(tmp_path / "notes.md")
    with pytest.raises(InputError, match="no .txt or .jsonl files"):
        load_corpus(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.jsonl:2: expected a string field 'text', got NoneType"):
        load_corpus(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.jsonl:2: not valid JSON"):
        load_corpus(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").unlink()
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(InputError, match="latin.txt: not valid UTF-8"):
        load_corpus(tmp_path / "latin.txt")
    (tmp_path / "latin.txt").write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(InputError, match="has no text"):
        load_corpus(tmp_path / "latin.txt")
