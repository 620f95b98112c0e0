"""Embedded tasks and dataset formats: arithmetic problems against naive re-solvers and the calculator,
function tasks against the real standard library, files in every supported format."""

import importlib
import json
import re
from ast import literal_eval
from fractions import Fraction
from types import SimpleNamespace

import pytest

from llmkit.chat import render_text, tool_call_payload
from llmkit.errors import ConfigError, InputError
from llmkit.infer.calculator import calculate
from llmkit.infer.tools import ToolBox, calculator_tool
from llmkit.tasks import arithmetic, functions
from llmkit.tasks.datasets import build_instance, extract_prompt, load_conversations, load_preferences


# ---------------------------------------------------------------------------------- arithmetic
@pytest.fixture(scope="module")
def problems():
    return arithmetic.generate_problems(400, seed=0)


def completion_text(messages: list[dict]) -> str:
    """A solution as the engine's output text: the assistant's words, calls and the injected results."""
    return render_text([{"role": "user", "content": "q"}] + messages).split("<|user|>q<|end|><|assistant|>", 1)[1]


def test_problems_are_a_pure_function_of_the_seed(problems):
    assert arithmetic.generate_problems(400, seed=0) == problems
    assert len({problem.question for problem in problems}) == 400
    assert arithmetic.generate_problems(50, seed=1) != problems[:50]
    assert {problem.template for problem in problems} == set(arithmetic.TEMPLATES)
    assert {len(problem.steps) for problem in problems} == {2, 3, 4}


def test_train_and_heldout_never_share_a_problem(problems):
    heldout = arithmetic.generate_problems(100, seed=0, split="heldout") + arithmetic.generate_problems(
        100, seed=7, split="heldout"
    )
    assert not {problem.question for problem in problems} & {problem.question for problem in heldout}
    assert all(arithmetic.split_of(problem.question) == "heldout" for problem in heldout)
    with pytest.raises(ConfigError, match="split"):
        arithmetic.generate_problems(3, split="test")


def test_every_calculator_call_evaluates_to_the_injected_result(problems):
    toolbox = ToolBox([calculator_tool()])
    for problem in problems:
        messages = arithmetic.to_conversation(problem).messages
        calls = [call for message in messages for call in message.get("tool_calls", [])]
        results = [message["content"] for message in messages if message["role"] == "tool"]
        assert len(calls) == len(results) == len(problem.steps)
        # What the engine would inject: the payload run through the tool protocol.
        assert [toolbox.run(tool_call_payload(call)) for call in calls] == results
        assert results[-1] == str(problem.answer) and messages[-1]["content"].endswith(f"#### {problem.answer}")
        # Every number the solution starts from is stated in the question.
        literals = [
            str(operand) for step in problem.steps for operand in (step.left, step.right) if isinstance(operand, int)
        ]
        assert all(re.search(rf"(?<![\d]){literal}(?![\d])", problem.question) for literal in literals)


def test_plain_solutions_write_correct_arithmetic_inline(problems):
    for problem in problems[:100]:
        (message,) = arithmetic.to_conversation(problem, with_tools=False).messages[2:]
        lines = message["content"].split("\n")
        for line in lines[:-1]:
            expression, value = line.split(": ", 1)[1].split(" = ")
            assert calculate(expression) == value
        assert lines[-1] == f"#### {problem.answer}"


def test_gsm8k_records_read_back_through_the_eval_loader_with_checkable_calculator_calls(problems, tmp_path):
    from llmkit.eval.generative import load_gsm8k, rationale
    from llmkit.infer.tools import find_tool_calls, parse_tool_call

    path = tmp_path / "arithmetic.jsonl"
    path.write_text("".join(json.dumps(arithmetic.gsm8k_record(problem)) + "\n" for problem in problems))
    examples = load_gsm8k(path)
    assert [example.question for example in examples] == [problem.question for problem in problems]
    for problem, example in zip(problems, examples):
        assert example.target == str(problem.answer)
        # With the calculator: one call per step, each evaluating to the result the annotation gives.
        exchanges = find_tool_calls(rationale(example.solution, calculator=True))
        assert len(exchanges) == len(problem.steps)
        for exchange in exchanges:
            call = parse_tool_call(exchange.payload)
            assert call.name == "calculator" and calculate(call.arguments) == exchange.result
        assert exchanges[-1].result == str(problem.answer)
        # Without it: inline arithmetic that is correct, and no trace of the annotations.
        plain = rationale(example.solution, calculator=False)
        assert "<<" not in plain and "<|" not in plain
        for expression, value in re.findall(r": ([\d+\-*/]+) = (\d+)\.", plain):
            assert calculate(expression) == value
        assert len(re.findall(r": ([\d+\-*/]+) = (\d+)\.", plain)) == len(problem.steps)


