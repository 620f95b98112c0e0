"""The command line end to end on a tiny corpus, its one-line errors, and YAML/flag precedence."""

import json

import pytest

from llmkit.cli import main
from llmkit.config import parse_duration, parse_number

CORPUS = "\n".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400))


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for part in range(6):
        (folder / f"part{part}.py").write_text(CORPUS[part * 1000 :] + CORPUS[: part * 1000])
    return folder


def test_every_stage_from_the_command_line(tmp_path, corpus, capsys):
    tok, data, run = tmp_path / "tok", tmp_path / "data", tmp_path / "run"
    assert main(["tokenizer", "train", "--source", str(corpus), "--vocab-size", "300", "--out", str(tok)]) == 0
    assert (
        main(
            [
                "data",
                "prepare",
                "--source",
                str(corpus),
                "--tokenizer",
                str(tok),
                "--out",
                str(data),
                "--val-fraction",
                "0.3",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                "pretrain",
                "--preset",
                "cpu-tiny",
                "--model.context-length",
                "32",
                "--data",
                str(data),
                "--train.out",
                str(run),
                "--train.max-steps",
                "6",
                "--train.batch-size",
                "4",
                "--train.eval-interval",
                "3",
                "--no-train.progress",
                "--train.dtype",
                "float32",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 6 and summary["model"]["vocab_size"] == 300 and summary["model"]["context_length"] == 32
    assert (
        main(
            [
                "generate",
                "--engine.checkpoint",
                str(run),
                "--prompt",
                "def ",
                "--generation.max-new-tokens",
                "5",
                "--generation.temperature",
                "0",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("def ")
    assert (
        main(
            [
                "generate",
                "--engine.checkpoint",
                str(run),
                "--prompt",
                "def ",
                "--generation.max-new-tokens",
                "5",
                "--generation.temperature",
                "0",
                "--engine.quantize",
                "int8",
            ]
        )
        == 0
    )
    assert len(capsys.readouterr().out.rstrip("\n")) > len("def ")
    assert main(["estimate", "--preset", "llama-7b", "--tokens", "1e12", "--gpus", "8"]) == 0
    assert "6.7 B" in capsys.readouterr().out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["pretrain", "--data", "{tmp}/missing", "--train.max-steps", "1"], "missing/manifest.json: file not found"),
        (["pretrain", "--model.n-embd", "30", "--train.max-steps", "1"], "'model.n_embd' = 30"),
        (["pretrain", "--preset", "gpt5", "--train.max-steps", "1"], "'preset' = 'gpt5'"),
        (["generate", "--engine.checkpoint", "{tmp}/nothing"], "nothing: checkpoint not found"),
        (["tokenizer", "train", "--source", "{tmp}/bad.jsonl", "--out", "{tmp}/tok"], "bad.jsonl:2: not valid JSON"),
        (["estimate", "--gpu", "abacus"], "'gpu' = 'abacus'"),
        (["posttrain", "--rl", "ppo", "--grpo.supervision", "process"], "'grpo.supervision' = 'process'"),
        (["posttrain", "--sft.train.lr", "-1"], "'sft.train.lr' = -1.0"),
        (["posttrain", "--dpo.train.out", "{tmp}/x"], "'dpo.train.out'"),
        (["grpo", "--dynamic-sampling", "--max-sampling-rounds", "0"], "'max_sampling_rounds' = 0"),
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, arguments, message):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    arguments = [argument.replace("{tmp}", str(tmp_path)) for argument in arguments]
    assert main(arguments) == 2
    stderr = capsys.readouterr().err
    error = stderr.strip().splitlines()[-1]  # progress bars may come before it
    assert error.startswith("llmkit: error:") and message.replace("{tmp}", str(tmp_path)) in error
    assert "Traceback" not in stderr


def test_yaml_is_overridden_by_flags(tmp_path, corpus, capsys):
    config = tmp_path / "tok.yaml"
    config.write_text(f"source: {corpus}\nvocab_size: 280\nout: {tmp_path / 'from_yaml'}\nkind: bpe\n")
    assert main(["tokenizer", "train", "--config", str(config), "--vocab-size", "290"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["vocab_size"] == 290 and summary["out"].endswith("from_yaml")
    config.write_text("vocab_sise: 280\n")
    assert main(["tokenizer", "train", "--config", str(config)]) == 2
    assert "vocab_sise" in capsys.readouterr().err


def test_nested_yaml_sections_for_pretrain(tmp_path):
    from llmkit.config import build
    from llmkit.pretrain import PretrainConfig

    config = build(
        PretrainConfig, {"preset": "cpu-tiny", "model": {"n_layer": 3}, "train": {"lr": "2e-3", "max_time": "5m"}}
    )
    assert config.model.n_layer == 3 and config.train.lr == 2e-3 and config.train.max_seconds == 300


def test_a_section_keeps_its_fields_default_instance():
    """A field ``default_factory=lambda: Section(x=...)`` sets the defaults of its flags: giving one
    field of the section keeps the others at the enclosing default, not at the section class's."""
    import argparse
    from dataclasses import dataclass, field

    from llmkit.config import add_dataclass_arguments, build, config_from_args

    @dataclass
    class Section:
        width: int = 1
        style: str = "plain"

    @dataclass
    class Command:
        section: Section = field(default_factory=lambda: Section(width=7, style="fancy"))

    assert build(Command, {"section": {"width": 3}}).section == Section(width=3, style="fancy")
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Command)
    assert config_from_args(Command, parser.parse_args(["--section.style", "bold"])).section == Section(
        width=7, style="bold"
    )
    assert "(default: fancy)" in parser.format_help()


def test_number_and_duration_parsing():
    assert parse_number("300e9", int) == 300_000_000_000 and parse_number("2.5k", int) == 2500
    assert parse_duration("10m") == 600 and parse_duration("1.5h") == 5400 and parse_duration(90) == 90
    with pytest.raises(ValueError):
        parse_number("1.5", int)


def test_pretraining_is_reproducible_from_its_seed(tmp_path, corpus):
    from safetensors.torch import load_file

    tok, data = tmp_path / "tok", tmp_path / "data"
    assert main(["tokenizer", "train", "--source", str(corpus), "--vocab-size", "300", "--out", str(tok)]) == 0
    assert (
        main(
            [
                "data",
                "prepare",
                "--source",
                str(corpus),
                "--tokenizer",
                str(tok),
                "--out",
                str(data),
                "--val-fraction",
                "0.3",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    weights = []
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        assert (
            main(
                [
                    "pretrain",
                    "--preset",
                    "cpu-tiny",
                    "--model.context-length",
                    "32",
                    "--data",
                    str(data),
                    "--train.out",
                    str(tmp_path / name),
                    "--train.max-steps",
                    "2",
                    "--train.batch-size",
                    "2",
                    "--train.seed",
                    seed,
                    "--no-train.progress",
                    "--train.dtype",
                    "float32",
                ]
            )
            == 0
        )
        weights.append(load_file(tmp_path / name / "checkpoints/step_00000002/model.safetensors"))
    assert all(weights[0][key].equal(weights[1][key]) for key in weights[0])
    assert not weights[0]["token_embedding.weight"].equal(weights[2]["token_embedding.weight"])


def test_a_moved_data_directory_still_trains(tmp_path, corpus):
    import shutil

    tok, data = tmp_path / "tok", tmp_path / "data"
    assert main(["tokenizer", "train", "--source", str(corpus), "--vocab-size", "300", "--out", str(tok)]) == 0
    assert (
        main(
            [
                "data",
                "prepare",
                "--source",
                str(corpus),
                "--tokenizer",
                str(tok),
                "--out",
                str(data),
                "--val-fraction",
                "0.3",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    shutil.rmtree(tok)
    moved = tmp_path / "elsewhere"
    shutil.move(str(data), str(moved))
    assert (
        main(
            [
                "pretrain",
                "--preset",
                "cpu-tiny",
                "--model.context-length",
                "32",
                "--data",
                str(moved),
                "--train.out",
                str(tmp_path / "run"),
                "--train.max-steps",
                "1",
                "--train.batch-size",
                "2",
                "--no-train.progress",
            ]
        )
        == 0
    )
