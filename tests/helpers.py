"""Small shared fixtures for tests: synthetic batches and a tiny model config."""

import torch

from llmkit.model import ModelConfig


def tiny_config(**changes) -> ModelConfig:
    values = dict(vocab_size=61, context_length=16, n_layer=2, n_head=2, n_embd=16, position="rope",
                  norm="rmsnorm", activation="swiglu", bias=False)
    values.update(changes)
    return ModelConfig(**values)


class SyntheticBatches:
    """A batch is a pure function of its index: a noisy "count up by one" sequence a model can learn."""

    def __init__(self, batch_size: int = 4, context_length: int = 16, vocab_size: int = 61, seed: int = 0):
        self.batch_size, self.context_length, self.vocab_size, self.seed = batch_size, context_length, vocab_size, seed
        self.bytes_per_token = 1.0

    def get_batch(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        starts = torch.randint(0, self.vocab_size, (self.batch_size, 1), generator=generator)
        rows = (starts + torch.arange(self.context_length + 1)) % self.vocab_size
        return {"input_ids": rows[:, :-1], "targets": rows[:, 1:]}

    def sequential_batch(self, index: int) -> dict:
        return self.get_batch(10_000_000 + index)
