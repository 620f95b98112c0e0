"""Throughput of the whole data pipeline (``llmkit data run``): read, clean, filter, de-duplicate, mask,
decontaminate, mix and tokenize.

Metrics (one JSON object per line):
- mb_per_s_per_core: megabytes of source text read per second of wall time, divided by the worker
  processes, for the embedded default (the standard library, the default steps) and for the web-like
  samples in ../shared/data (C4 and Wikipedia demo files, a web recipe: language, Gopher, C4, line
  de-duplication and decontamination against the shared evaluation sets);
- step_seconds_share: the share of the pipeline's CPU time each step takes (applying and measuring,
  summed over workers, from the manifest's filter statistics), so a slow step is visible.

Usage: python benchmarks/data_pipeline.py [--workers N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED_DATA, emit  # noqa: E402

from llmkit.data.pipeline import DEFAULT_STEPS, PipelineConfig, run_pipeline  # noqa: E402
from llmkit.data.tokenizer_training import (
    TokenizerConfig,
    train_tokenizer,  # noqa: E402
)
from llmkit.token_data import load_manifest  # noqa: E402

WEB_STEPS = [
    "clean",
    "language",
    "gopher_quality",
    "gopher_repetition",
    "c4",
    "exact_dedup",
    "minhash_dedup",
    "line_dedup",
    "pii",
]
EVALUATION_SETS = [
    "humaneval/HumanEval.jsonl.gz",
    "gsm8k/train.jsonl",
    "arc/ARC-Challenge/ARC-Challenge-Dev.jsonl",
    "mmlu/dev/high_school_mathematics_dev.csv",
]


def web_sources() -> list[dict] | None:
    demo = SHARED_DATA / "llamafactory_demo"
    if not (demo / "c4_demo.jsonl").is_file():
        return None
    return [
        {"name": "c4", "path": str(demo / "c4_demo.jsonl")},
        {"name": "wikipedia", "path": str(demo / "wiki_demo.txt"), "format": "lines"},
    ]


def evaluation_sets() -> list[str]:
    return [str(SHARED_DATA / name) for name in EVALUATION_SETS if (SHARED_DATA / name).is_file()]


def timed_run(config: PipelineConfig) -> tuple[float, dict]:
    start = time.perf_counter()
    summary = run_pipeline(config)
    return time.perf_counter() - start, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        train_tokenizer(TokenizerConfig(out=str(directory / "tokenizer"), vocab_size=4096, max_bytes=4_000_000))
        corpora = {"stdlib": (["stdlib"], DEFAULT_STEPS)}
        sources = web_sources()
        if sources is None:
            emit("skipped", 0, "", reason=f"{SHARED_DATA} not found: web-like samples not measured")
        else:
            sets = evaluation_sets()
            corpora["web"] = (sources, WEB_STEPS + ([{"decontaminate": {"sets": sets}}] if sets else []))
        for corpus, (sources, steps) in corpora.items():
            rates = []
            for repeat in range(arguments.repeats):
                config = PipelineConfig(
                    sources=sources,
                    steps=steps,
                    tokenizer=str(directory / "tokenizer"),
                    out=str(directory / f"{corpus}_{repeat}"),
                    workers=arguments.workers,
                )
                seconds, summary = timed_run(config)
                rates.append(summary["bytes_read"] / 1e6 / seconds / arguments.workers)
            rates.sort()
            emit(
                "mb_per_s_per_core",
                round(rates[len(rates) // 2], 3),
                "MB/s/core",
                corpus=corpus,
                workers=arguments.workers,
                steps=[step if isinstance(step, str) else next(iter(step)) for step in steps],
                documents_read=summary["documents_read"],
                documents_kept=summary["documents_kept"],
                mb_read=round(summary["bytes_read"] / 1e6, 2),
                seconds=round(seconds, 2),
                repeats=arguments.repeats,
                all_rates=[round(rate, 3) for rate in rates],
            )
            statistics = load_manifest(config.out)["filter_statistics"]
            total = sum(step["seconds"] for step in statistics.values())
            for label, step in statistics.items():
                emit(
                    "step_seconds_share",
                    round(step["seconds"] / total, 4),
                    "fraction",
                    corpus=corpus,
                    step=label,
                    seconds=round(step["seconds"], 3),
                )


if __name__ == "__main__":
    main()
