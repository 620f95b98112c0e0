"""Prompting by behaviour: demonstrations chosen and ordered as worked out by hand, prompts rendered to
hand-written strings, answers extracted from a table of hand cases, the vote and its tie rule,
self-consistency and self-improvement against a scripted engine, and one run on a real tiny Engine."""

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from helpers import tiny_config

from llmkit.align.self_improve import self_improvement_dataset, write_self_improvement
from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer
from llmkit.errors import ConfigError, InputError
from llmkit.infer import Engine, EngineConfig, GenerationConfig
from llmkit.infer.answers import extract_choice, extract_number, extract_text, majority_vote, normalize_text
from llmkit.infer.prompting import (
    Example,
    PromptBuilder,
    PromptConfig,
    SelfConsistencyConfig,
    hidden_state_embedder,
    load_examples,
    reason,
    self_consistency,
)
from llmkit.io import iter_jsonl
from llmkit.model import Transformer
from llmkit.tokenizer import Tokenizer

POOL = [
    Example("How many apples does Tom have?", "3", "Tom has 1 + 2 = 3 apples."),
    Example("What is the capital of France?", "Paris", "France's capital city is Paris."),
    Example("How many legs does a spider have?", "8", "Spiders have 4 pairs of legs, 8 legs."),
    Example("Who wrote Hamlet?", "Shakespeare", "Hamlet is a play by Shakespeare."),
]


def questions_of(examples):
    return [example.question for example in examples]


# ------------------------------------------------------------------------------ rendering
def test_few_shot_prompt_equals_the_hand_written_string():
    builder = PromptBuilder(PromptConfig(shots=3, instruction="Answer the questions."), POOL)
    # The query is a pool question: it is left out, so the other three are the shots, in pool order.
    expected = (
        "Answer the questions.\n\n"
        "Q: How many apples does Tom have?\nA: 3\n\n"
        "Q: How many legs does a spider have?\nA: 8\n\n"
        "Q: Who wrote Hamlet?\nA: Shakespeare\n\n"
        "Q: What is the capital of France?\nA:"
    )
    assert builder.prompt("What is the capital of France?") == expected
    assert builder.stop == ["\n\nQ:"]


def test_chain_of_thought_prompts_equal_the_hand_written_strings():
    few_shot = PromptBuilder(
        PromptConfig(shots=1, chain_of_thought="few_shot", ordering="given", selection="bm25"), POOL
    )
    assert few_shot.prompt("Who wrote Macbeth?") == (
        "Q: Who wrote Hamlet?\nA: Hamlet is a play by Shakespeare. The answer is Shakespeare.\n\n"
        "Q: Who wrote Macbeth?\nA:"
    )
    zero_shot = PromptBuilder(PromptConfig(chain_of_thought="zero_shot"))
    prompt = zero_shot.prompt("What is 3+4?")
    assert prompt == "Q: What is 3+4?\nA: Let's think step by step."
    assert zero_shot.answer_prompt(prompt, " 3 plus 4 is 7.\n") == (
        "Q: What is 3+4?\nA: Let's think step by step. 3 plus 4 is 7. Therefore, the answer is"
    )


def test_custom_template_and_separator():
    config = PromptConfig(shots=2, template="Question: {question}\nAnswer:\n{answer}", separator="\n###\n")
    builder = PromptBuilder(config, POOL[:2])
    assert builder.prompt("Why?") == (
        "Question: How many apples does Tom have?\nAnswer:\n3\n###\n"
        "Question: What is the capital of France?\nAnswer:\nParis\n###\n"
        "Question: Why?\nAnswer:\n"
    )
    assert builder.stop == ["\n###\nQuestion:"]


# ------------------------------------------------------------------------------ selection and ordering
@pytest.mark.parametrize(
    "ordering, expected",
    [
        ("given", [0, 2]),  # pool order
        ("similarity_descending", [0, 2]),
        ("similarity_ascending", [2, 0]),  # the most similar example sits last, next to the query
    ],
)
def test_bm25_picks_the_overlapping_questions(ordering, expected):
    # "apples" and "Mary" share nothing else; "how many ... does ... have" is shared by 0 and 2 only.
    builder = PromptBuilder(PromptConfig(shots=2, selection="bm25", ordering=ordering), POOL)
    assert builder.select("How many apples does Mary have?") == [POOL[index] for index in expected]


