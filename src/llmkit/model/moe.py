"""Mixture-of-Experts feed-forward: a router sends every token to ``top_k`` of ``n`` expert networks.

Follows GShard (Lepikhin et al. 2021) and Switch Transformer (Fedus et al. 2022):

- the router is a linear map to one logit per expert; a token goes to its ``top_k`` most
  probable experts and their outputs are mixed by the router probabilities (renormalised over
  the chosen experts when ``top_k > 1``, as Mixtral does; Switch's single expert keeps its raw
  probability so the router still receives a gradient);
- every expert takes at most ``capacity = ceil(capacity_factor * tokens * top_k / n)`` tokens
  per batch; first choices are served before second choices (GShard), and a token over capacity
  gets nothing from that expert (the residual connection carries it on unchanged);
- the load-balancing loss is Switch's ``n * sum_i f_i * P_i``, with ``f_i`` the fraction of
  routing choices that went to expert ``i`` and ``P_i`` its mean router probability. It equals 1
  when routing is uniform and grows to ``n`` when one expert takes everything.

The parameters are ``n`` experts plus the router; the compute per token is ``top_k`` experts.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class MixtureOfExperts(nn.Module):
    def __init__(
        self, n_embd: int, n_experts: int, top_k: int, capacity_factor: float, make_expert: Callable[[], nn.Module]
    ):
        super().__init__()
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
        self.router = nn.Linear(n_embd, n_experts, bias=False)
        self.experts = nn.ModuleList(make_expert() for _ in range(n_experts))
        self.aux_loss = torch.zeros(())
        self.utilisation = torch.zeros(n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        count = tokens.shape[0]
        # The router in float32: its softmax decides discrete assignments, which bfloat16 rounding would flip.
        probabilities = F.softmax(self.router(tokens).float(), dim=-1)
        weights, chosen = probabilities.topk(self.top_k, dim=-1)  # (tokens, top_k)
        if self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)

        # Choices ordered by rank, then token: every first choice is placed before any second choice.
        experts = chosen.t().reshape(-1)
        one_hot = F.one_hot(experts, self.n_experts)
        slot = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1
        capacity = math.ceil(self.capacity_factor * count * self.top_k / self.n_experts)
        kept = slot < capacity
        token_index = torch.arange(count, device=x.device).repeat(self.top_k)
        choice_weight = weights.t().reshape(-1)

        output = torch.zeros_like(tokens)
        for expert_index, expert in enumerate(self.experts):
            selected = torch.nonzero(kept & (experts == expert_index)).squeeze(-1)
            if selected.numel() == 0:
                continue
            rows = token_index[selected]
            contribution = expert(tokens[rows]) * choice_weight[selected, None].to(tokens.dtype)
            output.index_add_(0, rows, contribution)

        routed_fraction = one_hot.float().mean(dim=0)  # f_i over all choices
        self.aux_loss = self.n_experts * (routed_fraction * probabilities.mean(dim=0)).sum()
        self.utilisation = torch.bincount(experts[kept], minlength=self.n_experts).float().detach() / max(
            len(experts), 1
        )
        return output.view_as(x)
