"""A PPO or GRPO run end to end: load the policy and its frozen reference, the task's prompts and the
reward, evaluate, iterate, checkpoint, evaluate again, plot, summarise.

**Checkpoints** are the training loop's (:func:`llmkit.train.checkpoint.save_training_checkpoint`:
written into a temporary folder with a manifest of checksums, fsynced, renamed into place, then the
``latest`` pointer replaced, so neither a kill nor a power loss leaves a broken checkpoint in force;
resuming verifies it and falls back to the newest intact one). ``model.safetensors`` + ``config.json`` (stage
``ppo``/``grpo``) are the policy alone, which every later stage, the engine and the exporters load
as is; ``optimizer.pt`` holds the optimizer state and PPO's value head (the training state that is not
the language model); ``trainer_state.json`` the iteration, the algorithm's state (PPO's KL
coefficient) and the evaluation before training. ``--resume`` reloads all of it: the policy from the
run, the reference from ``--policy``, and continues from the next iteration with the same prompts
and sampling seeds an uninterrupted run would have used. SIGINT or SIGTERM finishes the iteration in
flight, saves and ends the run, as the training loop does (:class:`llmkit.train.trainer.StopSignals`).

**Evaluation** is greedy decoding (with the run's tools) on held-out prompts of the task, scored by
the task's exact checker (accuracy) and by the training reward.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from llmkit.align.preference import plot_metrics
from llmkit.align.rewards import ModelReward, Reward, load_task
from llmkit.align.rl_loop import Algorithm, PolicyLoop, RLOptimConfig, RLRunConfig, RolloutConfig
from llmkit.align.rollout import (Prompt, Rollout, build_batch, chat_prompt, completion_tokens, generate_rollouts,
                                  score_rollouts)
from llmkit.align.sft import load_base
from llmkit.config import parse_duration
from llmkit.errors import ConfigError, InputError
from llmkit.infer.completion import Tools
from llmkit.infer.engine import Engine
from llmkit.infer.sampling import GenerationConfig
from llmkit.infer.tools import ToolBox, calculator_tool, default_toolbox
from llmkit.io import read_json
from llmkit.model.checkpoint import LATEST, load_model, read_config, resolve_checkpoint
from llmkit.tokenizer import END, Tokenizer
from llmkit.train.checkpoint import (decode_rng, encode_rng, read_training_state, resumable_checkpoint,
                                     save_training_checkpoint)
from llmkit.train.metrics import MetricsLog
from llmkit.train.trainer import StopSignals, resolve_device

CURVES = ("reward", "kl", "entropy", "clip_fraction", "approx_kl", "value_loss", "response_length", "accuracy")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def toolbox(name: str) -> Tools | None:
    return {"calculator": lambda: ToolBox([calculator_tool()]), "default": default_toolbox, "none": lambda: None}[name]()


def evaluate(engine: Engine, prompts: list[Prompt], checker: Reward, reward: Reward, max_new_tokens: int,
             tools: Tools | None) -> dict[str, float]:
    """Greedy completions of ``prompts``: the share the checker accepts and their mean reward."""
    completions = engine.generate_ids([prompt.ids for prompt in prompts], GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0), tools)
    end_id = engine.tokenizer.special_ids[END]
    rollouts = [Rollout(prompt, completion, *completion_tokens(completion, end_id)) for prompt, completion in zip(prompts, completions)]
    correct = checker.score(rollouts)
    rewards = correct if reward is checker else reward.score(rollouts)
    return {"accuracy": sum(value == 1.0 for value in correct) / len(rollouts), "eval_reward": sum(rewards) / len(rollouts)}


def fitting_prompts(tokenizer, conversations: list[list[dict]], context_length: int, max_new_tokens: int, what: str) -> list[Prompt]:
    """The prompts that leave room for ``max_new_tokens`` in the context; refuses when none does."""
    prompts = [chat_prompt(tokenizer, messages) for messages in conversations]
    fitting = [prompt for prompt in prompts if len(prompt.ids) + max_new_tokens <= context_length]
    if not fitting:
        shortest = min(len(prompt.ids) for prompt in prompts)
        raise InputError(f"{what}: no prompt leaves room for max_new_tokens={max_new_tokens} in the context of "
                         f"{context_length} tokens (the shortest has {shortest} tokens)")
    return fitting


def evaluate_checkpoint(path: str, reference: str | None = None, task: str = "arithmetic", eval_problems: int = 200,
                        max_new_tokens: int = 160, tools: str = "calculator", seed: int = 0, device: str = "auto") -> dict[str, float]:
    """A post-training table row for any checkpoint (SFT, PPO, GRPO, DPO): greedy accuracy and verifiable
    reward on the task's held-out prompts, as the RL stages measure them, and with a ``reference``
    checkpoint the KL(policy || reference) of one sampled completion per prompt (nats per completion)."""
    device = resolve_device(device)
    model, tokenizer, _ = load_base(path)
    model.to(device)
    rl_task = load_task(task, 1, eval_problems, seed)
    prompts = fitting_prompts(tokenizer, rl_task.heldout, model.config.context_length, max_new_tokens, f"{task} held-out prompts")
    engine, runner = Engine(model, tokenizer, max_batch_size=64), toolbox(tools)
    result = evaluate(engine, prompts, rl_task.checker, rl_task.checker, max_new_tokens, runner)
    if reference is not None:
        reference_model, _ = load_model(reference, device=device)
        rollouts = generate_rollouts(engine, prompts, 1, GenerationConfig(max_new_tokens=max_new_tokens, temperature=1.0),
                                     runner, seed, 0)
        batch = build_batch(rollouts, [0.0] * len(rollouts), tokenizer.pad_id).to(device)
        result["kl"] = score_rollouts(batch, model, reference_model, None, 1.0, 16).sequence_kl()
    return result


def _save(loop: PolicyLoop, out: Path, iteration: int, state: dict, metadata: dict, keep_last: int) -> Path:
    value_head = loop.algorithm.value_head
    training_state = {"optimizer": loop.optimizer.state_dict(), "value_head": value_head.state_dict() if value_head is not None else None}
    state = {**state, "iteration": iteration, "algorithm": loop.algorithm.state_dict(), "rng": encode_rng(torch.get_rng_state())}
    return save_training_checkpoint(out, iteration, loop.policy.state_dict(), training_state, loop.policy.config, state,
                                    metadata, loop.tokenizer, keep_last)


def _restore(loop: PolicyLoop, checkpoint: Path) -> dict:
    """Optimizer, value head and algorithm state of the checkpoint resumed from (the policy is loaded from it already)."""
    training_state = read_training_state(checkpoint, loop.device)
    loop.optimizer.load_state_dict(training_state["optimizer"])
    if loop.algorithm.value_head is not None:
        loop.algorithm.value_head.load_state_dict(training_state["value_head"])
    state = read_json(checkpoint / "trainer_state.json")
    loop.algorithm.load_state_dict(state["algorithm"])
    torch.set_rng_state(decode_rng(state["rng"]))
    return state


def _format(metrics: dict[str, float]) -> dict[str, str]:
    return {name: f"{value:.6g}" for name, value in metrics.items()}


def run_policy_stage(stage: str, config, run: RLRunConfig, rollout: RolloutConfig, optim: RLOptimConfig,
                     make_algorithm: Callable[[nn.Module, Tokenizer], Algorithm]) -> dict:
    """Train ``run.policy`` with the algorithm ``make_algorithm(policy, tokenizer)`` builds; returns the summary."""
    out = Path(run.out)
    resuming = (out / LATEST).is_file()
    if resuming and not run.resume:
        raise ConfigError("out", run.out, "already holds a run; pass --resume to continue it or choose another --out")
    if run.resume and not resuming:
        raise ConfigError("resume", True, f"no checkpoint in {out} to resume from")
    resumed = resumable_checkpoint(out) if resuming else None
    if resumed is not None and read_config(resumed).get("stage") != stage:
        raise ConfigError("out", run.out, f"holds a {read_config(resumed).get('stage')} run, not a {stage} run to resume")
    device, dtype = resolve_device(run.device), DTYPES[run.dtype]
    # Resuming continues the policy of the run; the reference is always the starting policy.
    policy, tokenizer, _ = load_base(resumed or run.policy)
    base = resolve_checkpoint(run.policy)
    reference, _ = load_model(base, device=device)
    policy.to(device)
    task = load_task(run.task, run.train_problems, run.eval_problems, run.seed)
    reward = ModelReward(run.reward_model, tokenizer, str(device)) if run.reward_model else task.make_reward(run.format_bonus)
    context = policy.config.context_length
    train_prompts = fitting_prompts(tokenizer, task.train, context, rollout.max_new_tokens, f"{run.task} training prompts")
    eval_prompts = fitting_prompts(tokenizer, task.heldout, context, rollout.max_new_tokens, f"{run.task} held-out prompts")
    tools = toolbox(rollout.tools)
    loop = PolicyLoop(policy, reference, tokenizer, make_algorithm(policy, tokenizer), reward, train_prompts, rollout, optim,
                      run.iterations, run.seed, tools, run.missing_end_penalty, dtype)
    metadata = {"stage": stage, "stage_config": dataclasses.asdict(config), "tokenizer_sha256": tokenizer.sha256,
                "base": str(base.resolve())}

    def evaluation() -> dict[str, float]:
        return evaluate(loop.engine, eval_prompts, task.checker, reward, rollout.max_new_tokens, tools)

    state = _restore(loop, resumed) if resuming else {"tokens": 0, "elapsed_s": 0.0, "before": evaluation()}
    log = MetricsLog(out, state["iteration"] if resuming else None)
    log.rows = [row for row in log.rows if row.get("event") != "end"]  # the interrupted run's end is not this one's
    if not resuming:
        log.add(step=0, tokens=0, **_format(state["before"]), event="before")
    start_iteration = state.get("iteration", 0)
    started, deadline = time.perf_counter(), parse_duration(run.max_time)

    def elapsed() -> float:
        return state["elapsed_s"] + time.perf_counter() - started

    first_metrics = last_metrics = {}
    iteration = start_iteration
    bar = tqdm(range(start_iteration, run.iterations), initial=start_iteration, total=run.iterations, desc=stage,
               unit="it", disable=not run.progress, dynamic_ncols=True)
    signals = StopSignals().install()
    try:
        for iteration in bar:
            metrics = loop.iterate(iteration)
            first_metrics, last_metrics = first_metrics or metrics, metrics
            state["tokens"] += int(metrics.pop("generated_tokens"))
            if run.eval_interval and (iteration + 1) % run.eval_interval == 0:
                metrics.update(evaluation())
            log.add(step=iteration + 1, tokens=state["tokens"], elapsed_s=f"{elapsed():.1f}", **_format(metrics))
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics.get('kl', float('nan')):.3f}")
            if (iteration + 1) % run.checkpoint_interval == 0:
                log.flush()  # before the checkpoint, as in the Trainer: a crash between them loses no rows
                _save(loop, out, iteration + 1, {**state, "elapsed_s": elapsed()}, metadata, run.keep_last)
            if signals.requested or (deadline is not None and elapsed() >= deadline):
                break
        bar.close()
        completed = iteration + 1 if run.iterations > start_iteration else start_iteration
        # The checkpoint before the final evaluation, which may outlast a scheduler's grace period after SIGTERM.
        log.flush()
        checkpoint = _save(loop, out, completed, {**state, "elapsed_s": elapsed()}, metadata, run.keep_last)
        after = evaluation()
    finally:
        signals.restore()
    log.add(step=completed, tokens=state["tokens"], elapsed_s=f"{elapsed():.1f}", **_format(after),
            event="interrupted" if signals.requested else "end")
    log.flush()
    curves = plot_metrics(out, list(CURVES), f"{stage}: {run.task}", "curves.png", x_label="iteration", panel_rows=2,
                          with_events=True, marked=("accuracy",))
    return {"stage": stage, "policy": str(base), "task": run.task, "reward_source": "model" if run.reward_model else "verifiable",
            "iterations": completed, "generated_tokens": state["tokens"], "seconds": round(elapsed(), 1),
            "accuracy_before": state["before"]["accuracy"], "accuracy_after": after["accuracy"],
            "reward_before": state["before"]["eval_reward"], "reward_after": after["eval_reward"],
            "rollout_reward_first": first_metrics.get("reward"), "rollout_reward_last": last_metrics.get("reward"),
            "final_kl": last_metrics.get("kl"), **loop.algorithm.state_dict(), "eval_prompts": len(eval_prompts),
            "checkpoint": str(checkpoint), "curves": str(curves), "interrupted": signals.requested}
