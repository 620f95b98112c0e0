"""AdamW with weight-decay groups, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float = 1e-8,
                    fused: bool = True) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) decaying only matrices: decaying biases and norm gains
    pulls them towards zero for no regularisation benefit (GPT-3, nanoGPT)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for the whole update instead of a Python loop over parameters (sharded FSDP
    # parameters take the multi-tensor foreach path instead).
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **({"fused": True} if fused else {"foreach": True}))


def learning_rate(step: int, budget_used: float | None, peak: float, warmup_steps: int, schedule: str,
                  min_ratio: float, decay_fraction: float) -> float:
    """Linear warmup over ``warmup_steps``, then a function of ``budget_used``, the fraction (0..1) of the
    run's budget (steps, tokens or wall time, whichever ends first) already spent:
    - ``cosine``: half-cosine from the peak down to ``min_ratio * peak`` (GPT-3, Chinchilla);
    - ``wsd``: warmup-stable-decay, the peak until the last ``decay_fraction`` of the budget, then linear
      down to ``min_ratio * peak`` (Hu et al. 2024, MiniCPM): a run can be extended without restarting;
    - ``constant``: the peak (also whenever the budget is unknown).
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant" or budget_used is None:
        return peak
    used = min(max(budget_used, 0.0), 1.0)
    minimum = peak * min_ratio
    if schedule == "cosine":
        return minimum + 0.5 * (peak - minimum) * (1 + math.cos(math.pi * used))
    decay_start = 1.0 - decay_fraction
    if used < decay_start:
        return peak
    return peak - (peak - minimum) * (used - decay_start) / decay_fraction
