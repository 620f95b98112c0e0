"""Preference data for the reward model and DPO: comparison groups, their batches, sequence log-probs.

A preference row is a prompt with K >= 2 responses ranked best first: a pair (``chosen`` then
``rejected``, K = 2) or a ranking (:class:`~llmkit.chat.Ranking`). The data are files in any format
:func:`llmkit.tasks.datasets.load_preferences` reads, or the embedded tasks' generated pairs by name
(``arithmetic``, ``arithmetic_plain``, ``functions``; ``name:N`` for N problems), whose held-out
split gives the validation pairs, so a held-out accuracy never sees a training problem.

**Groups.** Each response is rendered after its prompt (:func:`llmkit.chat.render_completion`): the
ids of prompt + response and a mask True exactly on the tokens the assistant writes in the
response, its closing ``<|end|>`` included. A group of K responses stands for all K(K-1)/2
(better, worse) pairs (:func:`comparison_pairs`), and a batch holds whole groups: InstructGPT
(Ouyang et al. 2022 §3.5) found that a ranking's comparisons, shuffled into separate batches, make
the reward model overfit within one epoch, and keeping them together costs one forward pass per
response instead of one per comparison.

**Batches.** ``batch_size`` groups per batch, rows right-padded to the batch's longest (padding
comes after every real token, so causal attention never sees it)::

    input_ids          (rows, length)   pad_id after each sequence
    continuation_mask  (rows, length)   True on the response tokens whose log-probs count
    last_index         (rows,)          the last real token: where the reward head reads
    chosen_index       (pairs,)         row of the better response of each pair
    rejected_index     (pairs,)         row of the worse one
    pair_weight        (pairs,)         1 / (pairs of its group): every prompt weighs the same (InstructGPT)
    reference_logps    (rows,)          DPO, once computed: the frozen reference's sequence log-probs

Pairs index rows, so a batch cannot be cut to its first rows: the training loop's batch-size
warmup is refused. Batch ``i`` is a pure function of ``(seed, i)`` (epoch ``e`` is a seeded
permutation of the groups), as the loop's exact resume and ``torchrun`` split need.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from llmkit.align.sft import dataset_source
from llmkit.chat import Preference, Ranking, render_completion
from llmkit.config import check
from llmkit.errors import InputError
from llmkit.tasks.registry import TASK_NAMES, embedded_task
from llmkit.tokenizer import Tokenizer
from llmkit.train.config import TrainConfig
from llmkit.train.objectives import IGNORE_INDEX

PreferenceRow = Preference | Ranking


def comparison_pairs(count: int) -> list[tuple[int, int]]:
    """(better, worse) indices of ``count`` responses ranked best first: all count(count-1)/2 pairs,
    in the order of :meth:`llmkit.chat.Ranking.pairs`."""
    return [(better, worse) for better in range(count) for worse in range(better + 1, count)]


# ----------------------------------------------------------------------------------- data
def load_preference_datasets(
    entries: list[str], generated_pairs: int, val_fraction: float, seed: int
) -> tuple[list[PreferenceRow], list[PreferenceRow]]:
    """(training rows, validation rows) of dataset files and embedded tasks. A file gives
    ``round(val_fraction * n)`` random rows of its n to validation (never all); an embedded task of N
    problems gives pairs of ``ceil(val_fraction * N)`` problems of its held-out split."""
    train: list[PreferenceRow] = []
    validation: list[PreferenceRow] = []
    for entry in entries:
        source, count = dataset_source(entry, generated_pairs)
        if count is not None:
            task = embedded_task(source)
            train += task.preferences(count, seed, "train")
            if val_fraction:
                validation += task.preferences(math.ceil(val_fraction * count), seed, "heldout")
            continue
        if not Path(source).is_file():
            raise InputError(f"{source}: preference file not found (nor an embedded task: {', '.join(TASK_NAMES)})")
        from llmkit.tasks.datasets import load_preferences

        rows = load_preferences(source)
        order = np.random.default_rng(seed).permutation(len(rows))
        held_out = min(round(val_fraction * len(rows)), len(rows) - 1)
        validation += [rows[index] for index in order[:held_out]]
        train += [rows[index] for index in order[held_out:]]
    return train, validation


@dataclass
class ComparisonGroup:
    """One prompt's responses, best first, each rendered after the prompt with its response mask."""

    sequences: list[np.ndarray]
    masks: list[np.ndarray]
    reference_logps: np.ndarray | None = None  # (responses,) float32, filled in by DPO

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return comparison_pairs(len(self.sequences))


