"""The JSONL writer: one object per line, UTF-8 text as written, parent folders made, an earlier file replaced
whole, and what it writes reads back through the JSONL reader. Atomic writes are durable: the data is
fsynced before the rename and the folder after it."""

import os
from pathlib import Path

import pytest

from llmkit.io import atomic_directory, atomic_write_jsonl, atomic_write_text, iter_jsonl


class FsyncLog(list):
    """Every fsync as (the path it flushed, whether the path ``watch`` existed at that moment)."""

    watch: Path


@pytest.fixture
def fsynced(monkeypatch) -> FsyncLog:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the fsynced files")
    log, real_fsync = FsyncLog(), os.fsync

    def recording(descriptor):
        log.append((Path(os.readlink(f"/proc/self/fd/{descriptor}")), log.watch.exists()))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording)
    return log


def test_jsonl_records_are_written_one_per_line_and_read_back(tmp_path):
    path = tmp_path / "new" / "records.jsonl"
    records = [{"question": "Zoë has 3 €", "answer": 3}, {"nested": {"list": [1, 2]}}]
    atomic_write_jsonl(path, records)
    assert (
        path.read_text(encoding="utf-8") == '{"question": "Zoë has 3 €", "answer": 3}\n{"nested": {"list": [1, 2]}}\n'
    )
    assert [record for _, record in iter_jsonl(path)] == records
    atomic_write_jsonl(path, records[1:])
    assert [record for _, record in iter_jsonl(path)] == records[1:]
    assert [entry.name for entry in path.parent.iterdir()] == ["records.jsonl"]  # no temporary file left behind


def test_an_atomic_write_fsyncs_the_data_before_the_rename_and_the_folder_after(tmp_path, fsynced):
    path = tmp_path / "latest"
    fsynced.watch = path
    atomic_write_text(path, "checkpoints/step_00000001\n")
    [(data, renamed_yet), (folder, renamed)] = fsynced
    assert data.parent == tmp_path and data.name.startswith(".latest.") and not renamed_yet
    assert folder == tmp_path and renamed


def test_an_atomic_directory_fsyncs_every_file_and_folder_before_the_rename_and_the_parent_after(tmp_path, fsynced):
    final = tmp_path / "checkpoints" / "step_00000001"
    fsynced.watch = final
    with atomic_directory(final) as building:
        (building / "model.safetensors").write_bytes(b"weights")  # written as libraries do, without fsync
        (building / "adapters").mkdir()
        (building / "adapters" / "adapter.safetensors").write_bytes(b"adapter")
    before = {path.relative_to(building) for path, renamed in fsynced if not renamed and path.is_relative_to(building)}
    assert before == {Path("."), Path("model.safetensors"), Path("adapters"), Path("adapters/adapter.safetensors")}
    assert fsynced[-1] == (final.parent, True)
