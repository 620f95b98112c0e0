"""``llmkit ppo``: RLHF with PPO (Ouyang et al. 2022, InstructGPT; Ziegler et al. 2019; the recipe of
Huang et al. 2024, "The N+ implementation details of RLHF with PPO").

**Rewards.** A completion's scalar reward ``R`` (reward model or verifiable checker,
:mod:`llmkit.align.rewards`) is given at its last action token; every action token also pays the
per-token KL penalty ``-beta (log pi_old(a_t) - log pi_ref(a_t))`` against the frozen reference
(the starting policy), so the summed reward of a completion is InstructGPT's ``R - beta KL`` (eq. 2).
``beta`` is fixed, or adapted by Ziegler et al.'s proportional controller (§2.2):
``beta <- beta (1 + clip(KL / KL_target - 1, -0.2, 0.2) * n / horizon)`` after an iteration of ``n``
completions whose mean KL was ``KL``.

**Critic.** The value head is a ``Linear(n_embd, 1)`` on the policy's own final hidden states
(:meth:`~llmkit.model.Transformer.hidden_states`): one forward pass gives log-probabilities and
values (the head is :func:`llmkit.align.policy_gradient.value_head`, trained and checkpointed with the policy
as one :class:`~llmkit.align.policy_gradient.PolicyModel`), and the value loss joins the policy loss with the
coefficient ``c1`` (Schulman et al. 2017,
eq. 9, the shared-parameter form of PPO; TRL's ``AutoModelForCausalLMWithValueHead``). A separate value
model initialised from the reward model (InstructGPT) doubles the memory and the forward passes, which
this toolkit's single-GPU and CPU scale cannot spare; the shared trunk is protected instead by a small
``c1``, the clipped value loss and a zero-initialised head, whose gradient into the trunk is zero at
the first step (it is proportional to the head's weights).

**Advantages.** GAE(gamma, lambda) (Schulman et al. 2016) over the action tokens of each completion,
the value after its last action being 0; tool-result tokens inside a completion are skipped, so the
recursion runs over the policy's decisions only. Returns are ``advantages + values``; advantages are
whitened over the batch (all processes' parts of it under ``torchrun``).

**Losses.** The clipped surrogate (:func:`llmkit.align.policy_gradient.clipped_policy_loss`), the
clipped value loss ``0.5 max((V - G)^2, (V_clip - G)^2)`` with ``V_clip = V_old + clip(V - V_old, -c, c)``
(Huang et al. 2024; OpenAI baselines), an optional entropy bonus, and with ``--ptx-data`` InstructGPT's
PPO-ptx term ``gamma_ptx * L_LM`` on pretraining batches (eq. 2, the second line): ``ptx_batch_size``
rows of the token data with every micro-batch, the rows of the Trainer's micro-batch index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmkit.align.policy_gradient import (
    Aggregation,
    PolicyOutputs,
    aggregate,
    clipped_policy_loss,
    identity,
    kl_k1,
    masked_mean,
    masked_whiten,
)
from llmkit.align.rl_source import Algorithm, RolloutConfig, Total, UpdateConfig, steps_per_iteration
from llmkit.align.rl_stage import RLStageConfig, check_rl_config, rl_training, run_policy_stage
from llmkit.align.rollout import RolloutBatch
from llmkit.config import check
from llmkit.tokenizer import Tokenizer
from llmkit.train.config import TrainConfig

__all__ = [
    "KLController",
    "PPO",
    "PPOConfig",
    "clipped_policy_loss",
    "clipped_value_loss",
    "gae",
    "kl_penalised_rewards",
    "ppo",
]


@dataclass
class PPOConfig:
    kl_coef: float = field(
        default=0.05, metadata={"help": "beta of the per-token KL penalty (the initial value when adaptive)"}
    )
    adaptive_kl: bool = field(default=False, metadata={"help": "adapt beta towards --kl-target (Ziegler et al. 2019)"})
    kl_target: float = field(default=6.0, metadata={"help": "adaptive KL: the target KL per completion, in nats"})
    kl_horizon: int = field(
        default=10000, metadata={"help": "adaptive KL: completions over which beta may change by e^0.2"}
    )
    gamma: float = field(default=1.0, metadata={"help": "GAE discount"})
    gae_lambda: float = field(default=0.95, metadata={"help": "GAE lambda"})
    value_coef: float = field(default=0.1, metadata={"help": "weight c1 of the value loss"})
    value_clip: float = field(
        default=0.2,
        metadata={"help": "how far a value estimate may move from its rollout value before its loss is clipped"},
    )
    entropy_coef: float = field(default=0.0, metadata={"help": "weight c2 of the entropy bonus"})
    whiten_advantages: bool = field(
        default=True, metadata={"help": "normalise advantages to mean 0, std 1 over the batch"}
    )
    ptx_data: str | None = field(
        default=None, metadata={"help": "token data directory for the PPO-ptx pretraining loss"}
    )
    ptx_coef: float = field(default=0.0, metadata={"help": "gamma_ptx: weight of the pretraining loss"})
    ptx_batch_size: int = field(
        default=4, metadata={"help": "pretraining rows per micro-batch (per optimizer step without accumulation)"}
    )
    stage: RLStageConfig = field(default_factory=RLStageConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    train: TrainConfig = field(default_factory=lambda: rl_training(out="runs/ppo"))

    def __post_init__(self) -> None:
        check(self.kl_coef >= 0, "kl_coef", self.kl_coef, "must be >= 0")
        check(self.kl_target > 0, "kl_target", self.kl_target, "must be positive")
        check(self.kl_horizon > 0, "kl_horizon", self.kl_horizon, "must be positive")
        check(
            not (self.adaptive_kl and self.kl_coef == 0),
            "kl_coef",
            self.kl_coef,
            "an adaptive coefficient cannot start at 0",
        )
        check(0 < self.gamma <= 1, "gamma", self.gamma, "must be in (0, 1]")
        check(0 <= self.gae_lambda <= 1, "gae_lambda", self.gae_lambda, "must be in [0, 1]")
        check(
            self.value_coef > 0, "value_coef", self.value_coef, "must be positive (the value head learns from it alone)"
        )
        check(self.value_clip > 0, "value_clip", self.value_clip, "must be positive")
        check(self.entropy_coef >= 0, "entropy_coef", self.entropy_coef, "must be >= 0")
        check(self.ptx_coef >= 0, "ptx_coef", self.ptx_coef, "must be >= 0")
        check(
            (self.ptx_coef > 0) == (self.ptx_data is not None),
            "ptx_coef",
            self.ptx_coef,
            "give ptx_data together with a positive ptx_coef",
        )
        check(self.ptx_batch_size > 0, "ptx_batch_size", self.ptx_batch_size, "must be positive")
        check_rl_config(self)

    samples_per_prompt = 1

    @property
    def steps_per_iteration(self) -> int:
        return steps_per_iteration(self.rollout.prompts_per_iteration, self.update)


# ----------------------------------------------------------------------------------- pieces
def kl_penalised_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, reference_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards: ``-kl_coef * (log pi - log pi_ref)`` on every action token, plus each row's
    scalar ``scores`` on its last action token."""
    rewards = -kl_coef * kl_k1(logprobs, reference_logprobs) * mask
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, positions, -1).max(dim=1).values
    rows = (last >= 0).nonzero().squeeze(-1)
    rewards[rows, last[rows]] += scores[rows].to(rewards.dtype)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, gae_lambda: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over the masked positions of each
    row, read as consecutive time steps: ``delta_t = r_t + gamma V_next - V_t``, ``A_t = delta_t +
    gamma lambda A_next``, where "next" is the next *masked* position and 0 after the last one.
    Returns ``(advantages, returns = advantages + values)``, zero outside the mask."""
    advantages = torch.zeros_like(rewards)
    next_value = rewards.new_zeros(rewards.shape[0])
    next_advantage = rewards.new_zeros(rewards.shape[0])
    for position in reversed(range(rewards.shape[1])):
        acting = mask[:, position]
        delta = rewards[:, position] + gamma * next_value - values[:, position]
        advantage = delta + gamma * gae_lambda * next_advantage
        advantages[:, position] = torch.where(acting, advantage, 0.0)
        # A position that is not an action passes the next step's value and advantage through unchanged.
        next_value = torch.where(acting, values[:, position], next_value)
        next_advantage = torch.where(acting, advantage, next_advantage)
    return advantages, (advantages + values) * mask


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    aggregation: Aggregation = Aggregation(),
) -> tuple[torch.Tensor, dict[str, float]]:
    """``0.5 max((V - G)^2, (V_old + clip(V - V_old, -clip, clip) - G)^2)`` aggregated over the mask, and
    ``value_clip_fraction``, the share of tokens where the clipped error is the larger."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_error, clipped_error = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * aggregate(torch.maximum(unclipped_error, clipped_error), mask, aggregation)
    return loss, {"value_clip_fraction": float(masked_mean((clipped_error > unclipped_error).float(), mask))}


