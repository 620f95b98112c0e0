"""Shared fixtures of the PPO and GRPO tests: a character tokenizer, a tiny policy warmed up to answer
one of four letters, the toy task "the reply starts with 'a'", and a run of the Trainer on rollouts of
custom prompts and rewards.

A test module uses the pytest fixtures here (:func:`tokenizer`, :func:`policy`) by
importing them and naming them in its ``__all__``: pytest finds fixtures among a module's names."""

import copy
import csv
from pathlib import Path

import helpers
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config

from llmkit.align.policy_gradient import PolicyModel, value_head
from llmkit.align.rewards import as_reward
from llmkit.align.rl_source import RolloutSource
from llmkit.align.rollout import chat_prompt
from llmkit.chat import render_ids
from llmkit.model import Transformer
from llmkit.model.checkpoint import write_model
from llmkit.tasks import arithmetic
from llmkit.tokenizer import Tokenizer
from llmkit.train.trainer import Trainer

LETTERS = "abcd"
TOY_MESSAGES = [{"role": "user", "content": "go"}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return char_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def policy(tokenizer):
    return warm_policy(tokenizer, context_length=384)


def char_tokenizer(folder) -> Tokenizer:
    """Characters of the arithmetic task's conversations (so its prompts encode) and of the toy task."""
    problems = arithmetic.generate_problems(40, seed=0) + arithmetic.generate_problems(10, seed=0, split="heldout")
    texts = [
        message.get("content") or "" for problem in problems for message in arithmetic.to_conversation(problem).messages
    ]
    return helpers.char_tokenizer(folder, "\n".join(texts + [arithmetic.PLAIN_SYSTEM_PROMPT, "calculator()#"]), 400)


def warm_policy(tokenizer: Tokenizer, context_length: int = 64, steps: int = 25) -> Transformer:
    """A tiny model fine-tuned to answer "go" with one of a, b, c, d (equally likely) and <|end|>: the
    supervised start RL needs, with the rewarded letter at a probability near 1/4."""
    torch.manual_seed(0)
    model = Transformer(
        tiny_config(vocab_size=tokenizer.vocab_size, context_length=context_length, n_embd=32, tie_embeddings=False)
    )
    rows = [render_ids(tokenizer, TOY_MESSAGES + [{"role": "assistant", "content": letter}]) for letter in LETTERS]
    ids = torch.tensor([row for row, _ in rows])
    targets = torch.where(torch.tensor([mask for _, mask in rows])[:, 1:], ids[:, 1:], -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def first_letter_probabilities(model: Transformer, tokenizer: Tokenizer) -> dict[str, float]:
    """The policy's probability of each letter as the first token of its reply to the toy prompt."""
    prompt = chat_prompt(tokenizer, TOY_MESSAGES)
    with torch.no_grad():
        probabilities = model(torch.tensor([prompt.ids]))[0, -1].softmax(-1)
    return {letter: float(probabilities[tokenizer.encode(letter)[0]]) for letter in LETTERS}


def starts_with_a(prompt_messages: list[dict], completion_text: str) -> float:
    return 1.0 if completion_text.startswith("a") else 0.0


def frozen_copy(model: Transformer) -> Transformer:
    return copy.deepcopy(model).requires_grad_(False).eval()


def save_checkpoint(folder, model: Transformer, tokenizer: Tokenizer):
    write_model(folder, model.state_dict(), model.config, {"stage": "sft", "tokenizer_sha256": tokenizer.sha256})
    tokenizer.save(folder)
    return folder


def trainable(policy: Transformer, algorithm, config) -> PolicyModel:
    """A trainable copy of ``policy`` (with a value head when the algorithm trains a critic)."""
    torch.manual_seed(0)
    head = value_head(policy.config) if algorithm.critic else None
    return PolicyModel(frozen_copy(policy).requires_grad_(True), head, config.rollout.temperature).eval()


def rl_run(
    policy: Transformer, tokenizer: Tokenizer, algorithm, reward, prompts, **trainer_options
) -> tuple[PolicyModel, dict]:
    """Train a copy of ``policy`` with ``algorithm`` (and its config) on ``prompts`` rated by ``reward``
    through the Trainer, ``policy`` itself the frozen reference; returns the trained module and the summary."""
    model = trainable(policy, algorithm, algorithm.config)
    source = RolloutSource(model, frozen_copy(policy), tokenizer, algorithm, as_reward(reward), prompts)
    summary = Trainer(model, source, algorithm.config.train, loss_fn=source.loss, hooks=source, **trainer_options).run()
    return model, summary


def metrics_rows(out) -> list[dict]:
    """The training rows of a run's metrics.csv."""
    with open(out / "metrics.csv", newline="") as file:
        return [row for row in csv.DictReader(file) if not row["event"]]


def iteration_rewards(out) -> list[float]:
    """The mean rollout reward of every iteration of a run."""
    return list({row["iteration"]: float(row["reward"]) for row in metrics_rows(out)}.values())


def assert_learns_toy_task(policy: Transformer, tokenizer: Tokenizer, algorithm) -> None:
    """Four iterations of ``algorithm`` (with its config's rollout, update and training settings) on the
    toy task, from ``policy`` as the reference, make the rewarded first letter clearly more likely (from
    near 1/4 to above 0.6), every other letter less likely, and the rollouts' reward grow."""
    before = first_letter_probabilities(policy, tokenizer)
    model, _ = rl_run(policy, tokenizer, algorithm, starts_with_a, [chat_prompt(tokenizer, TOY_MESSAGES)])
    after = first_letter_probabilities(model.policy, tokenizer)
    rewards = iteration_rewards(Path(algorithm.config.train.out))
    assert before["a"] < 0.3 and after["a"] > 0.6, (before, after)
    assert all(after[letter] < before[letter] for letter in "bcd")
    assert len(rewards) == 4 and rewards[-1] > rewards[0]
