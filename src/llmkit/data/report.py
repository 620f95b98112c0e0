"""The data report: what every pipeline step removed and why, as Markdown tables and PNG plots.

It is the ``data`` section of the report card (``report.md`` / ``report.json``
in the output directory), so a speedrun and a single ``llmkit data run`` show
the same card. Removed documents, each with its step and reason, go to
``removed.jsonl`` beside it.
"""

from __future__ import annotations

import collections
import json
import math
import os
from pathlib import Path

from llmkit.figures import pyplot, save_figure
from llmkit.io import commit_file, iter_jsonl
from llmkit.report import add_section


def write_data_report(
    config,
    work,
    manifest: dict,
    kept_meta: list[dict],
    ingest: dict,
    statistics: dict,
    setup: dict,
    decisions: dict,
    phases: int,
    shards: int,
) -> dict:
    """Write the report files into ``config.out``; return the run's summary."""
    out = Path(config.out)
    splits = manifest["splits"]
    kept_bytes = sum(split["bytes"] for split in splits.values())
    kept_tokens = sum(split["tokens"] for split in splits.values())
    tokens_per_byte = kept_tokens / kept_bytes if kept_bytes else 0.0
    read_bytes = sum(source["bytes"] for source in ingest["sources"].values())

    removed = _collect_removed(work, phases, shards, out / "removed.jsonl" if config.write_removed else None)
    images = [_plot_steps(out, statistics, ingest["documents"]), _plot_histograms(out, kept_meta, removed)]

    step_rows = []
    for label, counts in statistics.items():
        removed_documents = sum(r["documents"] for r in counts["removed"].values())
        removed_bytes = sum(r["bytes"] for r in counts["removed"].values())
        step_rows.append(
            {
                "step": label,
                "documents_in": counts["documents_in"],
                "removed_documents": removed_documents,
                "removed_bytes": removed_bytes,
                "removed_tokens_estimate": round(removed_bytes * tokens_per_byte),
                "bytes_changed": counts["bytes_in"] - removed_bytes - counts["bytes_out"],
                "skipped_profile": counts["skipped_profile"],
                "seconds": counts["seconds"],
                "reasons": counts["removed"],
                "changes": counts["changes"],
            }
        )
    summary = {
        "out": str(out),
        "documents_read": ingest["documents"],
        "documents_kept": len(kept_meta),
        "bytes_read": read_bytes,
        "bytes_kept": kept_bytes,
        "train_tokens": splits["train"]["tokens"],
        "val_tokens": splits["val"]["tokens"],
        "skipped_records": ingest["errors"],
        "steps": {row["step"]: row["removed_documents"] for row in step_rows},
        "mixture_epochs": {name: source["epochs"] for name, source in manifest["mixture"].items()},
        **{
            f"{label}_{name}": value
            for results in (setup, decisions)
            for label, metrics in results.items()
            for name, value in metrics.items()
            if isinstance(value, (int, float))
        },
    }
    card = Path(config.report) if config.report else out
    add_section(
        card,
        "data",
        {key: value for key, value in summary.items() if not isinstance(value, dict)},
        _markdown(step_rows, ingest, manifest, tokens_per_byte),
        [Path(os.path.relpath(image, card)).as_posix() for image in images],
    )
    return summary


def _collect_removed(work, phases: int, shards: int, side_file: Path | None) -> list[dict]:
    """Every removed document's record (step, reason, meta), in pipeline order; optionally copied to ``side_file``."""
    records = []
    writer = open(side_file.with_name(side_file.name + ".tmp"), "w", encoding="utf-8") if side_file else None
    for phase in range(phases):
        for shard in range(shards):
            for _, record in iter_jsonl(work.output(phase, shard, "removed.jsonl")):
                if writer:
                    writer.write(json.dumps(record, ensure_ascii=False) + "\n")
                record.pop("text", None)
                records.append(record)
    if writer:
        writer.close()
        commit_file(writer.name, side_file)
    return records


