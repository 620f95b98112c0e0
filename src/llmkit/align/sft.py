"""``llmkit sft``: supervised fine-tuning of a checkpoint on conversations, full or with LoRA.

The data are dataset files in any format :func:`llmkit.tasks.datasets.load_conversations` reads
(``messages``, ``prompt``/``completion``, Alpaca, ShareGPT, Self-Instruct seed tasks) and the embedded
tasks by name (``arithmetic``, ``arithmetic_plain``, ``functions``; ``name:N`` for N conversations),
so everything runs offline. A conversation's task is its own label (a seed task's name, an embedded
task's name) or else its file's name; tasks are mixed examples-proportionally with a cap and packed
several conversations to a row, the loss on the assistant's tokens only
(:mod:`llmkit.align.conversation_batches`). A fraction of every task is held out for the validation loss.

Training is the one :class:`~llmkit.train.trainer.Trainer` with :func:`sft_loss`: schedules, mixed
precision, checkpoints, exact resume, metrics.csv and loss curves are the pretraining run's. With
``--lora.rank R`` the base is frozen and LoRA adapters are trained (:mod:`llmkit.model.lora`); the run's
checkpoints then hold base weights and adapters (``<module>.lora_A``/``lora_B``), which resume needs.
When a LoRA run completes it writes the adapters alone to ``<out>/adapters`` and, with ``merge`` (the
default), rewrites its final checkpoint with the adapters merged into the weights: the run directory
is then a plain checkpoint that every later stage, the engine and the exporters load as is.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from llmkit.align.conversation_batches import ConversationBatches, tokenize_conversations
from llmkit.chat import Conversation
from llmkit.config import check
from llmkit.errors import ConfigError, InputError
from llmkit.io import atomic_directory, atomic_write_json, read_json
from llmkit.model.checkpoint import LATEST, load_checkpoint, load_model, read_config, resolve_checkpoint, write_model
from llmkit.model.lora import LoRAConfig, apply_lora, merge_lora, save_adapters
from llmkit.model.transformer import Transformer
from llmkit.tasks.registry import TASK_NAMES, embedded_task
from llmkit.token_data import check_tokenizer
from llmkit.tokenizer import Tokenizer
from llmkit.train import distributed
from llmkit.train.batches import TokenBatches
from llmkit.train.config import TrainConfig
from llmkit.train.objectives import IGNORE_INDEX
from llmkit.train.trainer import Trainer

__all__ = [
    "ConversationBatches",
    "SFTConfig",
    "dataset_source",
    "load_datasets",
    "sft",
    "sft_loss",
    "sft_training",
]

ADAPTERS_DIRECTORY = "adapters"


def sft_training(**changes) -> TrainConfig:
    """The training loop's settings with fine-tuning defaults (``changes`` override them): a smaller peak
    learning rate and warmup than pretraining, and a looser spike guard (batches of conversations differ
    more than windows of text do)."""
    return TrainConfig(
        **{"out": "runs/sft", "lr": 1e-4, "warmup_steps": 20, "eval_interval": 50, "spike_ratio": 4.0, **changes}
    )


@dataclass
class SFTConfig:
    base: str = field(
        default="runs/base", metadata={"help": "checkpoint to fine-tune (run directory or checkpoint folder)"}
    )
    datasets: list[str] = field(
        default_factory=lambda: ["arithmetic"],
        metadata={
            "help": f"dataset files (messages, prompt/completion, Alpaca, ShareGPT, seed tasks) and embedded tasks "
            f"({', '.join(TASK_NAMES)}; name:N for N conversations)"
        },
    )
    generated_examples: int = field(
        default=2000, metadata={"help": "conversations generated for an embedded task named without :N"}
    )
    task_cap: int | None = field(
        default=None,
        metadata={
            "help": "examples-proportional mixing limit K: a task contributes at most K conversations per epoch "
            "(Raffel et al. 2020)"
        },
    )
    val_fraction: float = field(
        default=0.05, metadata={"help": "fraction of every task held out for the validation loss"}
    )
    sequence_length: int | None = field(
        default=1024,
        metadata={
            "help": "tokens per training row, conversations packed to it (at most the model's context; none = the "
            "model's context, e.g. 8,192 for SmolLM2, which a CPU may not hold)"
        },
    )
    overlong: Literal["truncate", "drop"] = field(
        default="truncate",
        metadata={"help": "conversations longer than a training row: cut them to it, or leave them out"},
    )
    epochs: float | None = field(
        default=3.0,
        metadata={
            "help": "passes over the task mixture (with max_steps, max_tokens or max_time: whichever ends first)"
        },
    )
    pretrain_data: str | None = field(
        default=None, metadata={"help": "token data directory mixed in as a regulariser (loss on all its tokens)"}
    )
    pretrain_fraction: float = field(
        default=0.0, metadata={"help": "fraction of every batch's rows taken from pretrain_data"}
    )
    merge: bool = field(
        default=True,
        metadata={
            "help": "LoRA: merge the adapters into the final checkpoint's weights (adapters are saved alone either way)"
        },
    )
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=sft_training)

    def __post_init__(self) -> None:
        check(len(self.datasets) > 0, "datasets", self.datasets, "name at least one dataset file or embedded task")
        for entry in self.datasets:
            dataset_source(entry, self.generated_examples)  # a bad count fails now
        check(self.generated_examples > 0, "generated_examples", self.generated_examples, "must be positive")
        check(
            self.sequence_length is None or self.sequence_length > 1,
            "sequence_length",
            self.sequence_length,
            "must be at least 2 tokens",
        )
        check(self.task_cap is None or self.task_cap > 0, "task_cap", self.task_cap, "must be positive")
        check(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction, "must be in [0, 1)")
        check(self.epochs is None or self.epochs > 0, "epochs", self.epochs, "must be positive")
        check(0 <= self.pretrain_fraction < 1, "pretrain_fraction", self.pretrain_fraction, "must be in [0, 1)")
        check(
            (self.pretrain_fraction > 0) == (self.pretrain_data is not None),
            "pretrain_fraction",
            self.pretrain_fraction,
            "give pretrain_data together with a positive pretrain_fraction",
        )
        check(
            self.pretraining_rows < self.train.batch_size,
            "pretrain_fraction",
            self.pretrain_fraction,
            f"leaves no conversation rows in a batch of {self.train.batch_size}",
        )
        check(
            self.train.target_val_bpb is None,
            "target_val_bpb",
            self.train.target_val_bpb,
            "the validation loss of fine-tuning is on assistant tokens, not bits per byte of text",
        )
        check(
            not (self.lora.enabled and self.train.optimizer == "muon"),
            "optimizer",
            self.train.optimizer,
            "LoRA trains rank-r factors, which Muon's orthogonalised updates are not meant for; use adamw",
        )
        check(
            bool(self.epochs or self.train.max_steps or self.train.max_tokens or self.train.max_time),
            "epochs",
            self.epochs,
            "give a budget: epochs, max_steps, max_tokens or max_time",
        )

    @property
    def pretraining_rows(self) -> int:
        """Rows of every batch taken from the pretraining data (at least one when mixing)."""
        return max(1, round(self.pretrain_fraction * self.train.batch_size)) if self.pretrain_fraction else 0


# --------------------------------------------------------------------------------- data
def dataset_source(entry: str, default_count: int) -> tuple[str, int | None]:
    """``(embedded task, count)`` for ``name`` or ``name:N``; ``(path, None)`` for a file. Every stage
    that reads datasets (SFT, reward model, DPO) names them so."""
    name, _, count = entry.partition(":")
    if name not in TASK_NAMES:
        return entry, None
    if not count:
        return name, default_count
    check(
        count.isdigit() and int(count) > 0,
        "datasets",
        entry,
        "an embedded task's count (name:N) must be a positive integer",
    )
    return name, int(count)


def load_datasets(entries: list[str], default_count: int, seed: int) -> list[Conversation]:
    """Every conversation of the datasets, each labelled with its task."""
    from llmkit.tasks.datasets import load_conversations

    conversations = []
    for entry in entries:
        source, count = dataset_source(entry, default_count)
        if count is not None:
            conversations += embedded_task(source).conversations(count, seed)
            continue
        if not Path(source).is_file():
            raise InputError(f"{source}: dataset file not found (nor an embedded task: {', '.join(TASK_NAMES)})")
        label = Path(source).name.split(".")[0]
        conversations += [Conversation(item.messages, item.task or label) for item in load_conversations(source)]
    return conversations


def split_validation(
    conversations: list[Conversation], fraction: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """Hold out ``round(fraction * n)`` random conversations of every task of n (never all of them)."""
    by_task: dict[str, list[Conversation]] = {}
    for conversation in conversations:
        by_task.setdefault(conversation.task, []).append(conversation)
    train, validation = [], []
    for task in sorted(by_task):
        members = by_task[task]
        # Seeded by the task's name, so a task's split does not depend on the other datasets of the run.
        order = np.random.default_rng((seed, zlib.crc32(task.encode("utf-8")))).permutation(len(members))
        held_out = min(round(fraction * len(members)), len(members) - 1)
        validation += [members[position] for position in order[:held_out]]
        train += [members[position] for position in order[held_out:]]
    return train, validation


# --------------------------------------------------------------------------------- loss
def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy over the batch's counted targets (assistant tokens, and every token of
    pretraining rows), each packed conversation attending only to itself; with pretraining rows the
    two parts' losses are reported apart as ``sft_loss`` and ``pretrain_loss``."""
    targets = batch["targets"]
    token_losses = model(batch["input_ids"], document_ids=batch["document_ids"], targets=targets)
    counted = targets != IGNORE_INDEX
    loss, metrics = token_losses.sum() / counted.sum().clamp(min=1), {}
    pretraining = batch.get("pretraining")
    if pretraining is not None and bool(pretraining.any()):
        detached = token_losses.detach()
        for name, rows in (("sft_loss", ~pretraining), ("pretrain_loss", pretraining)):
            metrics[name] = float(detached[rows].sum() / counted[rows].sum().clamp(min=1))
    return loss, metrics


