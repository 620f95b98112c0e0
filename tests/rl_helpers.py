"""Shared fixtures of the PPO and GRPO tests: a character tokenizer, a tiny policy warmed up to answer
one of four letters, and the toy task "the reply starts with 'a'".

A test module uses the pytest fixtures here (:func:`tokenizer`, :func:`policy`) by
importing them and naming them in its ``__all__``: pytest finds fixtures among a module's names."""

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_config
from llmkit.align.rewards import as_reward
from llmkit.align.rl_loop import PolicyLoop
from llmkit.align.rollout import chat_prompt
from llmkit.chat import render_ids
from llmkit.model import Transformer
from llmkit.model.checkpoint import write_model
from llmkit.tasks import arithmetic
from llmkit.tokenizer import Tokenizer
from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer

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
    texts = [message.get("content") or "" for problem in problems for message in arithmetic.to_conversation(problem).messages]
    (folder / "text.txt").write_text("\n".join(texts + [arithmetic.PLAIN_SYSTEM_PROMPT, "calculator()#"]))
    train_tokenizer(TokenizerConfig(source=str(folder / "text.txt"), out=str(folder / "tokenizer"), kind="char",
                                    vocab_size=400, held_out_fraction=0))
    return Tokenizer.load(folder / "tokenizer")


def warm_policy(tokenizer: Tokenizer, context_length: int = 64, steps: int = 25) -> Transformer:
    """A tiny model fine-tuned to answer "go" with one of a, b, c, d (equally likely) and <|end|>: the
    supervised start RL needs, with the rewarded letter at a probability near 1/4."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size, context_length=context_length, n_embd=32,
                                    tie_embeddings=False))
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


def assert_learns_toy_task(model: Transformer, policy: Transformer, tokenizer: Tokenizer, algorithm, config) -> None:
    """Four iterations of ``algorithm`` (with ``config``'s rollout and optimizer settings) on the toy task,
    from ``policy`` as the reference, make the rewarded first letter clearly more likely (from near 1/4 to
    above 0.6), every other letter less likely, and the rollouts' reward grow."""
    before = first_letter_probabilities(model, tokenizer)
    loop = PolicyLoop(model, frozen_copy(policy), tokenizer, algorithm, as_reward(starts_with_a),
                      [chat_prompt(tokenizer, TOY_MESSAGES)], config.rollout, config.optim, iterations=4)
    rewards = [loop.iterate(iteration)["reward"] for iteration in range(4)]
    after = first_letter_probabilities(model, tokenizer)
    assert before["a"] < 0.3 and after["a"] > 0.6, (before, after)
    assert all(after[letter] < before[letter] for letter in "bcd")
    assert rewards[-1] > rewards[0]
