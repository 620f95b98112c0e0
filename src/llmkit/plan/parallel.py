"""Parallel-layout planner: which tensor × pipeline × data parallel layout, ZeRO stage, micro-batch and
activation recomputation trains a model on N GPUs, how much memory each GPU needs and how long it takes.

Every layout is scored by closed forms, each from its paper:

* **model states per GPU** (ZeRO, Rajbhandari et al. 2020, §5 and Figure 1): with Φ parameters on a GPU
  (its pipeline stage's, divided by the tensor-parallel size t), 16-bit weights (2Φ) and gradients (2Φ)
  and K = 12 bytes of fp32 optimizer state (master weights, Adam m and v) are replicated over the d
  data-parallel ranks, or partitioned: stage 1 the optimizer state (4Φ + 12Φ/d), stage 2 also the
  gradients (2Φ + 14Φ/d), stage 3 everything (16Φ/d);
* **activations per layer** (Korthikanti et al. 2022, Table 2): ``s·b·h·(10 + 24/t + 5·a·s/(h·t))`` bytes
  with tensor parallelism, ``s·b·h·(34 + 5·a·s/h)/t`` with sequence parallelism as well; selective
  recomputation drops the ``5·a·s/h`` score term (so does flash attention, which never stores the
  scores), full recomputation keeps only the block input (``2·s·b·h``, ``/t`` with sequence parallelism)
  and rebuilds one layer at a time. The 24 and 34 are for GPT blocks; a wider or gated MLP and grouped
  keys and values change them as worked out in :func:`activation_bytes_per_layer`;
* **in-flight micro-batches**: under 1F1B the first pipeline stage holds p micro-batches' activations
  (Narayanan et al. 2021 §2.2.1), under GPipe all m of them; the last stage holds one, and the logits;
* **step time**: FLOPs per micro-batch and stage (``2·tokens·matmul weights + 4·b·s²·h`` per layer
  forward, backward twice that, full recomputation one more forward; Narayanan et al. 2021 eq. (3))
  at ``peak · compute_efficiency``; on top, per micro-batch, the tensor-parallel all-reduces (2 forward,
  2 backward, 2 more when recomputing; ring volume ``2(t−1)/t · 2·s·b·h`` bytes each, Megatron-LM,
  Shoeybi et al. 2019 §3) and the pipeline's point-to-point sends; ``(m + p − 1)`` micro-batch slots per
  step, of which ``p − 1`` are the bubble, ``(p − 1)/(m + p − 1)`` of the step (GPipe, Huang et al. 2019);
  then the data-parallel gradient all-reduce (ZeRO 0/1, once a step), reduce-scatter per micro-batch
  under ZeRO-2, and ZeRO-3's two all-gathers and one reduce-scatter per micro-batch, which overlap the
  micro-batch's compute (ring volumes as in the ZeRO paper §7).

Tensor parallelism stays inside a node when ``t ≤ gpus_per_node`` (NVLink bandwidth), data and pipeline
groups use the inter-node network once ``t·d`` or ``t`` fills a node (Megatron-LM's rank order: tensor
fastest, then data, then pipeline). The one free constant is ``compute_efficiency``, the fraction of
peak FLOP/s the kernels sustain; docs/estimate.md sets the predictions beside three published runs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from llmkit.config import check
from llmkit.errors import ConfigError
from llmkit.model.config import GATED_ACTIVATIONS, PRESETS, RECOMPUTE, ModelConfig, Recompute
from llmkit.model.config import preset as load_preset
from llmkit.model.transformer import Transformer
from llmkit.plan.estimate import DEVICES, GIB, SECONDS_PER_DAY

Schedule = Literal["1f1b", "gpipe"]

# Per-GPU link bandwidth, bytes/s in one direction: NVLink/NVSwitch (or PCIe) inside a node, the node's
# network adapters shared by its GPUs between nodes. DGX A100: NVLink 3 at 300 GB/s and eight 200 Gb/s
# HDR InfiniBand adapters (25 GB/s a GPU); DGX H100/H200: NVLink 4 at 450 GB/s, eight 400 Gb/s NDR
# adapters. PCIe cards: the slot (Gen4 x16 32 GB/s) and a 100 Gb/s network shared by 4 GPUs. These are
# datasheet figures, not measured bus bandwidths; override them with a cluster's own.
INTERCONNECTS: dict[str, dict] = {
    "a100-40gb": {"intra_node_bandwidth": 300e9, "inter_node_bandwidth": 25e9, "gpus_per_node": 8},
    "a100-80gb": {"intra_node_bandwidth": 300e9, "inter_node_bandwidth": 25e9, "gpus_per_node": 8},
    "h100-sxm": {"intra_node_bandwidth": 450e9, "inter_node_bandwidth": 50e9, "gpus_per_node": 8},
    "h100-pcie": {"intra_node_bandwidth": 64e9, "inter_node_bandwidth": 25e9, "gpus_per_node": 8},
    "h200": {"intra_node_bandwidth": 450e9, "inter_node_bandwidth": 50e9, "gpus_per_node": 8},
    "v100": {"intra_node_bandwidth": 150e9, "inter_node_bandwidth": 6.25e9, "gpus_per_node": 8},
    "rtx-4090": {"intra_node_bandwidth": 32e9, "inter_node_bandwidth": 3.125e9, "gpus_per_node": 8},
    "l4": {"intra_node_bandwidth": 32e9, "inter_node_bandwidth": 3.125e9, "gpus_per_node": 8},
    "t4": {"intra_node_bandwidth": 16e9, "inter_node_bandwidth": 3.125e9, "gpus_per_node": 8},
    "cpu": {"intra_node_bandwidth": 10e9, "inter_node_bandwidth": 3.125e9, "gpus_per_node": 1},
}

WEIGHT_BYTES, GRADIENT_BYTES, OPTIMIZER_BYTES = 2, 2, 12  # ZeRO's 2 + 2 + K with K = 12 for mixed-precision Adam
ACTIVATION_BYTES = 2  # 16-bit activations and the tensors the collectives move
LOGIT_BYTES = 4  # the last stage's logits, in fp32 for the cross-entropy
MICRO_BATCHES = (1, 2, 4, 8, 16, 32)


@dataclass
class PlanConfig:
    preset: str = field(default="llama-7b", metadata={"help": f"model preset: {', '.join(PRESETS)}"})
    tokens: float = field(default=1e12, metadata={"help": "training tokens"})
    gpus: int = field(default=64, metadata={"help": "number of GPUs"})
    gpu: str = field(default="a100-80gb", metadata={"help": f"GPU kind: {', '.join(DEVICES)}"})
    peak_flops: float | None = field(default=None, metadata={"help": "16-bit peak FLOP/s per GPU (default the GPU's)"})
    memory_gib: float | None = field(default=None, metadata={"help": "memory per GPU in GiB (default the GPU's)"})
    intra_node_bandwidth: float | None = field(
        default=None, metadata={"help": "bytes/s per GPU and direction inside a node (default the GPU's)"}
    )
    inter_node_bandwidth: float | None = field(
        default=None, metadata={"help": "bytes/s per GPU and direction between nodes (default the GPU's)"}
    )
    gpus_per_node: int | None = field(default=None, metadata={"help": "GPUs in a node (default the GPU's)"})
    global_batch: int = field(default=1024, metadata={"help": "sequences per optimizer step"})
    sequence_length: int | None = field(default=None, metadata={"help": "tokens per sequence (default the context)"})
    compute_efficiency: float = field(
        default=0.5, metadata={"help": "fraction of peak FLOP/s the kernels sustain (docs/estimate.md)"}
    )
    flash_attention: bool = field(
        default=True, metadata={"help": "fused attention: no s x s score matrices are stored"}
    )
    sequence_parallel: bool = field(
        default=True, metadata={"help": "shard norms and dropout over the sequence under tensor parallelism"}
    )
    schedule: Schedule = field(default="1f1b", metadata={"help": "pipeline schedule: 1f1b or gpipe"})
    usable_memory: float = field(
        default=0.9, metadata={"help": "fraction of GPU memory a layout may fill (allocator, CUDA context)"}
    )
    tp: int | None = field(default=None, metadata={"help": "pin the tensor-parallel size"})
    pp: int | None = field(default=None, metadata={"help": "pin the pipeline-parallel size"})
    zero: int | None = field(default=None, metadata={"help": "pin the ZeRO stage (0-3)"})
    micro_batch: int | None = field(default=None, metadata={"help": "pin the micro-batch size"})
    recompute: Recompute | None = field(
        default=None, metadata={"help": "pin activation recomputation: none, selective or full"}
    )
    top: int = field(default=5, metadata={"help": "layouts to show"})

    def __post_init__(self) -> None:
        check(self.preset in PRESETS, "preset", self.preset, f"unknown preset; choose one of {', '.join(PRESETS)}")
        check(self.gpu in DEVICES, "gpu", self.gpu, f"unknown device; choose one of {', '.join(DEVICES)}")
        for name in ("tokens", "gpus", "global_batch", "top"):
            check(getattr(self, name) > 0, name, getattr(self, name), "must be positive")
        for name in ("peak_flops", "memory_gib", "intra_node_bandwidth", "inter_node_bandwidth", "gpus_per_node"):
            value = getattr(self, name)
            check(value is None or value > 0, name, value, "must be positive")
        check(0 < self.compute_efficiency <= 1, "compute_efficiency", self.compute_efficiency, "must be in (0, 1]")
        check(0 < self.usable_memory <= 1, "usable_memory", self.usable_memory, "must be in (0, 1]")
        check(self.zero is None or self.zero in (0, 1, 2, 3), "zero", self.zero, "must be 0, 1, 2 or 3")
        for name in ("tp", "pp", "micro_batch"):
            value = getattr(self, name)
            check(value is None or value > 0, name, value, "must be positive")
        check(
            self.recompute is None or self.recompute in RECOMPUTE,
            "recompute",
            self.recompute,
            "none, selective or full",
        )

    def cluster(self) -> dict:
        """The GPU's figures with this config's overrides."""
        device, links = DEVICES[self.gpu], INTERCONNECTS[self.gpu]
        return {
            "gpu": self.gpu,
            "gpus": self.gpus,
            "peak_flops": self.peak_flops or device["peak_flops"],
            "memory_bytes": (self.memory_gib or device["memory_gib"]) * GIB,
            "intra_node_bandwidth": self.intra_node_bandwidth or links["intra_node_bandwidth"],
            "inter_node_bandwidth": self.inter_node_bandwidth or links["inter_node_bandwidth"],
            "gpus_per_node": self.gpus_per_node or links["gpus_per_node"],
        }


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero: int
    micro_batch: int
    micro_batches: int  # per pipeline and optimizer step (gradient accumulation)
    recompute: str


@dataclass(frozen=True)
class ModelCounts:
    """What the planner needs of a model: exact parameter counts of the real module (meta device) and
    the shape terms of the FLOP and activation formulas."""

    n_layer: int
    hidden: int
    heads: int
    kv_ratio: float  # n_kv_head / n_head
    vocab: int
    block_parameters: int
    block_matmul_weights: int
    embedding_parameters: int  # token (+ position) embedding and embedding norm: the first stage
    head_parameters: int  # output head (a copy when tied and pipelined) and final norm: the last stage
    mlp_activation_coefficient: float  # Korthikanti's MLP bytes per s·b·h: 19 for a 4h GELU MLP
    total_parameters: int
    context_length: int

    @classmethod
    def of(cls, model: ModelConfig) -> "ModelCounts":
        check(
            model.moe_experts == 0,
            "moe_experts",
            model.moe_experts,
            "the planner models dense blocks; experts need expert parallelism",
        )
        with torch.device("meta"):
            network = Transformer(model)

        def count(module: torch.nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        embedding = count(network.token_embedding)
        embedding += count(network.position_embedding) if network.position_embedding is not None else 0
        embedding += count(network.embedding_norm) if network.embedding_norm is not None else 0
        head = network.lm_head.weight.numel() + count(network.final_norm)
        h, f = model.n_embd, model.ffn_hidden
        gated = model.activation in GATED_ACTIVATIONS
        attention = h * (model.n_head + 2 * model.n_kv_head) * model.head_dim + h * h
        mlp = h * f * (2 if gated else 1) + f * h
        # Korthikanti's MLP term 19 = 2 (input of the first linear) + 8 (4h pre-activation) + 8 (4h input
        # of the second linear) + 1 (dropout mask); a gated MLP stores both halves before the product.
        ratio = f / h
        return cls(
            n_layer=model.n_layer,
            hidden=h,
            heads=model.n_head,
            kv_ratio=model.n_kv_head / model.n_head,
            vocab=model.vocab_size,
            block_parameters=count(network.blocks[0]),
            block_matmul_weights=attention + mlp,
            embedding_parameters=embedding,
            head_parameters=head,
            mlp_activation_coefficient=3 + (2 * (2 if gated else 1) + 2) * ratio,
            total_parameters=network.num_parameters(),
            context_length=model.context_length,
        )


@functools.cache
def preset_counts(name: str) -> ModelCounts:
    """:meth:`ModelCounts.of` a preset, built once a process (a 175B model takes a second on the meta device)."""
    return ModelCounts.of(load_preset(name))


def model_state_bytes(parameters: float, zero: int, dp: int) -> dict:
    """Bytes per GPU of 16-bit weights and gradients and fp32 optimizer state for ``parameters`` on the
    GPU, ZeRO stage ``zero`` over ``dp`` ranks (Rajbhandari et al. 2020, Figure 1)."""
    weights = WEIGHT_BYTES * parameters / (dp if zero >= 3 else 1)
    gradients = GRADIENT_BYTES * parameters / (dp if zero >= 2 else 1)
    optimizer = OPTIMIZER_BYTES * parameters / (dp if zero >= 1 else 1)
    return {
        "weights": weights,
        "gradients": gradients,
        "optimizer": optimizer,
        "total": weights + gradients + optimizer,
    }


def activation_bytes_per_layer(
    counts: ModelCounts, sequence: int, micro_batch: int, tp: int, sequence_parallel: bool, recompute: str, flash: bool
) -> float:
    """Bytes one layer keeps for one micro-batch on one GPU (Korthikanti et al. 2022, Table 2).

    Per ``s·b·h``: 10 stay whole under tensor parallelism (the two norms' inputs 4, the attention and
    MLP inputs 2 + 2, two dropout masks 1 + 1) and the rest is split t ways: q, k, v 2 + 4·kv_ratio and
    the output projection's input 2 (6 + 2 = 8 for multi-head attention), the MLP's inner activations
    (16 for a 4h GELU MLP); ``5·a·s/h`` are the scores, softmax and its dropout mask. Sequence
    parallelism splits the 10 too. Full recomputation keeps the block's 16-bit input only."""
    s, b, h = sequence, micro_batch, counts.hidden
    split_t = tp if sequence_parallel else 1
    if recompute == "full":
        return ACTIVATION_BYTES * s * b * h / split_t
    split = 2 + 4 * counts.kv_ratio + 2 + (counts.mlp_activation_coefficient - 3)
    scores = 0.0 if flash or recompute == "selective" else 5 * counts.heads * s / h
    return s * b * h * (10 / split_t + (split + scores) / tp)


