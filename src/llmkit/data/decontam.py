"""Benchmark decontamination: find training documents that share long n-grams with evaluation sets.

GPT-3 (Brown et al. 2020, appendix C) removed training text sharing a 13-gram
with any benchmark, after dropping case and punctuation; we follow it:

* Normalisation: lowercase, words are runs of ``\\w`` characters, everything
  else (punctuation, whitespace, markup) separates words. The same function
  reads evaluation and training text, so ``Hello, World!`` matches ``hello world``.
* Evaluation text: every string value of every record, walked recursively
  through nested objects and lists (ARC's ``question.choices[].text``,
  HellaSwag's ``ctx`` and ``endings``), so no per-benchmark code is needed.
  Keys, numbers and booleans are not text. Each string is n-grammed on its
  own: an n-gram across two fields would only match a training document that
  happens to lay them out in the same order.
* Short strings: a string of fewer than ``ngram`` words would never match, so
  one of at least ``min_words`` words contributes its whole word sequence as
  one shorter n-gram. GPT-3's overlap study (appendix C) likewise lowered n for
  benchmarks with short examples (to their 5th-percentile length in words) but
  never below 8; 8 is our default. Shorter strings (answer labels such as
  ``A``, ids, one-word answers, common phrases) would match ordinary text by
  chance, so they are skipped.
* Hashes: each word is hashed with xxh3-64 (fixed seed, so the same in every
  process, unlike Python's salted ``hash()``), and an n-gram's hash is a
  polynomial of its word hashes modulo 2**64 with an odd multiplier. Computing
  it with numpy over a document gives the hashes of every length up to n on
  the way, which the short whole-string n-grams need. Two different n-grams
  collide with probability about 2**-64.
* Index: a sorted ``uint64`` array of n-gram hashes with a parallel array of
  set ids (one entry per distinct hash and set), about 12 bytes per n-gram
  where a Python set of ints takes about 60, saved as one ``.npz`` that each
  worker process loads. A bitmap of the hashes' top bits (2 bytes per n-gram)
  rules out most of a document's n-grams before ``numpy.searchsorted`` sees
  them: binary search over an index larger than the CPU cache costs about
  200 ns per lookup, more than a Python set's lookup, while the bitmap costs a
  few. A 1,000-word document then takes about 0.4 ms, mostly normalising and
  hashing its words.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import xxhash

from llmkit.config import check
from llmkit.data.sources import open_parquet
from llmkit.errors import InputError
from llmkit.io import atomic_write_arrays, iter_jsonl, read_arrays, read_json

logger = logging.getLogger(__name__)

EVALUATION_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet", ".txt")


def _evaluation_suffix(path: Path) -> str:
    """The file's kind: its suffix, or ``.jsonl.gz`` for gzipped JSON lines (HumanEval ships so)."""
    return ".jsonl.gz" if path.name.endswith(".jsonl.gz") else path.suffix


def set_name(path: str | Path) -> str:
    """An evaluation set is named after its file, without the suffix."""
    path = Path(path)
    return path.name[: -len(_evaluation_suffix(path))] if _evaluation_suffix(path) else path.name


INDEX_FORMAT = 1
# A bitmap with this many bits per indexed n-gram answers "certainly absent" for all but
# about 1 - exp(-1/16) = 6% of a document's n-grams, so only those reach the binary search.
PREFILTER_BITS_PER_NGRAM = 16

_WORD = re.compile(r"\w+")
# Any odd multiplier is invertible modulo 2**64, so n-grams differing in one word never
# collide; these two are the golden-ratio constant and the FNV-64 offset basis.
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_OFFSET = np.uint64(0xCBF29CE484222325)


@dataclass
class DecontaminationConfig:
    sets: list[str] = field(
        default_factory=list,
        metadata={
            "help": f"evaluation files ({', '.join(EVALUATION_SUFFIXES)}); each file is one set named after its stem"
        },
    )
    ngram: int = field(default=13, metadata={"help": "words per n-gram (GPT-3 used 13)"})
    min_words: int = field(
        default=8,
        metadata={
            "help": "an evaluation string shorter than ngram but at least this long counts as one whole n-gram; "
            "shorter ones are ignored"
        },
    )
    min_matches: int = field(
        default=1, metadata={"help": "distinct n-grams a document must share with one set to count as contaminated"}
    )

    def __post_init__(self) -> None:
        if isinstance(self.sets, str):
            self.sets = [path.strip() for path in self.sets.split(",") if path.strip()]
        check(bool(self.sets), "sets", self.sets, "name at least one evaluation file")
        for path in self.sets:
            check(
                _evaluation_suffix(Path(path)) in EVALUATION_SUFFIXES,
                "sets",
                path,
                f"unsupported suffix; use one of {', '.join(EVALUATION_SUFFIXES)}",
            )
        _check_lengths(self.ngram, self.min_words)
        check(self.min_matches >= 1, "min_matches", self.min_matches, "must be at least 1")

    def is_contaminated(self, matches: dict[str, int]) -> bool:
        """Whether :meth:`ContaminationIndex.matches` reached ``min_matches`` for some set."""
        return any(count >= self.min_matches for count in matches.values())


