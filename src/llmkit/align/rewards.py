"""Rewards for PPO and GRPO, and the embedded tasks that supply their prompts.

A reward is a callable ``reward(prompt_messages, completion_text) -> float``; :meth:`Reward.score`
rates a whole rollout batch at once, which lets the function checker run a group's candidates side by
side and the reward model batch its forward passes.

A policy learns whatever earns reward, forgeries included, so each reward says what it trusts:

- :class:`ArithmeticReward`: verifiable (RL with verifiable rewards, Lambert et al. 2024 "Tülu 3";
  DeepSeekMath's rule-based rewards): 1 when :func:`llmkit.tasks.arithmetic.check_answer` accepts
  the answer after the last ``####``, else ``format_bonus`` when there is a well-formed ``#### N``
  (DeepSeek-R1's format reward, Guo et al. 2025 §2.2.2), else 0. Per step (:meth:`Reward.score_steps`,
  for process-supervised GRPO): a calculator call earns 1 when its result is one of the values the
  reference solution computes (a rule-based process reward in the spirit of Lightman et al. 2023's
  step labels: the step reached a number the solution needs), the final answer step its outcome reward.
  Trusts: nothing the completion runs (it is read as text); step rewards compare the results that
  the engine's bounded calculator (:mod:`llmkit.infer.calculator`) computed for the policy's calls.
- :class:`FunctionTaskReward`: 1 when the docstring -> function checker passes every recorded
  example, else ``format_bonus`` when the answer parses with the right signature, else 0.
  Trusts: only the values the candidate's function returns, as plain data, to a checker process the
  candidate cannot reach (:func:`llmkit.tasks.functions.check_solutions`): each candidate of a group
  runs in its own sandbox, so printing a fake verdict, exiting early or returning an object that
  equals everything earns 0 and changes no group mate's reward. Agreement on the recorded examples is
  necessary, not sufficient: a body that special-cases them passes.
- :class:`ModelReward`: a reward model trained by ``llmkit reward`` (:func:`llmkit.align.reward.load_reward_model`),
  scoring the token ids of prompt + completion, tool calls included. Trusts: the reward model, which
  is a learned proxy that a policy can over-optimise (Gao et al. 2022); the KL penalty is the guard.

A prompt is recognised by its last user message (the problem's question, or the function's request),
so the verifiable rewards need nothing but the conversation, as the interface promises.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

from llmkit.align.reward import load_reward_model
from llmkit.align.rollout import Rollout
from llmkit.errors import ConfigError, InputError, MismatchError
from llmkit.tasks import arithmetic, functions
from llmkit.tasks.registry import embedded_task
from llmkit.tokenizer import Tokenizer


def _question(messages: list[dict]) -> str:
    return next(message["content"] for message in reversed(messages) if message["role"] == "user")


class Reward:
    """``reward(prompt_messages, completion_text) -> float``; ``score(rollouts)`` for a batch."""

    def __call__(self, prompt_messages: list[dict], completion_text: str) -> float:
        raise NotImplementedError

    def score(self, rollouts: list[Rollout]) -> list[float]:
        return [float(self(rollout.prompt.messages, rollout.text)) for rollout in rollouts]

    def score_steps(self, rollouts: list[Rollout]) -> list[list[float]]:
        """One reward per step of each rollout (:meth:`Rollout.step_ends`), for process supervision."""
        raise ConfigError(
            "supervision",
            "process",
            f"{type(self).__name__} rates whole completions only; "
            f"process supervision needs a reward with step rewards (the arithmetic task's)",
        )


class FunctionReward(Reward):
    """Any plain ``(prompt_messages, completion_text) -> float`` function as a :class:`Reward`."""

    def __init__(self, function: Callable[[list[dict], str], float]):
        self.function = function

    def __call__(self, prompt_messages: list[dict], completion_text: str) -> float:
        return float(self.function(prompt_messages, completion_text))


def as_reward(reward: Reward | Callable[[list[dict], str], float]) -> Reward:
    return reward if isinstance(reward, Reward) else FunctionReward(reward)


class ArithmeticReward(Reward):
    def __init__(self, problems: list[arithmetic.Problem], format_bonus: float = 0.0):
        self.format_bonus = format_bonus
        self.problems = {problem.question: problem for problem in problems}

    def _problem(self, messages: list[dict]):
        question = _question(messages)
        if question not in self.problems:
            raise InputError(f"no arithmetic problem has the question {question[:60]!r}")
        return self.problems[question]

    def correct(self, prompt_messages: list[dict], completion_text: str) -> bool:
        return arithmetic.check_answer(self._problem(prompt_messages), completion_text)

    def __call__(self, prompt_messages: list[dict], completion_text: str) -> float:
        if self.correct(prompt_messages, completion_text):
            return 1.0
        return self.format_bonus if arithmetic.final_answer(completion_text) is not None else 0.0

    def score_steps(self, rollouts: list[Rollout]) -> list[list[float]]:
        """Step ``k`` is the ``k``-th calculator call while there are calls (1 when its result is a value of
        the reference solution), and the outcome reward on the last step when it is not a call."""
        scores = []
        for rollout in rollouts:
            needed = set(arithmetic.step_values(self._problem(rollout.prompt.messages).steps))
            calls = rollout.completion.tool_calls
            steps = [1.0 if _number(call["result"]) in needed else 0.0 for call in calls]
            if len(rollout.step_ends()) > len(calls):  # the answer after the last call, a step of its own
                steps.append(self(rollout.prompt.messages, rollout.text))
            scores.append(steps)
        return scores


def _number(text: str | None) -> Fraction | None:
    """A calculator result as an exact number (None for an error or no result)."""
    try:
        return Fraction(text.strip()) if text is not None else None
    except (ValueError, ZeroDivisionError):
        return None


class FunctionTaskReward(Reward):
    def __init__(self, tasks: list[functions.FunctionTask], format_bonus: float = 0.0):
        self.format_bonus = format_bonus
        self.tasks = {_question(functions.prompt_messages(task)): task for task in tasks}

    def _task(self, messages: list[dict]):
        request = _question(messages)
        if request not in self.tasks:
            raise InputError(f"no function task has the request {request[:60]!r}")
        return self.tasks[request]

    def _value(self, result: functions.FunctionCheck) -> float:
        return 1.0 if result.passed else self.format_bonus if result.signature_matches else 0.0

    def __call__(self, prompt_messages: list[dict], completion_text: str) -> float:
        return self._value(functions.check_solution(self._task(prompt_messages), completion_text))

    def score(self, rollouts: list[Rollout]) -> list[float]:
        """A task's completions (a GRPO group) are checked together, each in its own sandboxes."""
        by_request: dict[str, list[int]] = {}
        for index, rollout in enumerate(rollouts):
            by_request.setdefault(_question(rollout.prompt.messages), []).append(index)
        rewards = [0.0] * len(rollouts)
        for indices in by_request.values():
            task = self._task(rollouts[indices[0]].prompt.messages)
            for index, result in zip(indices, functions.check_solutions(task, [rollouts[i].text for i in indices])):
                rewards[index] = self._value(result)
        return rewards


