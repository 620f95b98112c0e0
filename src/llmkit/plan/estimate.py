"""Planning estimates: parameters, memory, FLOPs and wall time of a model preset.

Every figure is a closed-form rule of thumb, named after its source:

* parameters, GPT layout: ``l(12h² + 13h) + Vh`` (Kaplan et al. 2020 §2.1 count 12·l·h²; the 13h
  are the biases and the two LayerNorms of each block), beside the exact count of the
  :class:`~llmkit.model.Transformer` built on the meta device (no memory is allocated);
* training compute ``C = 6·N·D`` (Kaplan et al. 2020; GPT-3 paper, Brown et al. 2020, appendix D),
  one generated token ``2·N``;
* wall time ``C / (devices · peak · MFU)`` with model-FLOPs utilisation as defined in PaLM
  (Chowdhery et al. 2022); with full recomputation the hardware does ``8·N·D``
  (Narayanan et al. 2021, "8TP/(nX)"), which is how the classic "34 days for GPT-3" is worked;
* training memory ``20 bytes/param`` for mixed-precision AdamW: 16-bit weights and gradients (2 + 2),
  an fp32 gradient accumulator (4), fp32 master weights and Adam m and v (4 + 4 + 4); ZeRO
  (Rajbhandari et al. 2020) counts the same without the accumulator, 16 bytes;
* activations per layer ``s·b·h·(34 + 5·a·s/h)`` bytes, ``34·s·b·h`` with selective recomputation of the
  attention core, ``2·s·b·h`` with full recomputation (Korthikanti et al. 2022, no tensor or sequence
  parallelism);
* inference ``bytes_per_param·N`` plus the KV cache ``2 · layers · batch · seq · n_kv_head · head_dim``
  16-bit values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from llmkit.config import check
from llmkit.model.config import PRESETS, RECOMPUTE, RECOMPUTE_BOOLEANS, ModelConfig, Recompute
from llmkit.model.config import preset as load_preset
from llmkit.model.transformer import Transformer

GIB = 2**30

# Dense (no 2:4 sparsity) 16-bit tensor-core peak FLOP/s from the vendors' datasheets (bf16 where the
# device has it, fp16 otherwise) and nominal memory. The "cpu" line is an order of magnitude for a
# many-core server with AVX-512/AMX, not a measurement.
DEVICES: dict[str, dict] = {
    "a100-40gb": {"peak_flops": 312e12, "memory_gib": 40, "note": "NVIDIA A100 SXM 40 GB"},
    "a100-80gb": {"peak_flops": 312e12, "memory_gib": 80, "note": "NVIDIA A100 SXM 80 GB"},
    "h100-sxm": {"peak_flops": 989e12, "memory_gib": 80, "note": "NVIDIA H100 SXM5 80 GB"},
    "h100-pcie": {"peak_flops": 756e12, "memory_gib": 80, "note": "NVIDIA H100 PCIe 80 GB"},
    "h200": {"peak_flops": 989e12, "memory_gib": 141, "note": "NVIDIA H200 SXM 141 GB"},
    "v100": {"peak_flops": 125e12, "memory_gib": 32, "note": "NVIDIA V100 SXM2 32 GB (fp16)"},
    "rtx-4090": {"peak_flops": 165e12, "memory_gib": 24, "note": "NVIDIA GeForce RTX 4090 24 GB"},
    "l4": {"peak_flops": 121e12, "memory_gib": 24, "note": "NVIDIA L4 24 GB"},
    "t4": {"peak_flops": 65e12, "memory_gib": 16, "note": "NVIDIA T4 16 GB (fp16)"},
    "cpu": {"peak_flops": 1e12, "memory_gib": 64, "note": "many-core CPU server, order of magnitude"},
}

# ZeRO (Rajbhandari et al. 2020) counts 2 + 2 + 12 = 16 bytes: 16-bit weights and gradients, fp32 master
# weights, Adam m and v. Accumulating gradients in fp32 across micro-batches (Megatron-LM, DeepSpeed's
# bf16 optimizer) adds a 4-byte buffer: 20 bytes, the figure used here.
TRAINING_BYTES_BREAKDOWN = {
    "16-bit weights": 2,
    "16-bit gradients": 2,
    "fp32 gradient accumulator": 4,
    "fp32 master weights": 4,
    "fp32 Adam m": 4,
    "fp32 Adam v": 4,
}
TRAINING_BYTES_PER_PARAM = sum(TRAINING_BYTES_BREAKDOWN.values())  # 20
KV_BYTES = 2  # one 16-bit key or value element
RECOMPUTE_WORDS = {
    "none": "no recomputation",
    "selective": "attention core recomputed",
    "full": "full recomputation",
}
SECONDS_PER_DAY = 86400


@dataclass
class EstimateConfig:
    preset: str = field(default="gpt2", metadata={"help": "model preset to estimate"})
    tokens: float = field(default=300e9, metadata={"help": "training tokens D"})
    gpus: int = field(default=1, metadata={"help": "number of devices"})
    gpu: str = field(default="a100-40gb", metadata={"help": f"device kind: {', '.join(DEVICES)}"})
    mfu: float = field(default=0.4, metadata={"help": "model FLOPs utilisation, 0 < mfu <= 1"})
    batch_size: int = field(
        default=1, metadata={"help": "sequences per device for activations; sequences in the KV cache"}
    )
    sequence_length: int | None = field(
        default=None, metadata={"help": "sequence length for activations and KV cache (default the preset's context)"}
    )
    activation_checkpointing: Recompute = field(
        default="none",
        metadata={
            "help": "activation recomputation: none, selective (the attention core) or full (keep only each "
            "block's input)",
            "aliases": RECOMPUTE_BOOLEANS,
        },
    )
    inference_bytes_per_param: float = field(
        default=2.0, metadata={"help": "bytes per weight at inference (2 = 16-bit, 1 = int8, 0.5 = int4)"}
    )

    def __post_init__(self) -> None:
        check(self.preset in PRESETS, "preset", self.preset, f"unknown preset; choose one of {', '.join(PRESETS)}")
        check(self.gpu in DEVICES, "gpu", self.gpu, f"unknown device; choose one of {', '.join(DEVICES)}")
        check(self.tokens > 0, "tokens", self.tokens, "must be positive")
        check(self.gpus >= 1, "gpus", self.gpus, "must be at least 1")
        check(0 < self.mfu <= 1, "mfu", self.mfu, "must be in (0, 1]")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1")
        check(
            self.sequence_length is None or self.sequence_length >= 1,
            "sequence_length",
            self.sequence_length,
            "must be at least 1",
        )
        check(
            self.activation_checkpointing in RECOMPUTE,
            "activation_checkpointing",
            self.activation_checkpointing,
            f"must be one of {', '.join(RECOMPUTE)}",
        )
        check(
            self.inference_bytes_per_param > 0,
            "inference_bytes_per_param",
            self.inference_bytes_per_param,
            "must be positive",
        )


def is_gpt_layout(model: ModelConfig) -> bool:
    """True when the closed form l(12h²+13h)+Vh is exact up to position embeddings and the final norm:
    LayerNorm with biases, a 4h non-gated MLP, full multi-head attention, tied embeddings."""
    return (
        model.norm == "layernorm"
        and model.bias
        and model.activation != "swiglu"
        and model.ffn_hidden == 4 * model.n_embd
        and model.n_kv_head == model.n_head
        and model.tie_embeddings
    )


def closed_form_parameters(model: ModelConfig) -> int:
    """l(12h² + 13h) + Vh: per block 4h²+4h attention, 8h²+5h MLP, 4h for two LayerNorms; tied embedding."""
    h, layers = model.n_embd, model.n_layer
    return layers * (12 * h * h + 13 * h) + model.vocab_size * h


def exact_parameters(model: ModelConfig) -> tuple[int, int]:
    """(total, without token/position embeddings) of the real model, built on the meta device."""
    with torch.device("meta"):
        network = Transformer(model)
    return network.num_parameters(), network.num_parameters(exclude_embeddings=True)


def activation_bytes_per_layer(model: ModelConfig, sequence_length: int, batch_size: int, recompute: str) -> float:
    """Korthikanti et al. 2022, eq. (1) with t = 1: s·b·h·(34 + 5·a·s/h) bytes of 16-bit activations
    (with dropout masks); selective recomputation drops the attention core's 5·a·s/h (§4.1: the scores,
    softmax, its dropout mask and output), full recomputation keeps only the block input, 2·s·b·h bytes."""
    s, b, h, a = sequence_length, batch_size, model.n_embd, model.n_head
    if recompute == "full":
        return 2.0 * s * b * h
    scores = 0.0 if recompute == "selective" else 5 * a * s / h
    return s * b * h * (34 + scores)


def kv_cache_bytes(model: ModelConfig, batch_size: int, sequence_length: int) -> int:
    """Keys and values (the 2) of every layer, 16-bit: 2 · layers · batch · seq · n_kv_head · head_dim · 2 bytes."""
    return 2 * model.n_layer * batch_size * sequence_length * model.n_kv_head * model.head_dim * KV_BYTES


def estimate(config: EstimateConfig, model: ModelConfig | None = None) -> dict:
    """Every estimate for ``config``; ``model`` replaces the preset's architecture when given.

    The result is a plain, JSON-serialisable dict (sizes in bytes, time in seconds and days);
    :func:`format_estimate` renders it as a table.
    """
    model = model if model is not None else load_preset(config.preset)
    sequence_length = config.sequence_length or model.context_length
    check(
        sequence_length <= model.context_length,
        "sequence_length",
        sequence_length,
        f"exceeds the model's context_length={model.context_length}",
    )
    device = DEVICES[config.gpu]
    device_memory = device["memory_gib"] * GIB

    total, non_embedding = exact_parameters(model)
    gpt_layout = is_gpt_layout(model)
    closed = closed_form_parameters(model)
    position = model.context_length * model.n_embd if model.position == "learned" else 0
    final_norm = 0
    if model.norm_placement in ("pre", "sandwich"):
        final_norm = model.n_embd * (2 if model.norm == "layernorm" and model.bias else 1)
    if gpt_layout:
        closed_label = "GPT layout l(12h²+13h)+Vh (excludes position embeddings and final norm)"
    else:
        closed_label = "GPT-layout approximation l(12h²+13h)+Vh (this model is not GPT layout)"

    flops = 6.0 * total * config.tokens
    cluster_flops = config.gpus * device["peak_flops"] * config.mfu
    seconds = flops / cluster_flops
    time = {"seconds": seconds, "days": seconds / SECONDS_PER_DAY, "flops_formula": "6ND"}
    # Narayanan et al. 2021 count 8ND: activation recomputation repeats the forward pass. Their
    # "34 days for GPT-3 on 1024 A100s" is this line; shown always so the classic figure can be read off.
    hardware_flops = 8.0 * total * config.tokens
    recompute_seconds = hardware_flops / cluster_flops
    recompute_time = {
        "hardware_flops": hardware_flops,
        "seconds": recompute_seconds,
        "days": recompute_seconds / SECONDS_PER_DAY,
        "flops_formula": "8ND",
    }

    per_layer = activation_bytes_per_layer(model, sequence_length, config.batch_size, config.activation_checkpointing)
    activations = per_layer * model.n_layer
    states = TRAINING_BYTES_PER_PARAM * total
    replicated = states + activations
    sharded = states / config.gpus + activations

    weights = config.inference_bytes_per_param * total
    kv = kv_cache_bytes(model, config.batch_size, sequence_length)

    return {
        "preset": config.preset,
        "model": {
            "n_layer": model.n_layer,
            "n_embd": model.n_embd,
            "n_head": model.n_head,
            "n_kv_head": model.n_kv_head,
            "head_dim": model.head_dim,
            "ffn_hidden": model.ffn_hidden,
            "vocab_size": model.vocab_size,
            "context_length": model.context_length,
            "norm": model.norm,
            "position": model.position,
            "activation": model.activation,
            "tie_embeddings": model.tie_embeddings,
            "gpt_layout": gpt_layout,
        },
        "parameters": {
            "exact": total,
            "non_embedding": non_embedding,
            "closed_form": closed,
            "closed_form_label": closed_label,
            "position_embeddings": position,
            "final_norm": final_norm,
        },
        "device": {
            "name": config.gpu,
            "count": config.gpus,
            "peak_flops": device["peak_flops"],
            "memory_bytes": device_memory,
            "note": device["note"],
        },
        "compute": {
            "tokens": config.tokens,
            "training_flops": flops,
            "training_flops_formula": "6ND (N = exact parameters)",
            "inference_flops_per_token": 2.0 * total,
            "mfu": config.mfu,
            "cluster_flops_per_second": cluster_flops,
            "time": time,
            "time_with_recompute": recompute_time,
        },
        "training_memory": {
            "bytes_per_param": TRAINING_BYTES_PER_PARAM,
            "bytes_per_param_breakdown": dict(TRAINING_BYTES_BREAKDOWN),
            "states_bytes": states,
            "sequence_length": sequence_length,
            "batch_size": config.batch_size,
            "activation_checkpointing": config.activation_checkpointing,
            "activation_bytes_per_layer": per_layer,
            "activation_bytes": activations,
            "per_gpu_replicated_bytes": replicated,
            "per_gpu_zero3_bytes": sharded,
            "fits_replicated": replicated <= device_memory,
            "fits_zero3": sharded <= device_memory,
        },
        "inference_memory": {
            "bytes_per_param": config.inference_bytes_per_param,
            "weights_bytes": weights,
            "kv_cache_bytes": kv,
            "kv_cache_per_token_bytes": kv // (config.batch_size * sequence_length),
            "total_bytes": weights + kv,
            "batch_size": config.batch_size,
            "sequence_length": sequence_length,
            "devices_needed": max(1, math.ceil((weights + kv) / device_memory)),
        },
    }


# ---------------------------------------------------------------------------------------- formatting


def format_count(value: float) -> str:
    """174_579_068_928 -> '174.6 B'."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f}"


