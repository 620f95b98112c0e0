"""Training objectives: a batch in, a scalar loss and metrics out.

Three pretraining objectives share one decoder-only model (SPEC §3):

* **causal LM**: predict every next token.
* **prefix LM** (Raffel et al. 2020 §3.2; UL2's S-denoiser, Tay et al. 2022): a prefix of each
  row is conditioning, seen bidirectionally (``model(ids, prefix_lengths=...)``), and only the
  tokens after it are predicted.
* **span corruption** (T5, Raffel et al. 2020 §3.1.4) in UL2's decoder-only form: the row is
  ``corrupted text + targets``, the corrupted text is the prefix and the loss falls on the targets,
  so it is the prefix-LM loss on a rewritten batch.

An objective is therefore a *batch transform* plus a *loss*. :class:`ObjectiveBatches` wraps any
batch source (e.g. :class:`~llmkit.train.batches.TokenBatches`) and rewrites each causal batch with
a generator seeded by ``(seed, index)``: batch ``i`` stays a pure function of ``i``, so resume,
rollback and the split across ``torchrun`` ranks work unchanged. :func:`build_objective` returns the
pair for a name. The losses are the language model's alone: the :class:`~llmkit.train.trainer.Trainer`
adds the Mixture-of-Experts load-balancing loss (:func:`auxiliary_loss`) to every stage's loss while training.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from llmkit.config import check
from llmkit.errors import ConfigError
from llmkit.model.transformer import IGNORE_INDEX
from llmkit.tokenizer import RESERVED, Tokenizer

OBJECTIVES = ("causal", "prefix", "span")
NOISE_DENSITY, MEAN_SPAN_LENGTH = 0.15, 3.0  # T5's defaults (Raffel et al. 2020 §3.3.4)
Batch = dict[str, torch.Tensor]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under ``torch.compile`` (``_orig_mod``) and DDP (``module``) wrappers, in any nesting.
    FSDP2's ``fully_shard`` changes the module in place and needs no unwrapping."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # float32: bf16 logits lose too much precision for a softmax over the vocabulary.
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    # A vocabulary-parallel head's logits are split across the tensor-parallel ranks (a DTensor); under the
    # Trainer's loss_parallel their loss is the same on every rank (llmkit.train.parallel.shard_vocabulary).
    return loss.to_local() if isinstance(loss, DTensor) else loss


def auxiliary_loss(model: nn.Module) -> tuple[torch.Tensor | None, dict[str, float]]:
    """The MoE load-balancing loss of the forward just run (Fedus et al. 2021, Switch Transformer §2.2) and
    its metrics: ``aux_loss`` and ``expert_max_share``.

    The Trainer adds it to the loss of every training step, whatever the stage's loss function, and never
    to validation: it is a regulariser of the router, and validation must measure the language model
    alone so that dense and MoE runs compare in bits per byte. A model without experts (no
    ``expert_utilisation``) gives ``(None, {})``."""
    bare = unwrap_model(model)
    aux, utilisation = getattr(bare, "aux_loss", None), getattr(bare, "expert_utilisation", None)
    if aux is None or utilisation is None:
        return None, {}
    # (n_layer, experts) fractions of routed tokens: 1/experts is perfect balance, 1 is collapse.
    return aux, {
        "aux_loss": float(aux.detach()),
        "expert_max_share": float(utilisation.detach().float().max(dim=-1).values.mean()),
    }


def causal_lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross-entropy; targets equal to ``IGNORE_INDEX`` do not count."""
    return _cross_entropy(model(batch["input_ids"]), batch["targets"]), {}


