"""The post-training chain by behaviour: a tiny model goes through SFT, reward model, GRPO and DPO with
tiny budgets; every stage leaves a checkpoint of its kind; the report's table holds the four models,
and its accuracies and rewards are recomputed here from the per-answer records with the task's own
checker; the SFT model's KL to itself (the reference) comes out 0; and a resumed run does not touch a
finished stage again but reruns the one that is missing."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

from llmkit.align import posttrain as posttrain_module
from llmkit.align.posttrain import PosttrainConfig, posttrain
from llmkit.align.posttrain_eval import few_shot_prompts, solution_ids
from llmkit.chat import render_ids
from llmkit.config import build
from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer
from llmkit.errors import ConfigError
from llmkit.model import Transformer
from llmkit.model.checkpoint import read_config, resolve_checkpoint, write_model
from llmkit.tasks import arithmetic
from llmkit.tokenizer import END, TOOL_CALL, Tokenizer

STAGES = {"sft": "sft", "reward": "reward", "grpo": "grpo", "dpo": "dpo"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    """A small BPE over the arithmetic conversations, so a problem is about a hundred tokens."""
    folder = tmp_path_factory.mktemp("tokenizer")
    problems = arithmetic.generate_problems(300, seed=1) + arithmetic.generate_problems(30, seed=1, split="heldout")
    texts = [
        message.get("content") or ""
        for problem in problems
        for message in arithmetic.to_conversation(problem, False).messages
    ]
    (folder / "text.txt").write_text("\n".join(texts + [arithmetic.TOOL_SYSTEM_PROMPT, "calculator(4*3)"]))
    train_tokenizer(
        TokenizerConfig(
            source=str(folder / "text.txt"), out=str(folder / "tokenizer"), vocab_size=600, held_out_fraction=0
        )
    )
    return Tokenizer.load(folder / "tokenizer")


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size, context_length=256, n_embd=32))
    write_model(folder, model.state_dict(), model.config, {"stage": "pretrain", "tokenizer_sha256": tokenizer.sha256})
    tokenizer.save(folder)
    return folder


def tiny_run(base, out, **changes) -> PosttrainConfig:
    """Every stage at a few steps, written as the YAML file or the dotted flags would give it."""
    values = {
        "base": str(base),
        "out": str(out),
        "eval_problems": 6,
        "max_new_tokens": 12,
        "dtype": "float32",
        "device": "cpu",
        "progress": False,
        "sft": {"generated_examples": 16, "train": {"max_steps": 2, "batch_size": 2}},
        "reward": {"generated_pairs": 8, "train": {"max_steps": 2, "batch_size": 2}},
        "grpo": {
            "group_size": 2,
            "stage": {"train_problems": 16, "validation_problems": 16},
            "max_sampling_rounds": 2,
            "rollout": {"prompts_per_iteration": 2},
            "update": {"iterations": 1},
        },
        "ppo": {"stage": {"train_problems": 16}, "rollout": {"prompts_per_iteration": 4}, "update": {"iterations": 1}},
        "dpo": {"generated_pairs": 8, "train": {"max_steps": 2, "batch_size": 2}},
        **changes,
    }
    return build(PosttrainConfig, values)


def records(out, stage: str, mode: str) -> list[dict]:
    return [json.loads(line) for line in (out / "evaluation" / f"{stage}_{mode}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, base):
    out = tmp_path_factory.mktemp("posttrain")
    config = tiny_run(base, out)
    return config, posttrain(config)


def test_every_stage_writes_its_checkpoint_and_the_table_recomputes_from_the_records(finished):
    config, summary = finished
    out = Path(config.out)
    for directory, stage in STAGES.items():
        assert read_config(resolve_checkpoint(out / directory))["stage"] == stage
    # DPO tunes the model the RL stage ships: its best checkpoint by validation accuracy, else the SFT model
    shipped = resolve_checkpoint(posttrain_module.shipped_rl_model(out, "grpo"))
    assert read_config(resolve_checkpoint(out / "dpo"))["base"] == str(shipped.resolve())
    rl = summary["stages"]["rl"]
    assert shipped == (
        resolve_checkpoint(out / "grpo" / "best") if rl["best_step"] else resolve_checkpoint(out / "sft")
    )

    report = json.loads((out / "report.json").read_text())["stages"]["posttrain"]
    table = report["metrics"]["table"]
    assert (
        [row["stage"] for row in table]
        == ["base", "sft", "grpo", "grpo_best", "dpo"]
        == [row["stage"] for row in summary["table"]]
    )
    problems = {
        problem.question: problem
        for problem in arithmetic.generate_problems(config.eval_problems, seed=config.seed, split="heldout")
    }
    for row in table:
        for mode in ("calculator", "plain"):
            answers = records(out, row["stage"], mode)
            assert [answer["question"] for answer in answers] == list(problems)
            correct = [
                arithmetic.check_answer(problems[answer["question"]], answer["completion"]) for answer in answers
            ]
            assert row[f"accuracy_{mode}"] == sum(correct) / len(correct)
        rewards = [answer["reward"] for answer in records(out, row["stage"], "calculator")]
        assert row["reward"] == pytest.approx(sum(rewards) / len(rewards))
    assert table[0]["kl"] is None and table[1]["kl"] == 0.0  # the SFT model is the reference itself
    assert summary["rl_gain_over_sft"] == table[3]["accuracy_calculator"] - table[1]["accuracy_calculator"]
    assert summary["rl_last_gain_over_sft"] == table[2]["accuracy_calculator"] - table[1]["accuracy_calculator"]
    markdown = (out / "report.md").read_text()
    assert "| dpo |" in markdown and f"![posttrain]({posttrain_module.FIGURE})" in markdown
    assert (out / posttrain_module.FIGURE).stat().st_size > 0


def test_resume_keeps_finished_stages_and_reruns_a_missing_one(finished, tmp_path, monkeypatch):
    config, _ = finished
    out = tmp_path / "copy"
    shutil.copytree(config.out, out)
    state = json.loads((out / "posttrain.json").read_text())
    for part in ("stages", "evaluations"):
        del state[part]["dpo"]
    (out / "posttrain.json").write_text(json.dumps(state))
    shutil.rmtree(out / "dpo")

    def must_not_run(*arguments):
        raise AssertionError("a finished stage ran again")

    for stage in ("sft", "reward", "rl"):
        monkeypatch.setitem(posttrain_module.STAGE_FUNCTIONS, stage, must_not_run)
    # A stage stopped by SIGINT/SIGTERM ends the chain and is not recorded as finished: --resume continues it.
    interrupted = {"interrupted": True, "steps": 1}
    monkeypatch.setitem(posttrain_module.STAGE_FUNCTIONS, "dpo", lambda *arguments: interrupted)
    with pytest.raises(KeyboardInterrupt):
        posttrain(tiny_run(config.base, out, resume=True))
    assert "dpo" not in json.loads((out / "posttrain.json").read_text())["stages"]
    monkeypatch.setitem(posttrain_module.STAGE_FUNCTIONS, "dpo", posttrain_module.run_dpo)
    resumed = posttrain(tiny_run(config.base, out, resume=True))
    assert read_config(resolve_checkpoint(out / "dpo"))["stage"] == "dpo"
    assert [row["stage"] for row in resumed["table"]] == ["base", "sft", "grpo", "grpo_best", "dpo"]
    assert resumed["table"][:3] == finished[1]["table"][:3]
    with pytest.raises(ConfigError, match="rl"):
        posttrain(tiny_run(config.base, out, resume=True, rl="ppo"))


def test_few_shot_prompt_is_demonstrations_in_the_chat_stream_then_the_question(tokenizer):
    problems = arithmetic.generate_problems(2, seed=3, split="heldout")
    prompts, shots = few_shot_prompts(
        tokenizer, problems, with_tools=True, shots=1, context_length=1024, max_new_tokens=50, seed=0
    )
    assert shots == 1
    demonstration = min(
        arithmetic.generate_problems(64, seed=0),
        key=lambda problem: (
            len(tokenizer.encode(f"Question: {problem.question}\nAnswer: "))
            + len(solution_ids(tokenizer, problem, True))
        ),
    )
    text = tokenizer.decode(prompts[0])
    assert text.startswith(f"<|endoftext|>Question: {demonstration.question}\nAnswer: ")
    assert text.endswith(f"\n\nQuestion: {problems[0].question}\nAnswer: ")
    # the demonstration's solution is the assistant's token stream of the chat format, tool calls included
    full, _ = render_ids(tokenizer, arithmetic.to_conversation(demonstration).messages)
    assert tokenizer.decode(solution_ids(tokenizer, demonstration, True)) in tokenizer.decode(full)
    assert f"{TOOL_CALL}calculator(" in text and f"#### {demonstration.answer}\n\n" in text and text.count(END) >= 2
    # a context without room for a demonstration gives the bare question
    longest_question = max(len(tokenizer.encode(f"Question: {problem.question}\nAnswer: ")) for problem in problems)
    bare, none = few_shot_prompts(
        tokenizer,
        problems,
        with_tools=False,
        shots=3,
        context_length=longest_question + 1 + 10 + 5,
        max_new_tokens=10,
        seed=0,
    )
    assert none == 0 and tokenizer.decode(bare[1]) == f"<|endoftext|>Question: {problems[1].question}\nAnswer: "


def test_process_supervision_needs_grpo_and_the_verifiable_reward():
    assert build(PosttrainConfig, {"rl": "grpo", "grpo": {"supervision": "process"}}).grpo.supervision == "process"
    for changed in ({"rl": "ppo"}, {"rl_reward": "model"}):
        with pytest.raises(ConfigError, match="grpo.supervision"):
            build(PosttrainConfig, {"grpo": {"supervision": "process"}, **changed})


def test_the_sections_take_the_chains_defaults_and_refuse_what_the_chain_sets():
    """A section's flags default to the chain's values (not the stage's own), a changed budget is kept, and a
    field the chain sets itself (the stages' paths, seed, device) is refused by its dotted name."""
    config = build(PosttrainConfig, {"sft": {"train": {"lr": 0.01}}, "grpo": {"update": {"iterations": 3}}})
    assert config.sft.train.lr == 0.01 and config.sft.train.max_steps == 500 and config.sft.generated_examples == 500
    assert config.grpo.update.iterations == 3 and config.grpo.train.lr == 1e-4 and config.dpo.train.max_steps == 40
    assert config.grpo.dynamic_sampling and config.grpo.rollout.temperature == 0.8  # the chain's, not the stage's
    for section, dotted_path in (
        ({"sft": {"base": "x"}}, "sft.base"),
        ({"dpo": {"train": {"seed": 3}}}, "dpo.train.seed"),
        ({"grpo": {"stage": {"policy": "p"}}}, "grpo.stage.policy"),
    ):
        with pytest.raises(ConfigError, match=f"'{dotted_path}'.*set by posttrain itself"):
            build(PosttrainConfig, section)
    with pytest.raises(ConfigError, match="'reward.train.max_steps'"):
        build(PosttrainConfig, {"reward": {"epochs": 1, "train": {"max_steps": None}}})
