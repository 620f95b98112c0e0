import json
import logging
import os
from pathlib import Path

import pytest

from llmkit.data.sources import STDLIB_SUFFIXES, is_held_out, iter_documents, stdlib_root
from llmkit.errors import InputError


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_text_file_is_one_document(tmp_path):
    path = write(tmp_path / "notes.md", "line one\r\nline two ✓\n")
    documents = list(iter_documents(str(path)))
    assert [(d.text, d.source, d.id) for d in documents] == [("line one\r\nline two ✓\n", str(path), "notes.md")]


def test_explicit_binary_file_is_an_error(tmp_path):
    path = write(tmp_path / "image.dat", b"\x89PNG\x00\x01")
    with pytest.raises(InputError, match="image.dat"):
        list(iter_documents(str(path)))


def test_folder_is_walked_in_sorted_order_skipping_binaries_and_hidden(tmp_path, caplog):
    write(tmp_path / "b.txt", "bee")
    write(tmp_path / "a.txt", "ay")
    write(tmp_path / "sub" / "c.py", "print('c')")
    write(tmp_path / "sub" / "records.jsonl", json.dumps({"text": "from jsonl"}) + "\n")
    write(tmp_path / "sub" / "blob.bin", b"\x00\x01\x02binary")
    write(tmp_path / "sub" / "latin1.txt", "caf\xe9".encode("latin-1"))
    write(tmp_path / ".git" / "config", "hidden")
    write(tmp_path / "empty.txt", "  \n")
    with caplog.at_level(logging.WARNING):
        documents = list(iter_documents(str(tmp_path)))
    assert [(d.id, d.text) for d in documents] == [
        ("a.txt", "ay"),
        ("b.txt", "bee"),
        ("sub/c.py", "print('c')"),
        ("sub/records.jsonl:1", "from jsonl"),
    ]
    assert {d.source for d in documents} == {str(tmp_path)}
    assert "skipped 2 binary or non-UTF-8 files" in caplog.text


def test_jsonl_documents_by_line_with_custom_field(tmp_path):
    lines = [json.dumps({"body": "first"}), "", json.dumps({"body": "second", "other": 1})]
    path = write(tmp_path / "data.jsonl", "\n".join(lines) + "\n")
    documents = list(iter_documents(str(path), text_field="body"))
    assert [(d.id, d.text) for d in documents] == [("data.jsonl:1", "first"), ("data.jsonl:3", "second")]


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ("{not json", r"data.jsonl:2: not valid JSON"),
        (json.dumps({"content": "x"}), r"data.jsonl:2: missing field 'text'"),
        (json.dumps({"text": 7}), r"data.jsonl:2: field 'text' is int, expected a string"),
    ],
)
def test_jsonl_errors_name_file_line_and_field(tmp_path, bad_line, expected):
    path = write(tmp_path / "data.jsonl", json.dumps({"text": "fine"}) + "\n" + bad_line + "\n")
    with pytest.raises(InputError, match=expected):
        list(iter_documents(str(path)))


def test_parquet_column(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    pytest.importorskip("pyarrow.parquet")

    path = tmp_path / "table.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"text": ["alpha", "", "gamma δ"], "id": [1, 2, 3]}), path)
    documents = list(iter_documents(str(path)))
    assert [(d.id, d.text) for d in documents] == [("table.parquet:0", "alpha"), ("table.parquet:2", "gamma δ")]
    with pytest.raises(InputError, match="missing column 'content'"):
        list(iter_documents(str(path), text_field="content"))
    with pytest.raises(InputError, match="column 'id' is int64"):
        list(iter_documents(str(path), text_field="id"))
    pyarrow.parquet.write_table(pyarrow.table({"text": ["ok", None]}), path)
    with pytest.raises(InputError, match="row 1: field 'text' is null"):
        list(iter_documents(str(path)))


def test_missing_path_and_empty_corpus_are_errors(tmp_path):
    with pytest.raises(InputError, match="nowhere.txt: no such file or folder"):
        list(iter_documents(str(tmp_path / "nowhere.txt")))
    empty_folder = tmp_path / "empty"
    write(empty_folder / "blank.txt", "\n\n")
    with pytest.raises(InputError, match=f"{empty_folder}: source holds no non-empty documents"):
        list(iter_documents(str(empty_folder)))
    blank_jsonl = write(tmp_path / "blank.jsonl", json.dumps({"text": ""}) + "\n")
    with pytest.raises(InputError, match="blank.jsonl: source holds no non-empty documents"):
        list(iter_documents(str(blank_jsonl)))


def test_comma_separated_sources_keep_their_names(tmp_path):
    first = write(tmp_path / "one.txt", "one")
    second = write(tmp_path / "two.jsonl", json.dumps({"text": "two"}) + "\n")
    documents = list(iter_documents(f"{first}, {second}"))
    assert [(d.source, d.id, d.text) for d in documents] == [
        (str(first), "one.txt", "one"),
        (str(second), "two.jsonl:1", "two"),
    ]


def test_max_bytes_cuts_at_a_character_boundary(tmp_path):
    write(tmp_path / "a.txt", "abc")
    write(tmp_path / "b.txt", "dé€f")  # d=1 byte, é=2, €=3, f=1
    # 3 bytes of a.txt, then 4 left: "d" + "é" fit (3 bytes), "€" would cross the limit.
    documents = list(iter_documents(str(tmp_path), max_bytes=7))
    assert [d.text for d in documents] == ["abc", "dé"]
    assert sum(len(d.text.encode()) for d in documents) <= 7
    assert [d.text for d in iter_documents(str(tmp_path), max_bytes=3)] == ["abc"]


def test_stdlib_source_reads_the_installed_standard_library():
    documents = list(iter_documents("stdlib", max_bytes=300_000))
    root = stdlib_root()
    # Independent listing: the same filters, ordered as a sorted walk (a folder's files before its subfolders).
    skipped = {"site-packages", "dist-packages", "__pycache__", "test", "tests"}
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in skipped and not name.startswith(".")]
        found += [
            Path(folder, name).relative_to(root)
            for name in files
            if name.endswith(STDLIB_SUFFIXES) and not name.startswith(".")
        ]
    expected = sorted(found, key=lambda relative: (relative.parts[:-1], relative.name))
    assert len(documents) > 3
    assert sum(len(d.text.encode()) for d in documents) <= 300_000
    assert [d.id for d in documents] == [path.as_posix() for path in expected[: len(documents)]]
    for document in documents[:-1]:  # the last one may be cut by max_bytes
        assert document.source == "stdlib"
        assert document.text == (root / document.id).read_text(encoding="utf-8")


def test_held_out_is_a_stable_hash_split():
    ids = [f"file_{index}.txt" for index in range(5000)]
    chosen = [document_id for document_id in ids if is_held_out(document_id, 0.1)]
    assert 0.08 < len(chosen) / len(ids) < 0.12
    assert chosen == [document_id for document_id in reversed(ids) if is_held_out(document_id, 0.1)][::-1]
    assert not any(is_held_out(document_id, 0.0) for document_id in ids)
    # Raising the fraction only adds documents: a split never loses a member.
    assert set(chosen) <= {document_id for document_id in ids if is_held_out(document_id, 0.2)}
