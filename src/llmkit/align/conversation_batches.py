"""Supervised fine-tuning batches: conversations tokenised with their loss masks, mixed by task and
packed several to a row.

**Targets.** A conversation renders to ids ``t_0 .. t_n`` and the assistant mask of
:func:`llmkit.chat.render_ids`. The shift to next-token targets happens once, here, per conversation:
the inputs are ``t_0 .. t_{n-1}`` and target ``j`` is ``t_{j+1}`` where ``t_{j+1}`` is an assistant token,
``IGNORE_INDEX`` elsewhere. So the loss falls on what the assistant writes, its tool calls and the
``<|end|>`` that closes its turn (the model learns to stop), never on role headers, system or user text
or tool results, and no target ever crosses into the next conversation of a packed row.

**Packing.** Conversations are placed whole into rows of ``context_length`` tokens by first-fit
decreasing (longest first, each into the first row with room; Johnson 1973 bounds it by 11/9 of the
optimal row count + 1), as in Krell et al. 2021's packing for BERT. ``document_ids`` tell the model
where each conversation starts, so attention stays within a conversation and positions restart
(:meth:`llmkit.model.Transformer.forward`): a packed row computes exactly the losses of its
conversations run one by one. The rest of a row is padding with targets ``IGNORE_INDEX``.

**Mixing.** Examples-proportional mixing with an artificial size limit K (Raffel et al. 2020,
§3.5.2): task m is drawn at rate ``r_m = min(e_m, K) / sum_n min(e_n, K)``, so large tasks do not drown
small ones. A *mixture epoch* holds exactly ``min(e_m, K)`` conversations of each task (stratified,
rather than independent draws, so proportions hold in every epoch and not just on average); a task
larger than K contributes the next K conversations of a shuffled cycle through all of its examples,
so every example is used before any is repeated. Batch ``i`` is a pure function of ``(seed, i)``: the
training loop's resume, rollback and ``torchrun`` split need nothing else.

**Pretraining mix.** Optionally ``pretraining_rows`` rows of every batch are windows of pretraining
text with a loss on every token, the regulariser of InstructGPT's PPO-ptx (Ouyang et al. 2022) and
of FLAN's data mixtures (Wei et al. 2022); ``batch["pretraining"]`` marks them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from llmkit.chat import Conversation, render_ids
from llmkit.tokenizer import Tokenizer
from llmkit.train.objectives import IGNORE_INDEX


@dataclass
class Example:
    """One conversation, shifted once: ``targets[j]`` is the target of ``input_ids[j]``."""

    input_ids: np.ndarray
    targets: np.ndarray
    task: str

    def __len__(self) -> int:
        return len(self.input_ids)


def conversation_example(tokenizer: Tokenizer, messages: list[dict], task: str) -> Example:
    ids, mask = render_ids(tokenizer, messages)
    ids_array = np.asarray(ids, dtype=np.int64)
    targets = np.where(np.asarray(mask[1:], dtype=bool), ids_array[1:], IGNORE_INDEX)
    return Example(ids_array[:-1], targets, task)


def tokenize_conversations(
    tokenizer: Tokenizer, conversations: list[Conversation], context_length: int, overlong: str = "truncate"
) -> tuple[list[Example], dict[str, int]]:
    """Examples of the conversations that fit ``context_length`` input tokens, and the counts of
    conversations ``truncated`` (cut to the context; ``overlong="truncate"``) and ``dropped`` (too long
    with ``overlong="drop"``, or without an assistant token left inside the context)."""
    examples, truncated, dropped = [], 0, 0
    for conversation in tqdm(conversations, desc="sft: tokenizing", unit=" conversations", leave=False):
        example = conversation_example(tokenizer, conversation.messages, conversation.task)
        cut = len(example) > context_length
        if cut and overlong == "truncate":
            example = Example(example.input_ids[:context_length], example.targets[:context_length], example.task)
        if (cut and overlong == "drop") or not (example.targets != IGNORE_INDEX).any():
            dropped += 1
            continue
        truncated += cut
        examples.append(example)
    return examples, {"truncated": truncated, "dropped": dropped}


def pack_first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``capacity`` by first-fit decreasing."""
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    room = np.zeros(len(lengths), dtype=np.int64)
    rows: list[list[int]] = []
    for index in order:
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"item {index} of length {length} exceeds the row capacity {capacity}")
        fits = np.flatnonzero(room[: len(rows)] >= length)
        if len(fits):
            row = int(fits[0])
        else:
            row = len(rows)
            rows.append([])
            room[row] = capacity
        rows[row].append(index)
        room[row] -= length
    return rows


