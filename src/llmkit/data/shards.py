"""Token shards: tokenize a corpus in parallel into flat ``.bin`` files plus ``manifest.json``.

A data directory holds ``train_000.bin``, ``train_001.bin``, ... and
``val_000.bin``, ...: flat little-endian ``uint16`` (``uint32`` when the
vocabulary does not fit) token ids, every document followed by the
``<|endoftext|>`` id, cut into shards of ``shard_tokens`` tokens (a document may
span two shards). ``manifest.json`` describes them; readers open shards as
read-only memmaps through :func:`open_split`.

Documents go to the validation split by a hash of their id (:func:`is_held_out`),
so the split is the same whatever the file order or the number of workers. A corpus of
one or a few long documents (Tiny Shakespeare) uses ``split="tail"`` instead: the last
``val_fraction`` of every document's characters is validation, as in nanoGPT.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import numpy as np
from tqdm import tqdm

from llmkit import __version__
from llmkit.config import check
from llmkit.data.sources import Document, is_held_out, iter_documents
from llmkit.io import atomic_write_json, commit_file
from llmkit.token_data import FORMAT_VERSION, MANIFEST_FILE, SPLITS, TOKENIZER_FOLDER, token_dtype
from llmkit.tokenizer import Tokenizer

# Documents are sent to workers in chunks of about this many characters: large
# enough to amortise the inter-process traffic, small enough for a smooth progress bar.
CHUNK_CHARACTERS = 1 << 18


@dataclass
class PrepareConfig:
    source: str = field(
        default="stdlib",
        metadata={"help": "text source(s), comma-separated: 'stdlib', a file, a folder, .jsonl or .parquet"},
    )
    tokenizer: str = field(
        default="runs/tokenizer", metadata={"help": "tokenizer directory (from 'llmkit tokenizer train')"}
    )
    out: str = field(default="runs/data", metadata={"help": "output directory for the shards and manifest.json"})
    text_field: str = field(default="text", metadata={"help": "JSONL key / Parquet column holding the text"})
    val_fraction: float = field(default=0.01, metadata={"help": "fraction of documents in the validation split"})
    shard_tokens: int = field(default=50_000_000, metadata={"help": "tokens per shard file"})
    workers: int = field(default=0, metadata={"help": "tokenizer processes (0 = one per CPU)"})
    max_bytes: int | None = field(
        default=None, metadata={"help": "read at most this many UTF-8 bytes of text (quick runs)"}
    )
    split: Literal["document", "tail"] = field(
        default="document",
        metadata={"help": "validation = whole documents chosen by hash, or the tail of every document"},
    )

    def __post_init__(self) -> None:
        check(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction, "must be in [0, 1)")
        check(self.shard_tokens >= 1, "shard_tokens", self.shard_tokens, "must be at least 1")
        check(self.workers >= 0, "workers", self.workers, "must be 0 (one per CPU) or more")
        check(self.max_bytes is None or self.max_bytes > 0, "max_bytes", self.max_bytes, "must be positive")


def prepare_data(config: PrepareConfig) -> dict:
    """Tokenize ``config.source`` into ``config.out``; return the manifest plus ``seconds``.

    Shards are written under temporary names and renamed into place only once
    the whole corpus is done, then the manifest is written: an interrupted run
    leaves an existing data directory as it was.
    """
    start = time.perf_counter()
    documents = iter_documents(config.source, config.text_field, config.max_bytes)
    if config.split == "tail":
        documents = _split_tails(documents, config.val_fraction)
    manifest = write_token_data(
        documents,
        lambda document: _split_of(document, config),
        config.tokenizer,
        config.out,
        config.shard_tokens,
        config.workers,
        expected_bytes=config.max_bytes,
        description={
            "text_field": config.text_field,
            "val_fraction": config.val_fraction,
            "split": config.split,
            "max_bytes": config.max_bytes,
        },
    )
    return {**manifest, "seconds": time.perf_counter() - start}


def write_token_data(
    documents: Iterable[Document],
    split_of: Callable[[Document], str],
    tokenizer_directory: str | Path,
    out: str | Path,
    shard_tokens: int,
    workers: int,
    expected_bytes: int | None = None,
    description: dict | None = None,
) -> dict:
    """Tokenize ``documents`` in order into the shards of ``out`` (split chosen by ``split_of``) and write the manifest.

    ``description`` adds fields to the manifest (how the data was made). Every
    split's statistics count documents, tokens and UTF-8 bytes in total and per source.
    """
    tokenizer = Tokenizer.load(tokenizer_directory)
    dtype = token_dtype(tokenizer.vocab_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writers = {split: ShardWriter(out, split, dtype, shard_tokens) for split in SPLITS}
    statistics = {split: _empty_statistics() for split in SPLITS}
    sources: list[str] = []
    progress = tqdm(total=expected_bytes, desc="data: tokenizing", unit="B", unit_scale=True)
    try:
        for document, tokens in _tokenize(
            iter(documents), tokenizer, str(tokenizer_directory), workers or os.cpu_count() or 1
        ):
            split = split_of(document)
            writers[split].write(tokens)
            size = len(document.text.encode("utf-8"))
            for counts in (statistics[split], statistics[split]["sources"].setdefault(document.source, _counts())):
                counts["documents"] += 1
                counts["tokens"] += len(tokens)
                counts["bytes"] += size
            if document.source not in sources:
                sources.append(document.source)
            progress.update(size)
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    finally:
        progress.close()

    # Remove the old manifest first: between the renames below and the new
    # manifest, the directory must not look complete.
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    for split in SPLITS:
        statistics[split]["shards"] = writers[split].commit()
    manifest = {
        "format": "llmkit-tokens",
        "format_version": FORMAT_VERSION,
        "llmkit_version": __version__,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        # A copy of the tokenizer travels with the data, so the folder stays usable when moved.
        "tokenizer": {
            "path": TOKENIZER_FOLDER,
            "source": str(Path(tokenizer_directory).resolve()),
            "sha256": tokenizer.sha256,
        },
        "sources": sources,
        **(description or {}),
        "shard_tokens": shard_tokens,
        "splits": statistics,
    }
    tokenizer.save(out / TOKENIZER_FOLDER)
    atomic_write_json(out / MANIFEST_FILE, manifest)
    _remove_stale_shards(out, manifest)
    return manifest


class ShardWriter:
    """Appends token arrays to ``{split}_NNN.bin`` files of ``shard_tokens`` tokens, under temporary names until
    ``commit``."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []  # {"file", "tokens"} of every shard begun so far
        self.file = None

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self.file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next_shard()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            piece, tokens = tokens[:room], tokens[room:]
            self.file.write(piece.astype(self.dtype, copy=False).tobytes())
            self.shards[-1]["tokens"] += len(piece)

    def commit(self) -> list[dict]:
        """Flush to disk and rename every shard into place; return their names and token counts."""
        self._close()
        for shard in self.shards:
            commit_file(self._temporary_path(shard["file"]), self.directory / shard["file"])
        return self.shards

    def discard(self) -> None:
        self._close()
        for shard in self.shards:
            self._temporary_path(shard["file"]).unlink(missing_ok=True)

    def _next_shard(self) -> None:
        self._close()
        self.shards.append({"file": f"{self.split}_{len(self.shards):03d}.bin", "tokens": 0})
        self.file = open(self._temporary_path(self.shards[-1]["file"]), "wb")

    def _close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def _temporary_path(self, name: str) -> Path:
        return self.directory / f".{name}.tmp"


