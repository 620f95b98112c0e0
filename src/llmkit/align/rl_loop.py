"""The loop PPO and GRPO share: sample rollouts, score them, compute advantages, then several epochs
of clipped policy-gradient steps over minibatches; the algorithms differ only in their advantages and
the terms of their loss (:class:`Algorithm`).

One iteration (:meth:`PolicyLoop.iterate`):

1. choose ``prompts_per_iteration`` training prompts: epochs over the prompt set, each in its own
   seeded order, so iteration ``i`` sees a pure function of ``(seed, i)``;
2. generate ``samples_per_prompt`` completions each through the inference engine, with tools
   (:mod:`llmkit.align.rollout`), and rate them with the reward (and each of their steps, when the
   algorithm asks for step rewards); with dynamic sampling (GRPO) the prompts whose samples all earn
   the same reward are dropped and further rounds of prompts sampled until the batch is full;
3. one no-grad pass of the policy (old log-probabilities, values) and of the frozen reference;
4. the algorithm's advantages (PPO: KL-penalised rewards and GAE; GRPO: group-normalised rewards);
5. ``epochs`` passes over the batch in random minibatches, one AdamW step each
   (:func:`llmkit.train.optim.build_optimizer`, the learning-rate schedule of
   :func:`llmkit.train.optim.learning_rate` per iteration), the gradient norm clipped.

The policy stays in evaluation mode throughout: dropout would make the log-probabilities of the
update differ from the rollout's for no reason (Huang et al. 2024 disable it; so does TRL), and the
engine samples from the same module the optimizer updates, so every rollout is on-policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from llmkit.align.policy_gradient import AGGREGATIONS, PolicyOutputs, clipped_policy_loss, masked_mean, minibatches, policy_forward
from llmkit.align.rewards import TASKS, Reward
from llmkit.align.rollout import Prompt, Rollout, RolloutBatch, autocast, build_batch, generate_rollouts, score_rollouts
from llmkit.config import check, parse_duration
from llmkit.infer.completion import Tools
from llmkit.infer.engine import Engine
from llmkit.infer.sampling import GenerationConfig
from llmkit.tokenizer import Tokenizer
from llmkit.train.optim import build_optimizer, learning_rate


@dataclass
class RLRunConfig:
    policy: str = field(default="runs/sft", metadata={"help": "checkpoint of the starting policy (and of the frozen reference)"})
    out: str = field(default="runs/rl", metadata={"help": "run directory: checkpoints, metrics.csv, curves"})
    task: Literal["arithmetic", "arithmetic_plain", "functions"] = field(default="arithmetic", metadata={
        "help": "embedded task giving the prompts and the exact checker (arithmetic: with calculator calls)"})
    reward_model: str | None = field(default=None, metadata={"help": "reward-model checkpoint (llmkit reward); default: the task's verifiable reward"})
    format_bonus: float = field(default=0.0, metadata={"help": "verifiable reward of a well-formed but wrong answer (1 = correct)"})
    missing_end_penalty: float = field(default=0.0, metadata={"help": "subtracted from the reward of a completion cut off before its end token"})
    train_problems: int = field(default=2000, metadata={"help": "training prompts generated (functions: at most all tasks)"})
    eval_problems: int = field(default=200, metadata={"help": "held-out prompts for the greedy before/after accuracy"})
    eval_interval: int = field(default=0, metadata={"help": "also evaluate every this many iterations (0 = before and after only)"})
    iterations: int = field(default=100, metadata={"help": "rollout + optimisation iterations"})
    max_time: str | None = field(default=None, metadata={"help": "stop after this wall time, e.g. 10m"})
    checkpoint_interval: int = field(default=25, metadata={"help": "checkpoint every this many iterations (and at the end)"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept on disk"})
    seed: int = field(default=0, metadata={"help": "seed of prompt order, sampling and minibatches"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={"help": "autocast dtype of the training forward passes"})
    resume: bool = field(default=False, metadata={"help": "continue from the run directory's latest checkpoint"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        check(self.task in TASKS, "task", self.task, f"choose one of {', '.join(TASKS)}")
        check(self.missing_end_penalty >= 0, "missing_end_penalty", self.missing_end_penalty, "must be >= 0")
        for name in ("train_problems", "eval_problems", "iterations", "checkpoint_interval", "keep_last"):
            check(getattr(self, name) > 0, name, getattr(self, name), "must be positive")
        check(self.eval_interval >= 0, "eval_interval", self.eval_interval, "must be >= 0")
        try:
            seconds = parse_duration(self.max_time)
        except ValueError as error:
            check(False, "max_time", self.max_time, str(error))
        check(seconds is None or seconds > 0, "max_time", self.max_time, "must be positive")
        check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device", self.device,
              "must be auto, cpu, cuda or cuda:N")


@dataclass
class RolloutConfig:
    prompts_per_iteration: int = field(default=16, metadata={"help": "prompts sampled per iteration"})
    max_new_tokens: int = field(default=160, metadata={"help": "tokens a completion may sample (tool results not counted)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollouts (the loss uses the same)"})
    tools: Literal["calculator", "default", "none"] = field(default="calculator", metadata={
        "help": "tools the engine runs during rollouts and evaluation: the calculator, calculator + Python sandbox, or none"})
    engine_batch_size: int = field(default=64, metadata={"help": "sequences the engine decodes together"})
    forward_batch_size: int = field(default=16, metadata={"help": "sequences per no-grad scoring pass"})

    def __post_init__(self) -> None:
        for name in ("prompts_per_iteration", "max_new_tokens", "engine_batch_size", "forward_batch_size"):
            check(getattr(self, name) > 0, name, getattr(self, name), "must be positive")
        check(self.temperature > 0, "temperature", self.temperature, "must be positive (the policy's distribution is sampled)")


@dataclass
class RLOptimConfig:
    lr: float = field(default=1e-5, metadata={"help": "peak AdamW learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine schedule: final learning rate as a fraction of the peak"})
    schedule: Literal["constant", "cosine"] = field(default="constant", metadata={"help": "learning rate over the iterations, after warmup"})
    warmup_iterations: int = field(default=0, metadata={"help": "linear learning-rate warmup, in iterations"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on matrices"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm of every step to this (0 = off)"})
    epochs: int = field(default=4, metadata={"help": "passes over each rollout batch"})
    minibatch_size: int = field(default=8, metadata={"help": "sequences per optimizer step"})
    clip: float = field(default=0.2, metadata={"help": "epsilon of the clipped ratio 1 +- epsilon"})
    loss_aggregation: Literal["token", "sequence"] = field(default="token", metadata={
        "help": "token: mean over all tokens of a minibatch; sequence: per-sequence mean, then mean (DeepSeekMath)"})

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", self.lr, "must be positive")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        check(self.warmup_iterations >= 0, "warmup_iterations", self.warmup_iterations, "must be >= 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        check(0 <= self.beta1 < 1, "beta1", self.beta1, "must be in [0, 1)")
        check(0 <= self.beta2 < 1, "beta2", self.beta2, "must be in [0, 1)")
        check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0")
        check(self.epochs > 0, "epochs", self.epochs, "must be positive")
        check(self.minibatch_size > 0, "minibatch_size", self.minibatch_size, "must be positive")
        check(0 < self.clip < 1, "clip", self.clip, "must be in (0, 1)")
        check(self.loss_aggregation in AGGREGATIONS, "loss_aggregation", self.loss_aggregation, f"choose one of {', '.join(AGGREGATIONS)}")


class Algorithm:
    """What PPO and GRPO add to the shared loop: ``samples_per_prompt``, an optional value head (trained
    with the policy), the advantages of a scored batch and the loss of a minibatch, whose clipped
    policy term :meth:`policy_terms` computes for both."""

    samples_per_prompt: int = 1
    value_head: nn.Module | None = None
    process_supervision: bool = False  # whether the advantages need a reward per step
    dynamic_sampling: bool = False  # drop the prompts whose samples are not informative, and sample more
    sampling_rounds: int = 1  # rounds of prompts_per_iteration prompts an iteration may sample

    def __init__(self, optim: RLOptimConfig, temperature: float):
        self.clip, self.aggregation, self.temperature = optim.clip, optim.loss_aggregation, temperature

    def informative(self, rewards: list[float], step_rewards: list[list[float]] | None) -> list[bool] | None:
        """Per prompt, whether its rated samples can teach anything (None: the question does not apply)."""
        return None

    def advantages(self, batch: RolloutBatch) -> dict[str, float]:
        """Set ``batch.advantages`` (and ``batch.returns`` for a critic); return metrics."""
        raise NotImplementedError

    def loss(self, policy: nn.Module, minibatch: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def policy_terms(self, policy: nn.Module, minibatch: RolloutBatch) -> tuple[PolicyOutputs, torch.Tensor, dict[str, float]]:
        """The policy's forward pass over a minibatch and its clipped surrogate loss, with the entropy."""
        outputs = policy_forward(policy, minibatch.input_ids, self.temperature, self.value_head)
        loss, metrics = clipped_policy_loss(outputs.logprobs, minibatch.old_logprobs, minibatch.advantages,
                                            minibatch.action_mask, self.clip, self.aggregation)
        metrics.update(policy_loss=float(loss.detach()), entropy=float(masked_mean(outputs.entropy.detach(), minibatch.action_mask)))
        return outputs, loss, metrics

    def end_iteration(self, metrics: dict[str, float]) -> None:
        """Adapt to the iteration's metrics (PPO's KL controller)."""

    def state_dict(self) -> dict:
        """JSON-serialisable state a resumed run needs (besides the value head's weights)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def prompt_indices(count: int, per_iteration: int, seed: int, iteration: int) -> list[int]:
    """The prompts of one iteration: consecutive positions in a stream of epochs over ``count`` prompts,
    each epoch in its own seeded order."""
    positions = range(iteration * per_iteration, (iteration + 1) * per_iteration)
    orders: dict[int, np.ndarray] = {}
    chosen = []
    for position in positions:
        epoch, offset = divmod(position, count)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng((seed, epoch)).permutation(count)
        chosen.append(int(orders[epoch][offset]))
    return chosen


class PolicyLoop:
    """A policy, its frozen reference, an algorithm, prompts and a reward: :meth:`iterate` runs one iteration."""

    def __init__(self, policy: nn.Module, reference: nn.Module, tokenizer: Tokenizer, algorithm: Algorithm, reward: Reward,
                 prompts: list[Prompt], rollout: RolloutConfig, optim: RLOptimConfig, iterations: int, seed: int = 0,
                 tools: Tools | None = None, missing_end_penalty: float = 0.0, dtype: torch.dtype = torch.float32):
        self.policy, self.reference, self.tokenizer = policy, reference, tokenizer
        self.algorithm, self.reward, self.prompts = algorithm, reward, prompts
        self.rollout, self.optim, self.iterations, self.seed = rollout, optim, iterations, seed
        self.tools, self.missing_end_penalty, self.dtype = tools, missing_end_penalty, dtype
        self.device = policy.token_embedding.weight.device
        self.reference.requires_grad_(False)
        self.engine = Engine(policy.eval(), tokenizer, decoding_layout=False, max_batch_size=rollout.engine_batch_size)
        self.generation = GenerationConfig(max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature)
        trained = nn.ModuleList([policy] + ([algorithm.value_head] if algorithm.value_head is not None else []))
        self.trained_parameters = [parameter for parameter in trained.parameters() if parameter.requires_grad]
        self.optimizer = build_optimizer(trained, optim.lr, optim.weight_decay, (optim.beta1, optim.beta2),
                                         fused=self.device.type == "cuda")
        self.peak_lrs = [group["lr"] for group in self.optimizer.param_groups]

    def set_learning_rate(self, iteration: int) -> float:
        factor = learning_rate(iteration, iteration / self.iterations, 1.0, self.optim.warmup_iterations,
                               self.optim.schedule, self.optim.min_lr_ratio, 1.0)
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):
            group["lr"] = peak * factor
        return self.optim.lr * factor

    def rate(self, rollouts: list[Rollout]) -> tuple[list[float], list[list[float]] | None]:
        """The rewards of ``rollouts`` (and of each of their steps, when the algorithm asks for them)."""
        penalties = [0.0 if rollout.finished else self.missing_end_penalty for rollout in rollouts]
        rewards = [reward - penalty for reward, penalty in zip(self.reward.score(rollouts), penalties)]
        steps = None
        if self.algorithm.process_supervision:  # the penalty lands on the step that was cut off
            steps = [values[:-1] + [values[-1] - penalty] for values, penalty in zip(self.reward.score_steps(rollouts), penalties)]
        return rewards, steps

    def collect(self, iteration: int) -> tuple[RolloutBatch | None, dict[str, float]]:
        """Steps 1-3: the scored rollout batch of ``iteration`` and the metrics of everything sampled.

        With dynamic sampling, round ``r`` of the iteration takes the prompts (and sampling seeds) of
        position ``iteration * rounds + r`` of the prompt stream, so a resumed run samples what an
        uninterrupted one would; the batch is None when no round found an informative prompt."""
        rounds, per_iteration = self.algorithm.sampling_rounds, self.rollout.prompts_per_iteration
        group = self.algorithm.samples_per_prompt
        kept: list[Rollout] = []
        kept_rewards: list[float] = []
        kept_steps: list[list[float]] = []
        sampled_rewards: list[float] = []
        informative_flags: list[bool] = []
        generated_tokens = 0
        for round_index in range(rounds):
            stream = iteration * rounds + round_index
            chosen = [self.prompts[index] for index in prompt_indices(len(self.prompts), per_iteration, self.seed, stream)]
            rollouts = generate_rollouts(self.engine, chosen, group, self.generation, self.tools, self.seed, stream)
            rewards, steps = self.rate(rollouts)
            sampled_rewards += rewards
            generated_tokens += sum(rollout.injected.count(False) for rollout in rollouts)
            informative = self.algorithm.informative(rewards, steps)
            informative_flags += informative or []
            keep = informative if self.algorithm.dynamic_sampling else [True] * len(chosen)
            for prompt_index in [index for index, flag in enumerate(keep) if flag][:per_iteration - len(kept) // group]:
                rows = slice(prompt_index * group, (prompt_index + 1) * group)
                kept += rollouts[rows]
                kept_rewards += rewards[rows]
                kept_steps += steps[rows] if steps is not None else []
            if len(kept) == per_iteration * group:
                break
        sampled = torch.tensor(sampled_rewards)
        metrics = {"reward": float(sampled.mean()), "reward_std": float(sampled.std(unbiased=False)),
                   "generated_tokens": float(generated_tokens)}
        if informative_flags:
            metrics["uniform_groups"] = 1 - sum(informative_flags) / len(informative_flags)
        if self.algorithm.dynamic_sampling:
            metrics.update(sampling_rounds=float(round_index + 1), kept_groups=float(len(kept) // group))
        if not kept:
            return None, metrics
        batch = build_batch(kept, kept_rewards, self.tokenizer.pad_id, kept_steps if self.algorithm.process_supervision else None)
        batch = score_rollouts(batch.to(self.device), self.policy, self.reference, self.algorithm.value_head,
                               self.rollout.temperature, self.rollout.forward_batch_size, self.dtype)
        return batch, metrics

    def iterate(self, iteration: int) -> dict[str, float]:
        """One iteration (module docstring); returns its metrics."""
        lr = self.set_learning_rate(iteration)
        batch, metrics = self.collect(iteration)
        metrics["lr"] = lr
        if batch is None:  # nothing to learn from: no update
            return metrics
        metrics.update(kl=batch.sequence_kl(), response_length=float(batch.response_lengths.float().mean()))
        metrics.update(self.algorithm.advantages(batch))
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence((self.seed, iteration, 1)).generate_state(1)[0]))
        totals: dict[str, float] = {}
        steps = 0
        for _ in range(self.optim.epochs):
            for indices in minibatches(len(batch), self.optim.minibatch_size, generator):
                step_metrics = self.step(batch.rows(indices.to(self.device)))
                for name, value in step_metrics.items():
                    totals[name] = totals.get(name, 0.0) + value
                steps += 1
        metrics.update({name: total / steps for name, total in totals.items()})
        self.algorithm.end_iteration(metrics)
        return metrics

    def step(self, minibatch: RolloutBatch) -> dict[str, float]:
        """One optimizer step on a minibatch; its loss, gradient norm and the algorithm's metrics."""
        with autocast(self.device, self.dtype):
            loss, metrics = self.algorithm.loss(self.policy, minibatch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.optim.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trained_parameters, self.optim.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.trained_parameters if p.grad is not None])
        self.optimizer.step()
        return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), **metrics}

