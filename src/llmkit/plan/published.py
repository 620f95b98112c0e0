"""Three published large training runs, to check the layout planner against.

Each gives the cluster, the global batch and token budget, the layout where the authors published it,
and the time or throughput they reported. The planner scores the published layout with the same
``compute_efficiency`` for all three (no per-run fit); docs/estimate.md quotes the sources.
"""

from __future__ import annotations

from llmkit.plan.parallel import PlanConfig, plan

HOURS_PER_DAY = 24

PUBLISHED_RUNS: dict[str, dict] = {
    # Narayanan et al. 2021 (SC21), §5.1: GPT-3 175B on 1024 A100s (Selene: 80 GB, NVSwitch, 8 HDR adapters
    # a node) at batch 1536 sustains 140 TFLOP/s a GPU with recomputation: 34 days for 300B tokens. The
    # layout, 8-way tensor x 16-way pipeline with micro-batch 1, is Megatron-LM's
    # examples/gpt3/train_gpt3_175b_distributed.sh; 1024 / 128 leaves 8-way data parallelism. 2021
    # Megatron-LM had neither sequence parallelism nor fused attention, and replicated the optimizer.
    "megatron-gpt3-175b": {
        "plan": dict(
            preset="gpt3-175b",
            tokens=300e9,
            gpus=1024,
            gpu="a100-80gb",
            global_batch=1536,
            flash_attention=False,
            sequence_parallel=False,
        ),
        "layout": dict(tp=8, pp=16, zero=0, micro_batch=1, recompute="full"),
        "days": 34.0,
        "hardware_flops_per_gpu": 140e12,
    },
    # BLOOM (BigScience 2022, §3.4 and the model card): 384 A100 80 GB on Jean Zay, 48 nodes of 8 GPUs with
    # 4 NVLink links between GPUs and 4 x 100 Gb/s Omni-Path a node (6.25 GB/s a GPU); tensor 4 x pipeline
    # 12 x data 8 with ZeRO stage 1, micro-batch 2, global batch 2048 sequences of 2048 tokens, 366B tokens;
    # about 150 TFLOP/s a GPU; 1,082,990 GPU hours, i.e. 117.5 days on 384 GPUs (about 3.5 months).
    "bloom-176b": {
        "plan": dict(
            preset="bloom-176b",
            tokens=366e9,
            gpus=384,
            gpu="a100-80gb",
            global_batch=2048,
            intra_node_bandwidth=100e9,
            inter_node_bandwidth=4 * 100e9 / 8 / 8,
            flash_attention=False,
            sequence_parallel=False,
        ),
        "layout": dict(tp=4, pp=12, zero=1, micro_batch=2, recompute="full"),
        "days": 1_082_990 / 384 / HOURS_PER_DAY,
        "hardware_flops_per_gpu": 150e12,
    },
    # LLaMA (Touvron et al. 2023, §2.4): the 65B model processes about 380 tokens/s a GPU on 2048 A100 80 GB,
    # so 1.4T tokens take about 21 days; batch 4M tokens (2048 x 2048), model and sequence parallelism,
    # memory-efficient attention (xformers), selective recomputation. The layout is not published: the
    # planner's own best is compared.
    "llama-65b": {
        "plan": dict(preset="llama-65b", tokens=1.4e12, gpus=2048, gpu="a100-80gb", global_batch=2048),
        "layout": None,
        "days": 21.0,
        "tokens_per_second_per_gpu": 380.0,
    },
}


def check_published(name: str, compute_efficiency: float | None = None) -> dict:
    """The planner on a published run: whether the published layout fits (the planner raises if it does
    not), the predicted time and throughput beside the published ones, and their relative errors."""
    run = PUBLISHED_RUNS[name]
    settings = dict(run["plan"], **(run["layout"] or {}), top=1)
    if compute_efficiency is not None:
        settings["compute_efficiency"] = compute_efficiency
    best = plan(PlanConfig(**settings))["layouts"][0]
    result = {
        "run": name,
        "layout": best["layout"],
        "published_layout": run["layout"] is not None,
        "fits": best["fits"],
        "memory_per_gpu_bytes": best["memory"]["per_gpu_bytes"],
        "predicted_days": best["time"]["days"],
        "published_days": run["days"],
        "relative_error_days": best["time"]["days"] / run["days"] - 1,
    }
    for key in ("hardware_flops_per_gpu", "tokens_per_second_per_gpu"):
        if key in run:
            result[f"predicted_{key}"] = best["time"][key]
            result[f"published_{key}"] = run[key]
            result[f"relative_error_{key}"] = best["time"][key] / run[key] - 1
    return result
