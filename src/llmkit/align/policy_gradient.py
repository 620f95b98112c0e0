"""The policy-gradient pieces PPO and GRPO share: the trained module (:class:`PolicyModel`), token
log-probabilities, KL estimators, the clipped surrogate objective and masked statistics.

Every tensor here is laid out per *target position* of a padded batch of rows (prompt + completion):
index ``t`` of a ``(rows, length - 1)`` tensor belongs to the prediction of token ``t + 1`` from the
tokens before it, and a boolean ``mask`` of that shape is True where that token is an *action* (a
token the policy sampled: completion tokens, not the prompt, not padding, not tool results injected by
the engine). Log-probabilities, values, rewards and advantages all use this one layout.

Four ways to reduce a per-token loss to a scalar (:class:`Aggregation`), under the names of TRL's
``GRPOConfig.loss_type``, for a minibatch of ``B`` sequences with ``|o_i|`` action tokens each:

- ``grpo``: the mean over each sequence's action tokens, then the mean over sequences,
  ``1/B sum_i 1/|o_i| sum_t``: DeepSeekMath's objective as written (Shao et al. 2024, eq. 3). A token of
  a long answer weighs less than a token of a short one, so a long wrong answer is punished less per
  token (the length bias of Liu et al. 2025, "Understanding R1-Zero-like training");
- ``dr_grpo``: the sum over all action tokens divided by ``B x max_completion_length``, a constant:
  Dr. GRPO (Liu et al. 2025, §3.1), which removes that bias without making the step's size depend on
  the lengths the batch happened to sample;
- ``dapo``: the sum over all action tokens divided by their count, over the whole minibatch however it
  is split (DAPO's token-level loss, Yu et al. 2025 §3.3); the token mean of PPO implementations too;
- ``bnpo``: the token mean of each micro-batch, then the mean over micro-batches (TRL's "batch
  normalised" loss): ``dapo`` when a minibatch is one micro-batch, and otherwise dependent on how it
  is split over ``grad_accum`` and processes, as TRL's is.

A minibatch split into micro-batches weighs each micro-batch's aggregate by its share of the
minibatch's :meth:`Aggregation.units` (:mod:`llmkit.align.rl_source`), so that every loss type but
``bnpo`` gives one optimizer step's gradient however the minibatch is split. A row without actions
(the padding of an idle micro-batch) counts as no sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` where ``mask`` is True (0 when nothing is). Selected, not multiplied: an
    estimator may be infinite outside the mask (k3 where no reference log-probability was taken)."""
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def identity(value: torch.Tensor) -> torch.Tensor:
    return value


def masked_whiten(
    values: list[torch.Tensor],
    masks: list[torch.Tensor],
    eps: float = 1e-8,
    total: Callable[[torch.Tensor], torch.Tensor] = identity,
) -> list[torch.Tensor]:
    """``(values - mean) / std`` over the masked entries of every tensor (zero elsewhere): advantage
    normalisation at the batch level (Huang et al. 2024, "The N+ implementation details of RLHF with
    PPO"). ``total`` sums a statistic over the processes (the batch's parts on other ranks), so the
    mean and std are the whole batch's."""

    def masked_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
        return total(torch.stack([torch.where(mask, tensor, 0.0).sum() for tensor, mask in zip(tensors, masks)]).sum())

    count = total(torch.stack([mask.sum() for mask in masks]).sum()).clamp(min=1)
    mean = masked_sum(values) / count
    variance = masked_sum([(tensor - mean) ** 2 for tensor in values]) / count
    return [
        torch.where(mask, (tensor - mean) * torch.rsqrt(variance + eps), 0.0) for tensor, mask in zip(values, masks)
    ]


@dataclass(frozen=True)
class Aggregation:
    """How a per-token loss becomes a scalar: a :data:`LOSS_TYPES` name (module docstring) and, for
    ``dr_grpo``, the constant length it divides by (the most action tokens a completion may have)."""

    loss_type: str = "dapo"
    max_completion_length: int | None = None

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss type {self.loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
        if self.loss_type == "dr_grpo" and not self.max_completion_length:
            raise ValueError("the dr_grpo loss type divides by max_completion_length; give a positive one")

    def units(self, mask: torch.Tensor) -> float:
        """What a micro-batch's aggregate is a mean over: its action tokens (``dapo``), its sequences
        (``grpo``, ``dr_grpo``) or the micro-batch itself (``bnpo``), 0 when it has no actions."""
        if self.loss_type == "dapo":
            return float(mask.sum())
        if self.loss_type == "bnpo":
            return float(mask.any())
        return float(mask.any(dim=1).sum())


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: Aggregation) -> torch.Tensor:
    """A per-token loss ``(rows, positions)`` reduced to a scalar over the masked tokens (module docstring)."""
    if aggregation.loss_type in ("dapo", "bnpo"):
        return masked_mean(per_token, mask)
    acting = mask.any(dim=1)
    # Sums, not means of a selection: a minibatch without actions gives a zero still tied to the graph.
    if aggregation.loss_type == "dr_grpo":
        total = torch.where(mask, per_token, 0.0).sum()
        return total / (acting.sum().clamp(min=1) * aggregation.max_completion_length)
    per_sequence = torch.where(mask, per_token, 0.0).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return per_sequence[acting].sum() / acting.sum().clamp(min=1)


