"""The report card: ``report.json`` (stage -> metrics) and ``report.md`` rendered from it, plus PNGs.

Each stage adds its own section, so ``speedrun`` and a single stage produce the same card."""

from __future__ import annotations

import json
from pathlib import Path

from llmkit import __version__
from llmkit.io import atomic_write_json, atomic_write_text


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:.3e}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def add_section(
    directory: str | Path, stage: str, metrics: dict, text: str = "", images: list[str] | None = None
) -> None:
    """Add or replace ``stage`` in the report of ``directory`` and re-render ``report.md``."""
    directory = Path(directory)
    path = directory / "report.json"
    report = json.loads(path.read_text()) if path.is_file() else {"llmkit_version": __version__, "stages": {}}
    report["stages"][stage] = {"metrics": metrics, "text": text, "images": images or []}
    atomic_write_json(path, report)
    atomic_write_text(directory / "report.md", render(report))


def render(report: dict) -> str:
    lines = ["# llmkit report card", "", f"llmkit {report['llmkit_version']}", ""]
    for stage, section in report["stages"].items():
        lines += [f"## {stage}", ""]
        if section["text"]:
            lines += [section["text"], ""]
        scalars = {k: v for k, v in section["metrics"].items() if not isinstance(v, (dict, list))}
        if scalars:
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {key} | {_format(value)} |" for key, value in scalars.items()]
            lines.append("")
        lines += [f"![{stage}]({image})" for image in section["images"]]
        if section["images"]:
            lines.append("")
    return "\n".join(lines)
