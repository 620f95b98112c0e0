"""Ingest: the pipeline's named sources read in a deterministic order and cut into shards of keyed documents.

A document's *key* is its position in the corpus; every later step refers to
documents by it. Bad records (malformed JSONL lines, non-UTF-8 lines, binary
files) are skipped and listed with their file and line, never fatal: one bad
line must not stop a long run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

from tqdm import tqdm

from llmkit.config import build, check
from llmkit.data.clean import DialogueFields, render_threads
from llmkit.data.sources import Document, iter_documents
from llmkit.data.work import TemporaryJsonl, Work
from llmkit.errors import InputError
from llmkit.io import atomic_write_json, atomic_write_text, iter_jsonl, read_json

# File suffixes whose documents get the ``code`` profile when a source's profile is ``auto``.
CODE_SUFFIXES = (
    ".py",
    ".pyi",
    ".c",
    ".h",
    ".cc",
    ".cpp",
    ".hpp",
    ".java",
    ".js",
    ".ts",
    ".go",
    ".rs",
    ".rb",
    ".php",
    ".sh",
    ".cs",
    ".swift",
    ".kt",
    ".scala",
    ".lua",
    ".pl",
    ".r",
    ".sql",
    ".m",
    ".jl",
)


@dataclass
class SourceConfig:
    """One named source of the pipeline (a YAML mapping; a plain string is a path named by itself)."""

    name: str
    path: str  # llmkit source syntax: 'stdlib', a file, a folder, .jsonl, .parquet
    text_field: str = "text"
    # auto: by file suffix (a text file is one document); lines: every non-blank line of a text file is a document;
    # dialogue: JSONL messages with reply-to ids, rendered as reply trees
    format: Literal["auto", "lines", "dialogue"] = "auto"
    dialogue: dict = field(default_factory=dict)  # DialogueFields overrides (id, parent, thread, author, text)
    profile: Literal["auto", "prose", "code"] = "auto"  # auto: code for source-code file suffixes
    weight: float | None = None  # share of the training mixture (GPT-3 style); unset everywhere = natural sizes
    max_bytes: int | None = None  # read at most this many bytes of the source

    def __post_init__(self) -> None:
        check(bool(self.name) and "/" not in self.name, "name", self.name, "must be a non-empty name without '/'")
        check(self.weight is None or self.weight > 0, "weight", self.weight, "must be positive")
        check(self.max_bytes is None or self.max_bytes > 0, "max_bytes", self.max_bytes, "must be positive")
        self.dialogue_fields = build(DialogueFields, self.dialogue, source=f"sources.{self.name}.dialogue")


def source_config(entry, position: int) -> SourceConfig:
    if isinstance(entry, str):
        return SourceConfig(name=entry.strip().rstrip("/").replace("/", "_") or entry, path=entry.strip())
    if isinstance(entry, dict):
        return build(SourceConfig, entry, source=f"sources[{position}]")
    raise InputError(f"sources[{position}]: expected a path or a mapping with name and path, got {entry!r}")


def ingest_sources(sources: list[SourceConfig], documents_per_shard: int, work: Work) -> dict:
    """Cut the sources into input shards of keyed documents; skipped when a previous run finished it."""
    done = work.root / "ingest.json"
    if done.is_file():
        return read_json(done)
    errors: list[str] = []
    counts = {source.name: {"documents": 0, "bytes": 0} for source in sources}
    shard, buffer, key = 0, [], 0
    progress = tqdm(desc="data: reading sources", unit="doc")
    for source in sources:
        for document in _source_documents(source, errors.append):
            size = len(document.text.encode("utf-8"))
            document.meta.update(key=key, profile=_profile(source, document), bytes=size)
            buffer.append(document)
            counts[source.name]["documents"] += 1
            counts[source.name]["bytes"] += size
            key += 1
            progress.update()
            if len(buffer) == documents_per_shard:
                _write_ingest_shard(work, shard, buffer)
                shard, buffer = shard + 1, []
    progress.close()
    if buffer or shard == 0:
        _write_ingest_shard(work, shard, buffer)
        shard += 1
    if errors:
        atomic_write_text(work.root / "ingest_errors.txt", "\n".join(errors) + "\n")
    result = {"shards": shard, "documents": key, "sources": counts, "errors": len(errors), "error_examples": errors[:5]}
    atomic_write_json(done, result)
    return result


def _source_documents(source: SourceConfig, on_error: Callable[[str], None]) -> Iterator[Document]:
    if source.format == "dialogue":
        yield from _dialogue_documents(source, on_error)
        return
    for document in iter_documents(source.path, source.text_field, source.max_bytes, on_error=on_error):
        document.source = source.name
        if source.format == "lines":
            for number, line in enumerate(document.text.splitlines(), start=1):
                if line.strip():
                    yield Document(line, source.name, f"{document.id}:{number}")
        else:
            yield document


def _dialogue_documents(source: SourceConfig, on_error: Callable[[str], None]) -> Iterator[Document]:
    """One document per thread of every JSONL file of the source, each reply after the message it answers."""
    path = Path(source.path)
    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
    for file in files:
        records = (record for _, record in iter_jsonl(file, on_error))
        for thread, text in render_threads(records, source.dialogue_fields):
            yield Document(text, source.name, f"{file.name}:{thread}")


def _profile(source: SourceConfig, document: Document) -> str:
    if source.profile != "auto":
        return source.profile
    return "code" if document.id.lower().endswith(CODE_SUFFIXES) else "prose"


def _write_ingest_shard(work: Work, shard: int, documents: list[Document]) -> None:
    path = work.ingest(shard)
    if path.is_file():  # written by an interrupted earlier run from the same sources
        return
    writer = TemporaryJsonl(path)
    for document in documents:
        writer.write({"id": document.id, "source": document.source, "text": document.text, "meta": document.meta})
    writer.commit()
