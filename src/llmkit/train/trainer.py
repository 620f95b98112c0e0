"""The one training loop.

Pretraining, instruction tuning, reward modelling, DPO, PPO and GRPO differ only in the batches they feed,
the ``loss_fn`` (model, batch) -> (loss, metrics) they pass and, for PPO and GRPO, the
:class:`TrainingHooks` of their rollout source; everything else lives here: optimizer groups and
schedule, batch-size warmup, mixed precision, gradient accumulation and clipping, the Mixture-of-Experts
auxiliary loss, the loss-spike guard with rollback, checkpoints and exact resume, validation (or a
stage's own evaluation), logging (with the loss function's metrics), budgets and DDP/FSDP2 under ``torchrun``.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path
from typing import Callable, Literal, Protocol

import torch
from torch import nn
from torch.distributed.tensor.parallel import loss_parallel
from tqdm.auto import tqdm

from llmkit.errors import ConfigError, LlmkitError
from llmkit.io import atomic_write_text
from llmkit.model.checkpoint import BEST, DTYPES, LATEST
from llmkit.train import distributed
from llmkit.train.allocator import keep_freed_memory
from llmkit.train.checkpoint import (
    decode_rng,
    encode_rng,
    gather_state,
    load_training_checkpoint,
    save_sharded_checkpoint,
    save_training_checkpoint,
    split_weights,
)
from llmkit.train.config import TrainConfig
from llmkit.train.memory import FREE_MEMORY_SHARE, available_bytes, estimate_step_memory
from llmkit.train.metrics import MetricsLog, ThroughputMeter, measured_peak_flops
from llmkit.train.objectives import auxiliary_loss, causal_lm_loss, prefix_lm_loss
from llmkit.train.optim import build_muon, build_optimizer, learning_rate
from llmkit.train.parallel import clip_grad_norm

LossFunction = Callable[[nn.Module, dict], tuple[torch.Tensor, dict]]


class BatchSource(Protocol):
    def get_batch(self, index: int) -> dict[str, torch.Tensor]: ...


class TrainingHooks:
    """What a stage adds to the loop besides its batches and loss; the defaults add nothing (pretraining,
    SFT, the reward model and DPO), PPO and GRPO's rollout source uses every part.

    - ``cycle``: steps (data positions) that belong together, such as one RL iteration's minibatches,
      which share state a checkpoint does not hold (the rollouts): the loop checkpoints, evaluates and
      stops only between cycles, so a resume always starts a cycle afresh.
    - ``total_steps``: the data positions the source has; reaching them ends the run (a budget of its own,
      beside ``max_steps``, ``max_tokens`` and ``max_time``).
    - ``language_model``: the attribute path of the language model inside the trained module, when the
      module holds more (PPO's value head): checkpoints hold it alone as ``model.safetensors``, which
      later stages load as is, and the rest as ``extra_weights.safetensors``.
    - ``spike_metric``: what the spike guard compares with its running mean: the loss (a cross-entropy,
      positive), or the gradient norm for a loss whose value is no scale (a policy-gradient surrogate
      centred on 0, whose ratio to its mean means nothing).
    """

    cycle: int = 1
    total_steps: int | None = None
    language_model: str = ""
    spike_metric: Literal["loss", "grad_norm"] = "loss"

    def after_step(self, trainer: "Trainer") -> None:
        """Called after every step, whether it updated the model or the spike guard skipped it."""

    def evaluate(self, trainer: "Trainer") -> dict[str, float] | None:
        """Held-out metrics of the model, in place of the validation loss (None: the validation loss).
        An evaluation hook also runs before the first step, so a run's first row is the starting model's."""
        return None

    def state_dict(self) -> dict:
        """JSON-serialisable state a resumed run needs; saved in every checkpoint's trainer state."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TrainingDiverged(LlmkitError):
    """The loss kept spiking after every allowed rollback."""


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (what SLURM and Kubernetes send some seconds before they kill a job):
    the first sets ``requested``, so the loop finishes its step, saves a checkpoint and ends; a second
    stops at once (KeyboardInterrupt), leaving the previous checkpoint intact."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.previous: dict = {}

    def install(self) -> "StopSignals":
        try:
            self.previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        except ValueError:  # not the main thread: signals stay with whoever runs it
            pass
        return self

    def restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", name, "CUDA is not available on this machine")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype a run trains in. ``auto`` is bfloat16 where the device multiplies in it faster than
    in float32 (CUDA with bfloat16 support; a CPU by the measured peaks of :func:`measured_peak_flops`, so
    AVX512-BF16 or AMX), else float32: without bfloat16 instructions PyTorch's CPU bfloat16 matmul falls
    back to a reference path about fifty times slower than float32's (an AVX2 machine: 1.3 against
    55 GFLOP/s), and a bfloat16 speedrun there trained 10 steps in its 10 minutes."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    faster = measured_peak_flops(torch.bfloat16, device) > measured_peak_flops(torch.float32, device)
    return torch.bfloat16 if faster else torch.float32


