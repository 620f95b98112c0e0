"""The evaluation report card: ``eval.json``, ``eval.md``, ``eval.png`` (and ``ablations.png``),
``samples/<task>.jsonl``, and an ``eval`` section in the directory's ``report.json``/``report.md``.

Every file is written atomically (:mod:`llmkit.io`); plots are drawn by :mod:`llmkit.figures` (matplotlib's Agg backend)
into memory first, so no display is needed and no half-written PNG is ever seen.
"""

from __future__ import annotations

import math
from pathlib import Path

from llmkit import __version__
from llmkit.eval.kinds import KINDS, headline
from llmkit.figures import figure_png, pyplot
from llmkit.io import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, atomic_write_text
from llmkit.report import add_section
from llmkit.tracking import open_trackers, parse_report_to

SCORES_PLOT = "eval.png"
ABLATIONS_PLOT = "ablations.png"


def _number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def score_rows(tasks: dict) -> list[dict]:
    """One row per (task, headline metric): value, standard error, the value on clean examples."""
    rows = []
    for name, entry in tasks.items():
        metrics, clean = entry["metrics"], entry.get("clean_metrics", {})
        contamination = entry.get("contamination")
        for metric, stderr_key in KINDS[entry["kind"]].scores:
            if metric not in metrics:
                continue
            rows.append(
                {
                    "task": name,
                    "kind": entry["kind"],
                    "metric": metric,
                    "value": metrics[metric],
                    "stderr": metrics.get(stderr_key) if stderr_key else None,
                    "count": metrics.get("count", metrics.get("documents")),
                    "clean": clean.get(metric),
                    "contaminated": contamination["contaminated"] if contamination else None,
                }
            )
    return rows


def log_scores(report_to: str, out: Path, tasks: dict, step: int) -> None:
    """Every headline score as ``eval/<task>/<metric>`` at the checkpoint's training step, in the trackers
    of ``report_to`` (:mod:`llmkit.tracking`), as training logs its losses."""
    trackers = open_trackers(parse_report_to(report_to), out, None)
    values = {
        f"eval/{row['task']}/{row['metric']}": float(row["value"])
        for row in score_rows(tasks)
        if row["value"] is not None
    }
    for tracker in trackers:
        tracker.log(values, step)
        tracker.close()


