"""The one way llmkit draws a PNG: matplotlib on its file-only backend, written atomically and durably."""

from __future__ import annotations

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