def test_embedding_selection_uses_cosine_similarity():
    vectors = {
        POOL[0].question: [1.0, 0.0],
        POOL[1].question: [0.0, 1.0],
        POOL[2].question: [1.0, 1.0],
        POOL[3].question: [-1.0, 0.0],
        "query": [2.0, 1.0],
    }
    calls = []

    def embed(texts):
        calls.append(list(texts))
        return torch.tensor([vectors[text] for text in texts])

    # cosines with (2, 1): [1,0] 0.894, [0,1] 0.447, [1,1] 0.949, [-1,0] -0.894: magnitudes do not matter.
    descending = PromptBuilder(
        PromptConfig(shots=3, selection="embedding", ordering="similarity_descending"), POOL, embed
    )
    assert descending.select("query") == [POOL[2], POOL[0], POOL[1]]
    assert descending.select("query") == [POOL[2], POOL[0], POOL[1]]
    assert calls == [questions_of(POOL), ["query"], ["query"]]  # the pool is embedded once
    ascending = PromptBuilder(
        PromptConfig(shots=2, selection="embedding", ordering="similarity_ascending"), POOL, embed
    )
    assert ascending.select("query") == [POOL[0], POOL[2]]


def test_random_selection_is_seeded_per_query_and_uniform():
    pool = [Example(f"question {index}", str(index)) for index in range(6)]
    builder = PromptBuilder(PromptConfig(shots=2, seed=1), pool)
    queries = [f"query {index}" for index in range(600)]
    first = {query: builder.select(query) for query in queries}
    # The same shots whatever order the queries come in, and from a fresh builder.
    assert {query: builder.select(query) for query in reversed(queries)} == first
    assert PromptBuilder(PromptConfig(shots=2, seed=1), pool).select("query 7") == first["query 7"]
    other_seed = PromptBuilder(PromptConfig(shots=2, seed=2), pool)
    assert sum(other_seed.select(query) != first[query] for query in queries) > 400
    counts = [sum(example in chosen for chosen in first.values()) for example in pool]
    assert all(len(set(questions_of(chosen))) == 2 for chosen in first.values())
    assert all(abs(count - 600 * 2 / 6) < 60 for count in counts)  # each example in a third of the prompts
    # The query itself is never among its shots.
    assert all(pool[0] not in builder.select("question 0") for _ in range(3))


def test_random_ordering_permutes_the_selection():
    pool = [Example(f"question {index}", str(index)) for index in range(8)]
    given = PromptBuilder(PromptConfig(shots=8), pool)
    shuffled = PromptBuilder(PromptConfig(shots=8, ordering="random"), pool)
    orders = [questions_of(shuffled.select(f"q{index}")) for index in range(20)]
    assert questions_of(given.select("q0")) == questions_of(pool)
    assert all(sorted(order) == sorted(questions_of(pool)) for order in orders)
    assert len({tuple(order) for order in orders}) > 15


def test_bad_configurations_name_the_field():
    with pytest.raises(ConfigError, match="template"):
        PromptConfig(template="Q: {question}\nA:")  # no {answer}
    with pytest.raises(ConfigError, match="cot_template"):
        PromptConfig(cot_template="{answer} because {rationale}: {question}")
    with pytest.raises(ConfigError, match="template"):
        PromptConfig(template="Q: {question!r} {answer}")
    with pytest.raises(ConfigError, match="ordering"):
        PromptConfig(shots=2, ordering="similarity_ascending")
    with pytest.raises(ConfigError, match="shots"):
        PromptConfig(shots=2, chain_of_thought="zero_shot")
    with pytest.raises(ConfigError, match="selection"):
        PromptConfig(selection="nearest")
    with pytest.raises(ConfigError, match="selection"):
        PromptBuilder(PromptConfig(shots=1, selection="embedding"), POOL)
    with pytest.raises(InputError, match="5 shots.*4 examples"):
        PromptBuilder(PromptConfig(shots=5), POOL)
    with pytest.raises(InputError, match="demonstration 1 .*no rationale"):
        PromptBuilder(PromptConfig(shots=1, chain_of_thought="few_shot"), [POOL[0], Example("q", "a")])
    with pytest.raises(ConfigError, match="temperature"):
        SelfConsistencyConfig(temperature=0)


