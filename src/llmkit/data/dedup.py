"""De-duplication at three grains: exact copies, near-duplicate documents and lines repeated across documents.

*Exact copies.* :func:`exact_fingerprint` hashes a normalised text (NFKC, case-folded,
whitespace collapsed), so copies that differ only in formatting share one 16-byte digest.

*Near-duplicate documents* use MinHash with locality-sensitive hashing (Broder 1997;
Leskovec, Rajaraman & Ullman, *Mining of Massive Datasets*, ch. 3). A document is the set of
its word n-grams ("shingles", of lowercased words split on whitespace). Its signature holds,
for each of ``bands * rows`` random permutations of the 64-bit hash space, the smallest
permuted shingle hash; two signatures agree in one position with probability equal to the
Jaccard similarity of the two sets. LSH cuts the signature into ``bands`` bands of ``rows``
values: documents sharing a whole band are candidates, which happens with probability
``1 - (1 - s**rows) ** bands`` at similarity ``s`` (the S-curve). Candidates whose estimated
similarity (the fraction of equal signature values) reaches ``threshold`` are merged, and a
union-find turns the merged pairs into clusters. The defaults, 5-grams and 14 bands of 8 rows,
are datatrove's, used for FineWeb (Penedo et al. 2024).

Every step is vectorised with numpy, so no Python code runs per word or per shingle:

- the words of a whole batch of documents are hashed at once from their UTF-8 bytes: a
  polynomial hash ``sum(byte_j * P**j)`` (modulo 2**64 by the wrap-around of ``uint64``) read
  off prefix sums, then avalanched with MurmurHash3's 64-bit finaliser;
- an n-gram's hash combines the hashes of its words from shifted copies of the word array;
- each permutation is the affine map ``a * h + b`` modulo 2**64 with ``a`` odd (a bijection, so
  it adds no collisions), applied to the whole batch and reduced per document with
  ``np.minimum.reduceat``; the signature keeps the high 32 bits of each minimum (the bits a
  multiply-add hash mixes best) in half the memory of 64-bit values;
- LSH groups each band's rows with a sort of their hashes, not a dictionary.

Hashes depend only on the text and ``seed`` (never on Python's randomised ``hash()``), so
signatures computed in worker processes, one shard each, can be clustered in the driver.

A text without words has no shingles: its signature is all ``EMPTY_SIGNATURE_VALUE`` (which a
non-empty text reaches with probability below 2**-32 per value) and it is never a near-duplicate
of anything (exact de-duplication is the step that catches copies of it).

*Repeated lines* follow CCNet's paragraph de-duplication (Wenzek et al. 2020): a line
(normalised: lowercased, digits replaced by 0, punctuation removed) that appears in several
documents is boilerplate (cookie banners, navigation, licence footers) and is removed
everywhere except in the first document that has it. Lines shorter than ``MIN_LINE_CHARACTERS`` after normalisation are
never removed: "}" or "Thanks!" repeat across documents because they are short, not because they are
boilerplate, and removing them breaks the text around them. This step is meant for web text;
on source code, common lines ("return None") repeat legitimately across files.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from llmkit.config import check
from llmkit.errors import InputError
from llmkit.io import atomic_write_arrays, read_arrays

# The value of every position of an empty document's signature: no shingle was ever smaller.
EMPTY_SIGNATURE_VALUE = np.iinfo(np.uint32).max
# Normalised lines shorter than this are never treated as repeated: see the module docstring.
MIN_LINE_CHARACTERS = 10

_UINT64 = 1 << 64
# MurmurHash3's 64-bit finaliser (Appleby 2011): a bijection whose every output bit depends on
# every input bit, applied after the polynomial sums, which mix their low bits poorly.
_FINALISER_MULTIPLIERS = (np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53))
_FINALISER_SHIFT = np.uint64(33)
# Odd 64-bit constants for the polynomial hashes of bytes (into words) and of words (into n-grams).
_BYTE_BASE = 0x100000001B3  # the FNV-1a 64-bit prime
_WORD_BASE = 0x9E3779B97F4A7C15  # 2**64 / golden ratio, Knuth's multiplicative-hashing constant
# The ASCII characters str.split() separates words on (0x09-0x0D, 0x1C-0x20); other Unicode
# spaces are replaced first.
_SEPARATOR_BYTES = (0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x1F, 0x20)
# Documents are hashed in batches of about this many characters: large enough to amortise
# numpy's per-call cost over the permutation loop, small enough to keep the temporaries (tens
# of bytes per character) near the cache (measured: 2**17-2**19 equally fast, 2**16 and 2**20 slower).
_BATCH_CHARACTERS = 1 << 18
# Candidate pairs are verified this many at a time, bounding the (pairs x num_perm) comparison.
_VERIFY_CHUNK = 1 << 16

_DIGITS = re.compile(r"\d")
_PUNCTUATION = re.compile(r"[^\w\s]")
_WHITESPACE = re.compile(r"\s+")


def exact_fingerprint(text: str) -> bytes:
    """16-byte BLAKE2b digest of the text after NFKC, case folding and whitespace collapsing.

    NFKC maps compatibility characters (full-width letters, ligatures, non-breaking spaces) to
    their plain forms and ``casefold`` is Unicode's caseless matching (it also folds "ß" to
    "ss"), so copies re-encoded or re-cased by different crawlers still match.
    """
    normalised = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return hashlib.blake2b(_utf8(normalised), digest_size=16).digest()


@dataclass
class MinHashConfig:
    """MinHash-LSH near-duplicate detection; the defaults are datatrove's (FineWeb)."""

    ngram: int = field(default=5, metadata={"help": "words per shingle"})
    bands: int = field(default=14, metadata={"help": "LSH bands: more bands find less similar pairs"})
    rows: int = field(default=8, metadata={"help": "signature values per band: more rows make the S-curve steeper"})
    threshold: float = field(
        default=0.8,
        metadata={
            "help": "merge LSH candidates whose estimated Jaccard similarity is at least this (0 = every candidate)"
        },
    )
    seed: int = field(
        default=1, metadata={"help": "seed of the permutations; signatures are comparable only under the same seed"}
    )

    def __post_init__(self) -> None:
        check(self.ngram >= 1, "ngram", self.ngram, "must be at least 1")
        check(self.bands >= 1, "bands", self.bands, "must be at least 1")
        check(self.rows >= 1, "rows", self.rows, "must be at least 1")
        check(0 <= self.threshold <= 1, "threshold", self.threshold, "must be in [0, 1]")
        check(self.seed >= 0, "seed", self.seed, "must be 0 or more")

    @property
    def num_perm(self) -> int:
        """Length of a signature: one permutation per signature value."""
        return self.bands * self.rows


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """Sorted unique ``uint64`` hashes of the text's word n-grams (lowercased, whitespace-separated words).

    A text with fewer than ``ngram`` words (but at least one) is a single shingle of all its
    words; a text without words has none.
    """
    check(ngram >= 1, "ngram", ngram, "must be at least 1")
    hashes, _ = _shingles_of_batch([text], ngram)
    return np.unique(hashes)


