"""``llmkit data run pipeline.yaml``: named sources -> cleaning -> filters -> de-duplication -> PII ->
decontamination -> mixture -> tokenized shards, with every step's decisions in a data report.

How a run is organised (all under the work directory, by default ``<out>/work``):

1. **ingest** (driver): the sources are read in a deterministic order and cut
   into input shards of ``documents_per_shard`` documents (JSONL). Every document
   gets a *key*, its position in the corpus, which never changes afterwards.
   Bad records (malformed JSONL lines, binary files) are counted and listed,
   not fatal.
2. **phases** (parallel): the steps are cut into phases at every corpus step
   (de-duplication, score bands), because those need the whole corpus before
   deciding. A phase reads each shard, applies the previous corpus step's
   decision and the document steps, measures the next corpus step, and writes
   the kept documents, the removed ones (with the step and reason) and its
   statistics. The statistics file is written last and marks the shard done,
   once the shard's other files are fsynced (so a power loss cannot leave a
   shard marked done with its documents missing).
   Shards run as tasks of a local process pool, or of a Dask cluster
   (``executor: dask``; every task only needs the work directory, which must be
   on a filesystem the Dask workers share).
3. **decide** (driver): the corpus step reads every shard's measurements in
   corpus order and saves its decision.
4. **mixture and shards** (driver): kept documents are split train/validation
   by a hash of their id, training documents are sampled per source weights,
   shuffled or ordered by a curriculum, and tokenized into ``train_NNN.bin`` /
   ``val_NNN.bin`` plus ``manifest.json``; then the data report.

A run killed at any point resumes where it stopped: finished shards,
decisions and step set-ups are skipped, unfinished shards are redone from
their inputs, so no document is lost or duplicated. The work directory
remembers the pipeline that made it and refuses a different one (``restart``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from llmkit.config import build, check
from llmkit.data import mixture
from llmkit.data.executors import DaskExecutor, LocalExecutor
from llmkit.data.ingest import ingest_sources, source_config
from llmkit.data.report import write_data_report
from llmkit.data.shards import write_token_data
from llmkit.data.sources import Document, is_held_out
from llmkit.data.steps import STEPS, Classifier, CorpusStep, Step, parse_steps
from llmkit.data.work import TemporaryJsonl, Work, read_records
from llmkit.errors import InputError
from llmkit.io import atomic_write_arrays, atomic_write_json, read_json
from llmkit.tokenizer import Tokenizer

WORK_FORMAT_VERSION = 1
DEFAULT_STEPS = [
    "clean",
    "language",
    "gopher_quality",
    "gopher_repetition",
    "code_quality",
    "exact_dedup",
    "minhash_dedup",
    "pii",
]


@dataclass
class PipelineConfig:
    sources: list = field(
        default_factory=lambda: ["stdlib"],
        metadata={"help": "sources: YAML list of {name, path, weight, ...}, or comma-separated paths"},
    )
    steps: list = field(
        default_factory=lambda: list(DEFAULT_STEPS),
        metadata={
            "help": f"steps in order: YAML list of names or {{name: {{options}}}}, or comma-separated names; known: "
            f"{', '.join(STEPS)}"
        },
    )
    tokenizer: str = field(default="runs/tokenizer", metadata={"help": "tokenizer directory for the output shards"})
    out: str = field(default="runs/data", metadata={"help": "output directory: shards, manifest.json, report"})
    work: str | None = field(
        default=None, metadata={"help": "work directory for intermediate shards (default: <out>/work)"}
    )
    documents_per_shard: int = field(
        default=250, metadata={"help": "documents per work shard (the unit of parallelism and resumption)"}
    )
    workers: int = field(default=0, metadata={"help": "worker processes (0 = one per CPU)"})
    executor: Literal["local", "dask"] = field(
        default="local", metadata={"help": "run shards in a local process pool or on a Dask cluster"}
    )
    scheduler: str | None = field(
        default=None, metadata={"help": "Dask scheduler address (tcp://host:8786); unset = a local Dask cluster"}
    )
    val_fraction: float = field(
        default=0.01, metadata={"help": "fraction of kept documents in the validation split (by id hash)"}
    )
    shard_tokens: int = field(default=50_000_000, metadata={"help": "tokens per output shard file"})
    mixture_bytes: int | None = field(
        default=None, metadata={"help": "training bytes of the weighted mixture (default: the kept corpus's size)"}
    )
    curriculum: mixture.Curriculum = field(
        default="none",
        metadata={"help": "training order: shuffled (none) or easy first by length, perplexity or quality"},
    )
    seed: int = field(default=0, metadata={"help": "shuffling and sampling seed"})
    report: str | None = field(
        default=None, metadata={"help": "report card directory the data section is added to (default: out)"}
    )
    write_removed: bool = field(
        default=True, metadata={"help": "write removed documents with their reason to <out>/removed.jsonl"}
    )
    restart: bool = field(
        default=False,
        metadata={
            "help": "discard the work directory of an earlier run (needed when the pipeline or the source files "
            "changed)"
        },
    )

    def __post_init__(self) -> None:
        check(self.documents_per_shard >= 1, "documents_per_shard", self.documents_per_shard, "must be at least 1")
        check(self.workers >= 0, "workers", self.workers, "must be 0 (one per CPU) or more")
        check(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction, "must be in [0, 1)")
        check(self.shard_tokens >= 1, "shard_tokens", self.shard_tokens, "must be at least 1")
        check(
            self.mixture_bytes is None or self.mixture_bytes > 0,
            "mixture_bytes",
            self.mixture_bytes,
            "must be positive",
        )
        check(bool(self.sources), "sources", self.sources, "name at least one source")
        self.source_configs = [source_config(entry, position) for position, entry in enumerate(self.sources)]
        names = [source.name for source in self.source_configs]
        check(len(set(names)) == len(names), "sources", names, "source names must be unique")
        self.step_configs = parse_steps(self.steps, "pipeline")
        if self.curriculum != "none":
            needed = {"perplexity": "perplexity", "quality": "classifier"}.get(self.curriculum)
            check(
                needed is None or needed in [name for name, _ in self.step_configs],
                "curriculum",
                self.curriculum,
                f"needs the '{needed}' step, which scores the documents",
            )

    @property
    def work_directory(self) -> Path:
        return Path(self.work) if self.work else Path(self.out) / "work"

    def identity(self) -> dict:
        """What decides the work files' content: a rerun with the same identity resumes."""
        return {
            "format_version": WORK_FORMAT_VERSION,
            "sources": [dataclasses.asdict(s) for s in self.source_configs],
            "steps": [[name, dataclasses.asdict(options)] for name, options in self.step_configs],
            "documents_per_shard": self.documents_per_shard,
            "write_removed": self.write_removed,
        }