TAIL_MARK = "#val-tail"


def _split_tails(documents: Iterator[Document], fraction: float) -> Iterator[Document]:
    """Each document becomes its head (train) and its last ``fraction`` of characters (validation)."""
    for document in documents:
        cut = int(len(document.text) * (1 - fraction))
        yield Document(document.text[:cut], document.source, document.id)
        if cut < len(document.text):
            yield Document(document.text[cut:], document.source, document.id + TAIL_MARK)


def _split_of(document: Document, config: PrepareConfig) -> str:
    if config.split == "tail":
        return "val" if document.id.endswith(TAIL_MARK) else "train"
    return "val" if is_held_out(document.id, config.val_fraction) else "train"


def _counts() -> dict:
    return {"documents": 0, "tokens": 0, "bytes": 0}


def _empty_statistics() -> dict:
    # "bytes" are the UTF-8 bytes of the document texts: loss * tokens / (bytes * ln 2) gives bits per byte.
    return {**_counts(), "shards": [], "sources": {}}


def _chunks(documents: Iterator[Document]) -> Iterator[list[Document]]:
    chunk, size = [], 0
    for document in documents:
        chunk.append(document)
        size += len(document.text)
        if size >= CHUNK_CHARACTERS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _tokenize(
    documents: Iterator[Document], tokenizer: Tokenizer, tokenizer_directory: str, workers: int
) -> Iterator[tuple[Document, np.ndarray]]:
    """``(document, its ids + <|endoftext|>)`` in input order, computed by ``workers`` processes."""
    dtype = token_dtype(tokenizer.vocab_size)
    if workers == 1:
        for chunk in _chunks(documents):
            yield from zip(chunk, _encode_texts(tokenizer, [document.text for document in chunk], dtype))
        return
    with multiprocessing.Pool(workers, initializer=_load_worker_tokenizer, initargs=(tokenizer_directory,)) as pool:
        # A queue of in-flight chunks consumed in submission order: the output is
        # the same for any worker count, and unlike Pool.imap (which reads its
        # whole input ahead) at most a few chunks per worker are held in memory.
        pending: collections.deque = collections.deque()
        for chunk in _chunks(documents):
            pending.append((chunk, pool.apply_async(_encode_in_worker, ([document.text for document in chunk], dtype))))
            if len(pending) >= 4 * workers:
                chunk, result = pending.popleft()
                yield from zip(chunk, result.get())
        while pending:
            chunk, result = pending.popleft()
            yield from zip(chunk, result.get())


def _encode_texts(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    return [np.array(ids + [tokenizer.eot_id], dtype=dtype) for ids in tokenizer.encode_batch(texts)]


# Each worker process loads the tokenizer once, in the pool's initializer.
_worker_tokenizer: Tokenizer | None = None


def _load_worker_tokenizer(directory: str) -> None:
    global _worker_tokenizer
    # The processes are the parallelism; the tokenizer's own threads in every
    # process would only oversubscribe the CPUs.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = Tokenizer.load(directory)


def _encode_in_worker(texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    return _encode_texts(_worker_tokenizer, texts, dtype)


def _remove_stale_shards(directory: Path, manifest: dict) -> None:
    """Delete shards of an earlier, larger run so the directory holds only what the manifest lists."""
    listed = {shard["file"] for statistics in manifest["splits"].values() for shard in statistics["shards"]}
    for split in SPLITS:
        for path in directory.glob(f"{split}_[0-9][0-9][0-9]*.bin"):
            if path.name not in listed:
                path.unlink()