def _markdown(rows: list[dict], ingest: dict, manifest: dict, tokens_per_byte: float) -> str:
    lines = [
        f"Read {ingest['documents']:,} documents in {ingest['shards']} shards"
        + (
            f"; {ingest['errors']:,} records skipped: malformed, binary or empty (e.g. {ingest['error_examples'][0]}; "
            f"all in work/ingest_errors.txt)"
            if ingest["errors"]
            else ""
        )
        + ".",
        "",
        "| step | documents in | removed | removed % | bytes removed | ≈ tokens removed | CPU seconds | top reasons |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        share = 100 * row["removed_documents"] / row["documents_in"] if row["documents_in"] else 0.0
        reasons = sorted(row["reasons"].items(), key=lambda item: -item[1]["documents"])[:3]
        reason_text = ", ".join(f"{reason} ({removal['documents']:,})" for reason, removal in reasons) or "-"
        lines.append(
            f"| {row['step']} | {row['documents_in']:,} | {row['removed_documents']:,} | {share:.1f} | "
            f"{row['removed_bytes']:,} | {row['removed_tokens_estimate']:,} | {row['seconds']:.2f} | {reason_text} |"
        )
    changes = {row["step"]: row["changes"] for row in rows if row["changes"]}
    if changes:
        lines += [
            "",
            "Changes made without removing documents: "
            + "; ".join(f"{step}: " + ", ".join(f"{k} {v:,}" for k, v in c.items()) for step, c in changes.items())
            + ".",
        ]
    emptied = [name for name, source in manifest["mixture"].items() if not source["kept_train_bytes"]]
    if emptied:
        lines += [
            "",
            f"**No training documents left from {', '.join(emptied)}**: every document was removed (see the "
            "reasons above); the other sources share the mixture.",
        ]
    lines += [
        "",
        f"Removed tokens are estimated at the kept corpus's {tokens_per_byte:.3f} tokens per byte.",
        "",
        "| source | weight | epochs | kept training bytes |",
        "|---|---|---|---|",
    ]
    for name, source in manifest["mixture"].items():
        lines.append(
            f"| {name} | {source['weight'] if source['weight'] is not None else 'natural'} | {source['epochs']:.3g} | "
            f"{source['kept_train_bytes']:,} |"
        )
    return "\n".join(lines)


def _plot_steps(out: Path, statistics: dict, documents_read: int) -> Path:
    plt = pyplot()

    labels = list(statistics)
    removed = [sum(r["documents"] for r in statistics[label]["removed"].values()) for label in labels]
    kept = documents_read - sum(removed)
    figure, axis = plt.subplots(figsize=(7, 0.45 * (len(labels) + 1) + 1.2))
    axis.barh(labels + ["kept"], removed + [kept], color=["tab:red"] * len(labels) + ["tab:green"])
    axis.invert_yaxis()
    axis.set_xlabel("documents")
    axis.set_title(f"Documents removed per step (of {documents_read:,} read)")
    for position, value in enumerate(removed + [kept]):
        axis.text(value, position, f" {value:,}", va="center", fontsize=8)
    path = out / "data_steps.png"
    save_figure(figure, path)
    return path


def _plot_histograms(out: Path, kept: list[dict], removed: list[dict]) -> Path:
    plt = pyplot()

    panels = [("bytes", "document length (log10 bytes)", lambda value: math.log10(max(value, 1)))]
    for key, title in (
        ("quality_score", "quality classifier score"),
        ("bits_per_byte", "perplexity (bits per byte)"),
        ("language_score", "language identification score"),
    ):
        if any(key in meta for meta in kept) or any(key in record["meta"] for record in removed):
            panels.append((key, title, float))
    languages = collections.Counter(meta["language"] for meta in kept if "language" in meta)
    figure, axes = plt.subplots(
        1, len(panels) + bool(languages), figsize=(4 * (len(panels) + bool(languages)), 3.2), squeeze=False
    )
    for axis, (key, title, transform) in zip(axes[0], panels):
        for label, metas, color in (("kept", kept, "tab:green"), ("removed", [r["meta"] for r in removed], "tab:red")):
            values = [transform(meta[key]) for meta in metas if meta.get(key) is not None]
            if values:
                axis.hist(values, bins=40, alpha=0.6, color=color, label=f"{label} ({len(values):,})")
        axis.set_title(title, fontsize=9)
        axis.legend(fontsize=7)
    if languages:
        axis = axes[0][-1]
        top = languages.most_common(10)
        axis.bar([language for language, _ in top], [count for _, count in top], color="tab:blue")
        axis.set_title("language of kept documents", fontsize=9)
    path = out / "data_histograms.png"
    save_figure(figure, path)
    return path