def build_steps(config: PipelineConfig, work: Work) -> list[Step]:
    (work.root / "steps").mkdir(parents=True, exist_ok=True)
    steps = [
        STEPS[name](options, work.artifacts(index, name)) for index, (name, options) in enumerate(config.step_configs)
    ]
    seen: dict[str, int] = {}
    for step in steps:
        seen[step.name] = seen.get(step.name, 0) + 1
        step.label = step.name if seen[step.name] == 1 else f"{step.name}_{seen[step.name]}"
    return steps


def phases_of(steps: list[Step]) -> list[tuple[list[Step], CorpusStep | None]]:
    """``(steps applied, corpus step measured)`` per phase; a corpus step measured in one phase is applied first in the
    next."""
    phases, current = [], []
    for step in steps:
        if isinstance(step, CorpusStep):
            phases.append((current, step))
            current = [step]
        else:
            current.append(step)
    phases.append((current, None))
    return phases


# ---------------------------------------------------------------------------- one shard of one phase (a task)
_worker_cache: dict[str, tuple[PipelineConfig, list]] = {}


def _worker_pipeline(work_root: str) -> tuple[PipelineConfig, list[tuple[list[Step], CorpusStep | None]]]:
    """The config and phases as a worker builds them from ``pipeline.json``: steps load their models once per
    process."""
    if work_root not in _worker_cache:
        work = Work(work_root)
        state = read_json(work.state)
        config = build(PipelineConfig, state["config"], source=str(work.state))
        _worker_cache[work_root] = (config, phases_of(build_steps(config, work)))
    return _worker_cache[work_root]


def run_shard(work_root: str, phase: int, shard: int) -> dict:
    """Process one shard of one phase from the work directory alone; return its statistics."""
    work = Work(work_root)
    config, phases = _worker_pipeline(work_root)
    applied, measured = phases[phase]
    statistics = {step.label: _step_statistics() for step in applied}
    for step in applied:
        step.counts.clear()
    kept: list[Document] = []
    removed_file = TemporaryJsonl(work.output(phase, shard, "removed.jsonl"))
    for record in read_records(work.input(phase, shard)):
        document = Document(record["text"], record["source"], record["id"], record["meta"])
        for step in applied:
            counts = statistics[step.label]
            if document.meta["profile"] not in step.profiles:
                counts["skipped_profile"] += 1
                continue
            size = len(document.text.encode("utf-8"))
            counts["documents_in"] += 1
            counts["bytes_in"] += size
            started = time.perf_counter()
            reason = step.apply(document)
            counts["seconds"] += time.perf_counter() - started
            if reason is not None:
                removal = counts["removed"].setdefault(reason, {"documents": 0, "bytes": 0})
                removal["documents"] += 1
                removal["bytes"] += size
                removed_file.write(
                    {
                        "id": document.id,
                        "source": document.source,
                        "step": step.label,
                        "reason": reason,
                        "meta": document.meta,
                        **({"text": document.text} if config.write_removed else {}),
                    }
                )
                break
            counts["bytes_out"] += len(document.text.encode("utf-8"))
        else:
            kept.append(document)
    for step in applied:
        statistics[step.label]["changes"] = dict(step.counts)

    kept_file = TemporaryJsonl(work.output(phase, shard, "kept.jsonl"))
    measure_seconds = 0.0
    if measured is not None:
        started = time.perf_counter()
        measurements = measured.measure(kept)
        measure_seconds = time.perf_counter() - started
        atomic_write_arrays(work.output(phase, shard, "measure.npz"), **measurements)
    for document in kept:
        kept_file.write({"id": document.id, "source": document.source, "text": document.text, "meta": document.meta})
    kept_file.commit()
    removed_file.commit()
    result = {
        "shard": shard,
        "phase": phase,
        "kept": len(kept),
        "steps": statistics,
        "measured": {measured.label: measure_seconds} if measured is not None else {},
    }
    atomic_write_json(work.output(phase, shard, "stats.json"), result)
    return result