NAIVE_SOLVERS = {
    # Independent re-solutions from the question text alone.
    "shopping": (
        r"buys (\d+) \w+ at \$(\d+) each and (\d+) \w+ at \$(\d+) each\. \w+ pays with a \$(\d+) bill",
        lambda a, p, b, q, bill: bill - (a * p + b * q),
    ),
    "sharing": (
        r"bakes (\d+) trays of (\d+) \w+\. \w+ keeps (\d+) \w+ and shares the rest equally among (\d+) friends",
        lambda trays, per, kept, friends: Fraction(trays * per - kept, friends),
    ),
    "garden": (
        r"is (\d+) meters long and (\d+) meters wide\. A path covers (\d+) square meters of it, and the rest is "
        r"planted with (\d+) flowers",
        lambda length, width, path, density: (length * width - path) * density,
    ),
    "tickets": (
        r"(\d+) rows of (\d+) seats, and (\d+) seats are already sold\. The remaining seats cost \$(\d+)",
        lambda rows, seats, taken, price: (rows * seats - taken) * price,
    ),
}


def test_answers_match_naive_solvers_of_the_question_text(problems):
    checked = 0
    for problem in problems:
        if problem.template in NAIVE_SOLVERS:
            pattern, solve = NAIVE_SOLVERS[problem.template]
            numbers = [int(number) for number in re.search(pattern, problem.question).groups()]
            assert solve(*numbers) == problem.answer, problem.question
            checked += 1
    assert checked > 100


def test_check_answer_reads_only_the_final_marked_number(problems):
    problem = problems[0]
    answer = problem.answer
    for messages in (
        arithmetic.solution_messages(problem.steps),
        arithmetic.solution_messages(problem.steps, with_tools=False),
    ):
        assert arithmetic.check_answer(problem, completion_text(messages))
    assert arithmetic.check_answer(problem, f"#### {answer + 1} wait, no.\n#### ${answer:,}")
    assert arithmetic.check_answer(problem, f"####{answer}.0")
    assert not arithmetic.check_answer(problem, f"#### {answer + 1}")
    assert not arithmetic.check_answer(problem, f"The answer is {answer}.")  # no marker
    assert not arithmetic.check_answer(problem, f"#### {answer}\n#### unsure")  # the last marker has no number
    assert arithmetic.final_answer("#### 1,250") == 1250


def test_preference_pairs_put_a_correct_solution_against_a_plausible_wrong_one(problems):
    pairs = arithmetic.preference_pairs(problems, seed=0)
    assert len(pairs) >= 0.95 * len(problems)
    for pair in pairs:
        problem = next(problem for problem in problems if problem.question == pair.prompt_messages[-1]["content"])
        assert arithmetic.check_answer(problem, completion_text(pair.chosen_messages))
        assert not arithmetic.check_answer(problem, completion_text(pair.rejected_messages))
        # The wrong solution is wrong in its reasoning, not in its arithmetic.
        calls = [
            call["custom"]["input"] for message in pair.rejected_messages for call in message.get("tool_calls", [])
        ]
        results = [message["content"] for message in pair.rejected_messages if message["role"] == "tool"]
        assert [calculate(call) for call in calls] == results
    kinds = {kind for problem in problems for kind, _ in arithmetic.corruptions(problem.steps)}
    assert kinds == {"off_by_one", "wrong_operation", "dropped_step"}


def test_corruptions_of_a_hand_made_problem():
    # 3 pens at $4 (12) plus 5 pads at $2 (10): total 22; change from 50 is 28.
    P = arithmetic.Previous
    steps = (
        arithmetic.Step("Pens", "*", 3, 4),
        arithmetic.Step("Pads", "*", 5, 2),
        arithmetic.Step("Total", "+", P(0), P(1)),
        arithmetic.Step("Change", "-", 50, P(2)),
    )
    assert arithmetic.expressions(steps) == ["3*4", "5*2", "12+10", "50-22"]
    wrong = {(kind, tuple(arithmetic.expressions(variant))) for kind, variant in arithmetic.corruptions(steps)}
    assert ("dropped_step", ("5*2", "3+10", "50-13")) in wrong  # forgot to multiply the pens by their price
    assert ("dropped_step", ("3*4", "5*2", "50-12")) in wrong  # forgot to add the pads
    assert ("off_by_one", ("3*5", "5*2", "15+10", "50-25")) in wrong
    assert ("wrong_operation", ("3*4", "5*2", "12*10", "50-120")) not in wrong  # negative change is not plausible
    assert all(arithmetic.step_values(variant)[-1] != 28 for _, variant in arithmetic.corruptions(steps))