def _check_lengths(ngram: int, min_words: int) -> None:
    check(ngram >= 1, "ngram", ngram, "must be at least 1")
    check(1 <= min_words <= ngram, "min_words", min_words, f"must be between 1 and ngram ({ngram})")


def normalized_words(text: str) -> list[str]:
    """Lowercased runs of word characters: case, punctuation and spacing do not matter (GPT-3, appendix C)."""
    return _WORD.findall(text.lower())


def _word_hashes(words: list[str]) -> np.ndarray:
    return np.fromiter(
        (xxhash.xxh3_64_intdigest(word.encode("utf-8")) for word in words), dtype=np.uint64, count=len(words)
    )


def ngram_hashes(words: list[str], lengths: set[int]) -> dict[int, np.ndarray]:
    """For each length k in ``lengths``, the hashes of every k-word window of ``words`` (none when too short)."""
    word_hashes = _word_hashes(words)
    result: dict[int, np.ndarray] = {}
    rolling = np.full(len(word_hashes), _OFFSET, dtype=np.uint64)
    # After step k, rolling[i] is the hash of words i .. i+k-1: each step extends every
    # window by the next word (uint64 arithmetic wraps, which is the modulo 2**64).
    for k in range(1, max(lengths, default=0) + 1):
        if k > len(word_hashes):
            break
        rolling = rolling[: len(word_hashes) - k + 1] * _MULTIPLIER + word_hashes[k - 1 :]
        if k in lengths:
            result[k] = rolling
    return result


def evaluation_ngrams(text: str, ngram: int, min_words: int) -> tuple[int, np.ndarray] | None:
    """(n-gram length, hashes) of one evaluation string, or ``None`` when it is shorter than ``min_words``."""
    words = normalized_words(text)
    length = min(len(words), ngram)
    if length < min_words:
        return None
    return length, ngram_hashes(words, {length})[length]


