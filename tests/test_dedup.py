import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from llmkit.data import dedup
from llmkit.data.dedup import (
    EMPTY_SIGNATURE_VALUE,
    MinHashConfig,
    RepeatedLines,
    exact_fingerprint,
    line_hashes,
    minhash_signatures,
    near_duplicate_clusters,
    shingle_hashes,
)
from llmkit.errors import ConfigError, InputError


def naive_shingles(text: str, ngram: int) -> set[tuple[str, ...]]:
    """The reference: Python's own lowercasing and word splitting, n-grams as tuples."""
    words = text.lower().split()
    if 0 < len(words) < ngram:
        return {tuple(words)}
    return {tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1)}


def jaccard(first: set, second: set) -> float:
    return len(first & second) / len(first | second)


def hash_jaccard(first: np.ndarray, second: np.ndarray) -> float:
    return len(np.intersect1d(first, second)) / len(np.union1d(first, second))


def disjoint_pair(first_word: int, similarity: float, union: int = 200) -> tuple[str, str]:
    """Two texts of distinct words whose word sets have exactly ``similarity`` Jaccard (words from ``first_word``
    on)."""
    words = [f"w{first_word + k}" for k in range(union)]
    shared = round(similarity * union)
    half = (union - shared) // 2
    return " ".join(words[: shared + half]), " ".join(words[:shared] + words[shared + half :])


def random_text(rng: np.random.Generator, vocabulary: list[str], words: int) -> str:
    return " ".join(rng.choice(vocabulary, words))


# --- exact fingerprints -------------------------------------------------------------------------


def test_exact_fingerprint_ignores_formatting_but_not_words():
    reference = exact_fingerprint("The quick brown fox.")
    assert len(reference) == 16
    for variant in ["  the QUICK\tbrown\n\nfox.  ", "The\u00a0quick brown fox.", "Ｔｈｅ ｑｕｉｃｋ brown fox."]:
        assert exact_fingerprint(variant) == reference, variant
    for changed in ["The quick brown dog.", "The quick brown fox!", "The quickbrown fox.", "quick The brown fox."]:
        assert exact_fingerprint(changed) != reference, changed


# --- shingles -----------------------------------------------------------------------------------

TRICKY_TEXTS = [
    "One two three four five six seven one two three four five",
    "ONE two\tthree\nfour  five six\u00a0seven\u3000eight",  # tab, newline, NBSP and ideographic space separate words
    "café naïve 日本語 テキスト café naïve 日本語 テキスト",
    "a\x00 a b\x1cc d e f",  # a NUL inside a word; 0x1c separates words for str.split()
    "b a c d e a b c d e",
    "short text",
    "word",
    "",
    " \n\t ",
]


@pytest.mark.parametrize("ngram", [1, 2, 3, 5])
def test_shingle_hashes_match_python_ngram_sets(ngram):
    hashes = [shingle_hashes(text, ngram) for text in TRICKY_TEXTS]
    references = [naive_shingles(text, ngram) for text in TRICKY_TEXTS]
    for text, found, reference in zip(TRICKY_TEXTS, hashes, references):
        assert found.dtype == np.uint64
        assert len(found) == len(reference), text
    for i in range(len(TRICKY_TEXTS)):
        for j in range(i + 1, len(TRICKY_TEXTS)):
            if references[i] or references[j]:
                assert hash_jaccard(hashes[i], hashes[j]) == jaccard(references[i], references[j]), (i, j)


def test_shingle_jaccard_on_random_texts_matches_python():
    rng = np.random.default_rng(0)
    vocabulary = [f"v{k}" for k in range(30)]  # small, so n-grams repeat within and across texts
    texts = [random_text(rng, vocabulary, int(rng.integers(3, 120))) for _ in range(12)]
    for first, second in zip(texts, texts[1:]):
        expected = jaccard(naive_shingles(first, 3), naive_shingles(second, 3))
        assert hash_jaccard(shingle_hashes(first, 3), shingle_hashes(second, 3)) == expected


def test_text_shorter_than_ngram_is_one_shingle_and_empty_text_none():
    assert len(shingle_hashes("just three words", 5)) == 1
    assert not np.array_equal(shingle_hashes("just three words", 5), shingle_hashes("just three", 5))
    assert len(shingle_hashes("", 5)) == 0
    assert len(shingle_hashes(" \n ", 5)) == 0


def test_lone_surrogates_and_empty_corpora_are_handled():
    # JSON decodes "\ud800" to a lone surrogate, which strict UTF-8 refuses to encode.
    assert exact_fingerprint("a \ud800") != exact_fingerprint("a")
    assert len(shingle_hashes("x \ud800 y", 1)) == 3
    assert len(line_hashes("a line with \ud800 inside")) == 1
    assert minhash_signatures([], MinHashConfig()).shape == (0, 112)
    assert near_duplicate_clusters(np.zeros((0, 112), dtype=np.uint32), MinHashConfig()).shape == (0,)
    assert len(RepeatedLines.find(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64))) == 0


