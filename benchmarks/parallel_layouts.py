"""Parallel layouts as JSON lines: the planner beside published runs, and CPU layouts measured.

1. ``llmkit plan`` on Megatron-LM's GPT-3 175B (Narayanan et al. 2021), BLOOM-176B (BigScience 2022) and
   LLaMA-65B (Touvron et al. 2023): whether the published layout fits, the predicted training days and
   per-GPU throughput beside the published ones, and ``relative_error`` (predicted / published - 1; the
   goal is |error| <= 0.25). One ``compute_efficiency`` for all three (``--compute-efficiency``). Closed
   forms: the same on every machine.
2. (``--cpu``) every CPU layout of 1, 2 and 4 gloo processes (one thread each) training the same small
   model on the same global batch with the Trainer: median tokens/s over the steps after a warmup and
   over ``--repeats`` launches taken round-robin, relative to one process, and the share of each
   process's wall time spent in communication ops on its main thread (enqueueing collectives and
   waiting for them) as torch.profiler counts it, from one more profiled launch. A machine busy with
   other work voids these timings; rerun on an idle one.

    python benchmarks/parallel_layouts.py [--cpu] [--repeats 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

from llmkit.plan.parallel import PlanConfig  # noqa: E402
from llmkit.plan.published import PUBLISHED_RUNS, check_published  # noqa: E402

# (name, processes, tp, pp, vocab_parallel): data parallel is what is left. 16 rows of 64 tokens a step,
# micro-batches of 2.
CPU_LAYOUTS = [
    ("1 process", 1, 1, 1, False),
    ("dp 2 (DDP)", 2, 1, 1, False),
    ("tp 2", 2, 2, 1, False),
    ("tp 2 + vocab parallel", 2, 2, 1, True),
    ("pp 2 (1F1B)", 2, 1, 2, False),
    ("tp 2 x dp 2", 4, 2, 1, False),
    ("pp 2 x dp 2", 4, 1, 2, False),
    ("tp 2 x pp 2", 4, 2, 2, False),
]
GLOBAL_ROWS, MICRO_ROWS, CONTEXT, STEPS, WARMUP = 16, 2, 64, 10, 3
COMMUNICATION = ("_c10d_functional::", "c10d::", "FSDP::")  # ops on the main thread; gloo's own thread excluded


def planner(compute_efficiency: float) -> None:
    for name in PUBLISHED_RUNS:
        result = check_published(name, compute_efficiency)
        context = dict(
            run=name,
            layout=result["layout"],
            published_layout=result["published_layout"],
            fits=result["fits"],
            memory_per_gpu_gib=round(result["memory_per_gpu_bytes"] / 2**30, 1),
            compute_efficiency=compute_efficiency,
        )
        emit(
            "training_days",
            round(result["predicted_days"], 2),
            "days",
            published=round(result["published_days"], 2),
            relative_error=round(result["relative_error_days"], 4),
            **context,
        )
        for key, unit in (("hardware_flops_per_gpu", "TFLOP/s"), ("tokens_per_second_per_gpu", "tokens/s")):
            if f"published_{key}" in result:
                scale = 1e12 if unit == "TFLOP/s" else 1
                emit(
                    key,
                    round(result[f"predicted_{key}"] / scale, 1),
                    unit,
                    published=round(result[f"published_{key}"] / scale, 1),
                    relative_error=round(result[f"relative_error_{key}"], 4),
                    **context,
                )


def worker(out: str, tp: int, pp: int, vocab_parallel: bool, profiled: bool) -> None:
    """One process of a layout (under torchrun): train the small model, write tokens/s (metrics.csv) and,
    profiled, this rank's communication share to out/comm_<rank>.json."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from llmkit.model import ModelConfig, Transformer
    from llmkit.train.config import TrainConfig
    from llmkit.train.distributed import shutdown
    from llmkit.train.trainer import Trainer, TrainingHooks

    class Rows:
        def get_batch(self, index: int) -> dict:
            generator = torch.Generator().manual_seed(index)
            rows = torch.randint(0, 256, (MICRO_ROWS, CONTEXT + 1), generator=generator)
            return {"input_ids": rows[:, :-1], "targets": rows[:, 1:]}

    class Profile(TrainingHooks):
        """Advance the profiler's schedule after every step; time the profiled steps on the wall clock."""

        def after_step(self, trainer) -> None:
            profiler.step()
            if trainer.step == WARMUP:
                self.start = time.perf_counter()
            if trainer.step > WARMUP:
                self.wall = time.perf_counter() - self.start

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            vocab_size=256,
            context_length=CONTEXT,
            n_layer=4,
            n_head=8,
            n_kv_head=4,
            n_embd=128,
            norm="rmsnorm",
            position="rope",
            activation="swiglu",
            ffn_multiple_of=64,
            bias=False,
        )
    )
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    config = TrainConfig(
        out=out,
        batch_size=MICRO_ROWS,
        grad_accum=GLOBAL_ROWS // (MICRO_ROWS * processes // (tp * pp)),
        max_steps=STEPS,
        warmup_steps=1,
        eval_interval=0,
        log_interval=1,
        checkpoint_interval=10_000,
        dtype="float32",
        progress=False,
        device="cpu",
        memory_check=False,
        tp=tp,
        pp=pp,
        vocab_parallel=vocab_parallel,
    )
    hooks = Profile()
    schedule = torch.profiler.schedule(wait=WARMUP, warmup=0, active=STEPS - WARMUP, repeat=1)
    with profile(activities=[ProfilerActivity.CPU], schedule=schedule, record_shapes=False) as profiler:
        if not profiled:
            profiler.stop()
        Trainer(model, Rows(), config, hooks=hooks).run()
    if profiled:
        events = profiler.key_averages()
        communication = sum(event.self_cpu_time_total for event in events if event.key.startswith(COMMUNICATION))
        share = communication / 1e6 / hooks.wall
        Path(out, f"comm_{int(os.environ.get('RANK', '0'))}.json").write_text(json.dumps({"share": share}))
    shutdown()