def split_layers(n_layer: int, pp: int) -> tuple[int, int]:
    """(first, last) stage's blocks for ``n_layer`` blocks in ``pp`` stages as even as possible, the
    extra blocks on the first stages (the last one also runs the output head)."""
    return -(-n_layer // pp), n_layer // pp


def forward_flops_per_layer(counts: ModelCounts, sequence: int, micro_batch: int) -> float:
    """2 FLOPs per weight and token plus the attention scores and their weighted sum, 2·2·b·s²·h."""
    tokens = sequence * micro_batch
    return 2 * tokens * counts.block_matmul_weights + 4 * micro_batch * sequence * sequence * counts.hidden


def ring_seconds(volume: float, ranks: int, bandwidth: float, kind: str) -> float:
    """A ring collective on ``ranks`` GPUs: every GPU sends (n−1)/n of the tensor per all-gather or
    reduce-scatter and twice that per all-reduce (Patarasuk & Yuan 2009)."""
    if ranks == 1:
        return 0.0
    passes = 2 if kind == "all-reduce" else 1
    return passes * (ranks - 1) / ranks * volume / bandwidth


def evaluate_layout(config: PlanConfig, layout: Layout, counts: ModelCounts | None = None) -> dict:
    """Memory per GPU and step time of one layout (dict, bytes and seconds)."""
    counts = counts or preset_counts(config.preset)
    cluster = config.cluster()
    s = config.sequence_length or counts.context_length
    t, p, d, b, m = layout.tp, layout.pp, layout.dp, layout.micro_batch, layout.micro_batches
    first_layers, last_layers = split_layers(counts.n_layer, p)

    # Memory: the first stage holds the embedding and the most micro-batches in flight, the last stage
    # the head and the logits; a layout needs the larger of the two.
    in_flight = m if config.schedule == "gpipe" and p > 1 else min(p, m)
    per_layer = activation_bytes_per_layer(
        counts, s, b, t, config.sequence_parallel, layout.recompute, config.flash_attention
    )
    working = 0.0
    if layout.recompute == "full":  # the layer being recomputed holds all of its activations for a moment
        working = activation_bytes_per_layer(counts, s, b, t, config.sequence_parallel, "none", config.flash_attention)
    logits = LOGIT_BYTES * s * b * counts.vocab / t
    stages = {}
    for name, layers, extra_parameters, flight, extra_bytes in (
        (
            "first",
            first_layers,
            counts.embedding_parameters + (counts.head_parameters if p == 1 else 0),
            in_flight,
            logits if p == 1 else 0.0,
        ),
        ("last", last_layers, counts.head_parameters, 1 if config.schedule == "1f1b" or p == 1 else m, logits),
    ):
        parameters = (layers * counts.block_parameters + extra_parameters) / t
        states = model_state_bytes(parameters, layout.zero, d)
        activations = flight * layers * per_layer + working + extra_bytes
        # ZeRO-3 gathers a block's 16-bit weights (and holds its full gradients until they are
        # reduce-scattered) for the block running and the one prefetched.
        gathered = 2 * (WEIGHT_BYTES + GRADIENT_BYTES) * counts.block_parameters / t if layout.zero == 3 else 0.0
        stages[name] = {
            "parameters": parameters,
            "states": states,
            "zero3_gathered": gathered,
            "activations": activations,
            "total": states["total"] + gathered + activations,
        }
        if p == 1:
            break
    worst = max(stages.values(), key=lambda stage: stage["total"])
    budget = config.usable_memory * cluster["memory_bytes"]

    # Time of one micro-batch on the slowest stage: the first has the most blocks, the last the head too.
    # Blocks run forward, backward (twice the forward) and, recomputing, forward again; the head 3 times.
    layer_flops = forward_flops_per_layer(counts, s, b)
    head_flops = 2 * s * b * counts.hidden * counts.vocab
    passes = 4.0 if layout.recompute == "full" else 3.0
    block_flops = passes * layer_flops
    if layout.recompute == "selective":  # the attention core runs again in the backward pass
        block_flops += 4 * b * s * s * counts.hidden
    flops = max(first_layers * block_flops, last_layers * block_flops + 3 * head_flops) / t
    compute = flops / (cluster["peak_flops"] * config.compute_efficiency)

    node = cluster["gpus_per_node"]
    intra, inter = cluster["intra_node_bandwidth"], cluster["inter_node_bandwidth"]
    tp_bandwidth = intra if t <= node else inter
    dp_bandwidth = intra if t * d <= node else inter
    pp_bandwidth = intra if t * d * p <= node else inter
    boundary = ACTIVATION_BYTES * s * b * counts.hidden
    tp_collectives = (6 if layout.recompute == "full" else 4) * first_layers
    tensor_parallel = tp_collectives * ring_seconds(boundary, t, tp_bandwidth, "all-reduce")
    # One activation forward and one gradient back per micro-batch; split over the tensor-parallel ranks
    # (sequence parallelism, or Megatron-LM's scatter/gather optimisation).
    pipeline = 2 * (boundary / t) / pp_bandwidth if p > 1 else 0.0

    gradient_bytes = GRADIENT_BYTES * worst["parameters"]
    weight_bytes = WEIGHT_BYTES * worst["parameters"]
    zero_overlapped, data_parallel = 0.0, 0.0
    if layout.zero <= 1:  # all-reduce (ZeRO-1: reduce-scatter + all-gather, the same volume) once a step
        data_parallel = ring_seconds(gradient_bytes, d, dp_bandwidth, "all-reduce")
    elif layout.zero == 2:  # gradients reduce-scattered every micro-batch; updated weights gathered once
        zero_overlapped = ring_seconds(gradient_bytes, d, dp_bandwidth, "reduce-scatter")
        data_parallel = ring_seconds(weight_bytes, d, dp_bandwidth, "all-gather")
    else:  # weights gathered for the forward and again for the backward, gradients reduce-scattered
        zero_overlapped = 2 * ring_seconds(weight_bytes, d, dp_bandwidth, "all-gather") + ring_seconds(
            gradient_bytes, d, dp_bandwidth, "reduce-scatter"
        )
    micro_batch_seconds = max(compute, zero_overlapped) + tensor_parallel + pipeline
    slots = m + p - 1
    step = slots * micro_batch_seconds + data_parallel
    tokens_per_step = config.global_batch * s
    steps = config.tokens / tokens_per_step
    micro_batches_per_step = config.global_batch / b
    model_flops_per_step = 3 * (counts.n_layer * layer_flops + head_flops) * micro_batches_per_step
    hardware_flops_per_step = (counts.n_layer * block_flops + 3 * head_flops) * micro_batches_per_step
    gpus = config.gpus
    return {
        "layout": asdict(layout),
        "fits": worst["total"] <= budget,
        "memory": {
            "per_gpu_bytes": worst["total"],
            "budget_bytes": budget,
            "stages": stages,
            "activation_bytes_per_layer": per_layer,
            "in_flight_micro_batches": in_flight,
        },
        "time": {
            "micro_batch_compute_seconds": compute,
            "micro_batch_tensor_parallel_seconds": tensor_parallel,
            "micro_batch_pipeline_seconds": pipeline,
            "micro_batch_zero_seconds": zero_overlapped,
            "data_parallel_seconds": data_parallel,
            "bubble_fraction": (p - 1) / slots,
            "step_seconds": step,
            "steps": steps,
            "seconds": steps * step,
            "days": steps * step / SECONDS_PER_DAY,
            "tokens_per_second_per_gpu": tokens_per_step / step / gpus,
            "mfu": model_flops_per_step / (step * gpus * cluster["peak_flops"]),
            "hardware_flops_per_gpu": hardware_flops_per_step / (step * gpus),
        },
    }


def candidate_layouts(config: PlanConfig, counts: ModelCounts, heads: int, kv_heads: int, ffn: int) -> list[Layout]:
    """Every layout the config allows: tensor-parallel sizes dividing the heads, key/value heads and MLP
    width; pipeline sizes up to one block a stage; the data-parallel size that fills the GPUs and
    divides the global batch; power-of-two micro-batches dividing each rank's share."""
    layouts = []
    for t in range(1, config.gpus + 1):
        if config.gpus % t or heads % t or kv_heads % t or ffn % t or (config.tp and t != config.tp):
            continue
        for p in range(1, min(counts.n_layer, config.gpus // t) + 1):
            if (config.gpus // t) % p or (config.pp and p != config.pp):
                continue
            d = config.gpus // (t * p)
            if config.global_batch % d:
                continue
            share = config.global_batch // d
            sizes = [config.micro_batch] if config.micro_batch else [b for b in MICRO_BATCHES if share % b == 0]
            for b in sizes:
                if share % b:
                    continue
                for zero in [config.zero] if config.zero is not None else [0, 1, 2, 3]:
                    if d == 1 and zero:
                        continue  # nothing to partition over
                    for recompute in [config.recompute] if config.recompute else RECOMPUTE:
                        if recompute == "selective" and config.flash_attention and not config.recompute:
                            continue  # flash attention already keeps no scores: selective only costs time
                        layouts.append(Layout(t, p, d, zero, b, share // b, recompute))
    return layouts


def plan(config: PlanConfig) -> dict:
    """The fastest layouts that fit, best first, each with its memory, time, command and YAML."""
    model = load_preset(config.preset)
    sequence = config.sequence_length or model.context_length
    check(
        sequence <= model.context_length, "sequence_length", sequence, f"exceeds context_length={model.context_length}"
    )
    counts = preset_counts(config.preset)
    layouts = candidate_layouts(config, counts, model.n_head, model.n_kv_head, model.ffn_hidden)
    if not layouts:
        raise ConfigError(
            "gpus",
            config.gpus,
            "no tp x pp x dp factorisation of the GPUs divides the heads, the layers and the global batch "
            f"{config.global_batch} (with the pinned fields)",
        )
    evaluated = [evaluate_layout(config, layout, counts) for layout in layouts]
    fitting = sorted(
        (e for e in evaluated if e["fits"]), key=lambda e: (e["time"]["step_seconds"], e["memory"]["per_gpu_bytes"])
    )
    if not fitting:
        least = min(evaluated, key=lambda e: e["memory"]["per_gpu_bytes"])
        raise ConfigError(
            "gpus",
            config.gpus,
            f"no layout fits {config.usable_memory:.0%} of {config.cluster()['memory_bytes'] / GIB:g} GiB per GPU; "
            f"the smallest needs {least['memory']['per_gpu_bytes'] / GIB:.1f} GiB ({describe(least['layout'])})",
        )
    cluster = config.cluster()
    best = fitting[: config.top]
    for entry in best:
        entry["torchrun"] = torchrun_command(entry["layout"], cluster)
        entry["yaml"] = layout_yaml(config, entry["layout"], sequence, counts.vocab)
    return {
        "preset": config.preset,
        "parameters": counts.total_parameters,
        "tokens": config.tokens,
        "sequence_length": sequence,
        "global_batch": config.global_batch,
        "cluster": cluster,
        "compute_efficiency": config.compute_efficiency,
        "considered": len(evaluated),
        "fitting": len(fitting),
        "layouts": best,
    }


def describe(layout: dict) -> str:
    return (
        f"tp={layout['tp']} pp={layout['pp']} dp={layout['dp']} zero={layout['zero']} "
        f"micro_batch={layout['micro_batch']} x {layout['micro_batches']} recompute={layout['recompute']}"
    )


def torchrun_command(layout: dict, cluster: dict) -> str:
    """One ``torchrun`` per node; the c10d rendezvous on the first node's address joins them."""
    per_node = min(cluster["gpus"], cluster["gpus_per_node"])
    nodes = math.ceil(cluster["gpus"] / per_node)
    rendezvous = (
        " --rdzv-backend=c10d --rdzv-endpoint=$HEAD_NODE:29500 --rdzv-id=$JOB_ID" if nodes > 1 else " --standalone"
    )
    return f"torchrun --nnodes={nodes} --nproc-per-node={per_node}{rendezvous} -m llmkit.cli pretrain plan.yaml"


def layout_yaml(config: PlanConfig, layout: dict, sequence: int, vocab: int) -> str:
    """The ``llmkit pretrain`` fields that run the layout: the micro-batch is ``batch_size``, the
    micro-batches per step ``grad_accum``; the data-parallel size is what the world leaves. Data
    parallelism beside tensor or pipeline parallelism is FSDP2: ZeRO-3 resharding after the forward,
    ZeRO-2 style (gathered weights kept) for the stages below. The memory model splits the embedding, the
    head and the logits over the tensor-parallel ranks (Megatron-LM's vocabulary-parallel layers): the YAML
    turns ``vocab_parallel`` on where the Trainer can split them, without pipeline parallelism and with a
    vocabulary the tensor-parallel size divides; elsewhere they stay replicated, more than planned."""
    model_parallel = layout["tp"] > 1 or layout["pp"] > 1
    vocab_parallel = layout["tp"] > 1 and layout["pp"] == 1 and vocab % layout["tp"] == 0
    parallelism = "fsdp" if layout["zero"] >= 2 or model_parallel else "ddp"
    lines = [
        f"preset: {config.preset}",
        "model:",
        f"  context_length: {sequence}",
        "train:",
        f"  tp: {layout['tp']}",
        f"  pp: {layout['pp']}",
        f"  parallelism: {parallelism}",
        f"  reshard_after_forward: {str(layout['zero'] == 3).lower()}",
        f"  sequence_parallel: {str(config.sequence_parallel).lower()}",
        f"  vocab_parallel: {str(vocab_parallel).lower()}",
        f"  pipeline_schedule: {config.schedule}",
        f"  batch_size: {layout['micro_batch']}",
        f"  grad_accum: {layout['micro_batches']}",
        f"  activation_checkpointing: {layout['recompute']}",
        f"  max_tokens: {int(config.tokens)}",
    ]
    return "\n".join(lines) + "\n"


def format_plan(result: dict) -> str:
    """The best layouts as a table, then the first one's command and YAML."""
    cluster = result["cluster"]
    lines = [
        f"{result['preset']}: {result['parameters'] / 1e9:.1f} B parameters, {result['tokens']:.3g} tokens, "
        f"batch {result['global_batch']} x {result['sequence_length']} on {cluster['gpus']} x {cluster['gpu']} "
        f"({cluster['memory_bytes'] / GIB:g} GiB, {cluster['peak_flops'] / 1e12:g} TFLOP/s peak, "
        f"compute efficiency {result['compute_efficiency']:g})",
        f"{result['fitting']} of {result['considered']} layouts fit; fastest first:",
        "",
        f"{'tp':>3} {'pp':>3} {'dp':>5} {'zero':>4} {'mb':>3} {'x m':>5} {'recompute':>9} {'GiB/GPU':>8} "
        f"{'bubble':>7} {'step s':>8} {'MFU':>6} {'days':>8}",
    ]
    for entry in result["layouts"]:
        layout, time = entry["layout"], entry["time"]
        lines.append(
            f"{layout['tp']:>3} {layout['pp']:>3} {layout['dp']:>5} {layout['zero']:>4} {layout['micro_batch']:>3} "
            f"{layout['micro_batches']:>5} {layout['recompute']:>9} {entry['memory']['per_gpu_bytes'] / GIB:>8.1f} "
            f"{time['bubble_fraction']:>7.1%} {time['step_seconds']:>8.2f} {time['mfu']:>6.1%} {time['days']:>8.1f}"
        )
    best = result["layouts"][0]
    lines += ["", "Run the fastest (on every node):", f"  {best['torchrun']}", "", "plan.yaml:"]
    lines += [f"  {line}" for line in best["yaml"].splitlines()]
    return "\n".join(lines)
