"""Near-duplicate detection: quality and speed of llmkit's MinHash-LSH against datasketch's.

Corpus (generated, seeded): --documents texts of 200-400 words drawn from a vocabulary of about
50,000 random letter strings, so unrelated texts share no 5-gram. A tenth of them are originals
with a planted near-copy each, at a target Jaccard similarity of the two 5-gram sets in
{0.3, 0.5, 0.6, 0.7} (not duplicates) or {0.85, 0.9, 0.95, 1.0} (duplicates), reached by
replacing a computed number of well-separated words (:func:`planted_copy`); copies are also
re-cased and re-wrapped, which shingles ignore. Each planted pair's similarity is then measured
exactly on Python sets of its 5-gram tuples, and that exact value is the truth.

Both systems use 5-gram shingles, 14 bands x 8 rows (112 permutations) and merge LSH candidates
whose estimated similarity is >= 0.8; clusters are connected components of the merged pairs.

Metrics (one JSON object per line), for llmkit and for datasketch:
- recall: planted pairs with exact Jaccard >= 0.8 that end in one cluster / all such pairs;
- precision: pairs of documents sharing a cluster whose exact Jaccard is >= 0.8 / all such pairs
  (every predicted pair is checked, planted or not);
- merged_fraction: per planted target similarity, the fraction of pairs put in one cluster, with
  the LSH S-curve ``1 - (1 - s**8) ** 14`` at the pairs' mean similarity for comparison;
- docs_per_s: texts to clusters (signatures, LSH, verification, union-find), one process;
- speedup_vs_datasketch: datasketch's time / llmkit's on the same texts in this process, where
  datasketch builds shingles in Python, signatures with ``MinHash.bulk`` (``update_batch`` with
  shared permutations) and queries then inserts every document in ``MinHashLSH(params=(14, 8))``.

Usage: python benchmarks/dedup.py [--documents 100000] [--quick] [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

from llmkit.data.dedup import MinHashConfig, minhash_signatures, near_duplicate_clusters  # noqa: E402

NGRAM, BANDS, ROWS, THRESHOLD = 5, 14, 8, 0.8
VOCABULARY_SIZE = 50_000
TARGETS = (0.3, 0.5, 0.6, 0.7, 0.85, 0.9, 0.95, 1.0)
PLANTED_FRACTION = 0.1  # of the documents are originals with a planted copy


def generate_corpus(documents: int, rng: np.random.Generator) -> tuple[list[str], list[tuple[int, int, float]]]:
    """Shuffled texts and the planted ``(index, index, target)`` pairs."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocabulary = np.array(
        sorted({"".join(rng.choice(letters, int(rng.integers(3, 11)))) for _ in range(VOCABULARY_SIZE)})
    )
    pairs = int(documents * PLANTED_FRACTION)
    word_lists = [rng.integers(len(vocabulary), size=int(rng.integers(200, 401))) for _ in range(documents - pairs)]
    planted = []
    for index in range(pairs):
        target = TARGETS[index % len(TARGETS)]
        planted.append((index, len(word_lists), target))
        word_lists.append(planted_copy(word_lists[index], target, len(vocabulary), rng))
    texts = [" ".join(vocabulary[words].tolist()) for words in word_lists]
    for _, copy_index, _ in planted:
        texts[copy_index] = reformat(texts[copy_index], rng)
    order = rng.permutation(documents)
    position = np.empty(documents, dtype=np.int64)
    position[order] = np.arange(documents)
    shuffled = [texts[index] for index in order]
    return shuffled, [(int(position[first]), int(position[second]), target) for first, second, target in planted]


def planted_copy(original: np.ndarray, target: float, vocabulary_size: int, rng: np.random.Generator) -> np.ndarray:
    """The word ids of a copy whose 5-gram set has Jaccard similarity close to ``target`` with the original's.

    Replacing ``k`` words at least ``NGRAM`` apart, none within ``NGRAM - 1`` of an end, swaps
    ``NGRAM * k`` of the ``L`` shingles for new ones: Jaccard ``(L - NGRAM k) / (L + NGRAM k)``.
    """
    shingles = len(original) - NGRAM + 1
    replaced = round(shingles * (1 - target) / (NGRAM * (1 + target)))
    slots = (len(original) - 2 * NGRAM + 1) // NGRAM + 1
    positions = NGRAM - 1 + NGRAM * rng.choice(slots, replaced, replace=False)
    copy = original.copy()
    copy[positions] = rng.integers(vocabulary_size, size=replaced)
    return copy