def launch(processes: int, tp: int, pp: int, vocab_parallel: bool, profiled: bool) -> Path:
    out = Path(tempfile.mkdtemp(prefix="layout_"))
    script = [str(Path(__file__).resolve()), "--worker", str(out), str(tp), str(pp), str(int(vocab_parallel))]
    script += [str(int(profiled))]
    command = [sys.executable, *script]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        command += script
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, env=environment, check=True, capture_output=True, text=True)
    return out


def tokens_per_second(out: Path) -> float:
    with open(out / "metrics.csv") as file:
        rates = [float(row["tokens_per_s"]) for row in csv.DictReader(file) if row["tokens_per_s"]]
    return statistics.median(rates[WARMUP:])


def cpu_layouts(repeats: int) -> None:
    rates: dict[str, list[float]] = {name: [] for name, *_ in CPU_LAYOUTS}
    for _ in range(repeats):  # round-robin, so machine noise falls on every layout alike
        for name, processes, tp, pp, vocab_parallel in CPU_LAYOUTS:
            rates[name].append(tokens_per_second(launch(processes, tp, pp, vocab_parallel, profiled=False)))
    baseline = statistics.median(rates["1 process"])
    for name, processes, tp, pp, vocab_parallel in CPU_LAYOUTS:
        out = launch(processes, tp, pp, vocab_parallel, profiled=True)
        shares = [json.loads(path.read_text())["share"] for path in out.glob("comm_*.json")]
        median = statistics.median(rates[name])
        context = dict(layout=name, processes=processes, tp=tp, pp=pp, dp=processes // (tp * pp))
        context |= dict(vocab_parallel=vocab_parallel, repeats=repeats)
        emit(
            "tokens_per_second",
            round(median, 1),
            "tokens/s",
            relative_to_one_process=round(median / baseline, 3),
            **context,
        )
        emit("communication_share", round(statistics.mean(shares), 3), "fraction of wall time", **context)


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        out, tp, pp, vocab_parallel, profiled = sys.argv[2:7]
        worker(out, int(tp), int(pp), vocab_parallel == "1", profiled == "1")
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compute-efficiency", type=float, default=PlanConfig.compute_efficiency)
    parser.add_argument("--cpu", action="store_true", help="also measure the CPU layouts (minutes)")
    parser.add_argument("--repeats", type=int, default=2, help="launches of each CPU layout, round-robin")
    arguments = parser.parse_args()
    planner(arguments.compute_efficiency)
    if arguments.cpu:
        cpu_layouts(arguments.repeats)


if __name__ == "__main__":
    main()
