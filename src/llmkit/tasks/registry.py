"""The embedded tasks by name: one :class:`EmbeddedTask` each, the only place a stage looks one up.

SFT takes its worked solutions (:meth:`EmbeddedTask.conversations`), the reward model and DPO its
generated (correct, plausible wrong) pairs (:meth:`EmbeddedTask.preferences`), PPO and GRPO its prompts
(:meth:`EmbeddedTask.prompts`) and the exact checker of its items (``llmkit.align.rewards``), evaluation
its held-out split. Items come from a seeded generator (arithmetic) or a fixed mined list sampled with
the seed (functions). Splits (:data:`SPLITS`): ``train`` (worked solutions and preference pairs),
``prompts`` (RL prompts whose solutions no stage shows), ``validation`` (choosing checkpoints) and
``heldout`` (the test), disjoint for arithmetic by construction; ``functions`` has too few tasks to set
any aside, so its prompts and validation items are training tasks (only its held-out modules are apart).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any, Callable

from llmkit.chat import Conversation, Preference
from llmkit.errors import ConfigError
from llmkit.tasks import arithmetic, functions

SPLITS = arithmetic.SPLITS


@dataclass(frozen=True)
class EmbeddedTask:
    name: str
    description: str
    generate: Callable[[int, int, str], list[Any]]  # (count, seed, split) -> items
    prompt: Callable[[Any], list[dict]]  # an item's prompt messages
    conversation: Callable[[Any], Conversation]  # an item's prompt and worked solution
    pairs: Callable[[list[Any], int], list[Preference]]  # (items, seed) -> generated preference pairs

    def items(self, count: int, seed: int, split: str) -> list[Any]:
        """``count`` items of ``split`` (a task with fewer gives all it has)."""
        if split not in SPLITS:
            raise ConfigError("split", split, f"must be one of {', '.join(SPLITS)}")
        return self.generate(count, seed, split)

    def conversations(self, count: int, seed: int) -> list[Conversation]:
        """Worked solutions of ``count`` training items, labelled with the task's name."""
        return [Conversation(self.conversation(item).messages, self.name) for item in self.items(count, seed, "train")]

    def preferences(self, count: int, seed: int, split: str) -> list[Preference]:
        """Generated pairs of ``count`` items of ``split`` (an item with no wrong variant gives none)."""
        return self.pairs(self.items(count, seed, split), seed)

    def prompts(self, count: int, seed: int, split: str) -> list[list[dict]]:
        return [self.prompt(item) for item in self.items(count, seed, split)]


def _arithmetic(count: int, seed: int, split: str) -> list[arithmetic.Problem]:
    return arithmetic.generate_problems(count, seed=seed, split=split)


def _functions(count: int, seed: int, split: str) -> list[functions.FunctionTask]:
    tasks = functions.function_tasks("heldout" if split == "heldout" else "train")
    return random.Random(seed).sample(tasks, min(count, len(tasks)))


TASKS: dict[str, EmbeddedTask] = {
    task.name: task
    for task in (
        EmbeddedTask(
            "arithmetic",
            "multi-step word problems whose worked solutions call the calculator",
            _arithmetic,
            arithmetic.prompt_messages,
            arithmetic.to_conversation,
            arithmetic.preference_pairs,
        ),
        EmbeddedTask(
            "arithmetic_plain",
            "the same problems solved with inline arithmetic (no tools)",
            _arithmetic,
            functools.partial(arithmetic.prompt_messages, with_tools=False),
            functools.partial(arithmetic.to_conversation, with_tools=False),
            functools.partial(arithmetic.preference_pairs, with_tools=False),
        ),
        EmbeddedTask(
            "functions",
            "docstring -> function tasks mined from the standard library, checked by running their examples",
            _functions,
            functions.prompt_messages,
            functions.to_conversation,
            functions.preference_pairs,
        ),
    )
}
TASK_NAMES = tuple(TASKS)


def embedded_task(name: str, field: str = "task") -> EmbeddedTask:
    """The task of that name; another name is a :class:`ConfigError` naming ``field`` and the known ones."""
    if name not in TASKS:
        raise ConfigError(field, name, f"not an embedded task; choose one of {', '.join(TASK_NAMES)}")
    return TASKS[name]
