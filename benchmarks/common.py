"""Shared pieces of the benchmarks: JSON-lines output, the Tiny Shakespeare reference data, timing."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare" / "input.txt"
SMOLLM2 = SHARED_DATA / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"  # the real model (Apache-2.0)


def emit(metric: str, value, unit: str, **context) -> None:
    """One JSON object per line: the benchmarks' output contract."""
    print(json.dumps({"metric": metric, "value": value, "unit": unit, **context}), flush=True)


def require(path: Path) -> Path:
    if not path.exists():
        emit("skipped", 0, "", reason=f"{path} not found (the shared datasets live beside the repository)")
        sys.exit(0)
    return path


def prepare_shakespeare(directory: Path) -> Path:
    """nanoGPT's shakespeare_char: character tokenizer, first 90 % train, last 10 % validation."""
    from llmkit.data.shards import PrepareConfig, prepare_data
    from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer

    source = str(require(SHAKESPEARE))
    train_tokenizer(
        TokenizerConfig(
            source=source, out=str(directory / "tokenizer"), kind="char", vocab_size=128, held_out_fraction=0
        )
    )
    prepare_data(
        PrepareConfig(
            source=source,
            tokenizer=str(directory / "tokenizer"),
            out=str(directory / "data"),
            val_fraction=0.1,
            split="tail",
            workers=1,
        )
    )
    return directory / "data"


def interleaved_rates(runs: dict, repeats: int) -> dict[str, float]:
    """Median rate of each named callable, run round-robin so machine noise hits all of them alike."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            rates[name].append(run())
    return {name: statistics.median(values) for name, values in rates.items()}


def kernel_benchmark(
    description: str, alone: str | None = None, repeats: int = 9, more_arguments=None
) -> tuple[argparse.Namespace, dict] | None:
    """The command line of a benchmark of llmkit's CPU kernels (``--threads``, ``--repeats``; with ``alone``,
    ``--no-model``: then only ``alone`` runs, not the SmolLM2 part; ``more_arguments(parser)`` adds the script's own),
    with torch's threads set, and the context of its JSON lines; None, after a ``skipped`` line, where the kernels do
    not run."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=repeats)
    if alone is not None:
        parser.add_argument("--no-model", action="store_true", help=f"{alone} alone, not the SmolLM2 part")
    if more_arguments is not None:
        more_arguments(parser)
    arguments = parser.parse_args()
    import torch

    from llmkit.infer import cpu_kernels

    torch.set_num_threads(arguments.threads)
    if not cpu_kernels.available():
        emit("skipped", 0, "", reason="llmkit's CPU kernels need an x86-64 CPU with AVX2 and a C++ compiler")
        return None
    return arguments, {"threads": arguments.threads, "torch": torch.__version__}


def on_smollm2(skip: bool, system: str, run) -> None:
    """``run(checkpoint)`` on SmolLM2-135M-Instruct imported into a temporary directory, or a ``skipped`` line saying
    why not (``skip``: the script's ``--no-model``; or the shared file is absent)."""
    if skip:
        emit("skipped", 0, "", system=system, reason="--no-model")
    elif not SMOLLM2.exists():
        emit("skipped", 0, "", system=system, reason=f"{SMOLLM2} not found")
    else:
        from llmkit.interop.gguf_import import import_gguf

        with tempfile.TemporaryDirectory() as directory:
            checkpoint = Path(directory) / "smollm2"
            import_gguf(SMOLLM2, checkpoint)
            run(checkpoint)