# ---------------------------------------------------------------------------------- functions
@pytest.fixture(scope="module")
def function_tasks():
    return functions.function_tasks("train", modules=("html", "string", "email.quoprimime")) + functions.function_tasks(
        "heldout", modules=("textwrap",)
    )


def test_mining_keeps_small_documented_pure_functions():
    import ast

    source = '''
def kept(text, width=3):
    """Pad."""
    return text.ljust(width)

def no_docstring(x):
    return x

def prints(x):
    """Shout."""
    print(x)

def reads(path):
    """Size."""
    return os.stat(path).st_size

def generator(x):
    """Count."""
    yield x

def _private(x):
    """Hidden."""
    return x

def no_parameters():
    """Constant."""
    return 1
'''
    kept = [node.name for node in ast.parse(source).body if functions.is_candidate(node)]
    assert kept == ["kept"]


def test_examples_are_what_the_real_standard_library_returns(function_tasks):
    assert {task.module for task in function_tasks} == {"html", "string", "email.quoprimime", "textwrap"}
    for task in function_tasks:
        real = getattr(importlib.import_module(task.module), task.name)
        assert len(task.examples) >= functions.MIN_EXAMPLES and len({result for _, result in task.examples}) >= 2
        for arguments, result in task.examples:
            assert real(*literal_eval(arguments)) == literal_eval(result)
        assert task.prompt.startswith(f"def {task.name}(") and '"""' in task.prompt
        assert '"""' not in task.reference and task.reference.startswith(f"def {task.name}(")


def test_splits_are_by_module(function_tasks):
    assert {task.module for task in function_tasks if task.module in functions.HELDOUT_MODULES} == {"textwrap"}
    assert functions.function_tasks("heldout", modules=("html", "string")) == []


def test_checker_accepts_the_reference_and_a_different_correct_body_and_rejects_the_rest(function_tasks):
    escape = next(task for task in function_tasks if (task.module, task.name) == ("html", "escape"))
    assert all(functions.check_solution(task, task.reference).passed for task in function_tasks)
    rewritten = """Here it is:
```python
def escape(s, quote=True):
    table = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
    if quote:
        table.update({'"': "&quot;", "'": "&#x27;"})
    return "".join(table.get(character, character) for character in s)
```"""
    identity = "def escape(s, quote=True):\n    return s"
    hangs = "def escape(s, quote=True):\n    while True:\n        pass"
    results = functions.check_solutions(
        escape, [rewritten, identity, hangs, "def escape(s):\n    return s", "def escape(s, quote=True) return s"]
    )
    assert [result.passed for result in results] == [True, False, False, False, False]
    assert results[1].examples_passed < results[1].examples_total and results[2].examples_passed == 0
    assert (results[3].parsed, results[3].signature_matches) == (True, False)
    assert not results[4].parsed


def test_mutants_of_a_hand_made_function():
    reference = "def f(x):\n    if x < 2:\n        return x + 1\n    return not x"
    expected = {
        "def f(x):\n    if x <= 2:\n        return x + 1\n    return not x",
        "def f(x):\n    if x < 3:\n        return x + 1\n    return not x",
        "def f(x):\n    if x < 2:\n        return x - 1\n    return not x",
        "def f(x):\n    if x < 2:\n        return x + 2\n    return not x",
        "def f(x):\n    if not x < 2:\n        return x + 1\n    return not x",
        "def f(x):\n    if x < 2:\n        return x + 1\n    return x",
        "def f(x):\n    return not x",  # the if statement deleted
        "def f(x):\n    if x < 2:\n        return x + 1",  # the last return deleted
    }
    assert set(functions.mutants(reference)) == expected


def test_function_preference_pairs_are_correct_versus_rejected_by_the_checker(function_tasks):
    pairs = functions.preference_pairs(function_tasks, seed=0)
    assert len(pairs) >= len(function_tasks) // 2
    for pair in pairs:
        task = next(task for task in function_tasks if task.prompt in pair.prompt_messages[0]["content"])
        assert functions.check_solution(task, pair.chosen_messages[0]["content"]).passed
        assert not functions.check_solution(task, pair.rejected_messages[0]["content"]).passed
    conversation = functions.to_conversation(function_tasks[0])
    assert conversation.messages[-1]["content"] == function_tasks[0].reference and conversation.task == "functions"