def capped_sizes(sizes: dict[str, int], cap: int | None) -> dict[str, int]:
    """``min(e_m, K)`` per task (K None: no cap)."""
    return {task: min(size, cap) if cap else size for task, size in sizes.items()}


def mixing_rates(sizes: dict[str, int], cap: int | None) -> dict[str, float]:
    """Raffel et al. 2020 §3.5.2: ``r_m = min(e_m, K) / sum_n min(e_n, K)``."""
    capped = capped_sizes(sizes, cap)
    total = sum(capped.values())
    return {task: count / total for task, count in capped.items()}


class ConversationBatches:
    """Rows of packed conversations (see the module docstring), ``batch_size`` rows per batch.

    ``get_batch(i)`` walks the mixture epochs (plus ``pretraining_rows`` rows of ``pretraining``, a
    source of causal batches of that many rows such as :class:`~llmkit.train.batches.TokenBatches`);
    ``sequential_batch(i)`` walks the rows of the first epoch in order, for validation: without a cap,
    every conversation exactly once.
    """

    def __init__(
        self,
        examples: list[Example],
        batch_size: int,
        context_length: int,
        pad_id: int,
        seed: int = 0,
        task_cap: int | None = None,
        pretraining=None,
        pretraining_rows: int = 0,
    ):
        if not examples:
            raise ValueError("no conversations to make batches of")
        if not 0 <= pretraining_rows < batch_size or (pretraining_rows > 0) != (pretraining is not None):
            raise ValueError(
                f"pretraining_rows={pretraining_rows} needs a pretraining source and must be below "
                f"batch_size={batch_size}"
            )
        self.examples, self.batch_size, self.context_length, self.pad_id, self.seed = (
            examples,
            batch_size,
            context_length,
            pad_id,
            seed,
        )
        self.pretraining, self.pretraining_rows = pretraining, pretraining_rows
        self.conversation_rows = batch_size - pretraining_rows
        self.tasks = sorted({example.task for example in examples})
        self.members = [
            np.array([index for index, example in enumerate(examples) if example.task == task]) for task in self.tasks
        ]
        sizes = {task: len(members) for task, members in zip(self.tasks, self.members)}
        self.per_epoch = capped_sizes(sizes, task_cap)
        self.rates = mixing_rates(sizes, task_cap)
        self.rows_before = [0]  # rows_before[e]: rows of the epochs before epoch e, as far as counted
        # Consecutive batches need the same one or two epochs; resuming counts the earlier ones once.
        self.epoch_rows = functools.lru_cache(maxsize=4)(self._pack_epoch)

    # -------------------------------------------------------------- mixture epochs
    def epoch_examples(self, epoch: int) -> list[int]:
        """Example indices of mixture epoch ``epoch``: the next ``min(e_m, K)`` of each task's cycle of
        shuffled passes over its examples."""
        chosen: list[int] = []
        for task_index, task in enumerate(self.tasks):
            size, take = len(self.members[task_index]), self.per_epoch[task]
            first, last = epoch * take, (epoch + 1) * take
            passes = range(first // size, (last - 1) // size + 1)
            cycle = np.concatenate(
                [
                    np.random.default_rng((self.seed, 0, task_index, number)).permutation(self.members[task_index])
                    for number in passes
                ]
            )
            offset = passes[0] * size
            chosen += cycle[first - offset : last - offset].tolist()
        return chosen

    def _pack_epoch(self, epoch: int) -> list[list[int]]:
        """The packed rows of an epoch (lists of example indices), in a seeded random order so that
        batches do not follow the packing's long-to-short order."""
        chosen = self.epoch_examples(epoch)
        rows = [
            [chosen[item] for item in row]
            for row in pack_first_fit_decreasing([len(self.examples[i]) for i in chosen], self.context_length)
        ]
        order = np.random.default_rng((self.seed, 1, epoch)).permutation(len(rows))
        return [rows[index] for index in order]

    def _rows_before(self, epoch: int) -> int:
        """Rows of the epochs before ``epoch``."""
        while len(self.rows_before) <= epoch:
            self.rows_before.append(self.rows_before[-1] + len(self.epoch_rows(len(self.rows_before) - 1)))
        return self.rows_before[epoch]

    def locate(self, row: int) -> tuple[int, int]:
        """(epoch, row within it) of the ``row``-th row of the endless sequence of epochs."""
        while self.rows_before[-1] <= row:
            self._rows_before(len(self.rows_before))
        epoch = int(np.searchsorted(self.rows_before, row, side="right")) - 1
        return epoch, row - self.rows_before[epoch]

    def rows_in_epochs(self, epochs: float) -> int:
        """Rows of the first ``epochs`` (fractional allowed) mixture epochs."""
        whole = math.floor(epochs)
        return self._rows_before(whole) + math.ceil((epochs - whole) * len(self.epoch_rows(whole)))

    # --------------------------------------------------------------------- batches
    def _assemble(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        shape = (len(rows), self.context_length)
        input_ids = np.full(shape, self.pad_id, dtype=np.int64)
        targets = np.full(shape, IGNORE_INDEX, dtype=np.int64)
        document_ids = np.zeros(shape, dtype=np.int64)
        for row, members in enumerate(rows):
            start = 0
            for document, index in enumerate(members):
                example = self.examples[index]
                end = start + len(example)
                input_ids[row, start:end], targets[row, start:end], document_ids[row, start:end] = (
                    example.input_ids,
                    example.targets,
                    document,
                )
                start = end
            document_ids[row, start:] = len(members)  # the padding is a document of its own
        return {
            "input_ids": torch.from_numpy(input_ids),
            "targets": torch.from_numpy(targets),
            "document_ids": torch.from_numpy(document_ids),
            "pretraining": torch.zeros(len(rows), dtype=torch.bool),
        }

    def get_batch(self, index: int) -> dict[str, torch.Tensor]:
        rows = []
        for row in range(index * self.conversation_rows, (index + 1) * self.conversation_rows):
            epoch, position = self.locate(row)
            rows.append(self.epoch_rows(epoch)[position])
        batch = self._assemble(rows)
        if not self.pretraining_rows:
            return batch
        windows = self.pretraining.get_batch(index)
        text = {
            "input_ids": windows["input_ids"],
            "targets": windows["targets"],
            "document_ids": torch.zeros_like(windows["input_ids"]),  # as in pretraining: one stream
            "pretraining": torch.ones(self.pretraining_rows, dtype=torch.bool),
        }
        return {key: torch.cat([batch[key], text[key]]) for key in batch}

    def sequential_batch(self, index: int) -> dict[str, torch.Tensor]:
        rows = self.epoch_rows(0)
        start = (index * self.batch_size) % len(rows)
        return self._assemble(rows[start : start + self.batch_size])

    def statistics(self) -> dict:
        """Rows per epoch, and the fractions of row tokens that are conversation and that are trained on."""
        rows = self.epoch_rows(0)
        members = [index for row in rows for index in row]
        tokens = sum(len(self.examples[index]) for index in members)
        targets = sum(int((self.examples[index].targets != IGNORE_INDEX).sum()) for index in members)
        capacity = len(rows) * self.context_length
        return {
            "rows_per_epoch": len(rows),
            "conversations_per_epoch": len(members),
            "packing_efficiency": round(tokens / capacity, 4),
            "trained_token_fraction": round(targets / capacity, 4),
        }
