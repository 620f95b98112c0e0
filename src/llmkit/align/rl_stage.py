"""A PPO or GRPO run end to end: load the policy and its frozen reference, the task's prompts and the
reward, and train with the one :class:`~llmkit.train.trainer.Trainer` on a
:class:`~llmkit.align.rl_source.RolloutSource`; plot, summarise.

**Checkpoints, resume, signals, logs** are the Trainer's: ``model.safetensors`` + ``config.json``
(stage ``ppo``/``grpo``) are the policy alone, which every later stage, the engine and the exporters
load as is; PPO's value head is ``extra_weights.safetensors``; ``trainer_state.json`` holds the source's
state (PPO's KL coefficient, the evaluation before training, the tokens generated). Checkpoints,
evaluations and stops (SIGINT, SIGTERM, ``max_time``) fall between iterations, so ``--train.resume``
continues exactly: the policy and value head from the run, the reference from ``--stage.policy``, and the
next iteration samples the prompts and seeds an uninterrupted run would have.

**Evaluation** (the Trainer's evaluation hook, before training, every ``eval_interval`` steps and at
the end) is greedy decoding, with the run's tools, of held-out prompts of the task, scored by the
task's exact checker (accuracy) and by the training reward.
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

from llmkit.align.policy_gradient import PolicyModel, value_head
from llmkit.align.rewards import ModelReward, Reward, load_task
from llmkit.align.rl_source import Algorithm, RolloutSource, Total
from llmkit.align.rollout import (
    Prompt,
    Rollout,
    chat_prompt,
    completion_tokens,
)
from llmkit.config import check
from llmkit.errors import InputError
from llmkit.figures import plot_metrics
from llmkit.infer.completion import Tools
from llmkit.infer.engine import Engine
from llmkit.infer.sampling import GenerationConfig
from llmkit.infer.tools import select_tools
from llmkit.model.checkpoint import load_checkpoint, load_model
from llmkit.tasks.registry import embedded_task
from llmkit.tokenizer import Tokenizer
from llmkit.train.config import TrainConfig
from llmkit.train.distributed import World
from llmkit.train.trainer import Trainer, process_device

CURVES = ("reward", "kl", "entropy", "clip_fraction", "approx_kl", "value_loss", "response_length", "accuracy")


@dataclass
class RLStageConfig:
    policy: str = field(
        default="runs/sft", metadata={"help": "checkpoint of the starting policy (and of the frozen reference)"}
    )
    task: Literal["arithmetic", "arithmetic_plain", "functions"] = field(
        default="arithmetic",
        metadata={"help": "embedded task giving the prompts and the exact checker (arithmetic: with calculator calls)"},
    )
    reward_model: str | None = field(
        default=None,
        metadata={"help": "reward-model checkpoint (llmkit reward); default: the task's verifiable reward"},
    )
    format_bonus: float = field(
        default=0.0, metadata={"help": "verifiable reward of a well-formed but wrong answer (1 = correct)"}
    )
    missing_end_penalty: float = field(
        default=0.0, metadata={"help": "subtracted from the reward of a completion cut off before its end token"}
    )
    train_problems: int = field(
        default=2000, metadata={"help": "training prompts generated (functions: at most all tasks)"}
    )
    validation_problems: int = field(
        default=200,
        metadata={
            "help": "validation prompts (their own split, never the test problems) of the greedy accuracy before, "
            "every train.eval_interval steps and after, which picks the best checkpoint"
        },
    )

    def __post_init__(self) -> None:
        embedded_task(self.task)
        check(self.missing_end_penalty >= 0, "missing_end_penalty", self.missing_end_penalty, "must be >= 0")
        for name in ("train_problems", "validation_problems"):
            check(getattr(self, name) > 0, name, getattr(self, name), "must be positive")


def rl_training(**changes) -> TrainConfig:
    """The training loop's settings with PPO's and GRPO's defaults (``changes`` override them): one row a
    micro-batch (a step takes ``update.minibatch_size`` sequences), a constant small learning rate without
    weight decay, float32 (probability ratios need the precision), a metrics row every step, checkpoints
    and evaluations between iterations (240 steps is a multiple of most iterations' step counts), and a
    looser spike guard (RL's gradient norms vary more than losses do). The validation accuracy picks the
    best checkpoint (``best_metric``): a run that only got worse ships the model it started from."""
    defaults = {
        "out": "runs/rl",
        "batch_size": 1,
        "lr": 1e-5,
        "schedule": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "dtype": "float32",
        "eval_interval": 0,
        "log_interval": 1,
        "checkpoint_interval": 240,
        "keep_last": 2,
        "seed": 0,
        "spike_ratio": 10.0,
        "best_metric": "accuracy",
    }
    return TrainConfig(**{**defaults, **changes})


def check_rl_config(config) -> None:
    """What PPO and GRPO need of the training loop's settings (``config`` has sections ``train`` and ``update``)."""
    train, steps = config.train, config.steps_per_iteration
    for name in ("checkpoint_interval", "eval_interval"):
        value = getattr(train, name)
        near = max(value // steps, 1) * steps
        check(
            value % steps == 0,
            f"train.{name}",
            value,
            f"must be a multiple of the {steps} optimizer steps of an iteration "
            f"(epochs x minibatches) to fall between iterations, e.g. {near} or {near + steps}",
        )
    check(
        train.batch_size == 1,
        "train.batch_size",
        train.batch_size,
        "PPO and GRPO take --update.minibatch-size sequences per optimizer step, split into grad_accum x processes "
        "micro-batches",
    )
    check(
        train.dtype != "float16",
        "train.dtype",
        train.dtype,
        "use float32 or bfloat16: probability ratios need the range",
    )
    check(train.optimizer == "adamw", "train.optimizer", train.optimizer, "PPO and GRPO fine-tune with AdamW")
    check(
        train.parallelism == "ddp",
        "train.parallelism",
        train.parallelism,
        "every process samples through the whole policy, which FSDP shards; use ddp",
    )
    for name in ("tp", "pp"):
        check(
            getattr(train, name) == 1,
            f"train.{name}",
            getattr(train, name),
            "every process samples its own rollouts through the whole policy: PPO and GRPO are data parallel only",
        )
    check(
        train.batch_warmup_tokens is None,
        "train.batch_warmup_tokens",
        train.batch_warmup_tokens,
        "RL minibatches do not ramp",
    )
    check(
        train.target_val_bpb is None,
        "train.target_val_bpb",
        train.target_val_bpb,
        "RL evaluates accuracy, not bits per byte",
    )


# -------------------------------------------------------------------------------- evaluation
def greedy_scores(
    engine: Engine, prompts: list[Prompt], checker: Reward, reward: Reward, max_new_tokens: int, tools: Tools | None
) -> tuple[list[float], list[float]]:
    """The checker's and the reward's scores of greedy completions of ``prompts``."""
    completions = engine.generate_ids(
        [prompt.ids for prompt in prompts], GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0), tools
    )
    end_id = engine.tokenizer.stop_ids[0]
    rollouts = [
        Rollout(prompt, completion, *completion_tokens(completion, end_id))
        for prompt, completion in zip(prompts, completions)
    ]
    correct = checker.score(rollouts)
    return correct, correct if reward is checker else reward.score(rollouts)


def evaluate(
    engine: Engine, prompts: list[Prompt], checker: Reward, reward: Reward, max_new_tokens: int, tools: Tools | None
) -> dict[str, float]:
    """Greedy completions of ``prompts``: the share the checker accepts and their mean reward."""
    correct, rewards = greedy_scores(engine, prompts, checker, reward, max_new_tokens, tools)
    return {
        "accuracy": sum(value == 1.0 for value in correct) / len(prompts),
        "eval_reward": sum(rewards) / len(prompts),
    }


@dataclass
class HeldOutEvaluation:
    """The RL stages' evaluation hook: :func:`evaluate` on the held-out prompts; under ``torchrun`` each
    process decodes every N-th prompt and the counts are summed."""

    prompts: list[Prompt]
    checker: Reward
    reward: Reward
    max_new_tokens: int
    tools: Tools | None

    def __call__(self, engine: Engine, world: World, total: Total) -> dict[str, float]:
        mine = self.prompts[world.rank :: world.world_size]
        correct, rewards = greedy_scores(engine, mine, self.checker, self.reward, self.max_new_tokens, self.tools)
        right, reward, count = total(
            torch.tensor([sum(value == 1.0 for value in correct), sum(rewards), len(mine)], dtype=torch.float64)
        ).tolist()
        return {"accuracy": right / count, "eval_reward": reward / count}


def fitting_prompts(
    tokenizer, conversations: list[list[dict]], context_length: int, max_new_tokens: int, what: str
) -> list[Prompt]:
    """The prompts that leave room for ``max_new_tokens`` in the context; refuses when none does."""
    prompts = [chat_prompt(tokenizer, messages) for messages in conversations]
    fitting = [prompt for prompt in prompts if len(prompt.ids) + max_new_tokens <= context_length]
    if not fitting:
        shortest = min(len(prompt.ids) for prompt in prompts)
        raise InputError(
            f"{what}: no prompt leaves room for max_new_tokens={max_new_tokens} in the context of "
            f"{context_length} tokens (the shortest has {shortest} tokens)"
        )
    return fitting


# ------------------------------------------------------------------------------- the stage
def _rollout_rows(out: Path) -> list[dict]:
    """The training rows of the run's metrics.csv (the rollout metrics of every step)."""
    with open(out / "metrics.csv", newline="") as file:
        return [row for row in csv.DictReader(file) if not row["event"] and row.get("reward")]


def run_policy_stage(stage: str, config, make_algorithm: Callable[[Tokenizer, int], Algorithm]) -> dict:
    """Train ``config.stage.policy`` with the algorithm ``make_algorithm(tokenizer, context_length)`` builds;
    returns the summary."""
    setup, rollout, train = config.stage, config.rollout, config.train
    loaded = load_checkpoint(setup.policy)
    policy, tokenizer, base = loaded.model, loaded.tokenizer, loaded.path
    reference, _ = load_model(base)  # resuming continues the run's policy; the reference is always the starting one
    device, world = process_device(train.device)
    task = load_task(setup.task, setup.train_problems, setup.validation_problems, train.seed)
    reward = (
        ModelReward(setup.reward_model, tokenizer, str(device))
        if setup.reward_model
        else task.make_reward(setup.format_bonus)
    )
    context = policy.config.context_length
    train_prompts = fitting_prompts(
        tokenizer, task.train, context, rollout.max_new_tokens, f"{setup.task} training prompts"
    )
    validation_prompts = fitting_prompts(
        tokenizer, task.validation, context, rollout.max_new_tokens, f"{setup.task} validation prompts"
    )
    algorithm = make_algorithm(tokenizer, context)
    model = PolicyModel(policy, value_head(policy.config) if algorithm.critic else None, rollout.temperature).eval()
    evaluation = HeldOutEvaluation(
        validation_prompts, task.checker, reward, rollout.max_new_tokens, select_tools(rollout.tools)
    )
    source = RolloutSource(model, reference, tokenizer, algorithm, reward, train_prompts, evaluation, world)
    metadata = {
        "stage": stage,
        "stage_config": dataclasses.asdict(config),
        "tokenizer_sha256": tokenizer.sha256,
        "base": str(base.resolve()),
    }
    # Throughput counts a micro-batch as its rows at the longest prompt plus every new token (an upper bound).
    longest = max(len(prompt.ids) for prompt in train_prompts) + rollout.max_new_tokens
    trainer = Trainer(
        model,
        source,
        train,
        loss_fn=source.loss,
        tokenizer=tokenizer,
        metadata=metadata,
        tokens_per_batch=config.update.minibatch_size // source.parts * longest,
        hooks=source,
    )
    summary = trainer.run()
    out = Path(train.out)
    curves = None
    if trainer.world.is_main:
        curves = plot_metrics(
            out,
            list(CURVES),
            f"{stage}: {setup.task}",
            "curves.png",
            panel_rows=2,
            with_events=True,
            marked=("accuracy",),
        )
    rows = _rollout_rows(out)
    best = summary.pop("best") or {}
    position, after = source.evaluated or (None, {})
    after = after if position == trainer.data_position else {}  # none when a stop signal ended the run
    before = source.before or {}
    return {
        "stage": stage,
        "policy": str(base),
        "task": setup.task,
        "reward_source": "model" if setup.reward_model else "verifiable",
        "iterations": trainer.data_position // source.cycle,
        "generated_tokens": source.generated_tokens,
        "accuracy_before": before.get("accuracy"),
        "accuracy_after": after.get("accuracy"),
        "reward_before": before.get("eval_reward"),
        "reward_after": after.get("eval_reward"),
        "rollout_reward_first": float(rows[0]["reward"]) if rows else None,
        "rollout_reward_last": float(rows[-1]["reward"]) if rows else None,
        "final_kl": float(rows[-1]["kl"]) if rows and rows[-1].get("kl") else None,
        **algorithm.state_dict(),
        "validation_prompts": len(validation_prompts),
        "best_step": best.get("step"),
        "best_validation_accuracy": best.get("value"),
        "best_checkpoint": best.get("checkpoint"),
        "curves": None if curves is None else str(curves),
        **summary,
    }
