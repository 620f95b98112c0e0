"""Log-likelihood scoring throughput on a real model: SmolLM2-135M-Instruct (the shared Q4_1 GGUF, imported) on
ARC-Easy dev questions, through ``llmkit eval``, through lm-evaluation-harness with llmkit's model class, and
through lm-eval's own ``hf`` model on the Hugging Face folder ``llmkit export`` writes, at several batch sizes.

Every system scores the same questions (each choice after ``Question: ...\\nAnswer:``, lm-eval's ``arc_easy``
prompt) in float32 on the CPU, in one process, round-robin over ``--rounds`` rounds; the median time counts.
lm-eval's models are built once before the rounds (their loading is not timed); ``llmkit eval`` is timed as
the command runs, loading its checkpoint included. Output, JSON lines:

- ``scoring_throughput`` (questions/s) with ``system`` (``llmkit_eval``, ``lm_eval_llmkit``, ``lm_eval_hf``)
  and ``batch_size``, plus the accuracy and length-normalised accuracy each got;
- ``speedup_vs_lm_eval_hf`` for llmkit's two routes against the ``hf`` model at its best batch size
  (goal >= 1.5);
- ``same_accuracy``: whether every system gave identical acc and acc_norm.

Usage: python benchmarks/real_model_scoring.py [--questions N] [--rounds R] [--hf-batch-sizes 1,8,32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED_DATA, SMOLLM2, emit, require  # noqa: E402

MODEL = SMOLLM2
ARC_EASY = SHARED_DATA / "arc" / "ARC-Easy" / "ARC-Easy-Dev.jsonl"
TASK = """task: arc_sample
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_task(folder: Path, questions: int) -> Path:
    """The first ``questions`` ARC-Easy dev questions as a local lm-eval task (and the file llmkit eval reads)."""
    from llmkit.eval.choice_tasks import load_choice_task

    examples = load_choice_task(ARC_EASY)[:questions]
    data = folder / "arc_sample.jsonl"
    records = [
        {"question": example.context, "choices": example.choices, "answer": example.answer} for example in examples
    ]
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    (folder / "arc_sample.yaml").write_text(TASK.format(data=data, cache=folder / "cache"))
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=100, help="ARC-Easy dev questions scored (4 choices each)")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds; the median time counts")
    parser.add_argument("--hf-batch-sizes", default="1,8,32", help="batch sizes of lm-eval's hf model")
    parser.add_argument("--llmkit-batch-size", type=int, default=32, help="batch size of lm-eval's llmkit model")
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's choice)")
    arguments = parser.parse_args()
    require(MODEL)
    require(ARC_EASY)
    if arguments.threads:
        torch.set_num_threads(arguments.threads)

    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    import llmkit.eval.harness  # noqa: F401  (registers the "llmkit" model class)
    from llmkit.eval.run import EvalConfig, run_eval
    from llmkit.infer.engine import EngineConfig
    from llmkit.interop import ExportConfig, ImportConfig, export_checkpoint, import_checkpoint

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        checkpoint, hf = work / "smollm2", work / "hf"
        import_checkpoint(ImportConfig(source=str(MODEL), out=str(checkpoint)))
        export_checkpoint(ExportConfig(checkpoint=str(checkpoint), out=str(hf), format="hf"))
        (work / "tasks").mkdir()
        data = write_task(work / "tasks", arguments.questions)
        task_manager = TaskManager(include_path=str(work / "tasks"), include_defaults=False)

        def harness(model) -> tuple[float, float]:
            results = lm_eval.simple_evaluate(
                model=model, tasks=["arc_sample"], task_manager=task_manager, bootstrap_iters=0
            )["results"]["arc_sample"]
            return results["acc,none"], results["acc_norm,none"]

        def llmkit_eval(round_index: int) -> tuple[float, float]:
            out = work / f"eval_{round_index}"
            run_eval(
                EvalConfig(
                    engine=EngineConfig(checkpoint=str(checkpoint)),
                    out=str(out),
                    decontamination=False,
                    tasks=[f"choice:{data}:name=arc"],
                )
            )
            metrics = json.loads((out / "eval.json").read_text())["tasks"]["arc"]["metrics"]
            return metrics["accuracy"], metrics["accuracy_norm"]

        systems = {("llmkit_eval", 0): llmkit_eval}
        llmkit_model = get_model("llmkit")(checkpoint=str(checkpoint), batch_size=arguments.llmkit_batch_size)
        systems[("lm_eval_llmkit", arguments.llmkit_batch_size)] = lambda _: harness(llmkit_model)
        for batch_size in (int(size) for size in arguments.hf_batch_sizes.split(",")):
            model = get_model("hf")(pretrained=str(hf), dtype="float32", device="cpu", batch_size=batch_size)
            systems[("lm_eval_hf", batch_size)] = lambda _, model=model: harness(model)

        times = {key: [] for key in systems}
        scores = {}
        for round_index in range(arguments.rounds):
            for key, run in systems.items():
                started = time.perf_counter()
                scores[key] = run(round_index)
                times[key].append(time.perf_counter() - started)

        context = dict(
            questions=arguments.questions, rounds=arguments.rounds, threads=torch.get_num_threads(), dtype="float32"
        )
        throughput = {key: arguments.questions / statistics.median(seconds) for key, seconds in times.items()}
        for (system, batch_size), value in throughput.items():
            accuracy, accuracy_norm = scores[(system, batch_size)]
            emit(
                "scoring_throughput",
                round(value, 3),
                "questions/s",
                system=system,
                batch_size=batch_size or "llmkit's",
                acc=accuracy,
                acc_norm=accuracy_norm,
                seconds=[round(seconds, 2) for seconds in times[(system, batch_size)]],
                **context,
            )
        best_hf = max((key for key in throughput if key[0] == "lm_eval_hf"), key=throughput.get)
        for key in throughput:
            if key[0] != "lm_eval_hf":
                emit(
                    "speedup_vs_lm_eval_hf",
                    round(throughput[key] / throughput[best_hf], 3),
                    "x",
                    system=key[0],
                    hf_batch_size=best_hf[1],
                    goal=1.5,
                    **context,
                )
        emit(
            "same_accuracy", len(set(scores.values())) == 1, "", scores={f"{k[0]}@{k[1]}": v for k, v in scores.items()}
        )


if __name__ == "__main__":
    main()
