"""``llmkit eval`` end to end on a tiny random checkpoint: task specs, the files it writes, numbers that
agree with recomputations from the per-example records, and the decontamination check."""

import argparse
import json
import string

import pytest
import torch
from eval_fakes import ScriptedEngine
from helpers import tiny_config

from llmkit.config import add_dataclass_arguments, config_from_args
from llmkit.data.shards import PrepareConfig, prepare_data
from llmkit.data.tokenizer_training import TokenizerConfig, train_tokenizer
from llmkit.errors import ConfigError
from llmkit.eval.contamination import check_contamination, token_data_documents
from llmkit.eval.run import EvalConfig, parse_task, run_eval
from llmkit.infer import Engine, EngineConfig
from llmkit.infer.answers import extract_number, majority_vote
from llmkit.model import Transformer
from llmkit.model.checkpoint import write_model
from llmkit.tokenizer import Tokenizer

GSM8K = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did she sell?",
        "answer": "She sold 48/2 = <<48/2=24>>24 clips in May and 48+24 = <<48+24=72>>72 in all.\n#### 72",
    },
    {
        "question": "Weng earns 12 dollars an hour for babysitting. Yesterday she babysat for 50 minutes. How much "
        "did she earn?",
        "answer": "Per minute 12/60 = <<12/60=0.2>>0.2 dollars, so 0.2*50 = <<0.2*50=10>>10.\n#### 10",
    },
    {
        "question": "Betty needs 100 dollars for a wallet and has half of it. Her parents give her 15 dollars. How "
        "much more does she need?",
        "answer": "She has 100/2 = <<100/2=50>>50 dollars and needs 100-50-15 = <<100-50-15=35>>35 more.\n#### 35",
    },
]
CHOICE = [
    {
        "question": "Which planet is known as the red planet of the solar system?",
        "choices": ["Mars", "Venus", "Jupiter"],
        "answer": 0,
    },
    {
        "question": "What do plants take in from the air to make their food?",
        "choices": ["oxygen", "carbon dioxide"],
        "answer": "B",
    },
]
CODE = [
    {
        "task_id": "Toy/0",
        "prompt": "def add(a, b):\n",
        "canonical_solution": "    return a + b\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
        "entry_point": "add",
    }
]
PAIRS = [
    {"prompt": "Translate: chat noir ->", "reference": "black cat"},
    {"prompt": "Translate: chien ->", "reference": "dog"},
]
# The training text holds the second GSM8K question word for word (so that example is contaminated) and
# prose that shares no 13-word run with any evaluation example.
TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog near the quiet river bank every single morning.\n\n"
    + GSM8K[1]["question"]
    + " That was a good day for her.\n"
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    (root / "corpus.txt").write_text(string.printable * 3)
    train_tokenizer(
        TokenizerConfig(
            source=str(root / "corpus.txt"),
            out=str(root / "tokenizer"),
            kind="char",
            vocab_size=200,
            held_out_fraction=0,
        )
    )
    tokenizer = Tokenizer.load(root / "tokenizer")
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tokenizer.vocab_size, context_length=128))
    checkpoint = root / "checkpoint"
    checkpoint.mkdir()
    write_model(checkpoint, model.state_dict(), model.config, {"tokenizer_sha256": tokenizer.sha256})
    tokenizer.save(checkpoint)
    (root / "train.txt").write_text(TRAINING_TEXT)
    files = {
        "gsm8k": write_jsonl(root / "gsm8k.jsonl", GSM8K),
        "choice": write_jsonl(root / "choice.jsonl", CHOICE),
        "code": write_jsonl(root / "toy_code.jsonl", CODE),
        "pairs": write_jsonl(root / "pairs.jsonl", PAIRS),
        "text": str(root / "train.txt"),
    }
    return root, files


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_task_specs_read_options_and_refuse_what_does_not_apply():
    spec = parse_task("generative:data/gsm8k.jsonl:num_fewshot=4:chain_of_thought=true:name=gsm")
    assert (spec.kind, spec.path, spec.name, spec.options.num_fewshot, spec.options.chain_of_thought) == (
        "generative",
        "data/gsm8k.jsonl",
        "gsm",
        4,
        True,
    )
    assert parse_task({"kind": "code", "path": "HumanEval.jsonl.gz", "samples": 5}).name == "HumanEval"
    with pytest.raises(ConfigError, match="samples"):
        parse_task("choice:arc.jsonl:samples=3")
    with pytest.raises(ConfigError, match="unknown kind"):
        parse_task("summary:x.jsonl")
    with pytest.raises(ConfigError, match="nmu_fewshot"):
        parse_task("choice:arc.jsonl:nmu_fewshot=3")
    with pytest.raises(ConfigError, match="share this name"):
        EvalConfig(tasks=["choice:a/arc.jsonl", "choice:b/arc.jsonl"])