def _step_statistics() -> dict:
    return {"documents_in": 0, "bytes_in": 0, "bytes_out": 0, "skipped_profile": 0, "seconds": 0.0, "removed": {}}


# ---------------------------------------------------------------------------- the driver
def run_pipeline(config: PipelineConfig) -> dict:
    """Run the whole pipeline (resuming a previous run of the same pipeline); return the summary."""
    start = time.perf_counter()
    Tokenizer.load(config.tokenizer)  # a missing tokenizer fails now, not after hours of filtering
    work = _open_work(config)
    steps = build_steps(config, work)
    ingest = ingest_sources(config.source_configs, config.documents_per_shard, work)
    setup = _setup(steps, work, ingest)
    phases = phases_of(steps)
    workers = config.workers or os.cpu_count() or 1
    executor = DaskExecutor(workers, config.scheduler) if config.executor == "dask" else LocalExecutor(workers)
    work_root = str(work.root)
    decisions = _load_json(work.root / "decisions.json")
    try:
        for phase, (_, measured) in enumerate(phases):
            pending = [
                shard for shard in range(ingest["shards"]) if not work.output(phase, shard, "stats.json").is_file()
            ]
            if pending:
                executor.run(
                    run_shard,
                    [(work_root, phase, shard) for shard in pending],
                    f"data: phase {phase + 1}/{len(phases)}",
                )
            if measured is not None and measured.label not in decisions:
                decisions[measured.label] = measured.decide(_gather_measurements(work, phase, ingest["shards"]))
                atomic_write_json(work.root / "decisions.json", decisions)
    finally:
        executor.close()

    statistics = _merge_statistics(work, [step.label for step in steps], len(phases), ingest["shards"])
    description = {
        "pipeline": {
            "steps": [name for name, _ in config.step_configs],
            "curriculum": config.curriculum,
            "seed": config.seed,
            "val_fraction": config.val_fraction,
        },
        "filter_statistics": statistics,
        "step_setup": setup,
        "step_decisions": decisions,
    }
    manifest, kept_meta = _write_shards(config, work, len(phases) - 1, ingest["shards"], description)
    summary = write_data_report(
        config, work, manifest, kept_meta, ingest, statistics, setup, decisions, len(phases), ingest["shards"]
    )
    return {**summary, "seconds": round(time.perf_counter() - start, 2)}


def _open_work(config: PipelineConfig) -> Work:
    work = Work(config.work_directory)
    identity = config.identity()
    if work.state.is_file():  # only a directory holding pipeline.json is ever deleted
        if config.restart:
            shutil.rmtree(work.root)
        elif read_json(work.state).get("identity") != identity:
            raise InputError(
                f"{work.root}: made by a different pipeline (sources, steps or shard size changed); "
                f"pass --restart to discard it, or choose another --work"
            )
    work.root.mkdir(parents=True, exist_ok=True)
    state = {"identity": identity, "config": {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}}
    atomic_write_json(work.state, state)
    return work