# ------------------------------------------------------------------------------ the stage
def _check_resume(config: SFTConfig) -> None:
    """A resumed run must use the adapters it was started with and must not have merged them yet."""
    out = Path(config.train.out)
    if not (config.train.resume and (out / LATEST).is_file()):
        return
    saved = read_config(resolve_checkpoint(out)).get("lora")
    if saved and saved.get("merged"):
        raise ConfigError(
            "resume",
            True,
            f"{out} finished and merged its LoRA adapters into its weights; "
            f"fine-tune further in a new run with --base {out}",
        )
    wanted = dataclasses.asdict(config.lora) if config.lora.enabled else None
    if saved != wanted:
        raise ConfigError("rank", config.lora.rank, f"{out} was trained with LoRA settings {saved}, not {wanted}")


def _with_budget(config: SFTConfig, batches: ConversationBatches, context_length: int, val_rows: int) -> TrainConfig:
    """The training settings with ``epochs`` as a token budget (what the loop counts) and at most as
    many validation batches as the held-out rows fill."""
    train = config.train
    changes: dict = {"eval_batches": max(1, min(train.eval_batches, -(-val_rows // train.batch_size)))}
    if config.epochs:
        micro_batches = -(-batches.rows_in_epochs(config.epochs) // batches.conversation_rows)
        epoch_tokens = micro_batches * train.batch_size * context_length
        changes["max_tokens"] = min(train.max_tokens or epoch_tokens, epoch_tokens)
    return dataclasses.replace(train, **changes)


def _finish_lora(config: SFTConfig, checkpoint: Path, base: Path, metadata: dict, tokenizer: Tokenizer) -> dict:
    """Save the adapters of the final checkpoint alone; with ``merge``, rewrite that checkpoint as plain
    merged weights (without optimizer state: the run is complete and not resumable with adapters any
    more). Works from the files, so it is the same after DDP or FSDP training."""
    model, _ = load_model(
        checkpoint, model_class=lambda model_config: apply_lora(Transformer(model_config), config.lora)
    )
    adapters = save_adapters(model, Path(config.train.out) / ADAPTERS_DIRECTORY, base_checkpoint=base)
    if not config.merge:
        return {"adapters": str(adapters), "merged": False}
    merge_lora(model)
    trainer_state = read_json(checkpoint / "trainer_state.json")
    with atomic_directory(checkpoint) as building:
        write_model(
            building,
            model.state_dict(),
            model.config,
            {**metadata, "lora": {**metadata["lora"], "merged": True, "adapters": str(adapters.resolve())}},
        )
        tokenizer.save(building)
        atomic_write_json(building / "trainer_state.json", trainer_state)
    return {"adapters": str(adapters), "merged": True}


def sft(config: SFTConfig) -> dict:
    """Fine-tune ``config.base`` on the conversations of ``config.datasets``; returns the run summary."""
    train = config.train
    _check_resume(config)
    loaded = load_checkpoint(config.base)
    model, tokenizer, base = loaded.model, loaded.tokenizer, loaded.path
    context_length = min(config.sequence_length or model.config.context_length, model.config.context_length)
    conversations = load_datasets(config.datasets, config.generated_examples, train.seed)
    train_conversations, val_conversations = split_validation(conversations, config.val_fraction, train.seed)
    train_examples, fitted = tokenize_conversations(tokenizer, train_conversations, context_length, config.overlong)
    val_examples, val_fitted = tokenize_conversations(tokenizer, val_conversations, context_length, config.overlong)
    if not train_examples:
        raise InputError(
            f"{', '.join(config.datasets)}: no conversation with assistant tokens fits a training row of "
            f"{context_length} tokens (sequence_length)"
        )
    pretraining = None
    if config.pretraining_rows:
        pretraining = TokenBatches(
            config.pretrain_data, "train", config.pretraining_rows, context_length, seed=train.seed
        )
        check_tokenizer(pretraining.manifest, tokenizer)
    train_batches = ConversationBatches(
        train_examples,
        train.batch_size,
        context_length,
        tokenizer.pad_id,
        train.seed,
        config.task_cap,
        pretraining,
        config.pretraining_rows,
    )
    val_batches = (
        ConversationBatches(val_examples, train.batch_size, context_length, tokenizer.pad_id, train.seed)
        if val_examples
        else None
    )
    val_rows = len(val_batches.epoch_rows(0)) if val_batches else 0
    train = _with_budget(config, train_batches, context_length, val_rows)

    if config.lora.enabled:
        torch.manual_seed(train.seed)  # the adapters' initialisation, the same on every rank and every run
        apply_lora(model, config.lora)
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    model.train()  # load_model returns it in evaluation mode, which would switch dropout off
    metadata = {
        "stage": "sft",
        "stage_config": dataclasses.asdict(config),
        "tokenizer_sha256": tokenizer.sha256,
        "base": str(base.resolve()),
        "lora": dataclasses.asdict(config.lora) if config.lora.enabled else None,
    }
    trainer = Trainer(
        model,
        train_batches,
        train,
        val_batches=val_batches,
        loss_fn=sft_loss,
        tokenizer=tokenizer,
        metadata=metadata,
        tokens_per_batch=train.batch_size * context_length,
    )
    summary = trainer.run()
    lora = {"adapters": None, "merged": False}
    if config.lora.enabled and not summary["interrupted"]:
        if trainer.world.is_main:
            lora = _finish_lora(config, Path(summary["checkpoint"]), base, metadata, tokenizer)
        distributed.barrier(trainer.world)

    tasks = {
        task: {
            "train": len(members),
            "val": sum(example.task == task for example in val_examples),
            "rate": round(train_batches.rates[task], 4),
        }
        for task, members in zip(train_batches.tasks, train_batches.members)
    }
    return {
        "base": str(base),
        "tasks": tasks,
        "truncated": fitted["truncated"] + val_fitted["truncated"],
        "dropped": fitted["dropped"] + val_fitted["dropped"],
        **train_batches.statistics(),
        "pretraining_rows": config.pretraining_rows,
        "trainable_parameters": trainable,
        "lora_rank": config.lora.rank,
        **lora,
        **summary,
    }