def tokenize_preferences(
    tokenizer: Tokenizer, rows: list[PreferenceRow], context_length: int
) -> tuple[list[ComparisonGroup], int]:
    """Groups of the rows, and how many comparisons were dropped: a response longer than the context
    leaves its group (cutting it could cut away what makes it better or worse), and a group needs two."""
    groups, dropped = [], 0
    for row in tqdm(rows, desc="preferences: tokenizing", unit=" rows", leave=False):
        responses = row.responses if isinstance(row, Ranking) else [row.chosen_messages, row.rejected_messages]
        rendered = [render_completion(tokenizer, row.prompt_messages, response) for response in responses]
        fitting = [
            (np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool))
            for ids, mask in rendered
            if len(ids) <= context_length
        ]
        dropped += len(comparison_pairs(len(rendered))) - len(comparison_pairs(len(fitting)))
        if len(fitting) >= 2:
            groups.append(ComparisonGroup([ids for ids, _ in fitting], [mask for _, mask in fitting]))
    return groups, dropped


# -------------------------------------------------------------------------------- batches
class PreferenceBatches:
    """Batches of ``batch_size`` whole comparison groups (layout in the module docstring).

    ``get_batch(i)`` walks epochs, each a seeded permutation of the groups; ``sequential_batch(i)``
    walks the groups in order, for validation: batches ``0 .. sequential_batches - 1`` cover each once.
    """

    def __init__(self, groups: list[ComparisonGroup], batch_size: int, pad_id: int, seed: int = 0):
        if not groups:
            raise ValueError("no comparison groups to make batches of")
        self.groups, self.batch_size, self.pad_id, self.seed = groups, batch_size, pad_id, seed
        self.sequential_batches = math.ceil(len(groups) / batch_size)

    @property
    def pair_count(self) -> int:
        return sum(len(group.pairs) for group in self.groups)

    @property
    def tokens_per_batch(self) -> int:
        """Mean real tokens of one batch, for the training loop's throughput."""
        tokens = sum(len(sequence) for group in self.groups for sequence in group.sequences)
        return max(1, round(tokens / len(self.groups) * self.batch_size))

    def get_batch(self, index: int) -> dict[str, torch.Tensor]:
        count = len(self.groups)
        orders: dict[int, np.ndarray] = {}  # a batch spans at most a few epochs
        members = []
        for position in range(index * self.batch_size, (index + 1) * self.batch_size):
            epoch, offset = divmod(position, count)
            if epoch not in orders:
                orders[epoch] = np.random.default_rng((self.seed, epoch)).permutation(count)
            members.append(self.groups[orders[epoch][offset]])
        return self.assemble(members)

    def sequential_batch(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.sequential_batches:
            raise IndexError(f"sequential batch {index} of {self.sequential_batches}")
        return self.assemble(self.groups[index * self.batch_size : (index + 1) * self.batch_size])

    def assemble(self, members: list[ComparisonGroup]) -> dict[str, torch.Tensor]:
        sequences = [sequence for group in members for sequence in group.sequences]
        masks = [mask for group in members for mask in group.masks]
        input_ids = np.full((len(sequences), max(map(len, sequences))), self.pad_id, dtype=np.int64)
        continuation_mask = np.zeros(input_ids.shape, dtype=bool)
        for row, (sequence, mask) in enumerate(zip(sequences, masks)):
            input_ids[row, : len(sequence)], continuation_mask[row, : len(sequence)] = sequence, mask
        chosen, rejected, weights, first_row = [], [], [], 0
        for group in members:
            pairs = group.pairs
            chosen += [first_row + better for better, _ in pairs]
            rejected += [first_row + worse for _, worse in pairs]
            weights += [1.0 / len(pairs)] * len(pairs)
            first_row += len(group.sequences)
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "continuation_mask": torch.from_numpy(continuation_mask),
            "last_index": torch.tensor([len(sequence) - 1 for sequence in sequences]),
            "chosen_index": torch.tensor(chosen),
            "rejected_index": torch.tensor(rejected),
            "pair_weight": torch.tensor(weights, dtype=torch.float32),
        }
        if all(group.reference_logps is not None for group in members):
            batch["reference_logps"] = torch.from_numpy(np.concatenate([group.reference_logps for group in members]))
        return batch


def build_preference_batches(
    entries: list[str],
    generated_pairs: int,
    val_fraction: float,
    tokenizer: Tokenizer,
    context_length: int,
    batch_size: int,
    seed: int,
) -> tuple[PreferenceBatches, PreferenceBatches | None, dict[str, int]]:
    """Training and validation batches of the datasets, and the counts of groups, pairs and dropped pairs."""
    train_rows, val_rows = load_preference_datasets(entries, generated_pairs, val_fraction, seed)
    groups, dropped = tokenize_preferences(tokenizer, train_rows, context_length)
    val_groups, val_dropped = tokenize_preferences(tokenizer, val_rows, context_length)
    if not groups:
        raise InputError(f"{', '.join(entries)}: no preference pair fits the context of {context_length} tokens")
    batches = PreferenceBatches(groups, batch_size, tokenizer.pad_id, seed)
    val_batches = PreferenceBatches(val_groups, batch_size, tokenizer.pad_id, seed) if val_groups else None
    counts = {
        "train_prompts": len(groups),
        "train_pairs": batches.pair_count,
        "val_pairs": val_batches.pair_count if val_batches else 0,
        "dropped_pairs": dropped + val_dropped,
    }
    return batches, val_batches, counts