def test_load_examples_splits_gsm8k_answers(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text(
        json.dumps({"question": "Q1?", "answer": "She sold 48/2 = <<48/2=24>>24 clips.\n\nThen 48.\n#### 72"})
        + "\n"
        + json.dumps({"question": "Q2?", "answer": "B", "rationale": "Because."})
        + "\n"
    )
    assert load_examples(path) == [
        Example("Q1?", "72", "She sold 48/2 = 24 clips. Then 48."),
        Example("Q2?", "B", "Because."),
    ]
    path.write_text(json.dumps({"question": "Q1?"}) + "\n")
    with pytest.raises(InputError, match="pool.jsonl:1: .*'answer'"):
        load_examples(path)


# ------------------------------------------------------------------------------ answers and votes
@pytest.mark.parametrize(
    "text, marked, expected",
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", False, "72"),
        ("She has $1,200.50 left. The answer is 1200.5.", False, "1200.5"),
        ("The answer is $42.00", False, "42"),
        ("3 apples and 4 pears make 7 fruits", False, "7"),
        ("The temperature fell to -5 degrees.", False, "-5"),
        ("Take items 1, 2, 3", False, "3"),
        ("The answer is 12, since 4 + 8 = 12 and 4 is small", False, "12"),
        ("It costs .5 dollars", False, "0.5"),
        ("The answer is 1,000,000.", False, "1000000"),
        ("no numbers here", False, None),
        ("I counted 3 but the answer is unclear", False, None),
        (" 12 apples, or 3 times 4", True, "12"),
        (" 12 apples, or 3 times 4", False, "4"),
    ],
)
def test_number_extraction(text, marked, expected):
    assert extract_number(text, marked=marked) == expected


@pytest.mark.parametrize(
    "text, marked, expected",
    [
        ("The answer is (B).", False, "B"),
        ("The answer is C because the others fail", False, "C"),
        ("B) Paris", False, "B"),
        ("(D)", False, "D"),
        ("C", False, "C"),
        ("A dog is an animal", False, None),
        ("Between (A) and (C), I pick (C)", False, "C"),
        (" D, since it is larger", True, "D"),
        ("answer: e", False, None),
    ],
)
def test_choice_extraction(text, marked, expected):
    assert extract_choice(text, marked=marked) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is The Eiffel Tower.", "eiffel tower"),
        ("  Paris!\nand then more text", "paris"),
        ("The answer is an apple a day", "apple day"),
        ("", None),
        ("...", None),
    ],
)
def test_text_extraction_normalises_like_squad(text, expected):
    assert extract_text(text) == expected