# ---------------------------------------------------------------------------------- datasets
def write(path, rows, jsonl=True):
    path.write_text(
        "\n".join(json.dumps(row) for row in rows) if jsonl else json.dumps(rows, indent=2), encoding="utf-8"
    )
    return path


def test_every_conversation_format_becomes_messages(tmp_path):
    call = {"name": "search", "arguments": {"query": "fox"}}
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {
            "conversations": [
                {"from": "human", "value": "find"},
                {"from": "function_call", "value": json.dumps(call)},
                {"from": "observation", "value": "a fox"},
                {"from": "gpt", "value": "Found."},
            ],
            "system": "Be kind.",
        },
        {"prompt": "2+2?", "completion": "4"},
        {"prompt": [{"role": "user", "content": "2+3?"}], "completion": [{"role": "assistant", "content": "5"}]},
        {"instruction": "Add.", "input": "2 and 2", "output": "4"},
        {"instruction": "Greet.", "input": "", "output": "Hello!"},
        {
            "name": "adding",
            "instruction": "Add the numbers.",
            "instances": [{"input": "1 2", "output": "3"}, {"input": "", "output": "0"}],
        },
    ]
    conversations = load_conversations(write(tmp_path / "data.jsonl", rows))
    texts = [render_text(conversation.messages) for conversation in conversations]
    assert texts == [
        "<|endoftext|><|user|>hi<|end|><|assistant|>hello<|end|>",
        '<|endoftext|><|system|>Be kind.<|end|><|user|>find<|end|><|assistant|><|tool_call|>{"name": "search", '
        '"arguments": {"query": "fox"}}<|end|>'
        "<|tool_result|>a fox<|end|>Found.<|end|>",
        "<|endoftext|><|user|>2+2?<|end|><|assistant|>4<|end|>",
        "<|endoftext|><|user|>2+3?<|end|><|assistant|>5<|end|>",
        "<|endoftext|><|user|>Add.\n\n2 and 2<|end|><|assistant|>4<|end|>",
        "<|endoftext|><|user|>Greet.<|end|><|assistant|>Hello!<|end|>",
        "<|endoftext|><|user|>Definition: Add the numbers.\n\nInput: 1 2<|end|><|assistant|>3<|end|>",
        "<|endoftext|><|user|>Definition: Add the numbers.<|end|><|assistant|>0<|end|>",
    ]
    assert [conversation.task for conversation in conversations][-2:] == ["adding", "adding"]
    # The same rows as one JSON array read the same.
    assert load_conversations(write(tmp_path / "data.json", rows, jsonl=False)) == conversations


def test_instances_follow_the_super_natural_instructions_layout():
    conversation = build_instance(
        "Reverse the word.", "abc", "cba", demonstrations=[("dog", "god"), ("on", "no")], task="reverse"
    )
    assert conversation.messages[0]["content"] == (
        "Definition: Reverse the word.\n\nExample 1:\nInput: dog\nOutput: god\n\n"
        "Example 2:\nInput: on\nOutput: no\n\nNow complete the following example:\nInput: abc"
    )
    assert conversation.messages[1] == {"role": "assistant", "content": "cba"} and conversation.task == "reverse"


def test_every_preference_format_becomes_pairs(tmp_path):
    user, good, bad = (
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "good"},
        {"role": "assistant", "content": "bad"},
    )
    rows = [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": [user], "chosen": [good], "rejected": [bad]},
        {"chosen": [user, good], "rejected": [user, bad]},
        {"chosen": "\n\nHuman: q\n\nAssistant: good", "rejected": "\n\nHuman: q\n\nAssistant: bad"},
        {
            "conversations": [{"from": "human", "value": "q"}],
            "chosen": {"from": "gpt", "value": "good"},
            "rejected": {"from": "gpt", "value": "bad"},
        },
    ]
    rows_read = load_preferences(write(tmp_path / "pairs.jsonl", rows))
    assert all(
        (row.prompt_messages, row.chosen_messages, row.rejected_messages) == ([user], [good], [bad])
        for row in rows_read
    )
    (ranking,) = load_preferences(
        write(tmp_path / "ranked.jsonl", [{"prompt": "q", "responses": ["best", "middle", "worst"]}])
    )
    assert [(pair.chosen_messages[0]["content"], pair.rejected_messages[0]["content"]) for pair in ranking.pairs()] == [
        ("best", "middle"),
        ("best", "worst"),
        ("middle", "worst"),
    ]