class KLController:
    """The KL coefficient beta: fixed, or Ziegler et al.'s adaptive controller when ``target`` is given."""

    def __init__(self, value: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, completions: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * completions / self.horizon


# -------------------------------------------------------------------------------- algorithm
class PPO(Algorithm):
    critic = True

    def __init__(self, config: PPOConfig, tokenizer: Tokenizer | None = None, context_length: int | None = None):
        """``tokenizer`` and ``context_length`` (the policy's) are needed with PPO-ptx's token data only."""
        super().__init__(config)
        self.kl = KLController(config.kl_coef, config.kl_target if config.adaptive_kl else None, config.kl_horizon)
        self.ptx_coef = config.ptx_coef
        if config.ptx_data is not None:
            from llmkit.token_data import check_tokenizer
            from llmkit.train.batches import TokenBatches

            self.pretraining = TokenBatches(
                config.ptx_data, "train", config.ptx_batch_size, context_length, seed=config.train.seed
            )
            check_tokenizer(self.pretraining.manifest, tokenizer)

    def advantages(self, batches: list[RolloutBatch], total: Total = identity) -> dict[str, float]:
        """KL-penalised rewards and GAE per batch, whitened and averaged over all of them (``total``)."""
        for batch in batches:
            rewards = kl_penalised_rewards(
                batch.rewards, batch.old_logprobs, batch.reference_logprobs, batch.action_mask, self.kl.value
            )
            batch.advantages, batch.returns = gae(
                rewards, batch.values, batch.action_mask, self.config.gamma, self.config.gae_lambda
            )
        masks = [batch.action_mask for batch in batches]
        if self.config.whiten_advantages:
            for batch, advantages in zip(
                batches, masked_whiten([batch.advantages for batch in batches], masks, total=total)
            ):
                batch.advantages = advantages
        sums = [
            torch.stack(
                [
                    mask.sum().double(),
                    torch.where(mask, batch.values, 0.0).sum().double(),
                    torch.where(mask, batch.returns, 0.0).sum().double(),
                ]
            )
            for batch, mask in zip(batches, masks)
        ]
        count, values, returns = total(torch.stack(sums).sum(dim=0)).tolist()
        return {"kl_coef": self.kl.value, "value_mean": values / max(count, 1), "return_mean": returns / max(count, 1)}

    def terms(self, outputs: PolicyOutputs, minibatch: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        mask = minibatch.action_mask
        loss, metrics = self.policy_terms(outputs, minibatch)
        value_loss, value_metrics = clipped_value_loss(
            outputs.values, minibatch.values, minibatch.returns, mask, self.config.value_clip, self.aggregation
        )
        loss = loss + self.config.value_coef * value_loss
        if self.config.entropy_coef:
            loss = loss - self.config.entropy_coef * masked_mean(outputs.entropy, mask)
        metrics.update(value_loss=float(value_loss.detach()), **value_metrics)
        return loss, metrics

    def end_iteration(self, metrics: dict[str, float]) -> None:
        self.kl.update(metrics["kl"], self.config.rollout.prompts_per_iteration)

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl.value}

    def load_state_dict(self, state: dict) -> None:
        self.kl.value = state["kl_coef"]


def ppo(config: PPOConfig) -> dict:
    """Train ``config.stage.policy`` with PPO on the task's prompts; returns the run summary (greedy
    held-out accuracy and reward before and after, rollout rewards, final KL, checkpoint)."""
    return run_policy_stage("ppo", config, lambda tokenizer, context_length: PPO(config, tokenizer, context_length))
