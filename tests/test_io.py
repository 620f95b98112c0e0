"""The JSONL writer: one object per line, UTF-8 text as written, parent folders made, an earlier file replaced
whole, and what it writes reads back through the JSONL reader."""

from llmkit.io import atomic_write_jsonl, iter_jsonl


def test_jsonl_records_are_written_one_per_line_and_read_back(tmp_path):
    path = tmp_path / "new" / "records.jsonl"
    records = [{"question": "Zoë has 3 €", "answer": 3}, {"nested": {"list": [1, 2]}}]
    atomic_write_jsonl(path, records)
    assert path.read_text(encoding="utf-8") == '{"question": "Zoë has 3 €", "answer": 3}\n{"nested": {"list": [1, 2]}}\n'
    assert [record for _, record in iter_jsonl(path)] == records
    atomic_write_jsonl(path, records[1:])
    assert [record for _, record in iter_jsonl(path)] == records[1:]
    assert [entry.name for entry in path.parent.iterdir()] == ["records.jsonl"]  # no temporary file left behind
