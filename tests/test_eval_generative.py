"""GSM8K-format exact match: loading, prompts of every prompting style, answer extraction, majority vote,
tool-call demonstrations, and the ablation grid; a scripted engine makes the expected accuracy known."""

import json

import pytest
from eval_fakes import ScriptedEngine

from llmkit.errors import ConfigError, InputError
from llmkit.eval.generative import (
    GenerativeConfig,
    ablation_grid,
    evaluate_generative,
    load_gsm8k,
    rationale,
    run_ablations,
)
from llmkit.infer.answers import extract_number, majority_vote
from llmkit.infer.tools import ToolBox

PROBLEMS = [
    {
        "question": "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72",
    },
    {
        "question": "Weng earns $12 an hour. How much does she earn in 50 minutes?",
        "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nShe earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
    },
    {
        "question": "A book costs $1,200 and a pen $30. What do both cost?",
        "answer": "1200+30 = <<1200+30=1230>>1230\n#### 1,230",
    },
]
TRAIN = [
    {
        "question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
        "answer": "3+4 = <<3+4=7>>7\n#### 7",
    },
    {"question": "A box holds 6 eggs. How many eggs are in 5 boxes?", "answer": "6*5 = <<6*5=30>>30\n#### 30"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def problems(tmp_path):
    return load_gsm8k(write_jsonl(tmp_path / "test.jsonl", PROBLEMS))


@pytest.fixture
def pool(tmp_path):
    return load_gsm8k(write_jsonl(tmp_path / "train.jsonl", TRAIN))


def question_of(prompt: str) -> str:
    """The question being asked: the last "Q: ..." line of the prompt."""
    return prompt.rsplit("Q: ", 1)[1].split("\n", 1)[0]


def test_loading_reads_the_final_number_and_refuses_a_record_without_one(problems, tmp_path):
    assert [problem.target for problem in problems] == ["72", "10", "1230"]
    assert problems[0].solution.endswith("72 clips.")
    bad = write_jsonl(tmp_path / "bad.jsonl", [PROBLEMS[0], {"question": "q", "answer": "no final line"}])
    with pytest.raises(InputError, match="bad.jsonl:2"):
        load_gsm8k(bad)


def test_calculator_annotations_become_tool_calls_or_disappear():
    solution = "Half is 48/2 = <<48/2=24>>24.\nTotal 48+24 = <<48+24=72>>72."
    assert rationale(solution, calculator=False) == "Half is 48/2 = 24. Total 48+24 = 72."
    assert rationale(solution, calculator=True) == (
        "Half is 48/2 = <|tool_call|>calculator(48/2)<|end|><|tool_result|>24<|end|>24. "
        "Total 48+24 = <|tool_call|>calculator(48+24)<|end|><|tool_result|>72<|end|>72."
    )


def test_zero_shot_accuracy_is_exact_match_of_the_first_number(problems):
    replies = {
        PROBLEMS[0]["question"]: " 72 clips",
        PROBLEMS[1]["question"]: " $10.00, since 0.2 x 50 = 10",
        PROBLEMS[2]["question"]: " 1200 + 30",
    }
    engine = ScriptedEngine(lambda prompt, config: replies[question_of(prompt)])
    result = evaluate_generative(engine, problems, GenerativeConfig())
    assert [record["prediction"] for record in result["per_example"]] == ["72", "10", "1200"]
    assert result["accuracy"] == pytest.approx(2 / 3)
    prompt = result["per_example"][0]["prompt"]
    assert prompt == f"Q: {PROBLEMS[0]['question']}\nA:"
    config = engine.calls[0]["configs"][0]
    assert config.temperature == 0 and config.stop == ["\n\nQ:"] and engine.calls[0]["tools"] is None


def test_few_shot_chain_of_thought_shows_worked_demonstrations_and_reads_the_stated_answer(problems, pool):
    engine = ScriptedEngine(lambda prompt, config: " 48/2 = 24, 48 + 24 = 72. The answer is 72.")
    result = evaluate_generative(
        engine, problems[:1], GenerativeConfig(num_fewshot=2, chain_of_thought=True), fewshot_pool=pool
    )
    prompt = result["per_example"][0]["prompt"]
    assert "Q: Tom has 3 apples and buys 4 more. How many apples does he have?\nA: 3+4 = 7 The answer is 7." in prompt
    assert "6*5 = 30 The answer is 30." in prompt and prompt.endswith(f"Q: {PROBLEMS[0]['question']}\nA:")
    assert result["per_example"][0]["extracted"] == ["72"] and result["accuracy"] == 1.0


def test_tools_give_the_engine_a_calculator_and_tool_call_demonstrations(problems, pool):
    engine = ScriptedEngine(lambda prompt, config: "The answer is 72.")
    evaluate_generative(
        engine,
        problems[:1],
        GenerativeConfig(num_fewshot=1, chain_of_thought=True, tools="calculator"),
        fewshot_pool=pool,
    )
    tools = engine.calls[0]["tools"]
    assert isinstance(tools, ToolBox) and [tool.name for tool in tools.tools] == ["calculator"]
    assert "<|tool_call|>calculator(" in engine.calls[0]["prompts"][0]
    assert tools.run("calculator(48/2)") == "24"


def test_self_consistency_takes_the_majority_of_sampled_paths(problems):
    # Five paths with seeds 7..11; each question's answers per path are scripted.
    paths = {
        PROBLEMS[0]["question"]: ["72", "70", "72", "71", "72"],
        PROBLEMS[1]["question"]: ["9", "10", "9", "10", "11"],
        PROBLEMS[2]["question"]: ["1230", "1", "2", "3", "4"],
    }

    def reply(prompt, config):
        if prompt.endswith("Therefore, the answer is"):  # zero-shot CoT's second, greedy prompt
            return " " + prompt.rsplit("So the answer is ", 1)[1].split(".")[0] + "."
        return f"So the answer is {paths[question_of(prompt)][config.seed - 7]}."

    engine = ScriptedEngine(reply)
    config = GenerativeConfig(chain_of_thought=True, self_consistency=5, temperature=0.8, seed=7)
    result = evaluate_generative(engine, problems, config)
    sent = [(prompt, config) for call in engine.calls for prompt, config in zip(call["prompts"], call["configs"])]
    assert all(prompt.endswith("Therefore, the answer is") for prompt, config in sent if config.temperature == 0)
    seeds = [config.seed for prompt, config in sent if config.temperature > 0]
    assert sorted(seeds) == [seed for seed in (7, 8, 9, 10, 11) for _ in problems]
    expected = []
    for record, problem in zip(result["per_example"], problems):
        # A zero-shot CoT path reads "Let's think step by step. <reasoning> Therefore, the answer is <answer>".
        assert record["outputs"] == [
            f"Let's think step by step. So the answer is {answer}. Therefore, the answer is {answer}."
            for answer in paths[problem.question]
        ]
        votes = [extract_number(text) for text in record["outputs"]]
        expected.append(majority_vote(votes)[0] == problem.target)
    assert [record["prediction"] for record in result["per_example"]] == ["72", "9", "1230"]
    assert result["accuracy"] == pytest.approx(sum(expected) / len(expected)) == pytest.approx(2 / 3)


def test_zero_shot_chain_of_thought_prompts_twice(problems):
    def reply(prompt, config):
        return " 72" if prompt.endswith("Therefore, the answer is") else " Half of 48 is 24, plus 48 is 72."

    engine = ScriptedEngine(reply)
    result = evaluate_generative(engine, problems[:1], GenerativeConfig(chain_of_thought=True))
    first, second = engine.calls[0]["prompts"][0], engine.calls[1]["prompts"][0]
    assert first == f"Q: {PROBLEMS[0]['question']}\nA: Let's think step by step."
    assert second == first + " Half of 48 is 24, plus 48 is 72. Therefore, the answer is"
    assert result["per_example"][0]["correct"]


def test_self_consistency_refuses_greedy_paths():
    with pytest.raises(ConfigError, match="temperature"):
        GenerativeConfig(self_consistency=3, temperature=0)
    with pytest.raises(ConfigError, match="tools"):
        GenerativeConfig(tools="abacus")


def test_ablation_grid_covers_shots_cot_tools_and_paths(problems, pool):
    grid = ablation_grid(GenerativeConfig(num_fewshot=2, self_consistency=3))
    assert {(c.num_fewshot, c.chain_of_thought, c.tools, c.self_consistency) for c in grid} == {
        (k, cot, tools, paths)
        for k in (0, 2)
        for cot in (False, True)
        for tools in ("none", "calculator")
        for paths in (1, 3)
    }
    assert len(ablation_grid(GenerativeConfig())) == 4  # zero-shot, one path: CoT x tools only
    engine = ScriptedEngine(lambda prompt, config: " 72" if "Natalia" in question_of(prompt) else " 0")
    own, rows = run_ablations(engine, problems, GenerativeConfig(num_fewshot=1), fewshot_pool=pool)
    assert len(rows) == 8 and own["accuracy"] == pytest.approx(1 / 3)
    assert all(row["accuracy"] == pytest.approx(1 / 3) for row in rows if not row["chain_of_thought"])