class ModelReward(Reward):
    """A trained reward model's score of prompt + completion."""

    def __init__(self, path: str, tokenizer: Tokenizer, device: str = "cpu", batch_size: int = 16):
        self.scorer = load_reward_model(path, device=device, batch_size=batch_size)
        if self.scorer.tokenizer.sha256 != tokenizer.sha256:
            raise MismatchError(
                f"{path}: the reward model's tokenizer (sha256 {self.scorer.tokenizer.sha256[:12]}) is not "
                f"the policy's (sha256 {tokenizer.sha256[:12]})"
            )

    def __call__(self, prompt_messages: list[dict], completion_text: str) -> float:
        return self.scorer(prompt_messages, completion_text)

    def score(self, rollouts: list[Rollout]) -> list[float]:
        """By token ids: a completion with tool calls holds special tokens that message text may not."""
        return self.scorer.score_ids([rollout.prompt.ids + rollout.token_ids for rollout in rollouts])


# ----------------------------------------------------------------------------------- tasks
@dataclass
class RLTask:
    """An embedded task's RL prompts (its ``prompts`` split: no stage shows their solutions), validation
    prompts (for choosing checkpoints, never the test problems) and exact checker (1 for a correct answer)."""

    name: str
    train: list[list[dict]]
    validation: list[list[dict]]
    checker: Reward
    make_reward: Callable[[float], Reward]  # format_bonus -> the verifiable training reward


VERIFIERS: dict[type, type[Reward]] = {arithmetic.Problem: ArithmeticReward, functions.FunctionTask: FunctionTaskReward}


def load_task(name: str, train_count: int, validation_count: int, seed: int) -> RLTask:
    """``train_count`` RL prompts and ``validation_count`` validation ones of an embedded task (``functions``
    has a fixed number of tasks and gives at most that many), with the exact checker of its items."""
    task = embedded_task(name)
    train, validation = task.items(train_count, seed, "prompts"), task.items(validation_count, seed, "validation")
    items = train + validation
    verifier = VERIFIERS[type(items[0])]
    return RLTask(
        name,
        [task.prompt(item) for item in train],
        [task.prompt(item) for item in validation],
        verifier(items, 0.0),
        functools.partial(verifier, items),
    )