# --------------------------------------------------------------------------------- KL estimators
def kl_k1(logprobs: torch.Tensor, reference_logprobs: torch.Tensor) -> torch.Tensor:
    """``log pi - log pi_ref`` per sampled token: the unbiased, high-variance estimator of KL(pi || pi_ref)
    whose sum over a completion is InstructGPT's KL penalty (Ouyang et al. 2022, eq. 2)."""
    return logprobs - reference_logprobs


def kl_k3(logprobs: torch.Tensor, other_logprobs: torch.Tensor) -> torch.Tensor:
    """``r - log r - 1`` with ``r = p_other / p`` for tokens sampled from ``p``: an unbiased estimate of
    KL(p || p_other) that is never negative and has low variance (Schulman 2020, "Approximating KL
    divergence"). GRPO's KL term with ``p`` the policy and ``p_other`` the reference (Shao et al. 2024,
    eq. 4); with ``p`` the rollout policy and ``p_other`` the updated one, PPO's ``approx_kl``."""
    log_ratio = other_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


# -------------------------------------------------------------------------------- the objective
@dataclass
class PolicyOutputs:
    """One forward pass of the policy over a batch, in the target-position layout."""

    logprobs: torch.Tensor  # (rows, length - 1) log pi(token t+1 | tokens <= t)
    entropy: torch.Tensor  # (rows, length - 1) entropy of the whole next-token distribution
    values: torch.Tensor | None  # (rows, length - 1) value-head estimates, when a head was given
    language_logits: torch.Tensor | None = None  # (rows, length, vocab) of the rows PPO-ptx adds


def policy_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    temperature: float,
    value_head: nn.Module | None = None,
    action_mask: torch.Tensor | None = None,
) -> PolicyOutputs:
    """Log-probabilities of each row's next tokens (and entropies, and values) in one forward pass.

    The logits are divided by the sampling temperature, so the probabilities are those of the
    distribution the rollouts were drawn from (Huang et al. 2024). With a value head, the
    head reads the same hidden states the output head does (a shared trunk: Schulman et al. 2017, eq. 9).
    With ``action_mask`` (rows, length - 1) the log-probabilities and entropies are computed at the actions
    only and are 0 elsewhere: prompts, tool results and padding are most of a rollout row (a GRPO row on the
    arithmetic task: 85 prompt tokens, 60 actions), and the output head and its softmax over the vocabulary
    were a third of a scoring pass."""
    hidden = model.hidden_states(input_ids)
    logprobs, entropy = model.token_logprobs(
        hidden[:, :-1], input_ids[:, 1:], max(temperature, 1e-6), positions=action_mask
    )
    values = value_head(hidden[:, :-1]).squeeze(-1).float() if value_head is not None else None
    return PolicyOutputs(logprobs, entropy, values)


class PolicyModel(nn.Module):
    """What PPO and GRPO train: the policy and, for PPO, its value head, one module so that the Trainer's
    optimizer, DDP wrapper and checkpoints hold both (the policy, ``policy``, is the checkpoint's
    model). Its forward is :func:`policy_forward` at the sampling temperature; DDP synchronises gradients
    through a module's forward, so everything a loss needs comes from one call, the language-model
    logits of PPO-ptx's pretraining rows included."""

    def __init__(self, policy: nn.Module, value_head: nn.Module | None, temperature: float):
        super().__init__()
        self.policy, self.value_head, self.temperature = policy, value_head, temperature

    @property
    def config(self):
        """The policy's :class:`~llmkit.model.ModelConfig` (what is trained is that model and a head)."""
        return self.policy.config

    def forward(
        self,
        input_ids: torch.Tensor,
        language_ids: torch.Tensor | None = None,
        action_mask: torch.Tensor | None = None,
    ) -> PolicyOutputs:
        outputs = policy_forward(self.policy, input_ids, self.temperature, self.value_head, action_mask)
        if language_ids is not None:
            outputs.language_logits = self.policy(language_ids)
        return outputs


def value_head(config) -> nn.Linear:
    """PPO's critic, ``Linear(n_embd, 1)`` on the policy's final hidden states, zero-initialised: its
    gradient into the shared trunk is proportional to its weights, so it is zero at the first step."""
    head = nn.Linear(config.n_embd, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    aggregation: Aggregation = Aggregation(),
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:
    ``max(-A r, -A clip(r, 1 - clip, 1 + clip))`` per action token with ``r = pi / pi_old``, aggregated.

    Metrics: ``clip_fraction``, the share of tokens where the clipped term is the larger (its gradient
    is zero there), and ``approx_kl``, the k3 estimate of KL(pi_old || pi) (how far the update moved)."""
    # Ratio 1 off the mask: nothing there may overflow into the gradient (0 * inf is NaN).
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, aggregation)
    with torch.no_grad():
        metrics = {
            "clip_fraction": float(masked_mean((clipped > unclipped).float(), mask)),
            "approx_kl": float(masked_mean(kl_k3(old_logprobs, old_logprobs + log_ratio), mask)),
        }
    return loss, metrics
