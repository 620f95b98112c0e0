"""Raw text sources: every stage that reads text gets its documents from here.

A source is a string: the literal ``"stdlib"`` (the embedded default corpus), or
a path to a text file, a folder, a ``.jsonl`` file or a ``.parquet`` file.
Several sources are joined with commas (so a path that contains a comma cannot
be named). Each document carries a stable id, so splits chosen by hashing the id
(:func:`is_held_out`) do not move when files are added, removed or reordered.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from llmkit.errors import InputError
from llmkit.io import iter_jsonl

logger = logging.getLogger(__name__)

STDLIB = "stdlib"
# The standard library's own sources and documentation; everything else there is
# compiled code, archives or images.
STDLIB_SUFFIXES = (".py", ".txt", ".rst", ".md")
# Installed packages are not the standard library, and test folders hold
# deliberately malformed files (bad encodings, binary fixtures).
STDLIB_SKIPPED_FOLDERS = ("site-packages", "dist-packages", "__pycache__", "test", "tests")


@dataclass
class Document:
    text: str
    source: str  # the source string it came from, e.g. "stdlib" or "data/web.jsonl"
    id: str  # stable within its source: a relative path, or "file:line" / "file:row"
    meta: dict = field(default_factory=dict)  # what the data pipeline learns about it: profile, language, scores


def iter_documents(
    source: str, text_field: str = "text", max_bytes: int | None = None, on_error: Callable[[str], None] | None = None
) -> Iterator[Document]:
    """Yield the non-blank documents of one or more comma-separated sources, in a deterministic order.

    A bad record or file (malformed JSONL line, missing field, binary file named
    explicitly) raises :class:`InputError`; with ``on_error`` it is passed to it
    as a message naming the file and line, and skipped, so a long run carries on.

    ``max_bytes`` stops after that many UTF-8 bytes in total; the document that
    crosses the limit is cut at a character boundary so the total never exceeds it.
    A source that yields no non-blank document raises :class:`InputError`.
    """
    names = [name.strip() for name in source.split(",") if name.strip()]
    if not names:
        raise InputError(f"no source given (got {source!r})")
    remaining = max_bytes
    for name in names:
        found_any = False
        for document in _documents_of(name, text_field, on_error):
            if remaining is not None:
                encoded = document.text.encode("utf-8")
                if len(encoded) >= remaining:
                    # A prefix of valid UTF-8 can only end in a partial character; drop it.
                    document.text = encoded[:remaining].decode("utf-8", errors="ignore")
                    if document.text.strip():
                        yield document
                    return
                remaining -= len(encoded)
            found_any = True
            yield document
        if not found_any:
            raise InputError(f"{name}: source holds no non-empty documents")


def is_held_out(document_id: str, fraction: float) -> bool:
    """Deterministic split membership from a hash of the id: stable whatever the order or the other documents.

    The tokenizer's held-out set and the data's validation split both use it, so
    with equal fractions the tokenizer never trains on validation documents.
    """
    digest = hashlib.sha256(document_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def stdlib_root() -> Path:
    """The installed standard library, found at run time (never copied into the repo)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _documents_of(name: str, text_field: str, on_error: Callable[[str], None] | None) -> Iterator[Document]:
    if name == STDLIB:
        # The literal wins over a folder called "stdlib"; name such a folder "./stdlib".
        yield from _walk_folder(stdlib_root(), STDLIB, text_field, STDLIB_SUFFIXES, STDLIB_SKIPPED_FOLDERS, on_error)
        return
    path = Path(name)
    if path.is_dir():
        yield from _walk_folder(path, name, text_field, None, (), on_error)
    elif path.is_file():
        documents = _documents_of_file(path, name, path.name, text_field, on_error)
        if documents is None:
            _report(on_error, f"{path}: not a UTF-8 text file (binary or another encoding)")
        else:
            yield from documents
    else:
        raise InputError(f"{name}: no such file or folder (and not the literal source '{STDLIB}')")


def _report(on_error: Callable[[str], None] | None, message: str) -> None:
    if on_error is None:
        raise InputError(message)
    on_error(message)


