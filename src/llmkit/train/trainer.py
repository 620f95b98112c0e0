"""The one training loop.

Pretraining, instruction tuning, reward modelling and DPO differ only in the batches they feed and the
``loss_fn`` (model, batch) -> (loss, metrics) they pass; everything else lives here: optimizer groups and
schedule, batch-size warmup, mixed precision, gradient accumulation and clipping, the loss-spike guard
with rollback, checkpoints and exact resume, validation, logging (with the loss function's metrics),
budgets and DDP/FSDP2 under ``torchrun``.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from llmkit.errors import ConfigError, LlmkitError
from llmkit.model.checkpoint import LATEST
from llmkit.train import distributed
from llmkit.train.checkpoint import decode_rng, encode_rng, gather_state, load_training_checkpoint, save_training_checkpoint
from llmkit.train.config import TrainConfig
from llmkit.train.metrics import MetricsLog, ThroughputMeter, measured_peak_flops
from llmkit.train.objectives import causal_lm_loss
from llmkit.train.optim import build_muon, build_optimizer, learning_rate

LossFunction = Callable[[nn.Module, dict], tuple[torch.Tensor, dict]]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BatchSource(Protocol):
    def get_batch(self, index: int) -> dict[str, torch.Tensor]: ...


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


class SpikeGuard:
    """Loss-spike and NaN detection (the survey's §4.3; PaLM restarts ~100 steps earlier and skips
    the offending batches). A step is bad when its loss or gradient norm is not finite, or its loss
    exceeds ``ratio`` times the running mean of accepted losses."""

    def __init__(self, ratio: float, warmup: int = 10, momentum: float = 0.9):
        self.ratio, self.warmup, self.momentum = ratio, warmup, momentum
        self.mean: float | None = None
        self.accepted = 0
        self.consecutive = 0

    def is_bad(self, loss: float, grad_norm: float, check_grad: bool = True) -> bool:
        bad = not math.isfinite(loss) or (check_grad and not math.isfinite(grad_norm))
        if not bad and self.mean is not None and self.accepted >= self.warmup:
            bad = loss > self.ratio * self.mean
        if bad:
            self.consecutive += 1
            return True
        self.consecutive = 0
        self.accepted += 1
        self.mean = loss if self.mean is None else self.momentum * self.mean + (1 - self.momentum) * loss
        return False

    def state(self) -> dict:
        return {"mean": self.mean, "accepted": self.accepted, "consecutive": self.consecutive}

    def load(self, state: dict) -> None:
        self.mean, self.accepted, self.consecutive = state["mean"], state["accepted"], state["consecutive"]


def _format_validation(val_loss: float | None, val_bpb: float | None) -> dict:
    return {"val_loss": "" if val_loss is None else f"{val_loss:.5f}", "val_bpb": "" if val_bpb is None else f"{val_bpb:.4f}"}


class Trainer:
    def __init__(self, model: nn.Module, train_batches: BatchSource, config: TrainConfig, *,
                 val_batches=None, loss_fn: LossFunction = causal_lm_loss, tokenizer=None,
                 metadata: dict | None = None, tokens_per_batch: int | None = None):
        """``model`` is the bare :class:`~llmkit.model.Transformer`; the trainer wraps it for DDP/FSDP and
        ``torch.compile``. ``tokens_per_batch`` counts the tokens of one micro-batch (for throughput);
        by default batch_size * context_length. ``metadata`` goes into every checkpoint's config.json."""
        config.check_budget()
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = DTYPES[config.dtype]
        if self.dtype == torch.float16 and self.device.type != "cuda":
            raise ConfigError("dtype", config.dtype, "float16 training needs CUDA; use bfloat16 on the CPU")
        self.world = distributed.init_world(self.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.world.local_rank)
        self.model = model.to(self.device)
        self.model_config = model.config
        self.model.gradient_checkpointing = config.activation_checkpointing
        self.wrapped = distributed.wrap_model(self.model, self.world, config.parallelism, self.device)
        self.forward_model = torch.compile(self.wrapped) if config.compile else self.wrapped
        fused = not (self.world.distributed and config.parallelism == "fsdp")
        betas = (config.beta1, config.beta2)
        if config.optimizer == "muon":
            self.optimizer = build_muon(self.model, config.lr, config.weight_decay, betas, config.muon_lr,
                                        config.muon_momentum, config.muon_weight_decay, fused=fused)
        else:
            self.optimizer = build_optimizer(self.wrapped, config.lr, config.weight_decay, betas, fused=fused)
        # The schedule scales every group by one factor of its own peak (AdamW's and Muon's differ).
        self.peak_lrs = [group["lr"] for group in self.optimizer.param_groups]
        # float16 has too little range for small gradients: scale the loss up, unscale before the step.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        self.train_batches, self.val_batches, self.loss_fn = train_batches, val_batches, loss_fn
        self.tokenizer, self.metadata = tokenizer, metadata or {}
        self.run_directory = Path(config.out)
        self.micro_batches_per_step = config.grad_accum * self.world.world_size
        self.tokens_per_step = (tokens_per_batch or config.batch_size * self.model_config.context_length) * self.micro_batches_per_step
        self.guard = SpikeGuard(config.spike_ratio)
        self.step = 0
        self.data_position = 0
        self.tokens_seen = 0
        self.elapsed_before = 0.0
        self.skipped = 0
        self.rollbacks = 0
        self.best_val: float | None = None
        self.signals = StopSignals()
        self.stop_requested = False

    # ----------------------------------------------------------------- the loop
    def run(self) -> dict:
        """Train until a budget is spent or a stop signal comes; returns the summary. The signals stay
        caught until the final checkpoint is written, so a SIGTERM during it does not cut it short."""
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
        meter = ThroughputMeter(self.model.flops_per_token(), self.world.world_size *
                                measured_peak_flops(self.dtype if self.dtype != torch.float16 else torch.bfloat16, self.device))
        start_time = time.perf_counter()
        last_loss, last_metrics, validation, target_reached = float("nan"), {}, (None, None), False
        bar = tqdm(total=config.max_steps, initial=self.step, disable=not (config.progress and self.world.is_main),
                   desc="train", unit="step", dynamic_ncols=True)
        try:
            while not (target_reached or self._should_stop(time.perf_counter() - start_time)):
                factor = learning_rate(self.step, self._budget_used(time.perf_counter() - start_time), 1.0,
                                       config.warmup_steps, config.schedule, config.min_lr_ratio, config.decay_fraction)
                for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):
                    group["lr"] = peak * factor
                lr = config.lr * factor
                rows = self.rows_per_batch()
                loss, grad_norm, metrics = self._forward_backward(rows)
                self.data_position += 1
                step_tokens = self.tokens_per_step * rows // config.batch_size
                self.tokens_seen += step_tokens
                meter.add(step_tokens)
                if self.guard.is_bad(loss, grad_norm, check_grad=not self.scaler.is_enabled()):
                    self.optimizer.zero_grad(set_to_none=True)
                    self.skipped += 1
                    log.add(step=self.step, tokens=self.tokens_seen, loss=loss, lr=lr, event="skipped")
                    if self.guard.consecutive >= config.rollback_after:
                        self._roll_back(log)
                    continue
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                last_loss, last_metrics = loss, metrics
                bar.update(1)
                evaluate_now = config.eval_interval and self.step % config.eval_interval == 0
                if self.step % config.log_interval == 0 or evaluate_now:
                    # The loss function's metrics first: a metric named like a trainer column does not replace it.
                    row = {**{name: f"{value:.6g}" for name, value in metrics.items()},
                           **dict(step=self.step, tokens=self.tokens_seen, loss=f"{loss:.5f}", lr=f"{lr:.3e}", grad_norm=f"{grad_norm:.4f}",
                                  elapsed_s=f"{self.elapsed_before + time.perf_counter() - start_time:.1f}", **meter.window())}
                    if evaluate_now:
                        validation = self.evaluate()
                        row.update(_format_validation(*validation))
                        target_reached = bool(config.target_val_bpb and validation[1] is not None
                                              and validation[1] <= config.target_val_bpb)
                    log.add(**row)
                    if evaluate_now and self.world.is_main:
                        log.flush()
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{float(row['tokens_per_s']):,.0f}", mfu=f"{float(row['mfu']):.1%}",
                                    **({"val": f"{validation[0]:.3f}"} if validation[0] is not None else {}))
                    meter.restart()
                if self.step % config.checkpoint_interval == 0:
                    # Rows first: a crash between the two leaves rows past the checkpoint, which resume drops,
                    # rather than a checkpoint whose rows are missing for good.
                    if self.world.is_main:
                        log.flush()
                    self.save(time.perf_counter() - start_time)
        finally:
            bar.close()
        elapsed = time.perf_counter() - start_time
        if not (self.stop_requested or target_reached) or validation[0] is None:
            validation = self.evaluate()
        log.add(step=self.step, tokens=self.tokens_seen, elapsed_s=f"{self.elapsed_before + elapsed:.1f}",
                event="interrupted" if self.stop_requested else "end", **_format_validation(*validation))
        if self.world.is_main:
            log.flush()
        checkpoint = self.save(elapsed)
        if self.world.is_main:
            log.plot(self.run_directory / "loss.png", title=self.metadata.get("stage", "training"))
        log.close()
        tokens_per_s = (self.tokens_seen - tokens_at_start) / max(elapsed, 1e-9)
        val_loss, val_bpb = validation
        return {
            "steps": self.step, "tokens": self.tokens_seen, "seconds": round(self.elapsed_before + elapsed, 2),
            "tokens_per_s": round(tokens_per_s, 1), "mfu": round(meter.mfu(tokens_per_s), 4),
            "train_loss": round(last_loss, 5), "val_loss": None if val_loss is None else round(val_loss, 5),
            "val_bpb": None if val_bpb is None else round(val_bpb, 5), "skipped_batches": self.skipped,
            "rollbacks": self.rollbacks, "interrupted": self.stop_requested, "target_reached": target_reached,
            "checkpoint": str(checkpoint), "parameters": self.model.num_parameters(), "peak_flops": meter.peak_flops,
            "train_metrics": {name: round(value, 6) for name, value in last_metrics.items()},
        }

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
        kept = slice(rows) if rows < self.config.batch_size else slice(None)
        for micro in range(accumulate):
            # Rank r takes micro-batches r*accumulate .. of each global step, so N ranks with accumulation
            # A see exactly the batches one process sees with accumulation N*A.
            index = self.data_position * self.micro_batches_per_step + self.world.rank * accumulate + micro
            batch = {key: value[kept].to(self.device, non_blocking=True) for key, value in self.train_batches.get_batch(index).items()}
            # DDP all-reduces gradients on every backward; only the last micro-batch needs it.
            sync = micro == accumulate - 1 or not isinstance(self.wrapped, nn.parallel.DistributedDataParallel)
            with (contextlib.nullcontext() if sync else self.wrapped.no_sync()), self._autocast():
                loss, metrics = self.loss_fn(self.forward_model, batch)
            self.scaler.scale(loss / accumulate).backward()
            total += loss.detach()
            for name, value in metrics.items():
                if isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1):
                    value = torch.as_tensor(value, dtype=torch.float32, device=self.device).detach().reshape(())
                    metric_totals[name] = metric_totals.get(name, 0) + value
        # One all-reduce for the loss and the metrics together.
        means = distributed.all_reduce_mean(torch.stack([total, *metric_totals.values()]) / accumulate, self.world).tolist()
        loss, metrics = means[0], dict(zip(metric_totals, means[1:]))
        self.scaler.unscale_(self.optimizer)
        if self.config.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), self.config.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.wrapped.parameters() if p.grad is not None])
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        return loss, float(grad_norm), metrics

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    @torch.no_grad()
    def evaluate(self) -> tuple[float | None, float | None]:
        """Mean validation loss over a fixed set of windows, and bits per byte when the data knows its bytes."""
        if self.val_batches is None:
            return None, None
        self.forward_model.eval()
        total = torch.zeros(2, device=self.device)
        for index in range(self.world.rank, self.config.eval_batches, self.world.world_size):
            batch = {key: value.to(self.device) for key, value in self.val_batches.sequential_batch(index).items()}
            with self._autocast():
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
        return max(fractions) if fractions else None

    def _should_stop(self, elapsed: float) -> bool:
        """Whether a stop signal came or the budget is spent. Under torchrun the ranks stop together when
        any one must: their clocks differ, and a signal reaches them during different steps."""
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
        return {"step": self.step, "data_position": self.data_position, "tokens_seen": self.tokens_seen,
                "elapsed_s": self.elapsed_before + elapsed, "skipped": self.skipped, "rollbacks": self.rollbacks,
                "best_val": self.best_val, "guard": self.guard.state(), "world_size": self.world.world_size,
                "rng": states, "config": vars(self.config)}

    def save(self, elapsed: float) -> Path:
        model_state, optimizer_state = gather_state(self.wrapped, self.optimizer)
        state = self.trainer_state(elapsed)
        path = self.run_directory / "checkpoints" / f"step_{self.step:08d}"
        if self.world.is_main:
            path = save_training_checkpoint(self.run_directory, self.step, model_state, optimizer_state, self.model_config,
                                            state, self.metadata, self.tokenizer, self.config.keep_last)
        distributed.barrier(self.world)
        return path

    def _resume_or_start(self) -> int | None:
        """Load the latest checkpoint when resuming; refuse to write over a previous run otherwise."""
        torch.manual_seed(self.config.seed + self.world.rank)
        has_checkpoint = (self.run_directory / LATEST).is_file()
        if not self.config.resume:
            if has_checkpoint:
                raise ConfigError("out", self.config.out, "already holds a run; pass --resume to continue it or choose another --out")
            return None
        if not has_checkpoint:
            raise ConfigError("resume", True, f"no checkpoint in {self.run_directory} to resume from")
        self._load_state(load_training_checkpoint(self.run_directory, self.wrapped, self.optimizer, self.model_config))
        return self.step

    def _load_state(self, state: dict) -> None:
        self.step, self.data_position, self.tokens_seen = state["step"], state["data_position"], state["tokens_seen"]
        self.elapsed_before, self.skipped, self.rollbacks = state["elapsed_s"], state["skipped"], state["rollbacks"]
        self.best_val = state["best_val"]
        self.guard.load(state["guard"])
        if state["world_size"] == self.world.world_size:
            torch.set_rng_state(decode_rng(state["rng"][self.world.rank]))

    def _roll_back(self, log: MetricsLog) -> None:
        """Return to the last good checkpoint but keep the data position: the batches since then,
        which produced the spikes, are skipped (Chowdhery et al. 2022, §5.1)."""
        if self.rollbacks >= self.config.max_rollbacks or not (self.run_directory / LATEST).is_file():
            raise TrainingDiverged(f"{self.run_directory}: loss spiked {self.guard.consecutive} times in a row at step "
                                   f"{self.step} after {self.rollbacks} rollbacks; lower --lr or inspect the data")
        kept = self.data_position, self.tokens_seen, self.skipped, self.rollbacks + 1
        self._load_state(load_training_checkpoint(self.run_directory, self.wrapped, self.optimizer, self.model_config))
        self.data_position, self.tokens_seen, self.skipped, self.rollbacks = kept
        self.guard.consecutive = 0
        log.add(step=self.step, tokens=self.tokens_seen, event=f"rollback to step {self.step}")