def test_tasks_come_from_flags_and_from_yaml_mappings(tmp_path):
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, EvalConfig)
    flags = parser.parse_args(["--tasks", "generative:g.jsonl:num_fewshot=2,choice:c.jsonl", "--chain-of-thought"])
    config = config_from_args(EvalConfig, flags)
    assert [(spec.kind, spec.path) for spec in config.task_specs] == [("generative", "g.jsonl"), ("choice", "c.jsonl")]
    assert config.settings(config.task_specs[0])["chain_of_thought"] is True
    (tmp_path / "eval.yaml").write_text(
        "tasks:\n  - {kind: code, path: h.jsonl.gz, samples: 10, temperature: 0.8}\n  - perplexity:wiki.txt\n"
    )
    config = config_from_args(EvalConfig, parser.parse_args([]), tmp_path / "eval.yaml")
    assert config.settings(config.task_specs[0])["samples"] == 10 and config.task_specs[1].kind == "perplexity"


def test_bad_settings_fail_before_anything_runs_and_name_the_task():
    with pytest.raises(ConfigError, match=r"tools.*abacus.*task gsm"):
        EvalConfig(tasks=["generative:gsm.jsonl:tools=abacus"])
    with pytest.raises(ConfigError, match=r"temperature.*task h"):
        EvalConfig(tasks=["code:h.jsonl:samples=5:temperature=0"])


def test_a_task_option_overrides_the_command_which_overrides_the_kind_default():
    config = EvalConfig(
        tasks=["generative:g.jsonl:num_fewshot=3", "generative:h.jsonl", "code:c.jsonl:max_new_tokens=50"],
        num_fewshot=1,
        self_consistency=2,
    )
    first, second, code = (config.settings(spec) for spec in config.task_specs)
    assert (first["num_fewshot"], second["num_fewshot"], first["self_consistency"]) == (3, 1, 2)
    assert (first["max_new_tokens"], code["max_new_tokens"]) == (256, 50)