def minhash_signatures(texts: Sequence[str], config: MinHashConfig) -> np.ndarray:
    """``(len(texts), config.num_perm)`` ``uint32`` MinHash signatures, one row per text."""
    multipliers, offsets = _permutations(config)
    signatures = np.empty((config.num_perm, len(texts)), dtype=np.uint32)
    for start, stop in _batches(texts):
        hashes, counts = _shingles_of_batch(texts[start:stop], config.ngram)
        signatures[:, start:stop] = _minima(hashes, counts, multipliers, offsets)
    return np.ascontiguousarray(signatures.T)


def near_duplicate_clusters(signatures: np.ndarray, config: MinHashConfig) -> np.ndarray:
    """For each row, the smallest row index of its near-duplicate cluster (``int64``); keep row ``i`` iff
    ``result[i] == i``.

    Rows sharing all ``rows`` values of at least one band are candidates; a candidate pair is
    merged when its estimated Jaccard similarity reaches ``config.threshold``; clusters are the
    connected components of the merged pairs, so chains (a~b, b~c) end in one cluster even when
    the ends are not similar themselves. ``m`` rows with equal values in one band cost
    ``m * (m - 1) / 2`` pair checks, so exact copies should be removed first (:func:`exact_fingerprint`).
    """
    signatures = np.asarray(signatures)
    if signatures.ndim != 2 or signatures.shape[1] != config.num_perm:
        raise InputError(
            f"signatures have shape {signatures.shape}, expected (documents, {config.num_perm}) "
            f"for bands={config.bands} x rows={config.rows}"
        )
    non_empty = np.flatnonzero((signatures != EMPTY_SIGNATURE_VALUE).any(axis=1))
    left_parts, right_parts = [], []
    for band in range(config.bands):
        keys = _row_keys(signatures[non_empty, band * config.rows : (band + 1) * config.rows])
        left, right = _pairs_sharing_a_key(keys, every_pair=config.threshold > 0)
        left_parts.append(non_empty[left])
        right_parts.append(non_empty[right])
    left, right = np.concatenate(left_parts), np.concatenate(right_parts)
    if config.threshold > 0:
        # A pair found in several bands is verified once.
        pair_codes = np.unique(left * len(signatures) + right)
        left, right = np.divmod(pair_codes, len(signatures))
        similar = _estimated_jaccard(signatures, left, right) >= config.threshold
        left, right = left[similar], right[similar]
    return _smallest_connected_index(len(signatures), left, right)


