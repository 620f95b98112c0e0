"""Batches of token windows from a prepared data directory.

A batch is a pure function of its index: ``get_batch(i)`` draws its windows with a random generator
seeded by ``(seed, i)``. Resuming, skipping a bad data window after a loss spike and splitting a global
batch across ``torchrun`` ranks then need nothing but the index.
"""

from __future__ import annotations

import numpy as np
import torch

from llmkit.errors import InputError
from llmkit.token_data import load_manifest, open_split


class TokenBatches:
    """Random windows of ``context_length + 1`` tokens (inputs and next-token targets), as in nanoGPT."""

    def __init__(self, data_dir: str, split: str, batch_size: int, context_length: int, seed: int = 0):
        self.manifest = load_manifest(data_dir)
        self.batch_size, self.context_length, self.seed = batch_size, context_length, seed
        self.shards = [shard for shard in open_split(data_dir, split) if len(shard) > context_length + 1]
        if not self.shards:
            raise InputError(
                f"{data_dir}: the {split} split has no shard longer than context_length+1 = {context_length + 1} tokens"
            )
        starts = np.array([len(shard) - context_length - 1 for shard in self.shards], dtype=np.float64)
        self.shard_probabilities = starts / starts.sum()
        # Non-overlapping windows per shard, for the fixed evaluation set of sequential_batch.
        self.window_starts = [
            (shard, start)
            for shard, length in enumerate(starts.astype(int))
            for start in range(0, max(1, length // context_length) * context_length, context_length)
        ]
        split_stats = self.manifest["splits"][split]
        self.tokens = int(split_stats["tokens"])
        # Bits per byte (Gao et al. 2020, The Pile) make losses comparable across tokenizers.
        self.bytes_per_token = split_stats["bytes"] / max(1, split_stats["tokens"])

    def _windows(self, shard_indices: np.ndarray, offsets: np.ndarray) -> dict[str, torch.Tensor]:
        rows = np.stack([self.shards[s][o : o + self.context_length + 1] for s, o in zip(shard_indices, offsets)])
        rows = torch.from_numpy(rows.astype(np.int64))
        return {"input_ids": rows[:, :-1], "targets": rows[:, 1:]}

    def get_batch(self, index: int) -> dict[str, torch.Tensor]:
        generator = np.random.default_rng((self.seed, index))
        shard_indices = generator.choice(len(self.shards), size=self.batch_size, p=self.shard_probabilities)
        offsets = [generator.integers(0, len(self.shards[s]) - self.context_length - 1) for s in shard_indices]
        return self._windows(shard_indices, np.array(offsets))

    def sequential_batch(self, index: int) -> dict[str, torch.Tensor]:
        """Non-overlapping windows in order, wrapping around: a fixed, deterministic evaluation set."""
        rows = [
            self.window_starts[(index * self.batch_size + row) % len(self.window_starts)]
            for row in range(self.batch_size)
        ]
        shard_indices, offsets = zip(*rows)
        return self._windows(np.array(shard_indices), np.array(offsets))
