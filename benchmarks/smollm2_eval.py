"""SmolLM2-135M-Instruct (the shared Q4_1 GGUF) on the shared ARC and MMLU dev splits, through ``llmkit eval``.

The GGUF file is imported with ``llmkit import`` (its Q4_1/Q8_0 weights dequantized to float32, its own
vocabulary and chat template kept), then ``llmkit eval`` scores each task by the log-likelihood of every
choice after ``Question: ...\\nAnswer:`` (lm-eval's ``arc_easy`` prompt, and the "cloze" form in which the
SmolLM2 authors report MMLU), one run per task:

* ``arc_easy``, ``arc_challenge``: ARC-Easy dev (570 questions) and ARC-Challenge dev (299), zero-shot;
  ``--arc-limit N`` takes the first N of each;
* ``mmlu_5shot``, ``mmlu_0shot``: MMLU dev, all 57 subjects. The shared copy has only the dev split (5
  questions a subject). ``--mmlu-per-subject K`` evaluates the first K questions of every subject
  (default 5: all 285); 5-shot demonstrations are drawn (seed 0) from the dev questions not evaluated
  (with K = 5: from the other 284, never the question asked), of any subject.

Each task gives ``acc`` (highest summed log-likelihood) and ``acc_norm`` (per character of the choice,
lm-eval's), with the standard error of the mean. Output: JSON lines (``metric``, ``value``, ``unit``,
``task``, ``examples``, ``num_fewshot``, ``stderr``, ``seconds``) after each task, then the wall time.
Every choice is scored with its whole prompt, as lm-eval does, so the 5-shot task is the slow one: with
``--threads 1`` on 2 shared CPU cores the whole run took 56 minutes, 40 of them for 5-shot MMLU (the
numbers are in docs/eval.md). While other jobs held the cores, a second torch thread made scoring 3x
slower, hence ``--threads``.

Usage: python benchmarks/smollm2_eval.py [--work DIR] [--device cpu] [--threads N] [--arc-limit N]
                                         [--mmlu-per-subject K]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED_DATA, SMOLLM2, emit, require  # noqa: E402

from llmkit.cli import main as llmkit  # noqa: E402

MODEL = SMOLLM2
ARC = SHARED_DATA / "arc"
MMLU = SHARED_DATA / "mmlu" / "dev"


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    path.write_text(buffer.getvalue(), encoding="utf-8")
    return path


def mmlu_split(work: Path, per_subject: int) -> tuple[Path, Path | None]:
    """The first ``per_subject`` dev questions of every subject (file-name order) as one CSV, and the other
    dev questions as the demonstration file (None when every question is evaluated)."""
    header, evaluated, pool = None, [], []
    for file in sorted(MMLU.glob("*_dev.csv")):
        with open(file, encoding="utf-8", newline="") as handle:
            header, *rows = list(csv.reader(handle))
        evaluated += rows[:per_subject]
        pool += rows[per_subject:]
    return (
        write_csv(work / "mmlu_dev_evaluated.csv", header, evaluated),
        write_csv(work / "mmlu_dev_demonstrations.csv", header, pool) if pool else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work", default=None, help="folder for the imported checkpoint and the reports (default: a temporary one)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's choice)")
    parser.add_argument(
        "--arc-limit", type=int, default=None, help="first N questions of each ARC split (default: all)"
    )
    parser.add_argument(
        "--mmlu-per-subject",
        type=int,
        default=5,
        choices=range(1, 6),
        help="MMLU questions per subject (default: all 5)",
    )
    arguments = parser.parse_args()
    require(MODEL), require(ARC), require(MMLU)
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    work = Path(arguments.work or tempfile.mkdtemp(prefix="smollm2_eval_"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    checkpoint = work / "smollm2"
    if not (checkpoint / "model.safetensors").is_file():
        assert llmkit(["import", str(MODEL), "--out", str(checkpoint)]) == 0
    mmlu, demonstrations = mmlu_split(work, arguments.mmlu_per_subject)
    arc_limit = f":limit={arguments.arc_limit}" if arguments.arc_limit else ""
    fewshot = f":fewshot_file={demonstrations}" if demonstrations else ""
    tasks = [
        f"choice:{ARC / 'ARC-Easy' / 'ARC-Easy-Dev.jsonl'}:name=arc_easy{arc_limit}",
        f"choice:{ARC / 'ARC-Challenge' / 'ARC-Challenge-Dev.jsonl'}:name=arc_challenge{arc_limit}",
        f"choice:{mmlu}:name=mmlu_5shot:num_fewshot=5{fewshot}",
        f"choice:{mmlu}:name=mmlu_0shot",
    ]
    for task in tasks:  # one run per task, so each score is printed as soon as it is known
        name = task.split("name=")[1].split(":")[0]
        task_started = time.perf_counter()
        assert (
            llmkit(
                [
                    "eval",
                    "--engine.checkpoint",
                    str(checkpoint),
                    "--out",
                    str(work / "eval" / name),
                    "--tasks",
                    task,
                    "--engine.device",
                    arguments.device,
                    "--no-decontamination",
                    "--batch-size",
                    "8",
                ]
            )
            == 0
        )
        metrics = json.loads((work / "eval" / name / "eval.json").read_text())["tasks"][name]["metrics"]
        context = {
            "task": name,
            "split": "dev",
            "examples": metrics["count"],
            "num_fewshot": metrics["num_fewshot"],
            "model": "SmolLM2-135M-Instruct Q4_1 (dequantized, float32)",
            "seconds": round(time.perf_counter() - task_started, 1),
        }
        emit("acc", round(metrics["accuracy"], 4), "fraction", stderr=round(metrics["stderr"], 4), **context)
        emit(
            "acc_norm",
            round(metrics["accuracy_norm"], 4),
            "fraction",
            stderr=round(metrics["stderr_norm"], 4),
            **context,
        )
    emit(
        "wall_time",
        round(time.perf_counter() - started, 1),
        "s",
        device=arguments.device,
        threads=torch.get_num_threads(),
        work=str(work),
    )


if __name__ == "__main__":
    main()
