"""``llmkit grpo``: group relative policy optimisation (Shao et al. 2024, DeepSeekMath §4.1) with
verifiable rewards.

Each prompt gets a *group* of G sampled completions. A completion's advantage is its reward
normalised within its group, ``(r - mean(r_group)) / (std(r_group) + eps)``, the same for every one
of its tokens (outcome supervision, §4.1.2): the group mean replaces PPO's learned value function as
the baseline, so there is no critic. ``std`` is the sample standard deviation (``torch.std``'s
default, as TRL computes it); with ``--no-scale-rewards`` the advantage is ``r - mean`` alone, which
Liu et al. 2025 ("Understanding R1-Zero-like training", Dr. GRPO) recommend because the division
weights groups whose rewards barely differ the most. ``--advantage rloo`` takes REINFORCE
leave-one-out's baseline instead (Ahmadian et al. 2024, §3.2, after Kool et al. 2019): each sample's
reward minus the mean reward of the *other* G-1 samples of its prompt, a baseline independent of the
sample it judges, so the estimate is unbiased; it equals the group-centred reward times G/(G-1), and
Ahmadian et al. divide by no std (add ``--no-scale-rewards``; with it on, the std divides both
alike). A group whose completions all earn the same
reward has zero advantages and teaches nothing; the share of such groups is logged
(``uniform_groups``). **Dynamic sampling** (``--dynamic-sampling``, DAPO §3.2, Yu et al. 2025) drops
them before the update and samples further prompts, up to ``--max-sampling-rounds`` rounds of
``prompts_per_iteration``, until the batch holds ``prompts_per_iteration`` informative groups: every
sequence of the update then carries a signal, and the dropped groups cost no training forward pass.

**Process supervision** (``--supervision process``, §4.1.3) rates each *step* of a completion instead
(its calculator calls and its final answer, :meth:`llmkit.align.rewards.Reward.score_steps`). Every
step reward is normalised by the mean and std of all the step rewards of its group, and a token's
advantage is the sum of the normalised rewards of the steps that end at or after it: a wrong call
lowers the tokens that led to it, while the correct calls before it keep their credit. A small policy
whose answers fail on one mis-copied number among several right ones gets a signal from every group,
where outcome rewards leave most groups uniform.

The loss per token is the clipped surrogate (:func:`llmkit.align.policy_gradient.clipped_policy_loss`)
plus ``beta`` times the k3 estimate of KL(pi || pi_ref) against the frozen reference, which GRPO puts
in the loss instead of the reward (eq. 3-4). Tokens are aggregated per sequence then over sequences by
default, as eq. 3 is written (``--update.loss-type grpo``); ``dapo`` takes DAPO's token mean over the
minibatch (Yu et al. 2025), ``dr_grpo`` Dr. GRPO's token sum over a constant (Liu et al. 2025), ``bnpo``
TRL's token mean per micro-batch (:class:`llmkit.align.policy_gradient.Aggregation`).
With one epoch and one minibatch per batch the ratio is 1 and the update is the plain policy gradient
(the paper's "iterative" setting reuses the batch for several minibatches, where the clip matters).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from llmkit.align.policy_gradient import PolicyOutputs, aggregate, identity, kl_k3
from llmkit.align.rl_source import Algorithm, RolloutConfig, Total, UpdateConfig, steps_per_iteration
from llmkit.align.rl_stage import RLStageConfig, check_rl_config, rl_training, run_policy_stage
from llmkit.align.rollout import RolloutBatch
from llmkit.config import check
from llmkit.train.config import TrainConfig

__all__ = ["GRPO", "GRPOConfig", "group_advantages", "grpo", "grpo_rollout", "grpo_update", "process_advantages"]


def grpo_rollout(**changes) -> RolloutConfig:
    """Rollout settings with GRPO's defaults (``changes`` override them): 8 prompts an iteration, each
    sampled ``group_size`` times."""
    return RolloutConfig(**{"prompts_per_iteration": 8, **changes})


def grpo_update(**changes) -> UpdateConfig:
    """Update settings with GRPO's defaults (``changes`` override them): one pass over each rollout batch in
    minibatches of 16 sequences, the loss averaged per sequence, then over sequences (DeepSeekMath eq. 3)."""
    return UpdateConfig(**{"epochs": 1, "minibatch_size": 16, "loss_type": "grpo", **changes})


@dataclass
class GRPOConfig:
    group_size: int = field(default=8, metadata={"help": "completions sampled per prompt (G)"})
    kl_coef: float = field(
        default=0.04, metadata={"help": "beta of the k3 KL term to the reference in the loss (0 = none)"}
    )
    supervision: Literal["outcome", "process"] = field(
        default="outcome",
        metadata={
            "help": "outcome: one reward per completion; process: one per step (tool call, answer), DeepSeekMath §4.1.3"
        },
    )
    step_discount: float = field(
        default=1.0,
        metadata={
            "help": "process supervision: weight of the k-th later step's reward in a token's advantage is this ** k "
            "(1: DeepSeekMath's sum; 0: the token's own step alone)"
        },
    )
    advantage: Literal["grpo", "rloo"] = field(
        default="grpo",
        metadata={
            "help": "outcome baseline: grpo: the group's mean reward; rloo: the mean of the other G-1 samples' "
            "rewards (Ahmadian et al. 2024)"
        },
    )
    scale_rewards: bool = field(default=True, metadata={"help": "divide by the group's reward std (off: Dr. GRPO)"})
    advantage_eps: float = field(default=1e-4, metadata={"help": "added to the group std before dividing"})
    dynamic_sampling: bool = field(
        default=False,
        metadata={
            "help": "drop groups whose rewards are all equal and sample more prompts until the batch is full (DAPO)"
        },
    )
    max_sampling_rounds: int = field(
        default=4,
        metadata={"help": "dynamic sampling: at most this many rounds of prompts_per_iteration prompts per iteration"},
    )
    stage: RLStageConfig = field(default_factory=RLStageConfig)
    rollout: RolloutConfig = field(default_factory=grpo_rollout)
    update: UpdateConfig = field(default_factory=grpo_update)
    train: TrainConfig = field(default_factory=lambda: rl_training(out="runs/grpo"))

    def __post_init__(self) -> None:
        check(self.group_size >= 2, "group_size", self.group_size, "must be at least 2 (a group is its own baseline)")
        check(self.kl_coef >= 0, "kl_coef", self.kl_coef, "must be >= 0")
        check(self.supervision in ("outcome", "process"), "supervision", self.supervision, "choose outcome or process")
        check(0 <= self.step_discount <= 1, "step_discount", self.step_discount, "must be in [0, 1]")
        check(self.advantage in ("grpo", "rloo"), "advantage", self.advantage, "choose grpo or rloo")
        check(
            self.advantage == "grpo" or self.supervision == "outcome",
            "advantage",
            self.advantage,
            "rloo's leave-one-out baseline is one per completion: use it with outcome supervision",
        )
        check(self.advantage_eps > 0, "advantage_eps", self.advantage_eps, "must be positive")
        check(self.max_sampling_rounds > 0, "max_sampling_rounds", self.max_sampling_rounds, "must be positive")
        check_rl_config(self)

    @property
    def samples_per_prompt(self) -> int:
        return self.group_size

    @property
    def steps_per_iteration(self) -> int:
        return steps_per_iteration(self.rollout.prompts_per_iteration * self.group_size, self.update)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4, leave_one_out: bool = False
) -> torch.Tensor:
    """``(r - baseline) / (group std + eps)`` per completion, for rewards laid out group after group; the
    baseline is the group's mean reward, or with ``leave_one_out`` the mean of the group's other rewards."""
    groups = rewards.view(-1, group_size)
    if leave_one_out:
        baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    else:
        baseline = groups.mean(dim=1, keepdim=True)
    centred = groups - baseline
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def process_advantages(
    step_rewards: torch.Tensor,
    step_mask: torch.Tensor,
    group_size: int,
    scale: bool = True,
    eps: float = 1e-4,
    discount: float = 1.0,
) -> torch.Tensor:
    """Per position, the sum of the group-normalised rewards of the steps ending at or after it
    (module docstring), for ``(rows, positions)`` step tensors laid out group after group; the
    ``k``-th step after the position's own is weighted by ``discount ** k``."""
    width = group_size * step_rewards.shape[1]  # one row per group
    rewards, mask = step_rewards.view(-1, width), step_mask.view(-1, width)
    counts = mask.sum(dim=1, keepdim=True)
    mean = torch.where(mask, rewards, 0.0).sum(dim=1, keepdim=True) / counts.clamp(min=1)
    normalised = torch.where(mask, rewards - mean, 0.0)
    if scale:  # the sample std over the group's steps, as for outcome rewards
        std = (normalised.pow(2).sum(dim=1, keepdim=True) / (counts - 1).clamp(min=1)).sqrt()
        normalised = normalised / (std + eps)
    normalised = normalised.view_as(step_rewards)
    advantages, later = torch.zeros_like(normalised), normalised.new_zeros(normalised.shape[0])
    for position in range(
        normalised.shape[1] - 1, -1, -1
    ):  # a step's end passes on the discounted sum of the steps after it
        later = normalised[:, position] + torch.where(step_mask[:, position], discount, 1.0) * later
        advantages[:, position] = later
    return advantages


