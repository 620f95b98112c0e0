"""Throughput accounting (MFU against a measured peak), the metrics CSV (and the experiment trackers of
:mod:`llmkit.tracking`) and loss-curve plots."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import time
from pathlib import Path

import torch

from llmkit.figures import pyplot, save_figure
from llmkit.io import atomic_write_text
from llmkit.tracking import numeric, open_trackers, parse_report_to

CSV_COLUMNS = [
    "step",
    "tokens",
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "mfu",
    "val_loss",
    "val_bpb",
    "elapsed_s",
    "event",
]


def _cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "llmkit" / "peak_flops.json"


def measured_peak_flops(dtype: torch.dtype, device: torch.device, max_size: int = 2048) -> float:
    """Matmul FLOP/s this machine reaches for ``dtype``, measured once and cached per machine.

    MFU (Chowdhery et al. 2022) divides achieved model FLOP/s by a peak; a datasheet peak means little
    on a CPU, so we use the best square matmul we can time ourselves. The matrices grow from 256 up to
    ``max_size`` only while a product takes under :data:`PEAK_PRODUCT_SECONDS`: on a CPU without bfloat16
    instructions one bfloat16 product of 2048 takes a minute, and five of them were a speedrun's first
    five minutes.
    """
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    key = f"{device.type}|{name}|{torch.get_num_threads()}|{torch.__version__}|{dtype}"
    path = _cache_path()
    cache = {}
    if path.is_file():
        try:
            cache = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}
    if key in cache:
        return cache[key]
    size = min(256, max_size)
    while True:
        a = torch.randn(size, size, dtype=dtype, device=device)
        best = _best_product_seconds(a, device, repeats=2)
        if best >= PEAK_PRODUCT_SECONDS or size * 2 > max_size:
            break
        size *= 2
    measured = 2 * size**3 / min(best, _best_product_seconds(a, device, repeats=3))
    if not _cpu_busy(device):
        # A peak timed while other work ran is too low, and every MFU divided by it too high (over 100 % was
        # seen): only an idle machine's figure is kept, and the best one measured.
        cache[key] = max(measured, cache.get(key, 0.0))
        try:
            atomic_write_text(path, json.dumps(cache, indent=1))
        except OSError:
            pass  # a read-only home only costs a re-measurement next time
    return cache.get(key, measured)


PEAK_PRODUCT_SECONDS = 0.02


def _best_product_seconds(a: torch.Tensor, device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def _cpu_busy(device: torch.device) -> bool:
    """Whether other processes compete for this CPU: a 1-minute load beyond this process and a quarter of
    the cores."""
    return device.type == "cpu" and os.getloadavg()[0] > 1 + 0.25 * (os.cpu_count() or 1)


class ThroughputMeter:
    """Tokens per second over a window of steps (evaluations excluded) and the MFU they amount to."""

    def __init__(self, flops_per_token: float, peak_flops: float):
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.restart()

    def restart(self) -> None:
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def mfu(self, tokens_per_s: float) -> float:
        return self.flops_per_token * tokens_per_s / self.peak_flops

    def window(self) -> dict[str, str]:
        tokens_per_s = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        return {"tokens_per_s": f"{tokens_per_s:.1f}", "mfu": f"{self.mfu(tokens_per_s):.4f}"}


class MetricsLog:
    """``metrics.csv`` in the run directory; on resume, rows past the resumed step are dropped so the
    curve continues exactly where the checkpoint left off. Values other than :data:`CSV_COLUMNS` (the
    loss function's metrics) become extra columns after them, in order of first appearance."""

    def __init__(self, directory: Path, resume_step: int | None, report_to: str = "csv"):
        self.trackers = open_trackers(parse_report_to(report_to), directory, resume_step)
        self.path = directory / "metrics.csv"
        self.rows: list[dict] = []
        self.columns = list(CSV_COLUMNS)
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as file:
                reader = csv.DictReader(file)
                self.rows = [row for row in reader if int(row["step"]) <= resume_step]
                self.columns += [column for column in reader.fieldnames or [] if column not in self.columns]

    def add(self, **values) -> None:
        self.columns += [column for column in values if column not in self.columns]
        self.rows.append(values)
        numbers = numeric(values)
        step = int(numbers.pop("step", len(self.rows)))
        for tracker in self.trackers:
            tracker.log(numbers, step)

    def close(self) -> None:
        """Flush and close the experiment trackers (the CSV is written by :meth:`flush`)."""
        for tracker in self.trackers:
            tracker.close()

    def flush(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())

    def plot(self, path: Path, title: str = "") -> None:
        """Training and validation loss against tokens seen."""
        plt = pyplot()

        def series(column: str):
            points = [
                (float(row["tokens"]), float(row[column])) for row in self.rows if row.get(column) not in ("", None)
            ]
            return [p[0] for p in points], [p[1] for p in points]

        figure, axis = plt.subplots(figsize=(7, 4))
        for column, label in (("loss", "train"), ("val_loss", "validation")):
            x, y = series(column)
            if x:
                axis.plot(x, y, label=label, marker="o" if column == "val_loss" else None, markersize=3)
        axis.set_xlabel("tokens")
        axis.set_ylabel("loss (nats/token)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
        save_figure(figure, path)
