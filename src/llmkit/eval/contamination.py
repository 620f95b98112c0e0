"""Which evaluation examples also appear in the training data.

The n-gram machinery is :mod:`llmkit.data.decontam`'s (GPT-3's rule: lowercased words, 13-grams, a short
string of at least 8 words counts as one whole n-gram), turned around: the data pipeline asks "which
*training documents* share an n-gram with a benchmark" to drop them; evaluation asks "which *examples*
share an n-gram with the training data" to flag them, and reports scores on the clean rest beside the
full ones (as GPT-3, appendix C, did). Every example is its own set of the
:class:`~llmkit.data.decontam.ContaminationIndex`, so one pass over the training data attributes each
match to the examples it came from, for all evaluation files at once.

The examples are the ones the evaluation loaded (after ``limit``), each as its id and the strings it
shows the model or compares with (question, choices, reference solution), so a flag joins exactly with
the example's per-example record.

Training data is a token data directory (its ``train`` split is decoded back to documents with the
directory's own tokenizer) or any raw source :func:`llmkit.data.sources.iter_documents` reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from llmkit.data.decontam import ContaminationIndex, evaluation_ngrams
from llmkit.data.sources import iter_documents
from llmkit.token_data import MANIFEST_FILE, load_tokenizer, open_split


def build_example_index(records: list[tuple[str, list[str]]], ngram: int, min_words: int) -> ContaminationIndex | None:
    """An index whose set ``str(i)`` is record ``i``; None when no record has a string long enough to check."""
    hash_parts, id_parts, lengths = [], [], set()
    for position, (_, texts) in enumerate(records):
        found = [evaluation_ngrams(text, ngram, min_words) for text in texts]
        found = [item for item in found if item is not None]
        if not found:
            continue
        lengths.update(length for length, _ in found)
        # One entry per distinct n-gram and example: the index counts distinct shared n-grams.
        hashes = np.unique(np.concatenate([hashes for _, hashes in found]))
        hash_parts.append(hashes)
        id_parts.append(np.full(len(hashes), position, dtype=np.uint32))
    if not hash_parts:
        return None
    hashes, set_ids = np.concatenate(hash_parts), np.concatenate(id_parts)
    order = np.argsort(hashes, kind="stable")
    return ContaminationIndex(
        hashes[order],
        set_ids[order],
        [str(position) for position in range(len(records))],
        ngram,
        min_words,
        sorted(lengths),
    )


def token_data_documents(directory: str | Path, split: str = "train") -> Iterator[str]:
    """The documents of a token data directory's split, decoded with the directory's tokenizer (documents
    end at the end-of-text id and may continue from one shard into the next)."""
    tokenizer = load_tokenizer(directory)
    pending: list[np.ndarray] = []
    for shard in open_split(directory, split):
        start = 0
        for end in np.flatnonzero(shard == tokenizer.eot_id):
            pieces = pending + [shard[start:end]]
            pending = []
            yield tokenizer.decode(np.concatenate(pieces).tolist())
            start = end + 1
        pending.append(np.asarray(shard[start:]))
    if sum(len(piece) for piece in pending):
        yield tokenizer.decode(np.concatenate(pending).tolist())


def training_documents(sources: list[str]) -> Iterator[str]:
    """Texts of every training source: a token data directory (or its ``manifest.json``) or a raw source."""
    for source in sources:
        path = Path(source)
        directory = path.parent if path.name == MANIFEST_FILE else path
        if (directory / MANIFEST_FILE).is_file():
            yield from token_data_documents(directory)
        else:
            yield from (document.text for document in iter_documents(source))


def check_contamination(
    evaluation_sets: dict[str, list[tuple[str, list[str]]]],
    training_sources: list[str],
    ngram: int = 13,
    min_words: int = 8,
) -> dict[str, dict]:
    """For each evaluation set (task name -> (example id, texts) pairs): how many examples it has, how many
    are long enough to check, and the ids of those sharing an n-gram with some training document."""
    records, owners = [], []
    for task, examples in evaluation_sets.items():
        records += examples
        owners += [task] * len(examples)
    report = {
        task: {"examples": len(examples), "checked": 0, "contaminated": 0, "contaminated_ids": []}
        for task, examples in evaluation_sets.items()
    }
    index = build_example_index(records, ngram, min_words)
    if index is None:
        return report
    for position in set(index.set_ids.tolist()):
        report[owners[position]]["checked"] += 1
    hits: set[int] = set()
    for text in tqdm(training_documents(training_sources), desc="eval: decontamination", unit="document"):
        hits.update(int(name) for name in index.matches(text))
    for position in sorted(hits):
        entry = report[owners[position]]
        entry["contaminated"] += 1
        entry["contaminated_ids"].append(records[position][0])
    return report