# --- MinHash signatures -------------------------------------------------------------------------


def test_signature_of_a_union_is_the_minimum_and_ignores_order_and_repeats():
    config = MinHashConfig(ngram=1)
    first, second, union, shuffled = minhash_signatures(["a b c", "d e", "a b c d e", "e e d c b a a"], config)
    assert first.dtype == np.uint32 and first.shape == (config.num_perm,)
    np.testing.assert_array_equal(union, np.minimum(first, second))
    np.testing.assert_array_equal(shuffled, union)


def test_signatures_do_not_depend_on_batching(monkeypatch):
    rng = np.random.default_rng(1)
    vocabulary = [f"t{k}" for k in range(500)]
    # Short texts (one shingle of all their words) followed by others: n-grams must stop at a text's end.
    texts = [random_text(rng, vocabulary, int(rng.integers(0, 60))) for _ in range(40)] + [
        "",
        "x",
        "two words",
        "and more words",
    ]
    config = MinHashConfig(ngram=3)
    together = minhash_signatures(texts, config)
    one_by_one = np.stack([minhash_signatures([text], config)[0] for text in texts])
    monkeypatch.setattr(dedup, "_BATCH_CHARACTERS", 100)
    np.testing.assert_array_equal(minhash_signatures(texts, config), together)
    np.testing.assert_array_equal(together, one_by_one)
    assert (together[-4] == EMPTY_SIGNATURE_VALUE).all() and not (together[-3] == EMPTY_SIGNATURE_VALUE).any()


def test_seed_changes_the_permutations():
    text = ["some words to hash into a signature"]
    same = minhash_signatures(text, MinHashConfig(seed=1))
    np.testing.assert_array_equal(same, minhash_signatures(text, MinHashConfig(seed=1)))
    assert (same != minhash_signatures(text, MinHashConfig(seed=2))).mean() > 0.9


@pytest.mark.parametrize("similarity", [0.2, 0.5, 0.8, 0.95])
def test_estimated_jaccard_is_unbiased_with_binomial_variance(similarity):
    config = MinHashConfig(ngram=1)
    pairs = 100
    texts = [text for index in range(pairs) for text in disjoint_pair(index * 1000, similarity)]
    signatures = minhash_signatures(texts, config)
    estimates = (signatures[0::2] == signatures[1::2]).mean(axis=1)
    # Each estimate is a mean of num_perm indicators with success probability J (Broder 1997).
    variance = similarity * (1 - similarity) / config.num_perm
    assert abs(estimates.mean() - similarity) <= 4 * math.sqrt(variance / pairs)
    assert 0.6 <= estimates.var() / variance <= 1.5  # correlated permutations would inflate it


def test_estimated_jaccard_close_to_exact_on_perturbed_texts():
    config = MinHashConfig(ngram=5)
    rng = np.random.default_rng(2)
    vocabulary = [f"word{k}" for k in range(5000)]
    texts = []
    for _ in range(30):
        words = list(rng.choice(vocabulary, 300))
        copy = list(words)
        for position in rng.choice(300, int(rng.integers(0, 40)), replace=False):
            copy[position] = str(rng.choice(vocabulary))
        texts += [" ".join(words), " ".join(copy)]
    signatures = minhash_signatures(texts, config)
    for index in range(0, len(texts), 2):
        exact = jaccard(naive_shingles(texts[index], 5), naive_shingles(texts[index + 1], 5))
        estimate = (signatures[index] == signatures[index + 1]).mean()
        tolerance = 5 * math.sqrt(exact * (1 - exact) / config.num_perm) + 1 / config.num_perm
        assert abs(estimate - exact) <= tolerance, (exact, estimate)


# --- LSH clustering -----------------------------------------------------------------------------


@pytest.mark.parametrize("bands, rows", [(14, 8), (10, 4)])
def test_candidate_rate_follows_the_s_curve(bands, rows):
    config = MinHashConfig(ngram=1, bands=bands, rows=rows, threshold=0)
    pairs = 250
    for similarity in [0.3, 0.5, 0.7, 0.8, 0.9]:
        texts = [text for index in range(pairs) for text in disjoint_pair(index * 1000, similarity)]
        clusters = near_duplicate_clusters(minhash_signatures(texts, config), config)
        rate = (clusters[1::2] == clusters[0::2]).mean()
        expected = 1 - (1 - similarity**rows) ** bands
        assert abs(rate - expected) <= 4 * math.sqrt(expected * (1 - expected) / pairs) + 0.02, (
            similarity,
            rate,
            expected,
        )