def test_run_writes_the_report_and_its_numbers_agree_with_the_records(workspace):
    root, files = workspace
    out = root / "out"
    config = EvalConfig(
        engine=EngineConfig(checkpoint=str(root / "checkpoint")),
        out=str(out),
        max_new_tokens=4,
        training_data=[files["text"]],
        timeout_s=5,
        tasks=[
            f"generative:{files['gsm8k']}",
            f"choice:{files['choice']}",
            f"perplexity:{files['text']}",
            f"code:{files['code']}",
            f"bleu_rouge:{files['pairs']}",
            {"kind": "generative", "path": files["gsm8k"], "name": "grid", "ablations": True, "limit": 1},
        ],
    )
    summary = run_eval(config)
    for name in ("eval.json", "eval.md", "eval.png", "ablations.png", "report.json", "report.md"):
        assert (out / name).is_file(), name
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "eval.json").read_text())
    tasks = report["tasks"]

    records = read_jsonl(out / "samples" / "gsm8k.jsonl")
    recomputed = [
        majority_vote([extract_number(text, marked=True) for text in record["outputs"]])[0] == record["expected"]
        for record in records
    ]
    assert tasks["gsm8k"]["metrics"]["accuracy"] == pytest.approx(sum(recomputed) / len(recomputed))
    assert summary["tasks"]["gsm8k"]["accuracy"] == tasks["gsm8k"]["metrics"]["accuracy"]

    choice_records = read_jsonl(out / "samples" / "choice.jsonl")
    best = [max(range(len(record["logprobs"])), key=record["logprobs"].__getitem__) for record in choice_records]
    assert tasks["choice"]["metrics"]["accuracy"] == pytest.approx(
        sum(b == record["answer"] for b, record in zip(best, choice_records)) / len(choice_records)
    )

    assert tasks["train"]["metrics"]["bits_per_byte"] > 0
    assert tasks["toy_code"]["metrics"]["pass@1"] in (0.0, 1.0)
    assert 0 <= tasks["pairs"]["metrics"]["bleu"] <= 100

    # Decontamination: the GSM8K question copied into the training text is flagged, the others are not,
    # and the clean accuracy is the accuracy of the other records.
    contamination = tasks["gsm8k"]["contamination"]
    assert contamination["contaminated_ids"] == ["gsm8k.jsonl:2"] and contamination["checked"] == 3
    assert tasks["choice"]["contamination"]["contaminated"] == 0 and "clean_metrics" not in tasks["choice"]
    clean = [correct for correct, record in zip(recomputed, records) if record["id"] != "gsm8k.jsonl:2"]
    assert tasks["gsm8k"]["clean_metrics"]["accuracy"] == pytest.approx(sum(clean) / len(clean))

    grid = tasks["grid"]["ablations"]
    assert len(grid) == 4 and {(row["chain_of_thought"], row["tools"]) for row in grid} == {
        (cot, tools) for cot in (False, True) for tools in ("none", "calculator")
    }
    markdown = (out / "eval.md").read_text()
    assert "## Ablations: grid" in markdown and "gsm8k.jsonl:2" in markdown and "![eval.png](eval.png)" in markdown


def test_scores_on_clean_examples_leave_out_the_contaminated_ones(workspace, tmp_path, monkeypatch):
    root, files = workspace
    # Problems 1 and 2 are answered right; problem 2 is also in the training text, so the clean accuracy
    # is that of problems 1 and 3 alone.
    replies = {GSM8K[0]["question"]: " 72", GSM8K[1]["question"]: " 10 dollars", GSM8K[2]["question"]: " 40"}
    engine = ScriptedEngine(lambda prompt, config: replies[prompt.rsplit("Q: ", 1)[1].split("\n")[0]])
    monkeypatch.setattr(Engine, "from_config", classmethod(lambda cls, *args, **kwargs: engine))
    run_eval(
        EvalConfig(
            engine=EngineConfig(checkpoint=str(root / "checkpoint")),
            out=str(tmp_path),
            tasks=[f"generative:{files['gsm8k']}"],
            training_data=[files["text"]],
        )
    )
    entry = json.loads((tmp_path / "eval.json").read_text())["tasks"]["gsm8k"]
    assert entry["metrics"]["accuracy"] == pytest.approx(2 / 3)
    assert entry["contamination"]["contaminated_ids"] == ["gsm8k.jsonl:2"]
    assert entry["clean_metrics"]["accuracy"] == pytest.approx(1 / 2) and entry["clean_metrics"]["count"] == 2


def test_decontamination_reads_a_token_data_directory(workspace, tmp_path):
    root, files = workspace
    texts = [paragraph for paragraph in TRAINING_TEXT.split("\n\n")] + ["A third, short document."]
    source = write_jsonl(tmp_path / "train.jsonl", [{"text": text} for text in texts])
    prepare_data(
        PrepareConfig(
            source=source,
            tokenizer=str(root / "tokenizer"),
            out=str(tmp_path / "data"),
            val_fraction=0,
            workers=1,
            shard_tokens=40,
        )
    )
    assert list(token_data_documents(tmp_path / "data")) == texts  # 40-token shards: documents span shards
    evaluation = {"gsm8k": [(f"q{index}", [row["question"], row["answer"]]) for index, row in enumerate(GSM8K)]}
    report = check_contamination(evaluation, [str(tmp_path / "data" / "manifest.json")])
    assert report["gsm8k"]["contaminated_ids"] == ["q1"]