def _utf8(text: str) -> bytes:
    # JSON sources can decode to lone surrogates ("\ud800"), which strict UTF-8 refuses to encode.
    return text.encode("utf-8", errors="surrogatepass")


def _mix(values: np.ndarray) -> np.ndarray:
    values = values ^ (values >> _FINALISER_SHIFT)
    values *= _FINALISER_MULTIPLIERS[0]
    values ^= values >> _FINALISER_SHIFT
    values *= _FINALISER_MULTIPLIERS[1]
    values ^= values >> _FINALISER_SHIFT
    return values


def _powers(base: int, count: int) -> np.ndarray:
    """``base**0 .. base**(count - 1)`` modulo 2**64."""
    powers = np.full(count, base, dtype=np.uint64)
    powers[0] = 1
    return np.cumprod(powers)


def _separated_lowercase(text: str) -> bytes:
    """The lowercased text as UTF-8, with words separated only by the ASCII characters of ``_SEPARATOR_BYTES``."""
    lowered = text.lower()
    if not lowered.isascii():
        # str.split() also splits on Unicode spaces (U+00A0, U+3000, ...), which are multi-byte in UTF-8.
        lowered = " ".join(lowered.split())
    return _utf8(lowered)


def _word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The ``uint64`` hash of every word of ``texts`` in order, and the number of words of each text.

    A word's hash is ``mix(sum((1 + byte_j) * P**j))`` over its bytes ``j = 0, 1, ...`` (bytes
    count from 1 so that a NUL byte still changes the sum). It is computed for the whole batch
    at once from prefix sums of ``(1 + byte) * P**position``: a word's slice of them is its sum
    times ``P**start``, which ``P**-start`` cancels (``P`` is odd, so invertible modulo 2**64).
    """
    encoded = [_separated_lowercase(text) for text in texts]
    # One separator between texts keeps a word from running into the next text.
    data = np.frombuffer(b" ".join(encoded), dtype=np.uint8)
    in_word = (data > 0x20) | ((data > 0x0D) & (data < 0x1C)) | (data < 0x09)  # not in _SEPARATOR_BYTES
    word_starts = np.flatnonzero(in_word[1:] & ~in_word[:-1]) + 1
    if len(data) and in_word[0]:
        word_starts = np.r_[0, word_starts]
    if len(word_starts) == 0:
        return np.empty(0, dtype=np.uint64), np.zeros(len(texts), dtype=np.int64)
    powers, inverse_powers = _position_powers(1 << (len(data) - 1).bit_length())
    terms = data.astype(np.uint64)
    terms += np.uint64(1)
    terms *= powers[: len(data)]
    terms *= in_word
    prefix_sums = np.cumsum(terms)
    # Separators add nothing, so a word's sum runs to the byte before the next word.
    word_sums = prefix_sums[np.r_[word_starts[1:], len(data)] - 1] - prefix_sums[word_starts] + terms[word_starts]
    hashes = _mix(word_sums * inverse_powers[word_starts])
    text_starts = np.cumsum([0] + [len(piece) + 1 for piece in encoded])
    return hashes, np.diff(np.searchsorted(word_starts, text_starts))


@functools.lru_cache(maxsize=1)
def _position_powers(size: int) -> tuple[np.ndarray, np.ndarray]:
    """``P**j`` and ``P**-j`` modulo 2**64 for ``j < size``; batches are of similar sizes, so the last pair is kept."""
    return _powers(_BYTE_BASE, size), _powers(pow(_BYTE_BASE, -1, _UINT64), size)


def _shingles_of_batch(texts: Sequence[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every word n-gram of ``texts`` in order (repeats kept), and the number of shingles of each text."""
    words, word_counts = _word_hashes(texts)
    word_ends = np.repeat(np.cumsum(word_counts), word_counts)  # for each word, the end of its text's words
    positions = np.arange(len(words))
    combined = words.copy()
    for shift, factor in enumerate(_powers(_WORD_BASE, ngram)[1:], start=1):
        inside = positions[:-shift] + shift < word_ends[:-shift]
        combined[:-shift] += np.where(inside, words[shift:] * factor, np.uint64(0))
    # An n-gram starts wherever n words remain in its text; a text shorter than n is one shingle.
    text_of_word = np.repeat(np.arange(len(texts)), word_counts)
    first_words = np.cumsum(word_counts) - word_counts
    is_start = positions + ngram <= word_ends
    is_start[first_words[(word_counts > 0) & (word_counts < ngram)]] = True
    counts = np.bincount(text_of_word[is_start], minlength=len(texts))
    return _mix(combined[is_start]), counts