def check_preference_config(config) -> None:
    """The checks a preference stage's config (reward model, DPO) makes of its ``datasets``,
    ``generated_pairs``, ``val_fraction``, ``epochs`` and ``train``: the data it names, a budget, and
    no training-loop setting that preference batches cannot honour."""
    check(len(config.datasets) > 0, "datasets", config.datasets, "name at least one preference file or embedded task")
    for entry in config.datasets:
        dataset_source(entry, config.generated_pairs)  # a bad count fails now
    check(config.generated_pairs > 0, "generated_pairs", config.generated_pairs, "must be positive")
    check(0 <= config.val_fraction < 1, "val_fraction", config.val_fraction, "must be in [0, 1)")
    check(config.epochs is None or config.epochs > 0, "epochs", config.epochs, "must be positive")
    train = config.train
    check(
        bool(config.epochs or train.max_steps or train.max_tokens or train.max_time),
        "epochs",
        config.epochs,
        "give a budget: epochs, max_steps, max_tokens or max_time",
    )
    check(
        train.batch_warmup_tokens is None,
        "batch_warmup_tokens",
        train.batch_warmup_tokens,
        "preference batches pair rows with each other and cannot be cut to their first rows; leave batch-size "
        "warmup off",
    )
    check(
        train.target_val_bpb is None,
        "target_val_bpb",
        train.target_val_bpb,
        "the validation loss of preference training is a pairwise loss, not bits per byte of text",
    )


def with_epochs(
    train: TrainConfig, epochs: float | None, batches: PreferenceBatches, val_batches: PreferenceBatches | None
) -> TrainConfig:
    """The training settings with ``epochs`` passes over the groups as a step budget (the smaller of
    it and max_steps), and at most as many validation batches as the held-out groups fill."""
    changes: dict = {}
    if val_batches is not None:
        changes["eval_batches"] = min(train.eval_batches, val_batches.sequential_batches)
    if epochs:
        # Under torchrun every optimizer step takes grad_accum micro-batches on each of WORLD_SIZE ranks.
        groups_per_step = train.batch_size * train.grad_accum * int(os.environ.get("WORLD_SIZE", "1"))
        steps = max(1, math.ceil(epochs * len(batches.groups) / groups_per_step))
        changes["max_steps"] = min(train.max_steps or steps, steps)
    return dataclasses.replace(train, **changes)


# ------------------------------------------------------------------------- log-probs, scores
def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, continuation_mask: torch.Tensor) -> torch.Tensor:
    """Sum over the masked tokens of log p(token | the tokens before it), per row (batch,) in float32.

    Token ``t`` is scored by the logits at ``t - 1``, so position 0 (never a response token: a rendered
    conversation starts with ``<|endoftext|>``) cannot count. Differentiable: DPO's policy term. The model's
    chunked cross-entropy (``targets``) never holds batch × length × vocab logits."""
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = torch.where(continuation_mask[:, 1:], input_ids[:, 1:], IGNORE_INDEX)
    return -model(input_ids, targets=targets).sum(dim=-1)


@torch.no_grad()
def heldout_pair_scores(
    model: nn.Module, batches: PreferenceBatches, pair_scores, device: torch.device, dtype: torch.dtype
) -> dict[str, float]:
    """Accuracy (the better response scores strictly higher), mean margin and mean scores over every
    held-out pair; ``pair_scores(model, batch) -> (chosen scores, rejected scores)`` per pair."""
    was_training = model.training
    model.eval()
    chosen_scores, rejected_scores = [], []
    for index in tqdm(
        range(batches.sequential_batches), desc="preferences: held-out pairs", unit=" batches", leave=False
    ):
        batch = {key: value.to(device) for key, value in batches.sequential_batch(index).items()}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            chosen, rejected = pair_scores(model, batch)
        chosen_scores.append(chosen.float().cpu())
        rejected_scores.append(rejected.float().cpu())
    model.train(was_training)
    chosen, rejected = torch.cat(chosen_scores), torch.cat(rejected_scores)
    margins = chosen - rejected
    return {
        "heldout_pairs": len(margins),
        "heldout_accuracy": round(float((margins > 0).float().mean()), 4),
        "heldout_margin": round(float(margins.mean()), 4),
        "heldout_chosen": round(float(chosen.mean()), 4),
        "heldout_rejected": round(float(rejected.mean()), 4),
    }
