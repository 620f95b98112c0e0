"""The embedded-task registry: every stage looks tasks up here; the splits are disjoint, so RL's prompts
are never a demonstration and its validation problems are never a demonstration, an RL prompt or a test
problem; the sizes asked for are the sizes given."""

import pytest

from llmkit.align.rewards import load_task
from llmkit.align.sft import load_datasets
from llmkit.errors import ConfigError
from llmkit.tasks import arithmetic
from llmkit.tasks.registry import SPLITS, TASK_NAMES, embedded_task


def user_question(messages: list[dict]) -> str:
    return next(message["content"] for message in messages if message["role"] == "user")


def test_arithmetic_splits_are_disjoint_and_sized():
    task = embedded_task("arithmetic")
    questions = {split: [item.question for item in task.items(120, 3, split)] for split in SPLITS}
    assert all(len(items) == len(set(items)) == 120 for items in questions.values())
    for first in SPLITS:
        for second in SPLITS:
            if first < second:
                assert not set(questions[first]) & set(questions[second]), (first, second)
    assert all(arithmetic.split_of(question) == split for split in SPLITS for question in questions[split])


def test_the_heldout_split_is_the_one_every_table_always_used():
    """Adding the validation and prompt splits carved the non-held-out range; the test problems stayed."""
    assert arithmetic.SPLIT_BOUNDS["heldout"] == arithmetic.HELDOUT_FRACTION == 0.1
    digest_range = sorted(arithmetic.SPLIT_BOUNDS.values())
    assert digest_range == list(arithmetic.SPLIT_BOUNDS.values()) and digest_range[-1] == 1.0


def test_rl_never_sees_a_demonstration_or_a_test_problem():
    seed = 0
    demonstrations = {user_question(c.messages) for c in load_datasets(["arithmetic:300"], 300, seed)}
    rl = load_task("arithmetic", 300, 50, seed)
    prompts = {user_question(messages) for messages in rl.train}
    validation = {user_question(messages) for messages in rl.validation}
    test = {problem.question for problem in arithmetic.generate_problems(300, seed=seed, split="heldout")}
    assert len(prompts) == 300 and len(validation) == 50
    assert not prompts & demonstrations and not validation & (demonstrations | prompts | test)
    assert not prompts & test


def test_a_stage_names_an_unknown_task_with_the_known_ones():
    assert TASK_NAMES == ("arithmetic", "arithmetic_plain", "functions")
    with pytest.raises(ConfigError, match="'task' = 'algebra'.*arithmetic, arithmetic_plain, functions"):
        embedded_task("algebra")
    with pytest.raises(ConfigError, match="split"):
        embedded_task("arithmetic").items(3, 0, "test")


def test_plain_and_tool_forms_share_problems_but_not_prompts():
    tool, plain = embedded_task("arithmetic"), embedded_task("arithmetic_plain")
    problem = tool.items(1, 0, "train")[0]
    assert plain.items(1, 0, "train")[0] == problem
    assert tool.prompt(problem) != plain.prompt(problem)
    assert user_question(tool.prompt(problem)) == user_question(plain.prompt(problem)) == problem.question