class ContaminationIndex:
    """Hashes of the n-grams of some evaluation sets; :meth:`matches` counts a document's shared n-grams per set."""

    def __init__(
        self,
        hashes: np.ndarray,
        set_ids: np.ndarray,
        set_names: list[str],
        ngram: int,
        min_words: int,
        lengths: list[int],
    ):
        self.hashes = hashes  # sorted
        self.set_ids = set_ids
        self.set_names = set_names
        self.ngram = ngram
        self.min_words = min_words
        self.lengths = set(lengths)  # n-gram lengths present: ngram and those of short whole strings
        self._bitmap_bits = max(16, int(len(hashes) * PREFILTER_BITS_PER_NGRAM - 1).bit_length())
        self._bitmap = np.zeros(1 << (self._bitmap_bits - 3), dtype=np.uint8)
        slots = self._bitmap_slots(hashes)
        np.bitwise_or.at(self._bitmap, slots >> 3, np.left_shift(1, slots & 7).astype(np.uint8))

    def _bitmap_slots(self, hashes: np.ndarray) -> np.ndarray:
        return (hashes >> np.uint64(64 - self._bitmap_bits)).astype(np.int64)

    def _maybe_present(self, hashes: np.ndarray) -> np.ndarray:
        """False for hashes certainly not in the index; true for all that are, and a few that are not."""
        slots = self._bitmap_slots(hashes)
        return (self._bitmap[slots >> 3] >> (slots & 7).astype(np.uint8)) & 1 == 1

    @classmethod
    def from_files(cls, paths: list[str], ngram: int = 13, min_words: int = 8) -> "ContaminationIndex":
        """Index every string of every record of each file; a file is one set named after its stem."""
        _check_lengths(ngram, min_words)
        set_names: list[str] = []
        lengths: set[int] = set()
        hash_parts, id_parts = [], []
        for path in map(Path, paths):
            name = set_name(path)
            if name in set_names:
                raise InputError(
                    f"{path}: another evaluation file is also named '{name}'; set names come from file names, so "
                    f"rename one"
                )
            parts = [np.empty(0, dtype=np.uint64)]
            for text in _evaluation_texts(path):
                ngrams = evaluation_ngrams(text, ngram, min_words)
                if ngrams is not None:
                    lengths.add(ngrams[0])
                    parts.append(ngrams[1])
            hashes = np.unique(np.concatenate(parts))
            if not len(hashes):
                raise InputError(f"{path}: no text of at least {min_words} words, so nothing to decontaminate against")
            logger.info("%s: %d distinct n-grams", path, len(hashes))
            hash_parts.append(hashes)
            id_parts.append(np.full(len(hashes), len(set_names), dtype=np.uint32))
            set_names.append(name)
        hashes = np.concatenate(hash_parts) if hash_parts else np.empty(0, dtype=np.uint64)
        set_ids = np.concatenate(id_parts) if id_parts else np.empty(0, dtype=np.uint32)
        order = np.argsort(hashes, kind="stable")
        return cls(hashes[order], set_ids[order], set_names, ngram, min_words, sorted(lengths))

    def matches(self, text: str) -> dict[str, int]:
        """Set name -> number of distinct n-grams ``text`` shares with that set; sets with none are left out."""
        hashes_by_length = ngram_hashes(normalized_words(text), self.lengths)
        if not hashes_by_length:
            return {}
        queries = np.concatenate(list(hashes_by_length.values()))
        queries = queries[self._maybe_present(queries)]
        if not len(queries):
            return {}
        slots = np.minimum(np.searchsorted(self.hashes, queries), len(self.hashes) - 1)
        shared = np.unique(queries[self.hashes[slots] == queries])
        if not len(shared):
            return {}
        # A hash shared by several sets appears once per set, so each shared n-gram owns a range.
        first = np.searchsorted(self.hashes, shared, side="left")
        widths = np.searchsorted(self.hashes, shared, side="right") - first
        positions = np.repeat(first - np.cumsum(widths) + widths, widths) + np.arange(widths.sum())
        counts = np.bincount(self.set_ids[positions], minlength=len(self.set_names))
        return {self.set_names[set_id]: int(counts[set_id]) for set_id in np.flatnonzero(counts)}

    def save(self, path: str | Path) -> None:
        """Write the index as one ``.npz`` file, atomically, for worker processes to :meth:`load`."""
        atomic_write_arrays(
            path,
            format=np.int64(INDEX_FORMAT),
            hashes=self.hashes,
            set_ids=self.set_ids,
            set_names=np.array(self.set_names, dtype=str),
            ngram=np.int64(self.ngram),
            min_words=np.int64(self.min_words),
            lengths=np.array(sorted(self.lengths), dtype=np.int64),
        )

    @classmethod
    def load(cls, path: str | Path) -> "ContaminationIndex":
        arrays = read_arrays(
            path, "contamination index", ("format", "hashes", "set_ids", "set_names", "ngram", "min_words", "lengths")
        )
        if int(arrays["format"]) != INDEX_FORMAT:
            raise InputError(
                f"{path}: contamination index format {int(arrays['format'])}, expected {INDEX_FORMAT}; rebuild it"
            )
        return cls(
            arrays["hashes"],
            arrays["set_ids"],
            [str(name) for name in arrays["set_names"]],
            int(arrays["ngram"]),
            int(arrays["min_words"]),
            [int(length) for length in arrays["lengths"]],
        )


def iter_strings(value: Any) -> Iterator[str]:
    """Every string inside ``value``, depth first through dict values and list items."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from iter_strings(item)


def _evaluation_texts(path: Path) -> Iterator[str]:
    suffix = _evaluation_suffix(path)
    if suffix not in EVALUATION_SUFFIXES:
        raise InputError(
            f"{path}: unsupported evaluation file suffix '{suffix}'; use one of {', '.join(EVALUATION_SUFFIXES)}"
        )
    if not path.is_file():
        raise InputError(f"{path}: evaluation file not found")
    try:
        if suffix in (".jsonl", ".jsonl.gz"):
            for _, record in iter_jsonl(path):
                yield from iter_strings(record)
        elif suffix == ".json":
            yield from iter_strings(read_json(path))
        elif suffix == ".csv":
            yield from _csv_texts(path)
        elif suffix == ".parquet":
            yield from _parquet_texts(path)
        else:
            # A text file holds one evaluation example per line (as LAMBADA-style releases do).
            with open(path, encoding="utf-8") as file:
                yield from (line for line in file if line.strip())
    except UnicodeDecodeError:
        raise InputError(f"{path}: not valid UTF-8") from None


def _csv_texts(path: Path) -> Iterator[str]:
    """Every cell below the header row (the header holds field names, not evaluation text)."""
    with open(path, encoding="utf-8", newline="") as file:
        reader = csv.reader(file, strict=True)
        try:
            header = next(reader, None)
            for row in reader:
                if header is not None and len(row) != len(header):
                    raise InputError(f"{path}:{reader.line_num}: {len(row)} fields, but the header has {len(header)}")
                yield from row
        except csv.Error as error:
            raise InputError(f"{path}:{reader.line_num}: not valid CSV ({error})") from None


def _parquet_texts(path: Path) -> Iterator[str]:
    parquet_file = open_parquet(path)
    # Record batches keep memory bounded; nested columns come back as dicts and lists.
    for batch in parquet_file.iter_batches():
        yield from iter_strings(batch.to_pylist())