def signature_rows(*rows: list[int]) -> np.ndarray:
    return np.array(rows, dtype=np.uint32)


def test_chains_join_one_cluster_under_the_smallest_index():
    config = MinHashConfig(bands=4, rows=2, threshold=0.5)
    signatures = signature_rows(
        [9, 9, 9, 9, 3, 4, 7, 8],  # 0: "c", shares bands 2-3 with row 3 only
        [50, 51, 52, 53, 54, 55, 56, 57],  # 1: unrelated
        [1, 2, 3, 4, 5, 6, 7, 8],  # 2: "a"
        [1, 2, 3, 4, 3, 4, 7, 8],  # 3: "b" = a with band 2 changed; c = b with bands 0-1 changed
        [1, 2, 60, 61, 62, 63, 64, 65],  # 4: shares band 0 with a and b, but estimated similarity 2/8 < 0.5
    )
    np.testing.assert_array_equal(near_duplicate_clusters(signatures, config), [0, 1, 0, 0, 4])
    # Without verification every candidate is merged.
    np.testing.assert_array_equal(
        near_duplicate_clusters(signatures, MinHashConfig(bands=4, rows=2, threshold=0)), [0, 1, 0, 0, 0]
    )


def test_empty_documents_are_never_near_duplicates():
    config = MinHashConfig(threshold=0)
    signatures = minhash_signatures(["", "   ", "same words here", "same words here", ""], config)
    np.testing.assert_array_equal(near_duplicate_clusters(signatures, config), [0, 1, 2, 2, 4])


def naive_clusters(signatures: np.ndarray, bands: int, rows: int, threshold: float) -> list[int]:
    """All pairs compared directly, a plain dictionary union-find."""
    parent = list(range(len(signatures)))

    def root(node):
        while parent[node] != node:
            node = parent[node]
        return node

    for i in range(len(signatures)):
        for j in range(i + 1, len(signatures)):
            shares_band = any(
                (signatures[i, b * rows : (b + 1) * rows] == signatures[j, b * rows : (b + 1) * rows]).all()
                for b in range(bands)
            )
            if shares_band and (signatures[i] == signatures[j]).mean() >= threshold:
                low, high = sorted((root(i), root(j)))
                parent[high] = low
    return [min(k for k in range(len(signatures)) if root(k) == root(i)) for i in range(len(signatures))]


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.75])
def test_clusters_match_all_pairs_reference(threshold):
    rng = np.random.default_rng(3)
    config = MinHashConfig(bands=4, rows=2, threshold=threshold)
    # A three-letter alphabet makes shared bands (and chains of them) common.
    signatures = rng.integers(0, 3, size=(60, 8)).astype(np.uint32)
    found = near_duplicate_clusters(signatures, config)
    assert found.dtype == np.int64
    assert found.tolist() == naive_clusters(signatures, 4, 2, threshold)


def test_planted_near_duplicates_found_and_unrelated_documents_kept():
    rng = np.random.default_rng(4)
    vocabulary = [f"term{k}" for k in range(20000)]
    originals = [random_text(rng, vocabulary, 300).split() for _ in range(20)]
    texts, expected = [], []
    for index, words in enumerate(originals):
        copy = list(words)
        copy[int(rng.integers(300))] = "changed"  # one word: 5 of 296 shingles differ, Jaccard ~0.97
        if index % 2:  # the copy comes first: it is the one kept
            texts += [" ".join(copy), " ".join(words)]
        else:
            texts += [" ".join(words), " ".join(copy).upper()]
        expected += [len(texts) - 2, len(texts) - 2]
    for _ in range(20):
        texts.append(random_text(rng, vocabulary, 300))
        expected.append(len(texts) - 1)
    config = MinHashConfig()
    np.testing.assert_array_equal(near_duplicate_clusters(minhash_signatures(texts, config), config), expected)