class GRPO(Algorithm):
    def __init__(self, config: GRPOConfig):
        super().__init__(config)
        self.samples_per_prompt = config.group_size
        self.process_supervision = config.supervision == "process"
        self.sampling_rounds = config.max_sampling_rounds if config.dynamic_sampling else 1
        self.dynamic_sampling = config.dynamic_sampling

    def informative(self, rewards: list[float], step_rewards: list[list[float]] | None) -> list[bool]:
        """Per group: whether its rewards (its step rewards, under process supervision) differ."""
        size = self.config.group_size
        values = step_rewards if self.process_supervision else [[reward] for reward in rewards]
        groups = [sum(values[first : first + size], []) for first in range(0, len(values), size)]
        return [max(group) != min(group) for group in groups]

    def advantages(self, batches: list[RolloutBatch], total: Total = identity) -> dict[str, float]:
        """Group-normalised advantages; a group lies in one batch, so nothing is summed over processes."""
        group, scale, eps = self.config.group_size, self.config.scale_rewards, self.config.advantage_eps
        for batch in batches:
            if self.process_supervision:
                advantages = process_advantages(
                    batch.step_rewards, batch.step_mask, group, scale, eps, self.config.step_discount
                )
                batch.advantages = advantages * batch.action_mask
            else:
                advantages = group_advantages(batch.rewards, group, scale, eps, self.config.advantage == "rloo")
                batch.advantages = advantages[:, None] * batch.action_mask
        return {}

    def terms(self, outputs: PolicyOutputs, minibatch: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = self.policy_terms(outputs, minibatch)
        mask = minibatch.action_mask
        # The reference's log-probabilities exist on actions only: elsewhere the estimate is set to exactly 0.
        logprobs = torch.where(mask, outputs.logprobs, minibatch.reference_logprobs)
        kl = aggregate(kl_k3(logprobs, minibatch.reference_logprobs), mask, self.aggregation)
        metrics["kl_k3"] = float(kl.detach())
        return loss + self.config.kl_coef * kl, metrics


def grpo(config: GRPOConfig) -> dict:
    """Train ``config.stage.policy`` with GRPO on the task's prompts; returns the run summary (greedy
    held-out accuracy and reward before and after, rollout rewards, final KL, checkpoint)."""
    return run_policy_stage("grpo", config, lambda tokenizer, context_length: GRPO(config))
