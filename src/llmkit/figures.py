"""The one way llmkit draws a PNG: matplotlib on its file-only backend, written atomically and durably."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from llmkit.io import atomic_write_bytes


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: files only, so no display is needed or touched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(figure) -> bytes:
    """``figure`` laid out and drawn as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    pyplot().close(figure)
    return buffer.getvalue()


def save_figure(figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` (atomically, fsynced) and close it."""
    atomic_write_bytes(Path(path), figure_png(figure))
    return Path(path)


def plot_metrics(
    run_directory: Path,
    columns: list[str],
    title: str,
    filename: str = "preference.png",
    x_label: str = "step",
    panel_rows: int = 1,
    with_events: bool = False,
    marked: tuple[str, ...] = (),
) -> Path | None:
    """``<run>/<filename>``: each of ``columns`` of metrics.csv that has values, against the step, one panel
    each in ``panel_rows`` rows; the rows of events (evaluations before and after training) only
    ``with_events``, and the ``marked`` columns (sparse ones, such as periodic evaluations) with markers."""
    path = Path(run_directory) / "metrics.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as file:
        rows = [row for row in csv.DictReader(file) if with_events or row.get("event", "") == ""]
    columns = [column for column in columns if any(row.get(column) not in ("", None) for row in rows)]
    if not columns:
        return None
    plt = pyplot()

    panel_columns = -(-len(columns) // panel_rows)
    figure, axes = plt.subplots(
        panel_rows, panel_columns, figsize=(3.5 * panel_columns, 3.3 * panel_rows), squeeze=False
    )
    for axis in axes.flat[len(columns) :]:
        axis.axis("off")
    for axis, column in zip(axes.flat, columns):
        points = [(int(row["step"]), float(row[column])) for row in rows if row.get(column) not in ("", None)]
        axis.plot(
            [step for step, _ in points],
            [value for _, value in points],
            marker="o" if column in marked else None,
            markersize=3,
        )
        axis.set_title(column)
        axis.set_xlabel(x_label)
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    return save_figure(figure, Path(run_directory) / filename)