def format_bytes(value: float) -> str:
    """Binary units: '3.18 TiB', '1.42 GiB'."""
    for unit in ("PiB", "TiB", "GiB", "MiB", "KiB"):
        scale = 2 ** (10 * ("KMGTP".index(unit[0]) + 1))
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def format_duration(seconds: float) -> str:
    if seconds >= SECONDS_PER_DAY:
        return f"{seconds / SECONDS_PER_DAY:,.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    if seconds >= 60:
        return f"{seconds / 60:.1f} minutes"
    return f"{seconds:.1f} s"


def format_rate(flops_per_second: float) -> str:
    """1.476e17 -> '147.6 PFLOP/s'."""
    for scale, unit in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if flops_per_second >= scale:
            return f"{flops_per_second / scale:.4g} {unit}FLOP/s"
    return f"{flops_per_second:,.0f} FLOP/s"


def _flops(value: float) -> str:
    return f"{value:.2e}".replace("e+", "e")


def format_estimate(result: dict) -> str:
    """A human-readable, aligned table of :func:`estimate`'s result."""
    model, params, device = result["model"], result["parameters"], result["device"]
    compute, train, infer = result["compute"], result["training_memory"], result["inference_memory"]
    kv_heads = f"{model['n_kv_head']} kv" if model["n_kv_head"] != model["n_head"] else "MHA"
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    sections.append(
        (
            f"Model: {result['preset']}",
            [
                (
                    "shape",
                    f"{model['n_layer']} layers x {model['n_embd']} wide, {model['n_head']} heads ({kv_heads}), "
                    f"ffn {model['ffn_hidden']}, vocab {model['vocab_size']:,}, context {model['context_length']:,}",
                ),
                (
                    "layout",
                    f"{model['norm']}, {model['position']} positions, {model['activation']}, "
                    f"{'tied' if model['tie_embeddings'] else 'untied'} embeddings"
                    + ("" if model["gpt_layout"] else " (not GPT layout)"),
                ),
            ],
        )
    )
    sections.append(
        (
            "Parameters",
            [
                ("exact (meta-device model)", f"{format_count(params['exact'])}  ({params['exact']:,})"),
                ("non-embedding", f"{format_count(params['non_embedding'])}  ({params['non_embedding']:,})"),
                ("closed form", f"{format_count(params['closed_form'])}  ({params['closed_form']:,})"),
                ("", params["closed_form_label"]),
            ],
        )
    )
    time = compute["time"]
    rows = [
        ("training tokens D", f"{format_count(compute['tokens'])}  ({compute['tokens']:.3g})"),
        ("training FLOPs 6ND", f"{_flops(compute['training_flops'])} FLOPs"),
        (
            "device",
            f"{device['count']:,} x {device['name']} ({device['note']}), {format_rate(device['peak_flops'])} peak",
        ),
        (
            "utilisation (MFU)",
            f"{compute['mfu'] * 100:.1f} %  -> {format_rate(compute['cluster_flops_per_second'])} sustained",
        ),
        ("wall time", f"{format_duration(time['seconds'])}  ({time['seconds']:,.0f} s)"),
    ]
    recompute = compute["time_with_recompute"]
    if recompute:
        rows.append(
            (
                "with recompute 8ND",
                f"{format_duration(recompute['seconds'])}  "
                f"(if the utilisation counts recomputed FLOPs, {_flops(recompute['hardware_flops'])} FLOPs)",
            )
        )
    rows.append(("inference FLOPs/token 2N", f"{_flops(compute['inference_flops_per_token'])} FLOPs"))
    sections.append(("Compute", rows))
    breakdown = "+".join(str(v) for v in train["bytes_per_param_breakdown"].values())
    fits = {True: "fits", False: "does not fit"}
    per_device = format_bytes(device["memory_bytes"])
    sections.append(
        (
            "Training memory",
            [
                (
                    "weights+grads+AdamW",
                    f"{format_bytes(train['states_bytes'])}  ({train['bytes_per_param']} bytes/param = {breakdown})",
                ),
                ("", "16-bit weights, grads; fp32 grad accumulator, master weights, Adam m, v"),
                (
                    "activations",
                    f"{format_bytes(train['activation_bytes'])}  (batch {train['batch_size']} x "
                    f"{train['sequence_length']:,} tokens per device, "
                    + f"{RECOMPUTE_WORDS[train['activation_checkpointing']]})",
                ),
                (
                    "per device, replicated",
                    f"{format_bytes(train['per_gpu_replicated_bytes'])}  ({fits[train['fits_replicated']]} in "
                    f"{per_device})",
                ),
                (
                    "per device, ZeRO-3",
                    f"{format_bytes(train['per_gpu_zero3_bytes'])}  ({fits[train['fits_zero3']]} in {per_device}; "
                    f"states / {device['count']:,} + activations)",
                ),
            ],
        )
    )
    sections.append(
        (
            "Inference memory",
            [
                ("weights", f"{format_bytes(infer['weights_bytes'])}  ({infer['bytes_per_param']:g} bytes/param)"),
                (
                    "KV cache",
                    f"{format_bytes(infer['kv_cache_bytes'])}  (batch {infer['batch_size']} x "
                    f"{infer['sequence_length']:,} tokens, {format_bytes(infer['kv_cache_per_token_bytes'])}/token)",
                ),
                (
                    "total",
                    f"{format_bytes(infer['total_bytes'])}  ({infer['devices_needed']} x {device['name']} by memory)",
                ),
            ],
        )
    )
    width = max(len(label) for _, rows in sections for label, _ in rows)
    lines: list[str] = []
    for title, rows in sections:
        if lines:
            lines.append("")
        lines.append(title)
        lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines)