def render_markdown(summary: dict, images: list[str]) -> str:
    lines = [
        f"# Evaluation of `{summary['checkpoint']}`",
        "",
        f"llmkit {__version__} · {summary['device']} ({summary['dtype']}) · {summary['seconds']:.1f} s",
        "",
        "| task | kind | metric | value | ± stderr | examples | contaminated | value on clean examples |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in score_rows(summary["tasks"]):
        lines.append(
            f"| {row['task']} | {row['kind']} | {row['metric']} | {_number(row['value'])} | {_number(row['stderr'])} "
            f"| {_number(row['count'])} | {_number(row['contaminated'])} | {_number(row['clean'])} |"
        )
    lines.append("")
    for name, entry in summary["tasks"].items():
        if "ablations" not in entry:
            continue
        lines += [
            f"## Ablations: {name}",
            "",
            "| shots | chain of thought | tools | paths | accuracy | ± stderr |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {row['num_fewshot']} | {'yes' if row['chain_of_thought'] else 'no'} | {row['tools']} | "
            f"{row['self_consistency']} | {_number(row['accuracy'])} | {_number(row['stderr'])} |"
            for row in entry["ablations"]
        ]
        lines.append("")
    lines += ["## Decontamination", ""] + _decontamination_lines(summary)
    lines += [f"![{image}]({image})" for image in images]
    return "\n".join(lines) + "\n"


def _decontamination_lines(summary: dict) -> list[str]:
    check = summary["decontamination"]
    if not check["checked"]:
        return [f"Not checked: {check['source']}.", ""]
    lines = [
        f"Examples sharing a {check['ngram']}-word n-gram with the training data ({', '.join(check['training_data'])}; "
        f"{check['source']}); the last column above scores the rest.",
        "",
    ]
    for name, entry in summary["tasks"].items():
        found = entry["contamination"]
        listed = ", ".join(found["contaminated_ids"][:10]) + (" ..." if found["contaminated"] > 10 else "")
        lines.append(
            f"- {name}: {found['contaminated']} of {found['checked']} checkable examples "
            f"({found['examples']} in all){': ' + listed if listed else ''}"
        )
    return lines + [""]


def plot_scores(tasks: dict) -> bytes | None:
    """Bars of every score on a 0-1 scale (BLEU divided by 100) with standard-error whiskers, and a
    second panel of bits per byte for perplexity tasks (lower is better); None when there is nothing to draw."""
    plt = pyplot()

    rows = score_rows(tasks)
    higher = [row for row in rows if not KINDS[row["kind"]].lower_is_better]
    bits = [row for row in rows if row["metric"] == "bits_per_byte"]
    panels = [panel for panel in (higher, bits) if panel]
    if not panels:
        return None
    figure, axes = plt.subplots(
        1, len(panels), figsize=(6 * len(panels), 0.5 + 0.4 * max(map(len, panels))), squeeze=False
    )
    for axis, panel in zip(axes[0], panels):
        scale = [100.0 if row["metric"] == "bleu" else 1.0 for row in panel]
        values = [row["value"] / factor for row, factor in zip(panel, scale)]
        errors = [(row["stderr"] or 0.0) / factor for row, factor in zip(panel, scale)]
        labels = [
            f"{row['task']} · {row['metric']}{' / 100' if factor == 100 else ''}" for row, factor in zip(panel, scale)
        ]
        bars = axis.barh(
            range(len(panel)),
            values,
            xerr=errors if any(errors) else None,
            capsize=3,
            color="tab:blue" if panel is higher else "tab:orange",
        )
        axis.bar_label(bars, fmt="%.3g", padding=3)
        axis.set_yticks(range(len(panel)), labels)
        axis.invert_yaxis()
        axis.set_xlabel("score (higher is better)" if panel is higher else "bits per byte (lower is better)")
        if panel is higher:
            axis.set_xlim(0, 1)
    return figure_png(figure)


def plot_ablations(tasks: dict) -> bytes | None:
    """Accuracy of every ablation setting, one panel per generative task that ran the grid."""
    plt = pyplot()

    grids = {name: entry["ablations"] for name, entry in tasks.items() if "ablations" in entry}
    if not grids:
        return None
    figure, axes = plt.subplots(
        len(grids), 1, figsize=(7, 0.6 + 0.35 * max(map(len, grids.values())) * len(grids)), squeeze=False
    )
    for axis, (name, rows) in zip(axes[:, 0], grids.items()):
        errors = [row["stderr"] or 0.0 for row in rows]
        bars = axis.barh(
            range(len(rows)),
            [row["accuracy"] for row in rows],
            xerr=errors if any(errors) else None,
            color="tab:green",
            capsize=3,
        )
        axis.bar_label(bars, fmt="%.3g", padding=3)
        axis.set_yticks(range(len(rows)), [row["setting"] for row in rows])
        axis.invert_yaxis()
        axis.set_xlim(0, 1)
        axis.set_xlabel("accuracy")
        axis.set_title(name)
    return figure_png(figure)


def write_report(out: Path, summary: dict, samples: dict[str, list[dict]]) -> None:
    """Write every output file of an evaluation into ``out``."""
    images = []
    for name, data in (
        (SCORES_PLOT, plot_scores(summary["tasks"])),
        (ABLATIONS_PLOT, plot_ablations(summary["tasks"])),
    ):
        if data is not None:
            atomic_write_bytes(out / name, data)
            images.append(name)
    for name, records in samples.items():
        atomic_write_jsonl(out / "samples" / f"{name}.jsonl", records)
    atomic_write_json(out / "eval.json", summary)
    atomic_write_text(out / "eval.md", render_markdown(summary, images))
    metrics = {
        f"{name}/{metric}": value
        for name, entry in summary["tasks"].items()
        for metric, value in headline(entry["kind"], entry["metrics"]).items()
    }
    add_section(out, "eval", metrics, text=f"Checkpoint `{summary['checkpoint']}`; details in eval.md.", images=images)