def reformat(text: str, rng: np.random.Generator) -> str:
    """Capitalise some words and wrap lines: invisible to (lowercased, whitespace-split) shingles."""
    words = text.split()
    for index in rng.choice(len(words), len(words) // 10, replace=False):
        words[index] = words[index].capitalize()
    lines = [" ".join(words[start : start + 12]) for start in range(0, len(words), 12)]
    return "\n".join(lines)


def shingle_set(text: str) -> set[tuple[str, ...]]:
    """The reference definition: tuples of consecutive lowercased whitespace-separated words."""
    words = text.lower().split()
    if len(words) < NGRAM:
        return {tuple(words)} if words else set()
    return set(zip(*(words[offset:] for offset in range(NGRAM))))


def exact_jaccard(texts: list[str], first: int, second: int) -> float:
    a, b = shingle_set(texts[first]), shingle_set(texts[second])
    return len(a & b) / len(a | b)


def llmkit_clusters(texts: list[str]) -> tuple[np.ndarray, dict]:
    config = MinHashConfig(ngram=NGRAM, bands=BANDS, rows=ROWS, threshold=THRESHOLD)
    start = time.perf_counter()
    signatures = minhash_signatures(texts, config)
    signed = time.perf_counter()
    clusters = near_duplicate_clusters(signatures, config)
    end = time.perf_counter()
    return clusters, {
        "seconds": end - start,
        "signature_s": round(signed - start, 2),
        "cluster_s": round(end - signed, 2),
    }


def datasketch_clusters(texts: list[str]) -> tuple[np.ndarray, dict]:
    from datasketch import MinHash, MinHashLSH

    start = time.perf_counter()
    shingles = ([" ".join(shingle).encode("utf-8") for shingle in shingle_set(text)] for text in texts)
    index = MinHashLSH(threshold=THRESHOLD, num_perm=BANDS * ROWS, params=(BANDS, ROWS))
    signatures = []
    parent = list(range(len(texts)))
    for key, signature in enumerate(MinHash.generator(shingles, num_perm=BANDS * ROWS, seed=1)):
        for other in index.query(signature):
            if signature.jaccard(signatures[other]) >= THRESHOLD:
                union(parent, key, other)
        index.insert(key, signature)
        signatures.append(signature)
    clusters = np.array([find(parent, node) for node in range(len(texts))])
    return clusters, {"seconds": time.perf_counter() - start}


def find(parent: list[int], node: int) -> int:
    while parent[node] != node:
        parent[node] = parent[parent[node]]
        node = parent[node]
    return node


def union(parent: list[int], first: int, second: int) -> None:
    """Union by smallest index, so a root is its component's smallest member."""
    low, high = sorted((find(parent, first), find(parent, second)))
    parent[high] = low


def predicted_pairs(clusters: np.ndarray) -> list[tuple[int, int]]:
    members = collections.defaultdict(list)
    for index in np.flatnonzero(clusters != np.arange(len(clusters))):
        members[int(clusters[index])].append(int(index))
    pairs = []
    for representative, others in members.items():
        cluster = [representative] + others
        pairs += [(cluster[i], cluster[j]) for i in range(len(cluster)) for j in range(i + 1, len(cluster))]
    return pairs


def report_quality(
    system: str,
    clusters: np.ndarray,
    texts: list[str],
    planted: list[tuple[int, int, float]],
    planted_jaccard: list[float],
    context: dict,
) -> None:
    together = np.array([clusters[first] == clusters[second] for first, second, _ in planted])
    truth = np.array(planted_jaccard) >= THRESHOLD
    emit(
        "recall",
        round(float(together[truth].mean()), 4),
        "fraction",
        system=system,
        true_pairs=int(truth.sum()),
        goal=0.95,
        **context,
    )
    predicted = predicted_pairs(clusters)
    correct = sum(exact_jaccard(texts, first, second) >= THRESHOLD for first, second in predicted)
    emit(
        "precision",
        round(correct / max(len(predicted), 1), 4),
        "fraction",
        system=system,
        predicted_pairs=len(predicted),
        goal=0.95,
        **context,
    )
    targets = np.array([target for _, _, target in planted])
    for target in TARGETS:
        chosen = targets == target
        mean_jaccard = float(np.mean(np.array(planted_jaccard)[chosen]))
        emit(
            "merged_fraction",
            round(float(together[chosen].mean()), 4),
            "fraction",
            system=system,
            target=target,
            mean_exact_jaccard=round(mean_jaccard, 4),
            min_exact_jaccard=round(float(np.min(np.array(planted_jaccard)[chosen])), 4),
            max_exact_jaccard=round(float(np.max(np.array(planted_jaccard)[chosen])), 4),
            pairs=int(chosen.sum()),
            s_curve=round(1 - (1 - mean_jaccard**ROWS) ** BANDS, 4),
            **context,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=100_000, help="documents in the generated corpus")
    parser.add_argument("--quick", action="store_true", help="5,000 documents")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated corpus")
    arguments = parser.parse_args()
    documents = 5_000 if arguments.quick else arguments.documents
    texts, planted = generate_corpus(documents, np.random.default_rng(arguments.seed))
    planted_jaccard = [exact_jaccard(texts, first, second) for first, second, _ in planted]
    context = {
        "documents": documents,
        "planted_pairs": len(planted),
        "ngram": NGRAM,
        "bands": BANDS,
        "rows": ROWS,
        "threshold": THRESHOLD,
    }
    ours, our_timing = llmkit_clusters(texts)
    theirs, their_timing = datasketch_clusters(texts)
    for system, clusters in (("llmkit", ours), ("datasketch", theirs)):
        report_quality(system, clusters, texts, planted, planted_jaccard, context)
    emit(
        "docs_per_s",
        round(documents / our_timing["seconds"], 1),
        "documents/s",
        system="llmkit",
        signature_s=our_timing["signature_s"],
        cluster_s=our_timing["cluster_s"],
        **context,
    )
    emit("docs_per_s", round(documents / their_timing["seconds"], 1), "documents/s", system="datasketch", **context)
    emit("speedup_vs_datasketch", round(their_timing["seconds"] / our_timing["seconds"], 2), "x", goal=3, **context)


if __name__ == "__main__":
    main()