def test_normalize_text():
    assert normalize_text("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_text("An apple\ta day") == "apple day"
    assert normalize_text("Theory") == "theory"  # "the" only as a word


def test_majority_vote_and_its_tie_rule():
    assert majority_vote(["7", "8", "7", None, "7"]) == ("7", 0.6)
    assert majority_vote(["8", "7", "7", "8", None]) == ("8", 0.4)  # tie: the answer seen first
    assert majority_vote([None, "7", "8", "8", "7"]) == ("7", 0.4)
    assert majority_vote([None, None]) == (None, 0.0)
    with pytest.raises(ValueError):
        majority_vote([])


# ------------------------------------------------------------------------------ scripted engine
class ScriptedEngine:
    """Engine.generate's shape: replies chosen by ``script(prompt, config)``; records every call."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def generate(self, prompts, config):
        configs = config if isinstance(config, list) else [config] * len(prompts)
        self.calls.append((list(prompts), configs))
        return [SimpleNamespace(text=self.script(prompt, row_config)) for prompt, row_config in zip(prompts, configs)]


def test_self_consistency_votes_over_paths_sampled_in_one_call():
    replies = {
        0: " 3 + 4 = 7. The answer is 7.",
        1: " 3 + 4 = 8. The answer is 8.",
        2: " 7\n#### 7",
        3: " I do not know.",
        4: " 3 + 4 is $7.00",
    }
    engine = ScriptedEngine(lambda prompt, config: replies[config.seed])
    builder = PromptBuilder(PromptConfig(shots=1, chain_of_thought="few_shot"), POOL[:1])
    config = SelfConsistencyConfig(paths=5, temperature=0.7, top_k=None, max_new_tokens=40)
    vote = self_consistency(engine, builder, "What is 3+4?", config)
    assert vote.answer == "7" and vote.vote_share == pytest.approx(3 / 5)
    assert [path.answer for path in vote.paths] == ["7", "8", "7", None, "7"]
    assert vote.paths[0].text == "3 + 4 = 7. The answer is 7."
    assert len(engine.calls) == 1
    prompts, configs = engine.calls[0]
    assert prompts == [builder.prompt("What is 3+4?")] * 5
    assert [c.seed for c in configs] == [0, 1, 2, 3, 4]
    assert all(c.temperature == 0.7 and c.max_new_tokens == 40 and c.stop == ["\n\nQ:"] for c in configs)


def test_zero_shot_chain_of_thought_reads_the_answer_from_a_second_prompt():
    def script(prompt, config):
        if prompt.endswith("Let's think step by step."):
            return [" 3 plus 4 is 7.", " 3 and 4 make 12.\n", " Seven."][config.seed]
        assert config.temperature == 0 and "\n" in config.stop
        return {"7.": " 7, with 2 left over", "12.": " 12", "Seven.": " seven"}[prompt.split()[-5]]

    engine = ScriptedEngine(script)
    builder = PromptBuilder(PromptConfig(chain_of_thought="zero_shot"))
    vote = self_consistency(engine, builder, "What is 3+4?", SelfConsistencyConfig(paths=3))
    assert len(engine.calls) == 2
    assert (
        engine.calls[1][0][0] == "Q: What is 3+4?\nA: Let's think step by step. 3 plus 4 is 7. Therefore, the answer is"
    )
    # The first number after the trigger counts, not the last one of the line.
    assert [path.answer for path in vote.paths] == ["7", "12", None]
    assert vote.paths[0].text == "Let's think step by step. 3 plus 4 is 7. Therefore, the answer is 7, with 2 left over"
    assert (vote.answer, vote.vote_share) == ("7", pytest.approx(1 / 3))


def test_reason_answers_many_questions_in_one_call():
    engine = ScriptedEngine(lambda prompt, config: " Paris" if "France" in prompt.splitlines()[-2] else " Shakespeare!")
    builder = PromptBuilder(PromptConfig(shots=1), POOL[2:3])
    paths = reason(
        engine,
        builder,
        ["What is the capital of France?", "Who wrote Hamlet?"],
        GenerationConfig(temperature=0),
        answer_format="text",
    )
    assert [path.answer for path in paths] == ["paris", "shakespeare"]
    assert len(engine.calls) == 1
    # A direct reply is the answer: its first number counts, not its last.
    engine = ScriptedEngine(lambda prompt, config: " 12 apples, or 3 times 4")
    assert reason(engine, builder, ["How many?"], GenerationConfig(temperature=0))[0].answer == "12"
    with pytest.raises(ValueError, match="2 generation configs for 1 questions"):
        reason(engine, builder, ["Who?"], [GenerationConfig(), GenerationConfig()])


def test_self_improvement_keeps_agreeing_paths_of_confident_votes(tmp_path):
    replies = {
        "What is 3+4?": [
            "3+4=7. The answer is 7.",
            "3+4=7. The answer is 7.",
            "4+3=7. The answer is 7.",
            "The answer is 8.",
        ],
        "What is 2+2?": ["The answer is 4.", "The answer is 5.", "The answer is 6.", "No idea."],
    }
    engine = ScriptedEngine(lambda prompt, config: " " + replies[prompt.splitlines()[-2][3:]][config.seed])
    builder = PromptBuilder(PromptConfig(shots=1, chain_of_thought="few_shot"), POOL[:1])
    rows = self_improvement_dataset(engine, builder, list(replies), SelfConsistencyConfig(paths=4), min_vote_share=0.5)
    # 3+4: 7 wins with 3/4; its two distinct paths are kept. 2+2: the best share is 1/4, dropped.
    assert rows == [
        {
            "messages": [
                {"role": "user", "content": "What is 3+4?"},
                {"role": "assistant", "content": "3+4=7. The answer is 7."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "What is 3+4?"},
                {"role": "assistant", "content": "4+3=7. The answer is 7."},
            ]
        },
    ]
    assert (
        self_improvement_dataset(engine, builder, list(replies), SelfConsistencyConfig(paths=4), min_vote_share=0.8)
        == []
    )
    out = tmp_path / "sft" / "self_improve.jsonl"
    write_self_improvement(out, rows)
    assert [record for _, record in iter_jsonl(out)] == rows
    assert [path.name for path in out.parent.iterdir()] == ["self_improve.jsonl"]


# ------------------------------------------------------------------------------ real model
@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    folder = tmp_path_factory.mktemp("corpus")
    text = " ".join(f"{example.question} {example.rationale} The answer is {example.answer}." for example in POOL)
    (folder / "a.txt").write_text(text * 5 + " 0123456789+=$#")
    out = folder / "tokenizer"
    train_tokenizer(TokenizerConfig(source=str(folder), out=str(out), kind="char", vocab_size=200, held_out_fraction=0))
    tokenizer = Tokenizer.load(out)
    torch.manual_seed(0)
    return Engine(Transformer(tiny_config(vocab_size=tokenizer.vocab_size, context_length=256)), tokenizer)


def test_hidden_state_embedder_mean_pools_the_head_input(engine):
    model, tokenizer = engine.model, engine.tokenizer
    embed = hidden_state_embedder(model, tokenizer, batch_size=2)
    texts = ["How many apples?", "Who wrote Hamlet? Shakespeare did.", "Paris"]
    vectors = embed(texts)
    assert vectors.shape == (3, model.config.n_embd)
    with torch.no_grad():
        for text, vector in zip(texts, vectors):
            # The head is linear without bias: the head of the mean hidden state is the mean of the logits.
            logits = model(torch.tensor([tokenizer.encode(text)]))[0]
            torch.testing.assert_close(model.lm_head(vector), logits.mean(dim=0), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(embed([text])[0], vector, rtol=1e-5, atol=1e-5)  # padding changes nothing
    assert not model.final_norm._forward_hooks  # the hook is removed


def test_self_consistency_plugs_into_the_real_engine(engine):
    embed = hidden_state_embedder(engine.model, engine.tokenizer)
    builder = PromptBuilder(PromptConfig(shots=2, selection="embedding", chain_of_thought="few_shot"), POOL, embed)
    config = SelfConsistencyConfig(paths=4, temperature=1.0, top_k=None, max_new_tokens=12)
    vote = self_consistency(engine, builder, "How many apples does Mary have?", config)
    assert len(vote.paths) == 4
    assert len({path.text for path in vote.paths}) > 1  # each path has its own seed
    assert (vote.answer, vote.vote_share) == majority_vote([path.answer for path in vote.paths])
    # Path i depends on its own seed only: fewer paths are a prefix of more.
    fewer = self_consistency(engine, builder, "How many apples does Mary have?", replace(config, paths=2))
    assert [path.text for path in fewer.paths] == [path.text for path in vote.paths[:2]]


def test_run_self_improvement_writes_the_rows_of_a_checkpoint(engine, tmp_path):
    from llmkit.align.self_improve import SelfImproveConfig, run_self_improvement
    from llmkit.model.checkpoint import write_model

    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    write_model(
        checkpoint, engine.model.state_dict(), engine.model.config, {"tokenizer_sha256": engine.tokenizer.sha256}
    )
    engine.tokenizer.save(checkpoint)
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        "".join(json.dumps({"question": q, "answer": "unused"}) + "\n" for q in ["How many apples?", "Who?"])
    )
    config = SelfImproveConfig(
        engine=EngineConfig(checkpoint=str(checkpoint)),
        questions=str(questions),
        out=str(tmp_path / "rows.jsonl"),
        min_vote_share=0.3,
        prompt=PromptConfig(chain_of_thought="zero_shot"),
        consistency=SelfConsistencyConfig(paths=3, max_new_tokens=6, answer_max_new_tokens=4),
    )
    summary = run_self_improvement(config)
    rows = [record for _, record in iter_jsonl(tmp_path / "rows.jsonl")]
    assert summary == {
        "questions": 2,
        "questions_kept": len({row["messages"][0]["content"] for row in rows}),
        "rows": len(rows),
        "out": config.out,
    }
    assert all(row["messages"][1]["content"].startswith("Let's think step by step.") for row in rows)
    questions.write_text(json.dumps({"prompt": "no question field"}) + "\n")
    with pytest.raises(InputError, match="questions.jsonl:1: .*'question'"):
        run_self_improvement(config)


def test_self_improve_config_reads_nested_flags():
    import argparse

    from llmkit.align.self_improve import SelfImproveConfig
    from llmkit.config import add_dataclass_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, SelfImproveConfig)
    arguments = parser.parse_args(
        [
            "--questions",
            "q.jsonl",
            "--prompt.chain-of-thought",
            "zero_shot",
            "--consistency.paths",
            "3",
            "--min-vote-share",
            "0.7",
        ]
    )
    config = config_from_args(SelfImproveConfig, arguments)
    assert (config.questions, config.prompt.chain_of_thought, config.consistency.paths, config.min_vote_share) == (
        "q.jsonl",
        "zero_shot",
        3,
        0.7,
    )
    # zero-shot CoT by default (it needs no demonstrations); no chain of thought is refused
    assert (
        config_from_args(SelfImproveConfig, parser.parse_args(["--questions", "q.jsonl"])).prompt.chain_of_thought
        == "zero_shot"
    )
    with pytest.raises(ConfigError, match="'prompt.chain_of_thought'"):
        config_from_args(
            SelfImproveConfig, parser.parse_args(["--questions", "q.jsonl", "--prompt.chain-of-thought", "none"])
        )