def prefix_lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy on the tokens after each row's prefix.

    ``batch["prefix_lengths"]`` (batch,) = P means input positions 0..P-1 attend to each other
    bidirectionally. Target ``j`` is the token at position ``j + 1``; it counts when that token lies
    outside the prefix (``j >= P - 1``): a prefix token is visible to every prefix position, so
    predicting it would teach copying, while position P-1 predicts the first unseen token."""
    prefix_lengths = batch["prefix_lengths"]
    targets = batch["targets"]
    positions = torch.arange(targets.shape[1], device=targets.device)
    counted = positions[None, :] >= prefix_lengths[:, None] - 1
    logits = model(batch["input_ids"], prefix_lengths=prefix_lengths)
    return _cross_entropy(logits, torch.where(counted, targets, IGNORE_INDEX)), {}


# ------------------------------------------------------------------ batch transforms
Transform = Callable[[Batch, np.random.Generator], Batch]


def random_prefix(batch: Batch, generator: np.random.Generator) -> Batch:
    """Split each row at a uniformly random point (Raffel et al. 2020 §3.3.1's prefix LM objective):
    prefix length P in 1..T, so between T and 1 tokens are predicted."""
    rows, length = batch["input_ids"].shape
    prefix_lengths = torch.from_numpy(generator.integers(1, length + 1, size=rows))
    return {**batch, "prefix_lengths": prefix_lengths}


def _random_segmentation(items: int, segments: int, generator: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random split of ``items`` into ``segments`` non-empty parts."""
    cuts = np.sort(generator.choice(np.arange(1, items), size=segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [items]]))


class SpanCorruption:
    """T5's span corruption (Raffel et al. 2020 §3.1.4) laid out for a decoder-only model as in UL2.

    A window of ``window`` original tokens has ``noise_tokens`` of them, in ``spans`` spans, replaced:
    ``corrupted = keep_0 S_0 keep_1 S_1 ... keep_{k-1} S_{k-1}`` and
    ``targets = S_0 noise_0 S_1 noise_1 ... S_{k-1} noise_{k-1} <|endoftext|>``, where ``S_i`` is
    ``<|reserved_i|>``. The model reads ``corrupted + targets`` with the corrupted part as its prefix.
    As in T5, ``noise_tokens = round(window * noise_density)``, ``spans = round(noise_tokens /
    mean_span_length)``, span and kept-segment lengths are uniformly random compositions, and every row
    starts with kept text and ends with a noise span.

    Only 8 sentinel tokens exist, so ``spans`` is capped at 8. When the cap binds (contexts of
    186 tokens and more at the defaults) the noise density is kept and spans grow longer (mean =
    noise_tokens / 8): the fraction of predicted text stays at ``noise_density``, and long spans are
    UL2's X-denoising. ``window`` is the longest with ``window + 2 * spans + 1 <= context_length + 1``
    (a sentinel per span on each side plus the end token), so a row fills the context, padded when
    the span count rounds up.
    """

    def __init__(
        self,
        context_length: int,
        sentinel_ids: list[int],
        eos_id: int,
        pad_id: int,
        noise_density: float = NOISE_DENSITY,
        mean_span_length: float = MEAN_SPAN_LENGTH,
    ):
        check(0 < noise_density < 1, "noise_density", noise_density, "must be in (0, 1)")
        check(mean_span_length >= 1, "mean_span_length", mean_span_length, "must be at least 1")
        check(len(sentinel_ids) > 0, "sentinel_ids", sentinel_ids, "needs at least one sentinel token")
        self.context_length, self.sentinel_ids, self.eos_id, self.pad_id = (
            context_length,
            list(sentinel_ids),
            eos_id,
            pad_id,
        )
        self.window, self.noise_tokens, self.spans = self.layout(
            context_length, noise_density, mean_span_length, len(sentinel_ids)
        )
        self.prefix_length = self.window - self.noise_tokens + self.spans

    @staticmethod
    def layout(
        context_length: int,
        noise_density: float = NOISE_DENSITY,
        mean_span_length: float = MEAN_SPAN_LENGTH,
        max_spans: int = len(RESERVED),
    ) -> tuple[int, int, int]:
        """(window, noise_tokens, spans) for a context; raises ConfigError when none fits."""
        for window in range(context_length, 1, -1):
            noise = min(max(round(window * noise_density), 1), window - 1)
            spans = min(max(round(noise / mean_span_length), 1), max_spans, noise, window - noise)
            if window + 2 * spans <= context_length:
                return window, noise, spans
        raise ConfigError("context_length", context_length, "too short for span corruption (needs at least 4 tokens)")

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, context_length: int, **options) -> "SpanCorruption":
        return cls(
            context_length,
            [tokenizer.special_ids[token] for token in RESERVED],
            tokenizer.eot_id,
            tokenizer.pad_id,
            **options,
        )

    def corrupt(self, tokens: np.ndarray, generator: np.random.Generator) -> np.ndarray:
        """``corrupted + targets`` for one window of ``self.window`` tokens (the first ``prefix_length``
        entries are the corrupted text)."""
        noise_lengths = _random_segmentation(self.noise_tokens, self.spans, generator)
        keep_lengths = _random_segmentation(self.window - self.noise_tokens, self.spans, generator)
        corrupted, targets, start = [], [], 0
        for sentinel, keep, noise in zip(self.sentinel_ids, keep_lengths, noise_lengths):
            corrupted += [tokens[start : start + keep], [sentinel]]
            targets += [[sentinel], tokens[start + keep : start + keep + noise]]
            start += keep + noise
        return np.concatenate(corrupted + targets + [[self.eos_id]])

    def __call__(self, batch: Batch, generator: np.random.Generator) -> Batch:
        """Rewrite a causal batch (inputs and shifted targets of ``context_length + 1`` tokens per row)."""
        rows = torch.cat([batch["input_ids"][:, :1], batch["targets"]], dim=1)
        check(
            rows.shape[1] == self.context_length + 1,
            "context_length",
            rows.shape[1] - 1,
            f"batches must hold the {self.context_length} tokens span corruption was laid out for",
        )
        input_ids = torch.full((rows.shape[0], self.context_length), self.pad_id, dtype=torch.long)
        targets = torch.full_like(input_ids, IGNORE_INDEX)
        for row, tokens in enumerate(rows[:, : self.window].numpy()):
            sequence = torch.from_numpy(self.corrupt(tokens, generator))
            input_ids[row, : len(sequence) - 1] = sequence[:-1]
            targets[row, : len(sequence) - 1] = sequence[1:]
        return {
            "input_ids": input_ids,
            "targets": targets,
            "prefix_lengths": torch.full((rows.shape[0],), self.prefix_length, dtype=torch.long),
        }


