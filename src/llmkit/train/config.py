"""TrainConfig: everything the one training loop needs, shared by every stage that trains."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llmkit.config import check, parse_duration
from llmkit.model.config import RECOMPUTE, RECOMPUTE_BOOLEANS, Recompute
from llmkit.tracking import parse_report_to

DTYPE_HELP = (
    "autocast dtype: auto (bfloat16 where the device multiplies faster in it than in float32, else float32), "
    "float32, bfloat16 or float16 (CUDA only, with loss scaling)"
)


@dataclass
class TrainConfig:
    out: str = field(default="runs/base", metadata={"help": "run directory: checkpoints, metrics.csv, plots"})
    batch_size: int = field(default=16, metadata={"help": "sequences per micro-batch per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches accumulated per optimizer step"})
    lr: float = field(
        default=1e-3, metadata={"help": "peak learning rate (of the AdamW groups under --train.optimizer muon)"}
    )
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate as a fraction of the peak"})
    schedule: Literal["cosine", "wsd", "constant"] = field(
        default="cosine", metadata={"help": "learning-rate schedule after warmup"}
    )
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps"})
    decay_fraction: float = field(default=0.2, metadata={"help": "WSD: fraction of the run spent decaying"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on matrices"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    optimizer: Literal["adamw", "muon"] = field(
        default="adamw",
        metadata={"help": "adamw, or muon: Muon for hidden matrices, AdamW (--train.lr) for the rest (docs/train.md)"},
    )
    muon_lr: float = field(default=0.02, metadata={"help": "Muon: peak learning rate of the hidden matrices"})
    muon_momentum: float = field(default=0.95, metadata={"help": "Muon: Nesterov momentum"})
    muon_weight_decay: float = field(
        default=0.0, metadata={"help": "Muon: decoupled weight decay of the hidden matrices"}
    )
    batch_warmup_tokens: int | None = field(
        default=None,
        metadata={"help": "ramp the rows used per micro-batch linearly up to batch_size over this many tokens (GPT-3)"},
    )
    batch_warmup_start: int = field(
        default=1, metadata={"help": "rows per micro-batch at the start of the batch-size ramp"}
    )
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this (0 = off)"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata={"help": DTYPE_HELP},
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    activation_checkpointing: Recompute = field(
        default="none",
        metadata={
            "help": "recompute activations in the backward pass: none, selective (the attention core, "
            "Korthikanti et al. 2022) or full (whole blocks)",
            "aliases": RECOMPUTE_BOOLEANS,
        },
    )
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    max_tokens: int | None = field(default=None, metadata={"help": "stop after this many training tokens"})
    max_time: str | None = field(default=None, metadata={"help": "stop after this wall time, e.g. 90s, 10m, 2h"})
    target_val_bpb: float | None = field(
        default=None, metadata={"help": "stop once validation reaches this many bits per byte"}
    )
    eval_interval: int = field(default=100, metadata={"help": "validate every this many steps (0 = only at the end)"})
    eval_batches: int = field(default=20, metadata={"help": "validation batches per evaluation"})
    log_interval: int = field(default=10, metadata={"help": "write a metrics row every this many steps"})
    checkpoint_interval: int = field(
        default=500, metadata={"help": "checkpoint every this many steps (and at the end)"}
    )
    keep_last: int = field(default=3, metadata={"help": "checkpoints kept on disk"})
    checkpoint_format: Literal["full", "sharded"] = field(
        default="full",
        metadata={
            "help": "full: rank 0 gathers and writes model.safetensors + optimizer.pt; sharded: every rank "
            "writes its own pieces through torch.distributed.checkpoint (docs/train.md, checkpoints)"
        },
    )
    seed: int = field(default=1337, metadata={"help": "seed of initialisation, data order and dropout"})
    resume: bool = field(default=False, metadata={"help": "continue from the run directory's latest checkpoint"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    parallelism: Literal["ddp", "fsdp"] = field(
        default="ddp", metadata={"help": "under torchrun: DDP replicas or FSDP2 sharding"}
    )
    tp: int = field(default=1, metadata={"help": "tensor-parallel size (docs/train.md, parallel layouts)"})
    pp: int = field(default=1, metadata={"help": "pipeline-parallel size; data parallel = processes / (tp x pp)"})
    sequence_parallel: bool = field(
        default=True, metadata={"help": "under tensor parallelism, split norms and dropout along the sequence"}
    )
    vocab_parallel: bool = field(
        default=False,
        metadata={
            "help": "under tensor parallelism, split the token embedding and output head along the vocabulary and "
            "take the pretraining loss on the split logits (docs/train.md)"
        },
    )
    pipeline_split: Literal["even", "balanced"] = field(
        default="even", metadata={"help": "blocks per pipeline stage: even, or balanced with the output head's work"}
    )
    pipeline_schedule: Literal["1f1b", "gpipe", "interleaved-1f1b"] = field(
        default="1f1b", metadata={"help": "pipeline schedule; grad_accum is the number of pipeline micro-batches"}
    )
    virtual_stages: int = field(
        default=2, metadata={"help": "interleaved-1f1b: pipeline stages each process runs (Narayanan et al. 2021)"}
    )
    reshard_after_forward: bool = field(
        default=True, metadata={"help": "FSDP2: free gathered weights after the forward (ZeRO-3) or keep them (ZeRO-2)"}
    )
    spike_ratio: float = field(default=2.0, metadata={"help": "a loss above this times its running mean is a spike"})
    rollback_after: int = field(
        default=3, metadata={"help": "consecutive spikes before rolling back to the last checkpoint"}
    )
    max_rollbacks: int = field(default=3, metadata={"help": "give up after this many rollbacks"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    memory_check: bool = field(
        default=True,
        metadata={
            "help": "refuse before the first step when the estimated memory of a step exceeds what the device has free"
        },
    )
    keep_freed_memory: bool = field(
        default=True,
        metadata={
            "help": "on the CPU (Linux, glibc): large tensors come from the heap and freed memory stays in the process "
            "for the next step instead of being returned and faulted in again (process-wide; memory stays near its "
            "peak; llmkit.train.allocator)"
        },
    )
    best_metric: str | None = field(
        default=None,
        metadata={
            "help": "an evaluation metric (e.g. accuracy, val_loss) whose best value keeps its checkpoint: the run "
            "directory's 'best' pointer names it, and pruning spares it (none: off)"
        },
    )
    best_goal: Literal["max", "min"] = field(
        default="max", metadata={"help": "whether a larger or a smaller best_metric is better"}
    )
    report_to: str = field(
        default="csv",
        metadata={
            "help": "experiment trackers besides metrics.csv: comma-separated csv, tensorboard, wandb (offline), "
            "mlflow (local), or all/none"
        },
    )

    def __post_init__(self) -> None:
        for name in (
            "batch_size",
            "grad_accum",
            "eval_batches",
            "log_interval",
            "checkpoint_interval",
            "keep_last",
            "rollback_after",
        ):
            check(getattr(self, name) > 0, name, getattr(self, name), "must be positive")
        check(self.lr > 0, "lr", self.lr, "must be positive")
        parse_report_to(self.report_to)
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        check(0 < self.decay_fraction <= 1, "decay_fraction", self.decay_fraction, "must be in (0, 1]")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        check(0 <= self.beta1 < 1, "beta1", self.beta1, "must be in [0, 1)")
        check(0 <= self.beta2 < 1, "beta2", self.beta2, "must be in [0, 1)")
        check(self.muon_lr > 0, "muon_lr", self.muon_lr, "must be positive")
        check(0 <= self.muon_momentum < 1, "muon_momentum", self.muon_momentum, "must be in [0, 1)")
        check(self.muon_weight_decay >= 0, "muon_weight_decay", self.muon_weight_decay, "must be >= 0")
        check(
            not (self.optimizer == "muon" and self.parallelism == "fsdp"),
            "optimizer",
            self.optimizer,
            "Muon orthogonalises whole matrices, which FSDP shards; use --train.parallelism ddp or "
            "--train.optimizer adamw",
        )
        check(
            self.batch_warmup_tokens is None or self.batch_warmup_tokens > 0,
            "batch_warmup_tokens",
            self.batch_warmup_tokens,
            "must be positive",
        )
        check(
            1 <= self.batch_warmup_start <= self.batch_size,
            "batch_warmup_start",
            self.batch_warmup_start,
            f"must be in 1..batch_size={self.batch_size}",
        )
        check(
            self.activation_checkpointing in RECOMPUTE,
            "activation_checkpointing",
            self.activation_checkpointing,
            f"must be one of {', '.join(RECOMPUTE)}",
        )
        check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0")
        check(
            self.checkpoint_format in ("full", "sharded"),
            "checkpoint_format",
            self.checkpoint_format,
            "must be full or sharded",
        )
        check(self.tp >= 1, "tp", self.tp, "must be at least 1")
        check(self.pp >= 1, "pp", self.pp, "must be at least 1")
        check(self.virtual_stages >= 1, "virtual_stages", self.virtual_stages, "must be at least 1")
        check(
            self.pp == 1 or self.pipeline_schedule == "gpipe" or self.grad_accum >= self.pp,
            "grad_accum",
            self.grad_accum,
            f"1F1B needs at least pp={self.pp} micro-batches a step (or --train.pipeline-schedule gpipe)",
        )
        check(
            not (self.vocab_parallel and self.tp > 1 and self.pp > 1),
            "vocab_parallel",
            self.vocab_parallel,
            "the vocabulary-parallel embedding and head are not split across pipeline stages; use --train.pp 1",
        )
        check(
            not (self.optimizer == "muon" and self.tp > 1),
            "optimizer",
            self.optimizer,
            "Muon orthogonalises whole matrices, which tensor parallelism splits; use --train.optimizer adamw",
        )
        check(
            self.target_val_bpb is None or self.target_val_bpb > 0,
            "target_val_bpb",
            self.target_val_bpb,
            "must be positive",
        )
        check(self.eval_interval >= 0, "eval_interval", self.eval_interval, "must be >= 0")
        check(self.spike_ratio > 1, "spike_ratio", self.spike_ratio, "must be > 1")
        check(self.max_rollbacks >= 0, "max_rollbacks", self.max_rollbacks, "must be >= 0")
        for name in ("max_steps", "max_tokens"):
            value = getattr(self, name)
            check(value is None or value > 0, name, value, "must be positive")
        try:
            seconds = parse_duration(self.max_time)
        except ValueError as error:
            check(False, "max_time", self.max_time, str(error))
        check(seconds is None or seconds > 0, "max_time", self.max_time, "must be positive")
        check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "device",
            self.device,
            "must be auto, cpu, cuda or cuda:N",
        )

    def check_budget(self) -> None:
        check(
            bool(self.max_steps or self.max_tokens or self.max_time),
            "max_steps",
            self.max_steps,
            "give a budget: max_steps, max_tokens or max_time",
        )

    @property
    def max_seconds(self) -> float | None:
        return parse_duration(self.max_time)
