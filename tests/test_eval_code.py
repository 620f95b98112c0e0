"""Code evaluation: the pass@k estimator against the closed form, and HumanEval-format problems run
through the real sandbox (right solutions pass, wrong and non-terminating ones fail)."""

import gzip
import json
import math

import pytest
from eval_fakes import ScriptedEngine

from llmkit.errors import ConfigError, InputError
from llmkit.eval.code import STOP_SEQUENCES, evaluate_code, load_code_problems, pass_at_k, score_completions

PROBLEMS = [
    {
        "task_id": "Toy/0",
        "prompt": 'def add(a, b):\n    """Return a + b."""\n',
        "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
        "entry_point": "add",
    },
    {
        "task_id": "Toy/1",
        "prompt": 'def reverse(text):\n    """Reverse a string."""\n',
        "canonical_solution": "    return text[::-1]\n",
        "test": "def check(candidate):\n    assert candidate('abc') == 'cba'\n    assert candidate('') == ''\n",
        "entry_point": "reverse",
    },
]
WRONG = {"Toy/0": "    return a - b\n", "Toy/1": "    return text\n"}


@pytest.fixture
def problem_file(tmp_path):
    path = tmp_path / "toy.jsonl.gz"
    with gzip.open(path, "wt") as file:
        file.write("".join(json.dumps(problem) + "\n" for problem in PROBLEMS))
    return path


def test_pass_at_k_equals_the_closed_form():
    for n, c, k in [
        (1, 0, 1),
        (1, 1, 1),
        (5, 2, 1),
        (5, 2, 3),
        (5, 2, 4),
        (10, 3, 5),
        (20, 0, 10),
        (20, 20, 10),
        (200, 7, 1),
        (200, 7, 10),
        (200, 7, 100),
        (200, 150, 100),
    ]:
        closed_form = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(closed_form, abs=1e-12), (n, c, k)


def test_pass_at_k_needs_k_at_most_n():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 5)
    with pytest.raises(ValueError, match="between 0 and n"):
        pass_at_k(3, 4, 1)


def test_right_solutions_pass_and_wrong_or_endless_ones_fail(problem_file):
    problems = load_code_problems(problem_file)
    completions = [
        [problem.canonical_solution, WRONG[problem.task_id], "    while True:\n        pass\n"] for problem in problems
    ]
    result = score_completions(problems, completions, ks=[1, 2], timeout_s=1.0, workers=2)
    for record in result["per_example"]:
        outcomes = [(sample["passed"], sample["status"]) for sample in record["completions"]]
        assert outcomes == [(True, "ok"), (False, "error"), (False, "timeout")]
        assert "AssertionError" in record["completions"][1]["error"]
        assert record["passed"] == 1
    assert result["pass@1"] == pytest.approx(1 / 3)
    assert result["pass@2"] == pytest.approx(1 - math.comb(2, 2) / math.comb(3, 2))


def test_sampled_completions_give_the_mean_of_per_problem_pass_at_k(problem_file):
    problems = load_code_problems(problem_file)
    by_prompt = {problem.prompt: problem for problem in problems}

    def reply(prompt, config):
        # Sample j has seed 11 + j: Toy/0 is right on samples 0 and 2 of 4, Toy/1 on sample 3 only.
        sample = config.seed - 11
        problem = by_prompt[prompt]
        right = sample in ((0, 2) if problem.task_id == "Toy/0" else (3,))
        return problem.canonical_solution if right else WRONG[problem.task_id]

    engine = ScriptedEngine(reply)
    result = evaluate_code(engine, problems, samples=4, ks=[1, 2], temperature=0.8, seed=11, timeout_s=5, workers=2)
    assert [record["passed"] for record in result["per_example"]] == [2, 1]
    for k in (1, 2):
        expected = [1 - math.comb(4 - c, k) / math.comb(4, k) for c in (2, 1)]
        assert result[f"pass@{k}"] == pytest.approx(sum(expected) / 2)
    configs = [config for call in engine.calls for config in call["configs"]]
    assert all(config.stop == STOP_SEQUENCES and config.temperature == 0.8 for config in configs)


def test_sample_count_and_temperature_are_validated(problem_file):
    problems = load_code_problems(problem_file)
    engine = ScriptedEngine(lambda prompt, config: "    return None\n")
    with pytest.raises(ConfigError, match="pass@5"):
        evaluate_code(engine, problems, samples=2, ks=[5], temperature=0.8)
    with pytest.raises(ConfigError, match="temperature"):
        evaluate_code(engine, problems, samples=3, temperature=0)


def test_a_record_without_a_test_is_refused(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({key: value for key, value in PROBLEMS[0].items() if key != "test"}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:1: .*test"):
        load_code_problems(path)


def test_humaneval_canonical_solutions_pass(shared_data):
    problems = load_code_problems(shared_data / "humaneval" / "HumanEval.jsonl.gz")[:5]
    by_prompt = {problem.prompt: problem.canonical_solution for problem in problems}
    result = evaluate_code(ScriptedEngine(lambda prompt, config: by_prompt[prompt]), problems, temperature=0, workers=2)
    assert [record["passed"] for record in result["per_example"]] == [1] * 5
    assert result["pass@1"] == 1.0


@pytest.mark.parametrize(
    "forgery",
    [
        "    raise SystemExit\n",
        "    import os; os._exit(0)\n",
        "    import sys; sys.exit(0)\n",
        "    pass\nimport os\nos._exit(0)\n",
        "    class Yes(int):\n        __eq__ = lambda self, other: True\n    return Yes()\n",
    ],
)
def test_early_exits_and_lying_objects_fail(problem_file, forgery):
    problems = load_code_problems(problem_file)
    result = score_completions(problems, [[forgery] for _ in problems], ks=[1], timeout_s=5, workers=2)
    assert result["pass@1"] == 0.0
    assert all(not sample["passed"] for record in result["per_example"] for sample in record["completions"])


def test_every_canonical_humaneval_solution_passes_and_an_early_exit_fails(shared_data):
    problems = load_code_problems(shared_data / "humaneval" / "HumanEval.jsonl.gz")
    result = score_completions(problems, [[problem.canonical_solution] for problem in problems], ks=[1], workers=2)
    failing = [
        (record["id"], record["completions"][0]["error"]) for record in result["per_example"] if not record["passed"]
    ]
    assert failing == []
    # The early exit on a sample of the problems (each run costs two sandboxes; the exit is the same everywhere).
    sample = problems[::8]
    exits = score_completions(sample, [["    import os; os._exit(0)\n"] for _ in sample], ks=[1], workers=2)
    assert exits["pass@1"] == 0.0