def _permutations(config: MinHashConfig) -> tuple[np.ndarray, np.ndarray]:
    """Multipliers (odd) and offsets of the affine permutations, from BLAKE2b of the seed: the same in every process and
    numpy version."""
    stream = b"".join(
        hashlib.blake2b(f"minhash:{config.seed}:{index}".encode(), digest_size=16).digest()
        for index in range(config.num_perm)
    )
    parameters = np.frombuffer(stream, dtype="<u8").reshape(config.num_perm, 2)
    return parameters[:, 0] | np.uint64(1), parameters[:, 1].copy()


def _minima(hashes: np.ndarray, counts: np.ndarray, multipliers: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``(num_perm, len(counts))`` high 32 bits of each text's smallest permuted hash; empty texts get
    ``EMPTY_SIGNATURE_VALUE``."""
    signatures = np.full((len(multipliers), len(counts)), EMPTY_SIGNATURE_VALUE, dtype=np.uint32)
    non_empty = counts > 0
    if not non_empty.any():
        return signatures
    starts = (np.cumsum(counts) - counts)[non_empty]
    permuted = np.empty_like(hashes)
    high_bits = np.uint64(32)
    # One permutation at a time over the whole batch: 1-D arrays that stay in cache beat a
    # (shingles x num_perm) matrix reduced along its first axis several times over.
    for index, (multiplier, offset) in enumerate(zip(multipliers, offsets)):
        np.multiply(hashes, multiplier, out=permuted)
        permuted += offset
        signatures[index, non_empty] = np.minimum.reduceat(permuted, starts) >> high_bits
    return signatures


def _batches(texts: Sequence[str]):
    """``(start, stop)`` ranges of consecutive texts holding about ``_BATCH_CHARACTERS`` characters each."""
    start, size = 0, 0
    for index, text in enumerate(texts):
        size += len(text)
        if size >= _BATCH_CHARACTERS:
            yield start, index + 1
            start, size = index + 1, 0
    if start < len(texts):
        yield start, len(texts)


def _row_keys(values: np.ndarray) -> np.ndarray:
    """One ``uint64`` per row, equal for equal rows (and, but for a 2**-64 chance, only for them)."""
    keys = np.zeros(len(values), dtype=np.uint64)
    for column in values.T:
        keys = _mix(keys * np.uint64(_WORD_BASE) + column.astype(np.uint64))
    return keys


def _pairs_sharing_a_key(keys: np.ndarray, every_pair: bool) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``left < right`` with equal keys: every such pair, or (enough for connectivity) each row with the
    first of its group."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    positions = np.arange(len(keys))
    group_start = np.maximum.accumulate(np.where(_run_starts(sorted_keys), positions, 0))
    earlier = positions - group_start  # members of the same group before this one
    if not every_pair:
        later = earlier > 0
        return order[group_start[later]], order[later]
    right = np.repeat(positions, earlier)
    rank_in_pairs = np.arange(len(right)) - np.repeat(np.cumsum(earlier) - earlier, earlier)
    return order[group_start[right] + rank_in_pairs], order[right]


def _run_starts(values: np.ndarray) -> np.ndarray:
    """True where a run of equal consecutive values begins."""
    starts = np.ones(len(values), dtype=bool)
    starts[1:] = values[1:] != values[:-1]
    return starts


def _estimated_jaccard(signatures: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Fraction of equal signature values of each pair: an unbiased estimate of the pair's Jaccard similarity."""
    similarity = np.empty(len(left))
    for start in range(0, len(left), _VERIFY_CHUNK):
        chunk = slice(start, start + _VERIFY_CHUNK)
        equal = signatures[left[chunk]] == signatures[right[chunk]]
        similarity[chunk] = np.count_nonzero(equal, axis=1) / signatures.shape[1]
    return similarity


def _smallest_connected_index(count: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Union-find over the edges ``left[i] - right[i]``, vectorised: the smallest index of each node's component.

    Each round hooks the root of every edge's larger end onto the smaller root, then
    compresses paths by pointer jumping. A root only ever moves to a smaller index, so the
    surviving root of a component is its smallest member.
    """
    parent = np.arange(count, dtype=np.int64)
    while True:
        left_root, right_root = parent[left], parent[right]
        if np.array_equal(left_root, right_root):
            return parent
        smaller = np.minimum(left_root, right_root)
        np.minimum.at(parent, left_root, smaller)
        np.minimum.at(parent, right_root, smaller)
        while True:
            grandparent = parent[parent]
            if np.array_equal(grandparent, parent):
                break
            parent = grandparent


def normalise_line(line: str) -> str:
    """CCNet's line key (Wenzek et al. 2020): lowercased, digits replaced by 0, punctuation removed, spaces
    collapsed."""
    line = _PUNCTUATION.sub("", _DIGITS.sub("0", line.lower()))
    return _WHITESPACE.sub(" ", line).strip()


def _line_hash(normalised: str) -> int:
    return int.from_bytes(hashlib.blake2b(_utf8(normalised), digest_size=8).digest(), "little")


def line_hashes(text: str, min_line_characters: int = MIN_LINE_CHARACTERS) -> np.ndarray:
    """Sorted unique ``uint64`` hashes of the text's normalised lines of at least ``min_line_characters`` characters."""
    check(min_line_characters >= 1, "min_line_characters", min_line_characters, "must be at least 1")
    keys = {normalise_line(line) for line in text.splitlines()}
    return np.array(sorted(_line_hash(key) for key in keys if len(key) >= min_line_characters), dtype=np.uint64)


@dataclass(eq=False)  # arrays have no single truth value to compare by
class RepeatedLines:
    """Lines found in several documents, each with its owner: the first document (smallest key) that has it."""

    hashes: np.ndarray  # sorted unique uint64 line hashes
    owners: np.ndarray  # int64 key of the owner of each line
    document_counts: np.ndarray  # int64 number of documents having each line

    @classmethod
    def find(cls, document_keys: np.ndarray, hashes: np.ndarray, min_documents: int = 2) -> "RepeatedLines":
        """Lines whose hash occurs in at least ``min_documents`` documents; ``document_keys[i]`` is the document of
        ``hashes[i]``.

        Keys order the corpus (the driver numbers documents in corpus order), so the owner,
        the smallest key, is the first occurrence. A (key, hash) pair given twice counts once.
        """
        check(
            min_documents >= 2,
            "min_documents",
            min_documents,
            "must be at least 2 (a line in one document is not repeated)",
        )
        document_keys, hashes = np.asarray(document_keys), np.asarray(hashes)
        if document_keys.shape != hashes.shape or document_keys.ndim != 1:
            raise InputError(
                f"document_keys {document_keys.shape} and hashes {hashes.shape} must be 1-D arrays of one length"
            )
        document_keys, hashes = document_keys.astype(np.int64), hashes.astype(np.uint64)
        order = np.lexsort((document_keys, hashes))
        document_keys, hashes = document_keys[order], hashes[order]
        distinct = _run_starts(hashes) | _run_starts(document_keys)
        document_keys, hashes = document_keys[distinct], hashes[distinct]
        first = np.flatnonzero(_run_starts(hashes))
        document_counts = np.diff(np.r_[first, len(hashes)])
        repeated = document_counts >= min_documents
        return cls(hashes[first][repeated], document_keys[first][repeated], document_counts[repeated])

    def __len__(self) -> int:
        return len(self.hashes)

    def remove(self, text: str, document_key: int) -> tuple[str, int]:
        """The text without the repeated lines this document does not own (everything else byte for byte), and how many
        lines went."""
        lines = text.splitlines(keepends=True)
        if not lines or not len(self.hashes):
            return text, 0
        hashes = np.array([_line_hash(normalise_line(line)) for line in lines], dtype=np.uint64)
        found = np.minimum(np.searchsorted(self.hashes, hashes), len(self.hashes) - 1)
        dropped = (self.hashes[found] == hashes) & (self.owners[found] != document_key)
        if not dropped.any():
            return text, 0
        return "".join(line for line, drop in zip(lines, dropped) if not drop), int(dropped.sum())

    def save(self, path: str | Path) -> None:
        atomic_write_arrays(path, hashes=self.hashes, owners=self.owners, document_counts=self.document_counts)

    @classmethod
    def load(cls, path: str | Path) -> "RepeatedLines":
        arrays = read_arrays(path, "repeated-lines file", ("hashes", "owners", "document_counts"))
        return cls(arrays["hashes"], arrays["owners"], arrays["document_counts"])