def _note_empty(on_error: Callable[[str], None] | None, where: str) -> None:
    """Blank documents are skipped; a caller that counts skipped records hears of them too."""
    if on_error is not None:
        on_error(f"{where}: empty document, skipped")


def _walk_folder(
    root: Path,
    name: str,
    text_field: str,
    suffixes: tuple[str, ...] | None,
    skipped_folders: tuple[str, ...],
    on_error: Callable[[str], None] | None,
) -> Iterator[Document]:
    """Every file under ``root`` in sorted order; hidden entries (.git, ...) are skipped, binaries counted and
    skipped."""
    skipped = 0
    for folder, subfolders, files in os.walk(root):
        # Sorting in place makes os.walk descend in a deterministic order.
        subfolders[:] = sorted(
            entry for entry in subfolders if not entry.startswith(".") and entry not in skipped_folders
        )
        for file_name in sorted(files):
            if file_name.startswith(".") or (suffixes is not None and not file_name.endswith(suffixes)):
                continue
            path = Path(folder, file_name)
            relative = path.relative_to(root).as_posix()
            documents = _documents_of_file(path, name, relative, text_field, on_error)
            if documents is None:
                skipped += 1
                if on_error is not None:
                    on_error(f"{path}: binary or not UTF-8, skipped")
                continue
            yield from documents
    if skipped:
        logger.warning("%s: skipped %d binary or non-UTF-8 files", name, skipped)


def _documents_of_file(
    path: Path, name: str, document_id: str, text_field: str, on_error: Callable[[str], None] | None
) -> Iterator[Document] | None:
    """Documents of one file, chosen by its suffix; ``None`` for a binary or non-UTF-8 file."""
    if path.suffix == ".jsonl":
        return _documents_of_jsonl(path, name, document_id, text_field, on_error)
    if path.suffix == ".parquet":
        return _documents_of_parquet(path, name, document_id, text_field, on_error)
    text = _read_text(path)
    if text is None:
        return None
    if not text.strip():
        _note_empty(on_error, str(path))
        return iter([])
    return iter([Document(text, name, document_id)])


def _read_text(path: Path) -> str | None:
    """The file's text, or ``None`` when it looks binary (a NUL byte) or is not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror})") from None
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _documents_of_jsonl(
    path: Path, name: str, document_id: str, text_field: str, on_error: Callable[[str], None] | None
) -> Iterator[Document]:
    for line_number, record in iter_jsonl(path, on_error):
        text = record.get(text_field)
        if not isinstance(text, str):
            problem = (
                f"missing field '{text_field}'"
                if text_field not in record
                else f"field '{text_field}' is {type(text).__name__}, expected a string"
            )
            _report(on_error, f"{path}:{line_number}: {problem}")
        elif text.strip():
            yield Document(text, name, f"{document_id}:{line_number}")
        else:
            _note_empty(on_error, f"{path}:{line_number}")


def open_parquet(path: Path):
    """A ``pyarrow.parquet.ParquetFile``, with one-line errors when pyarrow is missing or the file is not Parquet."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise InputError(f"{path}: reading Parquet needs pyarrow (pip install 'llmkit[parquet]')") from None
    try:
        return pyarrow.parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise InputError(f"{path}: not a readable Parquet file ({error})") from None


def _documents_of_parquet(
    path: Path, name: str, document_id: str, text_field: str, on_error: Callable[[str], None] | None
) -> Iterator[Document]:
    import pyarrow

    parquet_file = open_parquet(path)
    schema = parquet_file.schema_arrow
    if text_field not in schema.names:
        raise InputError(f"{path}: missing column '{text_field}' (columns: {', '.join(schema.names)})")
    column_type = schema.field(text_field).type
    if not (pyarrow.types.is_string(column_type) or pyarrow.types.is_large_string(column_type)):
        raise InputError(f"{path}: column '{text_field}' is {column_type}, expected a string column")
    row = 0
    # Record batches keep memory bounded on files larger than RAM.
    for batch in parquet_file.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is None:
                _report(on_error, f"{path}: row {row}: field '{text_field}' is null, expected a string")
            elif text.strip():
                yield Document(text, name, f"{document_id}:{row}")
            else:
                _note_empty(on_error, f"{path}: row {row}")
            row += 1