def test_implicit_prompt_ends_where_the_assistant_answers():
    user, answer = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    follow_up = {"role": "user", "content": "and?"}
    # They first differ at a user turn: the shared assistant answer moves into both continuations.
    prompt, chosen, rejected = extract_prompt(
        [user, answer, follow_up], [user, answer, {"role": "user", "content": "but?"}]
    )
    assert (prompt, chosen[0], rejected[0]) == ([user], answer, answer)
    with pytest.raises(InputError, match="same conversation"):
        extract_prompt([user, answer], [user, answer])


def test_bad_files_name_the_file_and_line(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.jsonl:2: not valid JSON"):
        load_conversations(bad_json)
    array = tmp_path / "array.json"
    array.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"text": "plain"}\n]', encoding="utf-8")
    with pytest.raises(InputError, match=r"array\.json:3: no conversation format matches the keys \['text'\]"):
        load_conversations(array)
    with pytest.raises(InputError, match=r"pairs\.jsonl:1: .*responses"):
        load_preferences(write(tmp_path / "pairs.jsonl", [{"prompt": "q", "responses": ["only one"]}]))
    with pytest.raises(InputError, match=r"calls\.jsonl:1: conversations\[1\]: a function_call value must be JSON"):
        load_conversations(
            write(
                tmp_path / "calls.jsonl",
                [{"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "f(x)"}]}],
            )
        )
    with pytest.raises(InputError, match="file not found"):
        load_conversations(tmp_path / "missing.jsonl")


def test_shared_datasets_load(shared_data):
    alpaca = load_conversations(shared_data / "alpaca/alpaca_200.json")
    assert len(alpaca) == 200
    assert render_text(alpaca[0].messages) == (
        "<|endoftext|><|user|>Give three tips for staying healthy.<|end|><|assistant|>1.Eat a balanced "
        "diet and make sure to include plenty of fruits and vegetables. \n2. Exercise regularly to keep "
        "your body active and strong. \n3. Get enough sleep and maintain a consistent sleep schedule.<|end|>"
    )
    assert len(load_conversations(shared_data / "llamafactory_demo/alpaca_en_demo.json")) == 999
    seed_tasks = load_conversations(shared_data / "alpaca/seed_tasks.jsonl")
    assert len(seed_tasks) == 175 and all(conversation.task for conversation in seed_tasks)  # one instance per task
    tool_dialogues = load_conversations(shared_data / "llamafactory_demo/glaive_toolcall_en_demo.json")
    assert len(tool_dialogues) == 300
    assert (
        sum(
            len(message.get("tool_calls") or []) for conversation in tool_dialogues for message in conversation.messages
        )
        == 211
    )
    dpo = load_preferences(shared_data / "llamafactory_demo/dpo_en_demo.json")
    assert len(dpo) == 300 and all(row.chosen_messages[0]["role"] == "assistant" for row in dpo)
    hh = load_preferences(shared_data / "hh_rlhf/harmless-base/test.jsonl.gz")
    assert len(hh) == 2312
    assert all(
        row.prompt_messages[-1]["role"] == "user"
        and row.chosen_messages[0]["role"] == row.rejected_messages[0]["role"] == "assistant"
        for row in hh
    )
    assert sum(len(row.chosen_messages) == len(row.rejected_messages) == 1 for row in hh) >= 2300


def test_a_forged_verdict_earns_nothing_and_leaves_its_group_mates_alone(function_tasks):
    from llmkit.align.rewards import FunctionTaskReward

    escape = next(task for task in function_tasks if (task.module, task.name) == ("html", "escape"))
    forgeries = [  # the old harness trusted the JSON its process printed
        'def escape(s, quote=True):\n    import sys\n    print(\'[{"passed": 64, "error": null}]\' * 64)\n'
        "    sys.exit(0)",
        "import os\nos._exit(0)\ndef escape(s, quote=True):\n    return s",
        "def escape(s, quote=True):\n    class Same(str):\n        __eq__ = lambda self, other: True\n"
        "    return Same(s)",
    ]
    identity = "def escape(s, quote=True):\n    return s"
    alone = functions.check_solution(escape, identity)
    group = [escape.reference, *forgeries, identity]
    results = functions.check_solutions(escape, group)
    assert [result.passed for result in results] == [True, False, False, False, False]
    assert [result.examples_passed for result in results[1:4]] == [0, 0, 0]
    assert (results[4].examples_passed, results[4].error) == (alone.examples_passed, alone.error)
    reward = FunctionTaskReward([escape], format_bonus=0.0)
    prompt = SimpleNamespace(messages=functions.prompt_messages(escape))
    rollouts = [SimpleNamespace(prompt=prompt, text=text) for text in group]  # what a reward reads of a Rollout
    assert reward.score(rollouts) == [1.0, 0.0, 0.0, 0.0, 0.0]
