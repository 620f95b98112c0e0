"""The layout planner (`llmkit plan`) beside three published training runs, as JSON lines.

For Megatron-LM's GPT-3 175B (Narayanan et al. 2021), BLOOM-176B (BigScience 2022) and LLaMA-65B (Touvron
et al. 2023): whether the published layout fits, the predicted training days and per-GPU throughput
beside the published ones, and ``relative_error`` (predicted / published - 1; the goal is |error| <= 0.25).
One ``compute_efficiency`` for all three runs (``--compute-efficiency``, default the planner's). No timing
is taken here: the figures are closed forms, identical on every machine.

    python benchmarks/parallel_layouts.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

from llmkit.plan.parallel import PlanConfig  # noqa: E402
from llmkit.plan.published import PUBLISHED_RUNS, check_published  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compute-efficiency", type=float, default=PlanConfig.compute_efficiency)
    arguments = parser.parse_args()
    for name in PUBLISHED_RUNS:
        result = check_published(name, arguments.compute_efficiency)
        context = dict(
            run=name,
            layout=result["layout"],
            published_layout=result["published_layout"],
            fits=result["fits"],
            memory_per_gpu_gib=round(result["memory_per_gpu_bytes"] / 2**30, 1),
            compute_efficiency=arguments.compute_efficiency,
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


if __name__ == "__main__":
    main()
