"""Rollouts as the Trainer's batch source: PPO and GRPO train in the one :class:`~llmkit.train.trainer.Trainer`.

An *iteration* is ``epochs x ceil(samples / minibatch_size)`` optimizer steps (:func:`steps_per_iteration`),
one cycle of the Trainer's hooks. When the Trainer asks for the first minibatch of an iteration, the
source (:class:`RolloutSource`):

1. chooses the iteration's ``prompts_per_iteration`` training prompts: epochs over the prompt set, each
   in its own seeded order, so iteration ``i`` sees a pure function of ``(seed, i)``;
2. samples ``samples_per_prompt`` completions of each through the inference engine, with tools
   (:mod:`llmkit.align.rollout`), and rates them with the reward (and each of their steps, when the
   algorithm asks for step rewards); with dynamic sampling (GRPO) the prompts whose samples all earn
   the same reward are dropped and further rounds of prompts sampled until the batch is full;
3. scores them with one no-grad pass of the policy (old log-probabilities, values) and of the frozen
   reference;
4. computes the algorithm's advantages (PPO: KL-penalised rewards and GAE; GRPO: group-normalised rewards);
5. lays out the iteration's minibatches: ``epochs`` passes over the batch, each in its own seeded order.

The Trainer then takes one minibatch per optimizer step, with the algorithm's loss as its ``loss_fn``
(:meth:`RolloutSource.loss`): its optimizer, schedule, gradient clipping, spike guard (on the gradient
norm: a policy-gradient loss has no scale of its own), checkpoints, logs and DDP are every other
stage's. After an iteration's last step the Trainer's hook (:meth:`RolloutSource.after_step`) lets the
algorithm adapt (PPO's KL controller).

**The sampler.** Rollouts and evaluations run through an :class:`~llmkit.infer.engine.Engine` over a copy of the
policy in the run's dtype, laid out for decoding (the kernels' tiles, which the module being trained cannot hold),
made again after every update: the weights the optimizer just wrote, as TRL and OpenRLHF hand theirs to a vLLM
engine. Step 3 scores the samples with the policy itself, so the old log-probabilities are the trained module's and
the ratios of the first update start at exactly 1. A SmolLM2 iteration of 8 prompts x 8 samples of up to 192 tokens
with the calculator, float32: rollouts 97 s from the policy itself, 47 s from the copy (7,958 tokens either way).

**Shards.** The Trainer splits each step into ``grad_accum x processes`` micro-batches; the source
splits each iteration the same way. Shard ``k`` is the ``k``-th share of the iteration's prompts with
all their samples (GRPO's advantages need whole groups), sampled, scored and laid out on its own, and
gives micro-batch ``k`` of every step. Process ``r`` holds the shards of the micro-batches the Trainer
asks it for (``r*A .. r*A + A - 1``), so N processes with accumulation A sample and train on exactly what
one process with accumulation N*A does: a request's sampling seed belongs to its position in the
iteration. Statistics of the whole batch (PPO's advantage whitening, the logged rewards) are summed over
the processes, and each micro-batch's loss is weighted by its share of the minibatch's units (tokens,
sequences or micro-batches, by the loss type: :class:`~llmkit.align.policy_gradient.Aggregation`), so a
step's loss is its whole minibatch's aggregate however it is split (``bnpo`` excepted, by definition).
A micro-batch with nothing to learn from (a shard that kept fewer groups under dynamic sampling) is one
row of padding with weight 0; a step made only of those has a zero gradient, and the Trainer makes no
update.

**Resume.** An iteration's rollouts live in memory only, so the Trainer checkpoints, evaluates and stops
between iterations (the hooks' ``cycle``); a resumed run samples iteration ``i`` afresh from the weights
an uninterrupted run had then, with the same prompts and seeds.

The policy stays in evaluation mode throughout: dropout would make the log-probabilities of the update
differ from the rollout's for no reason (Huang et al. 2024 disable it; so does TRL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmkit.align.policy_gradient import (
    LOSS_TYPES,
    Aggregation,
    PolicyModel,
    PolicyOutputs,
    clipped_policy_loss,
    identity,
    masked_mean,
)
from llmkit.align.rewards import Reward
from llmkit.align.rollout import Prompt, Rollout, RolloutBatch, build_batch, generate_rollouts, score_rollouts
from llmkit.config import check
from llmkit.infer.engine import Engine
from llmkit.infer.sampling import GenerationConfig
from llmkit.infer.tools import ToolSelection, select_tools
from llmkit.model.checkpoint import detached_copy
from llmkit.tokenizer import Tokenizer
from llmkit.train.distributed import World
from llmkit.train.trainer import TrainingHooks, resolve_device, resolve_dtype

Total = Callable[[torch.Tensor], torch.Tensor]  # a sum over the processes


@dataclass
class RolloutConfig:
    prompts_per_iteration: int = field(default=16, metadata={"help": "prompts sampled per iteration"})
    max_new_tokens: int = field(
        default=160, metadata={"help": "tokens a completion may sample (tool results not counted)"}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "sampling temperature of the rollouts (the loss uses the same)"}
    )
    tools: ToolSelection = field(
        default="calculator",
        metadata={
            "help": "tools the engine runs during rollouts and evaluation: the calculator, calculator + Python "
            "sandbox, or none"
        },
    )
    engine_batch_size: int = field(default=64, metadata={"help": "sequences the engine decodes together"})
    forward_batch_size: int = field(default=16, metadata={"help": "sequences per no-grad scoring pass"})

    def __post_init__(self) -> None:
        for name in ("prompts_per_iteration", "max_new_tokens", "engine_batch_size", "forward_batch_size"):
            check(getattr(self, name) > 0, name, getattr(self, name), "must be positive")
        check(
            self.temperature > 0,
            "temperature",
            self.temperature,
            "must be positive (the policy's distribution is sampled)",
        )


@dataclass
class UpdateConfig:
    iterations: int = field(default=100, metadata={"help": "rollout + update iterations (the run's budget)"})
    epochs: int = field(default=4, metadata={"help": "passes over each rollout batch"})
    minibatch_size: int = field(
        default=8, metadata={"help": "sequences per optimizer step (split into grad_accum x processes micro-batches)"}
    )
    clip: float = field(default=0.2, metadata={"help": "epsilon of the clipped ratio 1 +- epsilon"})
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = field(
        default="dapo",
        metadata={
            "help": "TRL's names: grpo: per-sequence mean, then mean (DeepSeekMath); dapo: mean over the minibatch's "
            "tokens; bnpo: token mean per micro-batch, then mean; dr_grpo: token sum / (sequences x max_new_tokens)"
        },
    )

    def __post_init__(self) -> None:
        for name in ("iterations", "epochs", "minibatch_size"):
            check(getattr(self, name) > 0, name, getattr(self, name), "must be positive")
        check(0 < self.clip < 1, "clip", self.clip, "must be in (0, 1)")
        check(self.loss_type in LOSS_TYPES, "loss_type", self.loss_type, f"choose one of {', '.join(LOSS_TYPES)}")


def steps_per_iteration(samples: int, update: UpdateConfig) -> int:
    """Optimizer steps of one iteration: ``epochs`` passes over ``samples`` sequences in minibatches."""
    return update.epochs * -(-samples // update.minibatch_size)


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


class Algorithm:
    """What PPO and GRPO add to the shared source: ``samples_per_prompt``, whether a value head (a
    critic) is trained with the policy, the advantages of a scored batch and the loss terms of a
    minibatch, whose clipped policy term :meth:`policy_terms` computes for both. ``config`` is the
    stage's config (sections ``rollout``, ``update``, ``stage``, ``train``)."""

    samples_per_prompt: int = 1
    critic: bool = False
    process_supervision: bool = False  # whether the advantages need a reward per step
    dynamic_sampling: bool = False  # drop the prompts whose samples are not informative, and sample more
    sampling_rounds: int = 1  # rounds of prompts an iteration may sample
    pretraining = None  # PPO-ptx's token batches
    ptx_coef: float = 0.0

    def __init__(self, config):
        self.config = config
        self.clip = config.update.clip
        self.aggregation = Aggregation(config.update.loss_type, config.rollout.max_new_tokens)

    def informative(self, rewards: list[float], step_rewards: list[list[float]] | None) -> list[bool] | None:
        """Per prompt, whether its rated samples can teach anything (None: the question does not apply)."""
        return None

    def advantages(self, batches: list[RolloutBatch], total: Total = identity) -> dict[str, float]:
        """Set each batch's ``advantages`` (and ``returns`` for a critic); return metrics. ``batches`` are
        this process's shards, ``total`` sums a statistic over the processes."""
        raise NotImplementedError

    def terms(self, outputs: PolicyOutputs, minibatch: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The algorithm's loss on a minibatch, aggregated over its actions, and metrics."""
        raise NotImplementedError

    def loss(
        self,
        model: nn.Module,
        minibatch: RolloutBatch,
        weight: float = 1.0,
        language: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The Trainer's loss on a micro-batch: :meth:`terms` times ``weight`` (the micro-batch's share of its
        minibatch, module docstring), plus PPO-ptx's language-model loss on ``language`` rows."""
        outputs = model(minibatch.input_ids, None if language is None else language["input_ids"], minibatch.action_mask)
        loss, metrics = self.terms(outputs, minibatch)
        loss, metrics = loss * weight, {name: value * weight for name, value in metrics.items()}
        if language is not None:
            # float32: bf16 logits lose too much precision for a softmax over the vocabulary.
            ptx = F.cross_entropy(outputs.language_logits.float().flatten(0, 1), language["targets"].flatten())
            loss = loss + self.ptx_coef * ptx
            metrics["ptx_loss"] = float(ptx.detach())
        return loss, metrics

    def policy_terms(self, outputs: PolicyOutputs, minibatch: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The clipped surrogate loss of a minibatch, with its metrics and the policy's entropy."""
        loss, metrics = clipped_policy_loss(
            outputs.logprobs,
            minibatch.old_logprobs,
            minibatch.advantages,
            minibatch.action_mask,
            self.clip,
            self.aggregation,
        )
        metrics.update(
            policy_loss=float(loss.detach()),
            entropy=float(masked_mean(outputs.entropy.detach(), minibatch.action_mask)),
        )
        return loss, metrics

    def end_iteration(self, metrics: dict[str, float]) -> None:
        """Adapt to the iteration's metrics (PPO's KL controller)."""

    def state_dict(self) -> dict:
        """JSON-serialisable state a resumed run needs."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class Shard:
    """One share of an iteration (module docstring): its scored rollouts (None when it kept none), the
    rows of its micro-batch at each step of the iteration, and each micro-batch's loss weight."""

    batch: RolloutBatch | None
    schedule: list[torch.Tensor]
    weights: list[float] = field(default_factory=list)


# The sums over an iteration's shards that its logged metrics are made of.
SUMS = (
    "sampled",
    "reward",
    "reward_squared",
    "generated_tokens",
    "groups",
    "informative",
    "rounds",
    "kept",
    "kept_groups",
    "kl",
    "response_length",
)


class RolloutSource(TrainingHooks):
    """Rollouts of ``model`` (policy and value head) on ``prompts``, rated by ``reward``, as the Trainer's
    batches, loss function (:meth:`loss`) and hooks (module docstring); ``evaluation(engine, world, total)``
    is the held-out evaluation (before training, every ``eval_interval`` steps and at the end)."""

    spike_metric = "grad_norm"
    language_model = "policy"

    def __init__(
        self,
        model: PolicyModel,
        reference: nn.Module,
        tokenizer: Tokenizer,
        algorithm: Algorithm,
        reward: Reward,
        prompts: list[Prompt],
        evaluation: Callable[[Engine, World, Total], dict[str, float]] | None = None,
        world: World | None = None,
    ):
        config = algorithm.config
        self.model, self.reference, self.tokenizer = model, reference.requires_grad_(False).eval(), tokenizer
        self.algorithm, self.reward, self.prompts, self.evaluation = algorithm, reward, prompts, evaluation
        self.rollout, self.update, self.seed = config.rollout, config.update, config.train.seed
        self.world = world or World()
        self.parts = config.train.grad_accum * self.world.world_size
        for name, value in (
            ("prompts_per_iteration", self.rollout.prompts_per_iteration),
            ("minibatch_size", self.update.minibatch_size),
        ):
            check(
                value % self.parts == 0,
                name,
                value,
                f"must be a multiple of grad_accum x processes = {self.parts}: "
                f"every micro-batch is an equal share of an iteration",
            )
        self.cycle = config.steps_per_iteration
        self.total_steps = self.update.iterations * self.cycle
        self.generation = GenerationConfig(
            max_new_tokens=self.rollout.max_new_tokens, temperature=self.rollout.temperature
        )
        self.tools = select_tools(self.rollout.tools)
        self.dtype = resolve_dtype(config.train.dtype, resolve_device(config.train.device))
        self.missing_end_penalty = config.stage.missing_end_penalty
        self.engine: Engine | None = None  # made on first use after an update, on the device the policy is on
        self.iteration: int | None = None  # the iteration whose shards are in memory
        self.shards: dict[int, Shard] = {}
        self.metrics: dict[str, float] = {}
        self.before: dict[str, float] | None = None
        self.evaluated: tuple[int, dict[str, float]] | None = None  # (data position, metrics) of the latest evaluation
        self.generated_tokens = 0

    # ----------------------------------------------------------------- the Trainer's batches
    def get_batch(self, index: int) -> dict[str, torch.Tensor]:
        position, part = divmod(index, self.parts)
        iteration, step = divmod(position, self.cycle)
        if iteration != self.iteration:
            self._start_iteration(iteration)
        shard = self.shards[part]
        rows = shard.schedule[step]
        minibatch = (
            shard.batch.rows(rows.to(shard.batch.input_ids.device))
            if len(rows)
            else idle_rows(self.tokenizer.pad_id, self.algorithm.critic)
        )
        tensors = {**minibatch.tensors(), "weight": torch.tensor(shard.weights[step])}
        if (
            self.algorithm.pretraining is not None
        ):  # PPO-ptx: the index's pretraining rows, a function of it as the rest
            language = self.algorithm.pretraining.get_batch(index)
            tensors.update(language_ids=language["input_ids"], language_targets=language["targets"])
        return tensors

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The Trainer's ``loss_fn``: the algorithm's loss on a micro-batch, with the iteration's rollout metrics."""
        language = (
            {"input_ids": batch["language_ids"], "targets": batch["language_targets"]}
            if "language_ids" in batch
            else None
        )
        loss, metrics = self.algorithm.loss(model, RolloutBatch.from_tensors(batch), float(batch["weight"]), language)
        return loss, {**metrics, **self.metrics}

    # ----------------------------------------------------------------- hooks
    def after_step(self, trainer) -> None:
        self.engine = None  # its copy of the policy is out of date
        if trainer.data_position % self.cycle == 0 and self.iteration is not None:
            self.algorithm.end_iteration(self.metrics)
            self.iteration, self.shards = None, {}  # the rollouts are spent

    def evaluate(self, trainer) -> dict[str, float] | None:
        if self.evaluation is None:
            return None
        metrics = self.evaluation(self._engine(), self.world, self.total)
        if trainer.data_position == 0 and self.before is None:
            self.before = metrics
        self.evaluated = trainer.data_position, metrics
        return metrics

    def state_dict(self) -> dict:
        return {
            "algorithm": self.algorithm.state_dict(),
            "before": self.before,
            "generated_tokens": self.generated_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        self.algorithm.load_state_dict(state["algorithm"])
        self.before, self.generated_tokens = state["before"], state["generated_tokens"]

    # ----------------------------------------------------------------- an iteration
    def total(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the processes."""
        if not self.world.distributed:
            return value
        value = value.to(self.model.policy.token_embedding.weight.device).clone()
        torch.distributed.all_reduce(value)
        return value

    def _engine(self) -> Engine:
        """The engine rollouts and evaluations sample from: a copy of the policy in the run's dtype, laid out for
        decoding, made on first use after each update (the module docstring's sampler)."""
        if self.engine is None:
            self.engine = Engine(
                detached_copy(self.model.policy, self.dtype),
                self.tokenizer,
                decoding_layout=True,
                max_batch_size=self.rollout.engine_batch_size,
            )
            self.reference.to(self.engine.device)
        return self.engine

    def _start_iteration(self, iteration: int) -> None:
        """Steps 1-5 of the module docstring for this process's shards."""
        first = self.world.rank * self.parts // self.world.world_size
        sampled = {
            part: self._sample(iteration, part) for part in range(first, first + self.parts // self.world.world_size)
        }
        batches = [batch for batch, _ in sampled.values() if batch is not None]
        advantage_metrics = self.algorithm.advantages(batches, self.total)
        self.shards = {
            part: Shard(batch, self._schedule(iteration, part, 0 if batch is None else len(batch)))
            for part, (batch, _) in sampled.items()
        }
        self._weigh()
        self.metrics = {**self._metrics(iteration, [sums for _, sums in sampled.values()]), **advantage_metrics}
        self.generated_tokens += int(self.metrics["generated_tokens"])
        self.iteration = iteration

    def _sample(self, iteration: int, part: int) -> tuple[RolloutBatch | None, dict[str, float]]:
        """Steps 1-3 for shard ``part``: its scored rollouts and the sums of what it sampled.

        With dynamic sampling, round ``r`` of the iteration takes the prompts (and sampling seeds) of
        position ``iteration * rounds + r`` of the prompt stream, so a resumed run samples what an
        uninterrupted one would; the batch is None when no round found an informative prompt."""
        algorithm, group = self.algorithm, self.algorithm.samples_per_prompt
        per_iteration = self.rollout.prompts_per_iteration
        per_shard, start = per_iteration // self.parts, part * per_iteration // self.parts
        kept: list[Rollout] = []
        kept_rewards: list[float] = []
        kept_steps: list[list[float]] = []
        sampled_rewards: list[float] = []
        flags: list[bool] = []
        generated = 0
        for round_index in range(algorithm.sampling_rounds):
            stream = iteration * algorithm.sampling_rounds + round_index
            positions = prompt_indices(len(self.prompts), per_iteration, self.seed, stream)[start : start + per_shard]
            rollouts = generate_rollouts(
                self._engine(),
                [self.prompts[index] for index in positions],
                group,
                self.generation,
                self.tools,
                self.seed,
                stream,
                start,
            )
            rewards, steps = self.rate(rollouts)
            sampled_rewards += rewards
            generated += sum(rollout.injected.count(False) for rollout in rollouts)
            informative = algorithm.informative(rewards, steps)
            flags += informative or []
            keep = informative if algorithm.dynamic_sampling else [True] * len(positions)
            for prompt in [index for index, flag in enumerate(keep) if flag][: per_shard - len(kept) // group]:
                rows = slice(prompt * group, (prompt + 1) * group)
                kept += rollouts[rows]
                kept_rewards += rewards[rows]
                kept_steps += steps[rows] if steps is not None else []
            if len(kept) == per_shard * group:
                break
        sums = dict.fromkeys(SUMS, 0.0)
        sums.update(
            sampled=len(sampled_rewards),
            reward=sum(sampled_rewards),
            reward_squared=sum(r * r for r in sampled_rewards),
            generated_tokens=generated,
            groups=len(flags),
            informative=sum(flags),
            rounds=round_index + 1,
            kept=len(kept),
            kept_groups=len(kept) // group,
        )
        if not kept:
            return None, sums
        batch = build_batch(
            kept, kept_rewards, self.tokenizer.pad_id, kept_steps if algorithm.process_supervision else None
        )
        device = self._engine().device
        batch = score_rollouts(
            batch.to(device),
            self.model.policy,
            self.reference,
            self.model.value_head,
            self.rollout.temperature,
            self.rollout.forward_batch_size,
            self.dtype,
        )
        sums.update(kl=float(batch.sequence_kls().sum()), response_length=float(batch.response_lengths.sum()))
        return batch, sums

    def rate(self, rollouts: list[Rollout]) -> tuple[list[float], list[list[float]] | None]:
        """The rewards of ``rollouts`` (and of each of their steps, when the algorithm asks for them)."""
        penalties = [0.0 if rollout.finished else self.missing_end_penalty for rollout in rollouts]
        rewards = [reward - penalty for reward, penalty in zip(self.reward.score(rollouts), penalties)]
        steps = None
        if self.algorithm.process_supervision:  # the penalty lands on the step that was cut off
            steps = [
                values[:-1] + [values[-1] - penalty]
                for values, penalty in zip(self.reward.score_steps(rollouts), penalties)
            ]
        return rewards, steps

    def _schedule(self, iteration: int, part: int, rows: int) -> list[torch.Tensor]:
        """Step 5: the rows of the shard's micro-batch at every step of the iteration, ``epochs`` passes each
        in its own seeded order (empty where the shard has no rows left)."""
        seed = int(np.random.SeedSequence((self.seed, iteration, 1 + part)).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        size, per_epoch = self.update.minibatch_size // self.parts, self.cycle // self.update.epochs
        schedule = []
        for _ in range(self.update.epochs):
            order = torch.randperm(rows, generator=generator)
            schedule += [order[start : start + size] for start in range(0, per_epoch * size, size)]
        return schedule

    def _weigh(self) -> None:
        """Each micro-batch's loss weight: the process count times its share of its minibatch's units
        (:meth:`~llmkit.align.policy_gradient.Aggregation.units`), so the Trainer's mean over micro-batches is
        the minibatch's aggregate (1 when there is one micro-batch)."""
        units = torch.zeros(len(self.shards), self.cycle, dtype=torch.float64)
        for row, shard in enumerate(self.shards.values()):
            for step, rows in enumerate(shard.schedule):
                if len(rows):
                    mask = shard.batch.action_mask[rows.to(shard.batch.action_mask.device)]
                    units[row, step] = self.algorithm.aggregation.units(mask)
        minibatch_units = self.total(units.sum(dim=0)).cpu().clamp(min=1)
        for row, shard in enumerate(self.shards.values()):
            shard.weights = (self.parts * units[row] / minibatch_units).tolist()

    def _metrics(self, iteration: int, shard_sums: list[dict[str, float]]) -> dict[str, float]:
        """The logged metrics of the iteration, over everything every process sampled."""
        totals = dict(
            zip(
                SUMS,
                self.total(
                    torch.tensor([[sums[name] for name in SUMS] for sums in shard_sums], dtype=torch.float64).sum(dim=0)
                ).tolist(),
            )
        )
        mean = totals["reward"] / totals["sampled"]
        metrics = {
            "iteration": float(iteration),
            "reward": mean,
            "reward_std": max(totals["reward_squared"] / totals["sampled"] - mean * mean, 0.0) ** 0.5,
            "generated_tokens": totals["generated_tokens"],
        }
        if totals["groups"]:
            metrics["uniform_groups"] = 1 - totals["informative"] / totals["groups"]
        if self.algorithm.dynamic_sampling:
            metrics.update(sampling_rounds=totals["rounds"] / self.parts, kept_groups=totals["kept_groups"])
        if totals["kept"]:
            metrics.update(kl=totals["kl"] / totals["kept"], response_length=totals["response_length"] / totals["kept"])
        return metrics


def idle_rows(pad_id: int, critic: bool) -> RolloutBatch:
    """One row of padding without actions: a micro-batch with nothing to learn from, whose zero loss
    still runs the whole model (DDP needs every process's backward)."""
    zeros = torch.zeros(1, 1)
    return RolloutBatch(
        torch.full((1, 2), pad_id),
        torch.zeros(1, 1, dtype=torch.bool),
        torch.zeros(1),
        old_logprobs=zeros,
        reference_logprobs=zeros,
        values=zeros if critic else None,
        advantages=zeros,
        returns=zeros if critic else None,
    )
