"""Training objectives: a batch in, a scalar loss and metrics out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross-entropy in float32 (bf16 logits lose too much precision for a softmax over the
    vocabulary); targets equal to ``IGNORE_INDEX`` do not count."""
    logits = model(batch["input_ids"])
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE_INDEX)
    return loss, {}
