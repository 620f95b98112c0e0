"""The pipeline's work directory: one place that names its files, so the driver and the workers agree.

```
work/
  pipeline.json            the pipeline that made it (a different one is refused)
  ingest/shard_NNNNN.jsonl the sources cut into shards of keyed documents
  ingest.json              ingest finished: shard count, documents per source, skipped records
  steps/NN_name_*          step artefacts: decisions, classifier, evaluation index
  setup.json decisions.json  step set-up and decision metrics
  phase_P/shard_NNNNN.{kept.jsonl, removed.jsonl, measure.npz, stats.json}
```

Every file is written under a temporary name, fsynced and renamed into place
(:func:`llmkit.io.commit_file`); a shard's ``stats.json`` is written last and marks it
done, so even after a power loss a shard marked done has its JSONL files on disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from llmkit.io import commit_file, iter_jsonl


class Work:
    """Paths of the work directory; one place so driver and workers agree."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def ingest(self, shard: int) -> Path:
        return self.root / "ingest" / f"shard_{shard:05d}.jsonl"

    def output(self, phase: int, shard: int, kind: str) -> Path:
        # kind: "kept.jsonl", "removed.jsonl", "measure.npz", "stats.json" (written last: the shard is done)
        return self.root / f"phase_{phase}" / f"shard_{shard:05d}.{kind}"

    def input(self, phase: int, shard: int) -> Path:
        return self.ingest(shard) if phase == 0 else self.output(phase - 1, shard, "kept.jsonl")

    def artifacts(self, index: int, name: str) -> Path:
        return self.root / "steps" / f"{index:02d}_{name}"

    @property
    def state(self) -> Path:
        return self.root / "pipeline.json"


class TemporaryJsonl:
    """A JSONL file written under a temporary name and renamed into place by ``commit``."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.temporary = path.with_name(path.name + ".tmp")
        self.file = open(self.temporary, "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def commit(self) -> None:
        self.file.close()
        commit_file(self.temporary, self.path)


def read_records(path: Path) -> Iterator[dict]:
    for _, record in iter_jsonl(path):
        yield record