class ObjectiveBatches:
    """A batch source whose batches are another's, rewritten by ``transform``; batch ``i`` is a pure
    function of ``(seed, i)``. ``bytes_per_token`` is None when the loss is not per token of text (then
    validation reports no bits per byte)."""

    def __init__(self, source, transform: Transform, seed: int, bytes_per_token: float | None):
        self.source, self.transform, self.seed, self.bytes_per_token = source, transform, seed, bytes_per_token

    def get_batch(self, index: int) -> Batch:
        return self.transform(self.source.get_batch(index), np.random.default_rng((self.seed, 0, index)))

    def sequential_batch(self, index: int) -> Batch:
        return self.transform(self.source.sequential_batch(index), np.random.default_rng((self.seed, 1, index)))


def build_objective(objective: str, batches, tokenizer: Tokenizer, context_length: int, seed: int):
    """``(batch source, loss_fn)`` for an objective name, from a source of causal batches."""
    check(objective in OBJECTIVES, "objective", objective, f"choose one of {', '.join(OBJECTIVES)}")
    if objective == "causal":
        return batches, causal_lm_loss
    if objective == "prefix":
        # The predicted tokens are ordinary text, so bits per byte keep their meaning.
        return ObjectiveBatches(batches, random_prefix, seed, getattr(batches, "bytes_per_token", None)), prefix_lm_loss
    # Span targets are sentinels and fragments: their loss is not a per-byte measure of the text.
    return ObjectiveBatches(
        batches, SpanCorruption.for_tokenizer(tokenizer, context_length), seed, None
    ), prefix_lm_loss
