"""Atomic file writes, hashing and line-checked JSONL reading.

Every file llmkit writes goes to a temporary name in the same directory and is
moved into place with ``os.replace``, so an interrupted run never leaves a
half-written file where a complete one used to be. A rename alone survives a
killed process but not a power loss: the kernel may persist the new name before
the data behind it. So :func:`commit_file` (and :class:`AtomicDirectory` for whole
folders) fsyncs the data before the rename and the folder after it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from llmkit.errors import InputError

_UMASK = os.umask(0)
os.umask(_UMASK)


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries (the names created or renamed in it), to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def commit_file(temporary: str | Path, path: str | Path) -> None:
    """Rename a finished temporary file to ``path`` durably: after a crash, even a power loss, ``path``
    holds its old content or the new one, never an empty or partial file."""
    fsync_path(temporary)
    os.replace(temporary, path)
    fsync_path(Path(path).parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temp_name, 0o666 & ~_UMASK)  # mkstemp makes owner-only files; give the usual mode
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        commit_file(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path: str | Path, records: Iterable[Any]) -> None:
    """One JSON object per line (UTF-8 text, not escaped), written atomically."""
    atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def atomic_directory(final: str | Path) -> "AtomicDirectory":
    """Context manager: build a directory under a temporary name, rename it into place on success."""
    return AtomicDirectory(Path(final))


class AtomicDirectory:
    def __init__(self, final: Path):
        self.final = final

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.temporary = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".{self.final.name}.", suffix=".tmp"))
        os.chmod(self.temporary, 0o777 & ~_UMASK)  # mkdtemp makes owner-only folders
        return self.temporary

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            shutil.rmtree(self.temporary, ignore_errors=True)
            return
        # Libraries (safetensors, torch.save) write without fsync: flush everything before the rename.
        for path in self.temporary.rglob("*"):
            fsync_path(path)
        fsync_path(self.temporary)
        if self.final.exists():
            # Move the old copy aside first so there is never a moment without a complete directory.
            stale = self.final.with_name(f".{self.final.name}.old")
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(self.final, stale)
            os.replace(self.temporary, self.final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(self.temporary, self.final)
        fsync_path(self.final.parent)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read ({error})") from None


def iter_jsonl(path: str | Path, on_error: Callable[[str], None] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line (of a gzipped file when it ends in ``.gz``).

    A bad line (not UTF-8, not JSON, not an object) raises naming file and line, or,
    when ``on_error`` is given, is passed to it as that message and skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        for line_number, raw in enumerate(file, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise InputError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            except UnicodeDecodeError:
                error = InputError(f"{path}:{line_number}: not valid UTF-8")
            except json.JSONDecodeError as decode_error:
                error = InputError(f"{path}:{line_number}: not valid JSON ({decode_error.msg})")
            except InputError as input_error:
                error = input_error
            else:
                yield line_number, record
                continue
            if on_error is None:
                raise error
            on_error(str(error))


def atomic_write_arrays(path: str | Path, **arrays) -> None:
    """Named numpy arrays as an ``.npz`` file, written atomically."""
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(Path(path), buffer.getvalue())


def read_arrays(path: str | Path, what: str, names: tuple[str, ...]) -> dict:
    """The arrays ``names`` of an ``.npz`` file; a missing or malformed file raises naming ``what`` it should be."""
    import zipfile

    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return {name: arrays[name] for name in names}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise InputError(f"{path}: not a valid {what} ({error})") from None