def process_device(name: str) -> tuple[torch.device, distributed.World]:
    """This process's device and its place in the ``torchrun`` world (joined here): ``cuda`` without an
    index is the process's own GPU."""
    device = resolve_device(name)
    world = distributed.init_world(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", world.local_rank)
    return device, world


class SpikeGuard:
    """Loss-spike and NaN detection (the survey's §4.3; PaLM restarts ~100 steps earlier and skips
    the offending batches). A step is bad when its loss or gradient norm is not finite, or its
    ``metric`` (the loss, or the gradient norm) exceeds ``ratio`` times the running mean of accepted ones."""

    def __init__(self, ratio: float, warmup: int = 10, momentum: float = 0.9, metric: str = "loss"):
        self.ratio, self.warmup, self.momentum, self.metric = ratio, warmup, momentum, metric
        self.mean: float | None = None
        self.accepted = 0
        self.consecutive = 0

    def is_bad(self, loss: float, grad_norm: float, check_grad: bool = True) -> bool:
        value = grad_norm if self.metric == "grad_norm" else loss
        bad = not math.isfinite(loss) or (check_grad and not math.isfinite(grad_norm))
        if not bad and self.mean is not None and self.accepted >= self.warmup:
            bad = value > self.ratio * self.mean
        if bad:
            self.consecutive += 1
            return True
        self.consecutive = 0
        self.accepted += 1
        self.mean = value if self.mean is None else self.momentum * self.mean + (1 - self.momentum) * value
        return False

    def state(self) -> dict:
        return {"mean": self.mean, "accepted": self.accepted, "consecutive": self.consecutive}

    def load(self, state: dict) -> None:
        self.mean, self.accepted, self.consecutive = state["mean"], state["accepted"], state["consecutive"]


EVALUATION_FORMATS = {"val_loss": "{:.5f}", "val_bpb": "{:.4f}"}


def _format_evaluation(values: dict[str, float | None]) -> dict[str, str]:
    return {
        name: "" if value is None else EVALUATION_FORMATS.get(name, "{:.6g}").format(value)
        for name, value in values.items()
    }


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        train_batches: BatchSource,
        config: TrainConfig,
        *,
        val_batches=None,
        loss_fn: LossFunction = causal_lm_loss,
        tokenizer=None,
        metadata: dict | None = None,
        tokens_per_batch: int | None = None,
        hooks: TrainingHooks | None = None,
    ):
        """``model`` is the bare :class:`~llmkit.model.Transformer` (or a module holding one, named by
        ``hooks.language_model``); the trainer wraps it for DDP/FSDP and ``torch.compile``.
        ``tokens_per_batch`` counts the tokens of one micro-batch (for throughput); by default
        batch_size * context_length. ``metadata`` goes into every checkpoint's config.json."""
        self.hooks = hooks or TrainingHooks()
        if self.hooks.total_steps is None:
            config.check_budget()
        self.config = config
        device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, device)
        if self.dtype == torch.float16 and device.type != "cuda":
            raise ConfigError("dtype", config.dtype, "float16 training needs CUDA; use bfloat16 on the CPU")
        self.device, self.world = process_device(config.device)
        if config.keep_freed_memory and self.device.type == "cpu":
            keep_freed_memory()
        self.model = model.to(self.device)
        self.language_model = model.get_submodule(self.hooks.language_model)
        self.model_config = self.language_model.config
        self.language_model.activation_checkpointing = config.activation_checkpointing
        self.wrapped = distributed.wrap_model(self.model, self.world, config, self.device, self.language_model)
        if self.world.pipeline is not None and loss_fn is not causal_lm_loss:
            raise ConfigError("pp", config.pp, "pipeline parallelism trains the causal LM objective only")
        self.vocab_parallel = config.vocab_parallel and config.tp > 1
        if self.vocab_parallel and loss_fn not in (causal_lm_loss, prefix_lm_loss):
            raise ConfigError(
                "vocab_parallel", config.vocab_parallel, "the split-vocabulary loss is the pretraining objectives' only"
            )
        self.forward_model = torch.compile(self.wrapped) if config.compile else self.wrapped
        fused = not (self.world.distributed and (config.parallelism == "fsdp" or self.world.mesh is not None))
        betas = (config.beta1, config.beta2)
        if config.optimizer == "muon":
            self.optimizer = build_muon(
                self.model,
                config.lr,
                config.weight_decay,
                betas,
                config.muon_lr,
                config.muon_momentum,
                config.muon_weight_decay,
                fused=fused,
            )
        else:
            self.optimizer = build_optimizer(self.wrapped, config.lr, config.weight_decay, betas, fused=fused)
        if self.world.mesh is not None:  # tensor-parallel DTensors beside replicated tensors: no foreach kernels
            for group in self.optimizer.param_groups:
                group["foreach"] = False
        # The schedule scales every group by one factor of its own peak (AdamW's and Muon's differ).
        self.peak_lrs = [group["lr"] for group in self.optimizer.param_groups]
        # float16 has too little range for small gradients: scale the loss up, unscale before the step.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        self.train_batches, self.val_batches, self.loss_fn = train_batches, val_batches, loss_fn
        self.tokenizer, self.metadata = tokenizer, metadata or {}
        self.run_directory = Path(config.out)
        self.micro_batches_per_step = config.grad_accum * self.world.data_size
        self.tokens_per_step = (
            tokens_per_batch or config.batch_size * self.model_config.context_length
        ) * self.micro_batches_per_step
        self.guard = SpikeGuard(config.spike_ratio, metric=self.hooks.spike_metric)
        self.step = 0
        self.data_position = 0
        self.tokens_seen = 0
        self.elapsed_before = 0.0
        self.skipped = 0
        self.rollbacks = 0
        self.best_val: float | None = None
        self.best: dict | None = None  # {"value", "step"} of the best evaluation of config.best_metric so far
        self.signals = StopSignals()
        self.stop_requested = False
        self.validation: dict[str, float | None] = {}  # the latest evaluation
        # Evaluations and checkpoints fall due every so many steps and happen at the next end of a cycle.
        self.evaluation_due = self.checkpoint_due = False

    def check_memory(self) -> None:
        """Refuse, naming the flags to change, a step the device cannot hold (:mod:`llmkit.train.memory`)."""
        tokens = self.tokens_per_step // self.micro_batches_per_step
        need = estimate_step_memory(self.model, tokens, self.dtype, self.config.activation_checkpointing)
        free = available_bytes(self.device)
        # A fifth of the free memory is left for what the estimate does not count: the runtime, the data,
        # copies made while checkpoints are written (SmolLM2's LoRA run peaked 3 GiB above the estimate).
        if free is not None and need.total > FREE_MEMORY_SHARE * free:
            gib = 2**30
            raise ConfigError(
                "batch_size",
                self.config.batch_size,
                f"a step of {tokens:,} tokens needs about {need.total / gib:.1f} GiB beyond the weights "
                f"(activations {need.activation_bytes / gib:.1f}, logits {need.logit_bytes / gib:.1f}, "
                f"gradients and optimizer {need.optimizer_bytes / gib:.1f}), over {FREE_MEMORY_SHARE:.0%} of "
                f"the {free / gib:.1f} GiB {self.device} has free: use --train.activation-checkpointing full, a "
                f"smaller --train.batch-size (with --train.grad-accum for the same batch) or a shorter "
                f"--sequence-length (--train.memory-check false to try anyway)",
            )

    # ----------------------------------------------------------------- the loop
    def run(self) -> dict:
        """Train until a budget is spent or a stop signal comes; returns the summary. The signals stay
        caught until the final checkpoint is written, so a SIGTERM during it does not cut it short."""
        if self.config.memory_check:
            self.check_memory()
        self.signals.install()
        try:
            return self._run()
        finally:
            self.signals.restore()

    def _run(self) -> dict:
        config = self.config
        resume_step = self._resume_or_start()
        tokens_at_start = self.tokens_seen
        log = MetricsLog(self.run_directory, resume_step, config.report_to if self.world.is_main else "none")
        log.rows = [row for row in log.rows if row.get("event") != "end"]  # a run resumed after its end goes on past it
        meter = ThroughputMeter(
            self.language_model.flops_per_token(),
            self.world.world_size
            * measured_peak_flops(self.dtype if self.dtype != torch.float16 else torch.bfloat16, self.device),
        )
        start_time = time.perf_counter()
        last_loss, last_metrics, target_reached = float("nan"), {}, False
        if resume_step is None:
            self._evaluate_before(log)
        bar = tqdm(
            total=config.max_steps or self.hooks.total_steps,
            initial=self.step,
            disable=not (config.progress and self.world.is_main),
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        try:
            while not (target_reached or self._should_stop(time.perf_counter() - start_time)):
                lr = self._set_learning_rate(time.perf_counter() - start_time)
                rows = self.rows_per_batch()
                loss, grad_norm, metrics = self._forward_backward(rows)
                self.data_position += 1
                step_tokens = self.tokens_per_step * rows // config.batch_size
                self.tokens_seen += step_tokens
                meter.add(step_tokens)
                updated = self._update(loss, grad_norm, lr, log)
                self.hooks.after_step(self)
                if not updated:
                    continue
                self.step += 1
                last_loss, last_metrics = loss, metrics
                bar.update(1)
                self.evaluation_due |= bool(config.eval_interval and self.step % config.eval_interval == 0)
                self.checkpoint_due |= self.step % config.checkpoint_interval == 0
                evaluate_now = self.evaluation_due and self._between_cycles()
                if self.step % config.log_interval == 0 or evaluate_now:
                    # The loss function's metrics first: a metric named like a trainer column does not replace it.
                    row = {
                        **{name: f"{value:.6g}" for name, value in metrics.items()},
                        **dict(
                            step=self.step,
                            tokens=self.tokens_seen,
                            loss=f"{loss:.5f}",
                            lr=f"{lr:.3e}",
                            grad_norm=f"{grad_norm:.4f}",
                            elapsed_s=f"{self.elapsed_before + time.perf_counter() - start_time:.1f}",
                            **meter.window(),
                        ),
                    }
                    if evaluate_now:
                        self.validation, self.evaluation_due = self.evaluate(), False
                        self.checkpoint_due |= self._note_best()  # the best is kept as a checkpoint now
                        row.update(_format_evaluation(self.validation))
                        target_reached = self._target_reached()
                    log.add(**row)
                    if evaluate_now and self.world.is_main:
                        log.flush()
                    bar.set_postfix(
                        loss=f"{loss:.3f}",
                        tok_s=f"{float(row['tokens_per_s']):,.0f}",
                        mfu=f"{float(row['mfu']):.1%}",
                        **(
                            {"val": f"{self.validation['val_loss']:.3f}"}
                            if self.validation.get("val_loss") is not None
                            else {}
                        ),
                    )
                    meter.restart()
                if self.checkpoint_due and self._between_cycles():
                    # Rows first: a crash between the two leaves rows past the checkpoint, which resume drops,
                    # rather than a checkpoint whose rows are missing for good.
                    if self.world.is_main:
                        log.flush()
                    self.save(time.perf_counter() - start_time)
                    self.checkpoint_due = False
        finally:
            bar.close()
        elapsed = time.perf_counter() - start_time
        if not (self.stop_requested or target_reached) or not self.validation:
            self.validation = self.evaluate()
            self._note_best()
        log.add(
            step=self.step,
            tokens=self.tokens_seen,
            elapsed_s=f"{self.elapsed_before + elapsed:.1f}",
            event="interrupted" if self.stop_requested else "end",
            **_format_evaluation(self.validation),
        )
        if self.world.is_main:
            log.flush()
        checkpoint = self.save(elapsed)
        if self.world.is_main:
            log.plot(self.run_directory / "loss.png", title=self.metadata.get("stage", "training"))
        log.close()
        tokens_per_s = (self.tokens_seen - tokens_at_start) / max(elapsed, 1e-9)
        val_loss, val_bpb = self.validation.get("val_loss"), self.validation.get("val_bpb")
        return {
            "steps": self.step,
            "tokens": self.tokens_seen,
            "seconds": round(self.elapsed_before + elapsed, 2),
            "tokens_per_s": round(tokens_per_s, 1),
            "mfu": round(meter.mfu(tokens_per_s), 4),
            "train_loss": round(last_loss, 5),
            "val_loss": None if val_loss is None else round(val_loss, 5),
            "val_bpb": None if val_bpb is None else round(val_bpb, 5),
            "skipped_batches": self.skipped,
            "rollbacks": self.rollbacks,
            "interrupted": self.stop_requested,
            "target_reached": target_reached,
            "checkpoint": str(checkpoint),
            "best": self._best_summary(),
            "parameters": self.language_model.num_parameters(),
            "peak_flops": meter.peak_flops,
            "dtype": str(self.dtype).removeprefix("torch."),
            "train_metrics": {name: round(value, 6) for name, value in last_metrics.items()},
        }

    def _evaluate_before(self, log: MetricsLog) -> None:
        """A stage's own evaluation (:meth:`TrainingHooks.evaluate`) of the starting model, as the first row."""
        with torch.no_grad():
            before = self.hooks.evaluate(self)
        if before is not None:
            self.validation = before
            self._note_best()
            log.add(step=0, tokens=0, event="before", **_format_evaluation(before))

    def _note_best(self) -> bool:
        """Whether the latest evaluation is the best so far of ``config.best_metric`` (the starting model,
        step 0, counts: a run that only gets worse keeps no checkpoint as its best)."""
        metric, value = self.config.best_metric, None
        if metric is not None:
            value = self.validation.get(metric)
        if value is None:
            return False
        if self.best is not None:
            previous = self.best["value"]
            improved = value > previous if self.config.best_goal == "max" else value < previous
            if not improved:  # a tie keeps the earlier checkpoint
                return False
        self.best = {"value": float(value), "step": self.step}
        return True

    def _best_summary(self) -> dict | None:
        """The best evaluation of ``config.best_metric``: its value, step and checkpoint (None at step 0: the
        starting model was never bettered, so the run's best model is the one it started from)."""
        if self.best is None:
            return None
        step = self.best["step"]
        checkpoint = self.run_directory / "checkpoints" / f"step_{step:08d}" if step else None
        return {
            "metric": self.config.best_metric,
            **self.best,
            "checkpoint": None if checkpoint is None else str(checkpoint),
        }

    def _set_learning_rate(self, elapsed: float) -> float:
        """The schedule's rate for this step in every optimizer group; returns the one logged (of ``--lr``)."""
        config = self.config
        factor = learning_rate(
            self.step,
            self._budget_used(elapsed),
            1.0,
            config.warmup_steps,
            config.schedule,
            config.min_lr_ratio,
            config.decay_fraction,
        )
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):
            group["lr"] = peak * factor
        return config.lr * factor

    def _update(self, loss: float, grad_norm: float, lr: float, log: MetricsLog) -> bool:
        """The optimizer step on the accumulated gradients, unless the spike guard rejects them (then they
        are dropped, the step is not counted, and repeated spikes roll back); returns whether it counts."""
        if grad_norm == 0.0:
            # Nothing to learn from (an RL minibatch without actions): AdamW would still move the weights
            # by its momentum, so no optimizer step, and the guard's mean does not see it.
            self.optimizer.zero_grad(set_to_none=True)
            return True
        if self.guard.is_bad(loss, grad_norm, check_grad=not self.scaler.is_enabled()):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            log.add(step=self.step, tokens=self.tokens_seen, loss=loss, lr=lr, event="skipped")
            if self.guard.consecutive >= self.config.rollback_after:
                self._roll_back(log)
            return False
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def _between_cycles(self) -> bool:
        """Whether the data position ends a cycle of the hooks (always, without cycles)."""
        return self.data_position % self.hooks.cycle == 0

    def _target_reached(self) -> bool:
        val_bpb = self.validation.get("val_bpb")
        return bool(self.config.target_val_bpb and val_bpb is not None and val_bpb <= self.config.target_val_bpb)

    def rows_per_batch(self) -> int:
        """Batch-size warmup (GPT-3, Brown et al. 2020 §2.3): the batch grows linearly in the tokens seen,
        from ``batch_warmup_start`` rows of each micro-batch to all ``batch_size`` after ``batch_warmup_tokens``.
        A function of ``tokens_seen`` alone, so a resumed run ramps exactly as an uninterrupted one."""
        config = self.config
        if not config.batch_warmup_tokens:
            return config.batch_size
        wanted = math.ceil(config.batch_size * self.tokens_seen / config.batch_warmup_tokens)
        return min(config.batch_size, max(config.batch_warmup_start, wanted))

    def _forward_backward(self, rows: int) -> tuple[float, float, dict[str, float]]:
        """One optimizer step's worth of micro-batches, each cut to its first ``rows`` rows; returns the
        global mean loss, the gradient norm and the loss function's numeric metrics (means over the
        micro-batches of every rank)."""
        accumulate = self.config.grad_accum
        total = torch.zeros((), device=self.device)
        metric_totals: dict[str, torch.Tensor] = {}
        batches = []
        for micro in range(accumulate):
            # Rank r takes micro-batches r*accumulate .. of each global step, so N ranks with accumulation
            # A see exactly the batches one process sees with accumulation N*A.
            index = self.data_position * self.micro_batches_per_step + self.world.data_rank * accumulate + micro
            batch = self.train_batches.get_batch(index)
            if rows < self.config.batch_size:
                batch = {key: value[:rows] for key, value in batch.items()}
            batch = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}
            if self.world.pipeline is not None:  # the schedule runs every micro-batch at once, below
                batches.append(batch)
                continue
            # DDP all-reduces gradients on every backward; only the last micro-batch needs it.
            sync = micro == accumulate - 1 or not isinstance(self.wrapped, nn.parallel.DistributedDataParallel)
            with self._loss_parallel():
                with contextlib.nullcontext() if sync else self.wrapped.no_sync(), self._autocast():
                    loss, metrics = self.loss_fn(self.forward_model, batch)
                    # The MoE balancing loss of whatever the loss function ran, added here once for every stage.
                    aux, aux_metrics = auxiliary_loss(self.language_model)
                    loss, metrics = (loss if aux is None else loss + aux), {**aux_metrics, **metrics}
                self.scaler.scale(loss / accumulate).backward()
            total += loss.detach()
            for name, value in metrics.items():
                if isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1):
                    value = torch.as_tensor(value, dtype=torch.float32, device=self.device).detach().reshape(())
                    metric_totals[name] = metric_totals.get(name, 0) + value
        if self.world.pipeline is not None:
            with self._autocast():
                total = self.world.pipeline.forward_backward(batches) * accumulate
        # One all-reduce for the loss and the metrics together.
        means = distributed.all_reduce_mean(
            torch.stack([total, *metric_totals.values()]) / accumulate, self.world
        ).tolist()
        loss, metrics = means[0], dict(zip(metric_totals, means[1:]))
        self.scaler.unscale_(self.optimizer)
        if self.world.mesh is not None:  # DTensors on several meshes: each norm reduced over its own
            grad_norm = clip_grad_norm(self.wrapped, self.config.grad_clip, self.world.pipeline)
        elif self.config.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), self.config.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.wrapped.parameters() if p.grad is not None])
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        return loss, float(grad_norm), metrics

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _loss_parallel(self):
        """The cross-entropy of a vocabulary-parallel head's split logits, forward and backward
        (:func:`llmkit.train.parallel.shard_vocabulary`)."""
        return loss_parallel() if self.vocab_parallel else contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float | None]:
        """The hooks' evaluation (:meth:`TrainingHooks.evaluate`), or else ``val_loss``, the mean validation
        loss over a fixed set of windows, and ``val_bpb``, bits per byte when the data knows its bytes."""
        metrics = self.hooks.evaluate(self)
        if metrics is not None:
            return metrics
        val_loss, val_bpb = self._validation_loss()
        return {"val_loss": val_loss, "val_bpb": val_bpb}

    def _validation_loss(self) -> tuple[float | None, float | None]:
        if self.val_batches is None:
            return None, None
        self.forward_model.eval()
        total = torch.zeros(2, device=self.device)
        for index in range(self.world.data_rank, self.config.eval_batches, self.world.data_size):
            batch = {key: value.to(self.device) for key, value in self.val_batches.sequential_batch(index).items()}
            with self._autocast(), self._loss_parallel():
                if self.world.pipeline is not None:
                    loss = self.world.pipeline.evaluate(batch)
                else:
                    loss, _ = self.loss_fn(self.forward_model, batch)
            total += torch.stack([loss.float(), torch.ones((), device=self.device)])
        if self.world.distributed:
            torch.distributed.all_reduce(total)
        self.forward_model.train()
        val_loss = (total[0] / total[1]).item()
        self.best_val = val_loss if self.best_val is None else min(self.best_val, val_loss)
        bytes_per_token = getattr(self.val_batches, "bytes_per_token", None)
        val_bpb = val_loss / math.log(2) / bytes_per_token if bytes_per_token else None
        return val_loss, val_bpb

    # ------------------------------------------------------------ budgets
    def _budget_used(self, elapsed: float) -> float | None:
        fractions = []
        if self.config.max_steps:
            fractions.append(self.step / self.config.max_steps)
        if self.config.max_tokens:
            fractions.append(self.tokens_seen / self.config.max_tokens)
        if self.config.max_seconds:
            fractions.append((self.elapsed_before + elapsed) / self.config.max_seconds)
        if self.hooks.total_steps:
            fractions.append(self.data_position / self.hooks.total_steps)
        return max(fractions) if fractions else None

    def _should_stop(self, elapsed: float) -> bool:
        """Whether a stop signal came or the budget is spent, asked between cycles only (a signal waits for
        the cycle in flight). Under torchrun the ranks stop together when any one must: their clocks
        differ, and a signal reaches them during different steps."""
        if not self._between_cycles():
            return False
        used = self._budget_used(elapsed)
        stop = [self.signals.requested, used is not None and used >= 1.0]
        if self.world.distributed:
            flags = torch.tensor(stop, dtype=torch.float32, device=self.device)
            stop = (distributed.all_reduce_mean(flags, self.world) > 0).tolist()
        self.stop_requested = stop[0]
        return any(stop)

    # ------------------------------------------------------- checkpoints
    def trainer_state(self, elapsed: float) -> dict:
        rng = encode_rng(torch.get_rng_state())
        states = [None] * self.world.world_size
        if self.world.distributed:
            torch.distributed.all_gather_object(states, rng)
        else:
            states = [rng]
        return {
            "step": self.step,
            "data_position": self.data_position,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed_before + elapsed,
            "skipped": self.skipped,
            "rollbacks": self.rollbacks,
            "best_val": self.best_val,
            "best": self.best,
            "guard": self.guard.state(),
            "world_size": self.world.world_size,
            "rng": states,
            "hooks": self.hooks.state_dict(),
            "config": vars(self.config),
        }

    def save(self, elapsed: float) -> Path:
        """Every rank calls it: a full checkpoint gathers the state to rank 0, which writes it; a sharded
        one has every rank write its own pieces."""
        state = self.trainer_state(elapsed)
        path = self.run_directory / "checkpoints" / f"step_{self.step:08d}"
        best = self.best["step"] if self.best else 0
        spare = self.run_directory / "checkpoints" / f"step_{best:08d}" if best else None
        if self.config.checkpoint_format == "sharded":
            save_sharded_checkpoint(
                self.run_directory,
                self.step,
                self.wrapped,
                self.optimizer,
                self.model_config,
                state,
                self.metadata,
                self.tokenizer,
                self.config.keep_last,
                self.hooks.language_model,
                spare,
                self.world.is_main,
            )
        else:
            model_state, optimizer_state = gather_state(self.wrapped, self.optimizer)
            model_state, extra_weights = split_weights(model_state, self.hooks.language_model)
            if self.world.is_main:
                save_training_checkpoint(
                    self.run_directory,
                    self.step,
                    model_state,
                    optimizer_state,
                    self.model_config,
                    state,
                    self.metadata,
                    self.tokenizer,
                    self.config.keep_last,
                    extra_weights,
                    spare,
                )
        if self.world.is_main and best == self.step:  # only once the checkpoint is complete on disk, as for ``latest``
            atomic_write_text(self.run_directory / BEST, f"checkpoints/{path.name}\n")
        distributed.barrier(self.world)
        return path

    def _resume_or_start(self) -> int | None:
        """Load the latest checkpoint when resuming; refuse to write over a previous run otherwise."""
        torch.manual_seed(self.config.seed + self.world.rank)
        has_checkpoint = (self.run_directory / LATEST).is_file()
        if not self.config.resume:
            if has_checkpoint:
                raise ConfigError(
                    "out",
                    self.config.out,
                    "already holds a run; pass --train.resume to continue it or choose another --train.out",
                )
            return None
        if not has_checkpoint:
            raise ConfigError("resume", True, f"no checkpoint in {self.run_directory} to resume from")
        state = self._load_checkpoint()
        self.hooks.load_state_dict(state.get("hooks", {}))
        return self.step

    def _load_checkpoint(self) -> dict:
        """Model and optimizer from the newest intact checkpoint; its trainer state restored and returned."""
        state = load_training_checkpoint(
            self.run_directory,
            self.wrapped,
            self.optimizer,
            self.model_config,
            self.hooks.language_model,
            self.metadata.get("stage"),
        )
        self._load_state(state)
        return state

    def _load_state(self, state: dict) -> None:
        self.step, self.data_position, self.tokens_seen = state["step"], state["data_position"], state["tokens_seen"]
        self.elapsed_before, self.skipped, self.rollbacks = state["elapsed_s"], state["skipped"], state["rollbacks"]
        self.best_val, self.best = state["best_val"], state.get("best")
        self.guard.load(state["guard"])
        if state["world_size"] == self.world.world_size:
            torch.set_rng_state(decode_rng(state["rng"][self.world.rank]))

    def _roll_back(self, log: MetricsLog) -> None:
        """Return to the last good checkpoint but keep the data position: the batches since then,
        which produced the spikes, are skipped (Chowdhery et al. 2022, §5.1)."""
        if self.rollbacks >= self.config.max_rollbacks or not (self.run_directory / LATEST).is_file():
            raise TrainingDiverged(
                f"{self.run_directory}: loss spiked {self.guard.consecutive} times in a row at step "
                f"{self.step} after {self.rollbacks} rollbacks; lower --train.lr or inspect the data"
            )
        kept = self.data_position, self.tokens_seen, self.skipped, self.rollbacks + 1
        self._load_checkpoint()
        self.data_position, self.tokens_seen, self.skipped, self.rollbacks = kept
        self.guard.consecutive = 0
        log.add(step=self.step, tokens=self.tokens_seen, event=f"rollback to step {self.step}")