def _load_json(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def _setup(steps: list[Step], work: Work, ingest: dict) -> dict:
    """Driver-side preparation of each step (classifier training, evaluation index), once per work directory."""
    path = work.root / "setup.json"
    done = _load_json(path)
    pool = None
    for step in steps:
        if step.label in done:
            continue
        if isinstance(step, Classifier) and pool is None:
            pool = _sample_pool(work, ingest, step.config.max_documents)
        done[step.label] = step.setup(pool or [])
        atomic_write_json(path, done)
    return done


def _sample_pool(work: Work, ingest: dict, count: int) -> list[Document]:
    """About ``count`` raw documents spread evenly over the corpus: the classifier's negative class."""
    every = max(1, ingest["documents"] // count)
    pool = []
    for shard in range(ingest["shards"]):
        for record in read_records(work.ingest(shard)):
            if record["meta"]["key"] % every == 0 and len(pool) < count:
                pool.append(Document(record["text"], record["source"], record["id"], record["meta"]))
    return pool


def _gather_measurements(work: Work, phase: int, shards: int) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for shard in range(shards):
        with np.load(work.output(phase, shard, "measure.npz")) as data:
            for name in data.files:
                parts.setdefault(name, []).append(data[name])
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}


def _merge_statistics(work: Work, labels: list[str], phases: int, shards: int) -> dict:
    """Every step's statistics summed over shards, in pipeline order (``seconds``: measuring and applying it)."""
    merged: dict = {label: {**_step_statistics(), "changes": {}} for label in labels}
    for phase in range(phases):
        for shard in range(shards):
            shard_statistics = read_json(work.output(phase, shard, "stats.json"))
            for label, seconds in shard_statistics["measured"].items():
                merged[label]["seconds"] += seconds
            for label, counts in shard_statistics["steps"].items():
                total = merged[label]
                for name in ("documents_in", "bytes_in", "bytes_out", "skipped_profile", "seconds"):
                    total[name] += counts[name]
                for reason, removal in counts["removed"].items():
                    into = total["removed"].setdefault(reason, {"documents": 0, "bytes": 0})
                    into["documents"] += removal["documents"]
                    into["bytes"] += removal["bytes"]
                for name, value in counts["changes"].items():
                    total["changes"][name] = total["changes"].get(name, 0) + value
    return merged


@dataclass
class _KeptDocument:
    """Where a kept document's record starts in its shard file, and what the mixture needs to know of it."""

    shard: int
    offset: int
    source: str
    id: str
    meta: dict


def _index_kept(work: Work, phase: int, shards: int) -> list[_KeptDocument]:
    index = []
    for shard in range(shards):
        with open(work.output(phase, shard, "kept.jsonl"), "rb") as file:
            offset = 0
            for line in file:
                record = json.loads(line)
                meta = record["meta"]
                meta["bytes"] = len(record["text"].encode("utf-8"))
                index.append(_KeptDocument(shard, offset, record["source"], record["id"], meta))
                offset += len(line)
    return index


def _read_kept(work: Work, phase: int, documents: Iterator[_KeptDocument]) -> Iterator[Document]:
    """The documents' records, read by seeking (the mixture's order is not the files' order)."""
    files: dict[int, object] = {}
    try:
        for kept in documents:
            if kept.shard not in files:
                files[kept.shard] = open(work.output(phase, kept.shard, "kept.jsonl"), "rb")
            file = files[kept.shard]
            file.seek(kept.offset)
            record = json.loads(file.readline())
            yield Document(record["text"], record["source"], record["id"], kept.meta)
    finally:
        for file in files.values():
            file.close()


def _write_shards(
    config: PipelineConfig, work: Work, last_phase: int, shards: int, description: dict
) -> tuple[dict, list[dict]]:
    """Mixture, order, tokenization: the output data directory; returns its manifest and the kept documents' meta."""
    documents = _index_kept(work, last_phase, shards)
    if not documents:
        raise InputError(
            f"{work.root}: every document was removed; loosen the filters (per-step counts in {work.root}/phase_*)"
        )
    for document in documents:
        document.meta["split"] = "val" if is_held_out(document.id, config.val_fraction) else "train"
    train = [index for index, document in enumerate(documents) if document.meta["split"] == "train"]
    validation = [index for index, document in enumerate(documents) if document.meta["split"] == "val"]
    source_bytes = {source.name: 0 for source in config.source_configs}
    for index in train:
        source_bytes[documents[index].source] += documents[index].meta["bytes"]
    weights = {source.name: source.weight for source in config.source_configs}
    epochs = mixture.mixture_epochs(source_bytes, weights, config.mixture_bytes)
    sampled = mixture.sample_mixture(
        [documents[i].source for i in train], [documents[i].meta["bytes"] for i in train], epochs, config.seed
    )
    order = mixture.order_documents(
        [train[i] for i in sampled], [d.meta for d in documents], config.curriculum, config.seed
    )
    description["mixture"] = {
        name: {"weight": weights[name], "epochs": round(epochs[name], 4), "kept_train_bytes": source_bytes[name]}
        for name in source_bytes
    }
    stream = _read_kept(work, last_phase, (documents[index] for index in order + validation))
    manifest = write_token_data(
        stream,
        lambda document: document.meta["split"],
        config.tokenizer,
        config.out,
        config.shard_tokens,
        config.workers,
        expected_bytes=sum(documents[i].meta["bytes"] for i in order + validation),
        description=description,
    )
    return manifest, [document.meta for document in documents]
