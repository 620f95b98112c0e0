"""The speedrun chains every stage and writes the report card; --resume keeps finished stages."""

import json

import pytest

from llmkit import speedrun as speedrun_module
from llmkit.report import add_section, render
from llmkit.speedrun import SpeedrunConfig, speedrun


def test_speedrun_writes_a_complete_report(tmp_path, monkeypatch):
    post_training = []

    def fake_posttrain(config):
        """Post-training has its own tests (test_posttrain.py); here: what the speedrun hands it."""
        post_training.append(config)
        add_section(config.report, "posttrain", {"rl_gain_over_sft": 0.0})
        return {"table": [], "rl_gain_over_sft": 0.0, "seconds": 0.0}

    monkeypatch.setattr(speedrun_module, "posttrain", fake_posttrain)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(12):
        (corpus / f"module_{index}.py").write_text(f"def f{index}(x):\n    return x + {index}\n" * 60)
    config = SpeedrunConfig(
        out=str(tmp_path / "run"),
        source=str(corpus),
        vocab_size=300,
        val_fraction=0.25,
        preset="cpu-tiny",
        max_steps=4,
        max_time="2m",
        batch_size=2,
        eval_interval=2,
        samples=2,
        progress=False,
        dtype="float32",
    )
    summary = speedrun(config)
    report = json.loads((tmp_path / "run/report.json").read_text())
    assert list(report["stages"]) == ["tokenizer", "data", "pretrain", "samples", "posttrain", "speedrun"]
    # post-training starts from the pretrained model, with a fifth of its budgets after 2 of the default 10 minutes
    assert post_training[0].base == str(tmp_path / "run/base") and post_training[0].scale == 0.2
    assert post_training[0].out == post_training[0].report == str(tmp_path / "run") and not post_training[0].resume
    assert report["stages"]["pretrain"]["metrics"]["steps"] == 4
    assert summary["data"]["train_tokens"] + summary["data"]["val_tokens"] > 0
    assert len(summary["samples"]) == 2 and summary["samples"][0].startswith("def fibonacci(n):")
    markdown = (tmp_path / "run/report.md").read_text()
    assert "| val_bpb |" in markdown and "![pretrain](base/loss.png)" in markdown
    # the data stage is the pipeline: every 5-gram of a module holds its own number, so none is a near-duplicate
    data = report["stages"]["data"]["metrics"]
    assert (
        data["documents_read"]
        == data["documents_kept"]
        == 12
        == summary["data"]["train_documents"] + summary["data"]["val_documents"]
    )
    assert "| minhash_dedup | 12 | 0 |" in markdown and "![data](data/data_steps.png)" in markdown
    assert (tmp_path / "run/base/loss.png").is_file()

    tokenizer_json = (tmp_path / "run/tokenizer/tokenizer.json").stat().st_mtime_ns
    config.resume, config.max_steps, config.posttrain = True, 6, False
    resumed = speedrun(config)
    assert len(post_training) == 1 and "posttrain" not in resumed
    assert resumed["tokenizer"] == {"reused": str(tmp_path / "run/tokenizer")}
    assert (tmp_path / "run/tokenizer/tokenizer.json").stat().st_mtime_ns == tokenizer_json
    assert resumed["pretrain"]["steps"] == 6

    # Pretraining stopped by SIGINT/SIGTERM (it saved a checkpoint) ends the speedrun: no post-training follows
    monkeypatch.setattr(speedrun_module, "pretrain", lambda config: {"interrupted": True, "steps": 7})
    config.posttrain = True
    with pytest.raises(KeyboardInterrupt):
        speedrun(config)
    assert len(post_training) == 1


def test_report_sections_replace_and_render(tmp_path):
    add_section(tmp_path, "a", {"loss": 1.23456, "tokens": 1234567}, "first")
    add_section(tmp_path, "b", {"big": 3.2e23})
    add_section(tmp_path, "a", {"loss": 0.5}, "again")
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["stages"]) == ["a", "b"] and report["stages"]["a"]["metrics"] == {"loss": 0.5}
    text = render(report)
    assert "| loss | 0.5 |" in text and "| big | 3.200e+23 |" in text and "again" in text