def test_signatures_are_the_same_in_another_process():
    texts = ["Déjà vu: the same five word shingles again and again", "short", ""]
    config = MinHashConfig(seed=7)
    script = (
        "import json, sys; from llmkit.data.dedup import MinHashConfig, minhash_signatures, shingle_hashes\n"
        "texts = json.loads(sys.argv[1])\n"
        "print(json.dumps({'signatures': minhash_signatures(texts, MinHashConfig(seed=7)).tolist(),\n"
        "                  'shingles': [shingle_hashes(t, 5).tolist() for t in texts]}))"
    )
    results = []
    for hash_seed in ["1", "2"]:
        environment = {**os.environ, "PYTHONHASHSEED": hash_seed}
        output = subprocess.run(
            [sys.executable, "-c", script, json.dumps(texts)],
            env=environment,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        results.append(json.loads(output))
    assert results[0] == results[1]
    assert results[0]["signatures"] == minhash_signatures(texts, config).tolist()
    assert results[0]["shingles"] == [shingle_hashes(text, 5).tolist() for text in texts]


# --- repeated lines -----------------------------------------------------------------------------

CORPUS = {
    30: "Welcome to the site\nArticle one body text here\n}\nAll rights reserved 2021\n",
    10: "Unrelated first line here\nwelcome   to the SITE.\n",
    20: "Welcome to the site\r\nArticle two is different\r\n}\r\nALL RIGHTS RESERVED, 2023!\r\nWelcome to the site",
}


def repeated_lines(min_documents: int = 2) -> RepeatedLines:
    keys = np.concatenate([np.full(len(line_hashes(text)), key) for key, text in CORPUS.items()])
    hashes = np.concatenate([line_hashes(text) for text in CORPUS.values()])
    return RepeatedLines.find(keys, hashes, min_documents=min_documents)


def test_line_hashes_skip_blank_and_short_lines_and_are_unique():
    hashes = line_hashes("Welcome to the site\n\n}\nThanks!\nWELCOME to the site.\n")
    assert len(hashes) == 1 and hashes.dtype == np.uint64
    assert len(line_hashes("}\nOK\nThanks!", min_line_characters=1)) == 2  # "}" normalises to nothing


def test_repeated_lines_owned_by_first_document_and_removed_elsewhere():
    repeated = repeated_lines()
    assert len(repeated) == 2  # "welcome to the site" (3 documents), "all rights reserved 0000" (2)
    assert sorted(repeated.document_counts.tolist()) == [2, 3]
    # Keys give the corpus order: 10 owns "welcome to the site", 20 the copyright line.
    assert repeated.remove(CORPUS[10], 10) == (CORPUS[10], 0)
    assert repeated.remove(CORPUS[20], 20) == ("Article two is different\r\n}\r\nALL RIGHTS RESERVED, 2023!\r\n", 2)
    assert repeated.remove(CORPUS[30], 30) == ("Article one body text here\n}\n", 2)


def test_min_documents_raises_the_bar():
    repeated = repeated_lines(min_documents=3)
    assert len(repeated) == 1
    assert repeated.remove(CORPUS[30], 30) == ("Article one body text here\n}\nAll rights reserved 2021\n", 1)


def test_find_counts_a_document_once_and_owner_is_smallest_key():
    repeated = RepeatedLines.find(np.array([5, 5, 3, 9]), np.array([7, 7, 7, 8], dtype=np.uint64))
    assert (
        repeated.hashes.tolist() == [7] and repeated.owners.tolist() == [3] and repeated.document_counts.tolist() == [2]
    )
    assert len(RepeatedLines.find(np.array([1, 1]), np.array([7, 7], dtype=np.uint64))) == 0


def test_repeated_lines_save_and_load(tmp_path):
    repeated = repeated_lines()
    repeated.save(tmp_path / "lines.npz")
    loaded = RepeatedLines.load(tmp_path / "lines.npz")
    for name in ("hashes", "owners", "document_counts"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(repeated, name))
    assert loaded.remove(CORPUS[20], 20) == repeated.remove(CORPUS[20], 20)
    assert [path.name for path in tmp_path.iterdir()] == ["lines.npz"]
    with pytest.raises(InputError, match="missing.npz: repeated-lines file not found"):
        RepeatedLines.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", something=np.zeros(3))
    with pytest.raises(InputError, match="other.npz: not a valid repeated-lines file"):
        RepeatedLines.load(tmp_path / "other.npz")


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"ngram": 0}, "ngram"),
        ({"bands": 0}, "bands"),
        ({"rows": 0}, "rows"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": -0.1}, "threshold"),
        ({"seed": -1}, "seed"),
    ],
)
def test_config_validation_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        MinHashConfig(**changes)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ConfigError, match="'ngram'"):
        shingle_hashes("text", 0)
    with pytest.raises(InputError, match=r"expected \(documents, 112\)"):
        near_duplicate_clusters(np.zeros((3, 100), dtype=np.uint32), MinHashConfig())
    with pytest.raises(ConfigError, match="'min_documents'"):
        RepeatedLines.find(np.array([1]), np.array([2], dtype=np.uint64), min_documents=1)
    with pytest.raises(InputError, match="one length"):
        RepeatedLines.find(np.array([1, 2]), np.array([2], dtype=np.uint64))
    with pytest.raises(ConfigError, match="'min_line_characters'"):
        line_hashes("text", min_line_characters=0)
