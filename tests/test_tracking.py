"""Experiment trackers beside metrics.csv: TensorBoard and MLflow read back hold the logged losses (and
continue exactly on resume), W&B gets offline runs, evaluation scores go the same way, and bad
choices are one-line errors."""

import csv
import shutil
import sys
import types

import pytest
import torch
from helpers import SyntheticBatches, tiny_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from llmkit.errors import ConfigError
from llmkit.eval.report import log_scores
from llmkit.model import Transformer
from llmkit.tracking import parse_report_to
from llmkit.train.config import TrainConfig
from llmkit.train.trainer import Trainer


def train(out, max_steps, report_to, resume=False):
    torch.manual_seed(0)
    config = TrainConfig(
        out=str(out),
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        max_steps=max_steps,
        eval_interval=0,
        eval_batches=1,
        log_interval=1,
        checkpoint_interval=3,
        dtype="float32",
        progress=False,
        seed=3,
        resume=resume,
        report_to=report_to,
    )
    return Trainer(Transformer(tiny_config()), SyntheticBatches(), config, val_batches=SyntheticBatches()).run()


def csv_losses(out) -> dict[int, float]:
    with open(out / "metrics.csv") as file:
        return {
            int(row["step"]): float(row["loss"]) for row in csv.DictReader(file) if row["loss"] and not row["event"]
        }


def tensorboard_scalars(out, tag) -> dict[int, float]:
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def test_report_to_names_trackers_like_hugging_face():
    assert parse_report_to("csv") == [] and parse_report_to("none") == []
    assert parse_report_to("csv,tensorboard") == ["tensorboard"]
    assert parse_report_to("all") == ["tensorboard", "wandb", "mlflow"]
    for bad in ("tensorbord", "", "csv,comet"):
        with pytest.raises(ConfigError, match="report_to"):
            parse_report_to(bad)
    with pytest.raises(ConfigError, match="report_to"):
        TrainConfig(report_to="neptune")


def test_tensorboard_and_mlflow_hold_the_logged_losses_and_resume_continues_them(tmp_path):
    from mlflow.tracking import MlflowClient

    train(tmp_path, 5, "csv,tensorboard,mlflow")
    # As a kill after step 5 was logged but before its checkpoint: steps 4 and 5 are logged again.
    shutil.rmtree(tmp_path / "checkpoints/step_00000005")
    (tmp_path / "latest").write_text("checkpoints/step_00000003\n")
    train(tmp_path, 7, "csv,tensorboard,mlflow", resume=True)
    expected = csv_losses(tmp_path)
    assert sorted(expected) == list(range(1, 8))
    logged = tensorboard_scalars(tmp_path, "loss")
    assert logged == pytest.approx(expected, abs=1e-5)  # purged past step 3: one value per step, the resumed one
    assert set(tensorboard_scalars(tmp_path, "lr")) == set(expected)
    client = MlflowClient((tmp_path / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("llmkit").experiment_id])
    history = sorted(
        client.get_metric_history(run.info.run_id, "loss"), key=lambda metric: (metric.timestamp, metric.step)
    )
    newest = {metric.step: metric.value for metric in history}  # MLflow keeps superseded points; the newest counts
    assert newest == pytest.approx(expected, abs=1e-5) and len(history) == 7 + 2


def test_wandb_runs_offline_in_the_run_directory_and_resumes_the_same_run(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, values, step):
            if "loss" in values:  # the end-of-run row carries validation and totals only
                calls.append(("log", step, values["loss"]))

        def finish(self):
            calls.append(("finish",))

    def init(**options):
        calls.append(("init", options["mode"], options["dir"], options["id"], options["resume"]))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    train(tmp_path, 3, "wandb")
    train(tmp_path, 4, "wandb", resume=True)
    inits = [call for call in calls if call[0] == "init"]
    assert [call[1:3] for call in inits] == [("offline", str(tmp_path))] * 2 and inits[0][3] == inits[1][3]
    logged = {call[1]: call[2] for call in calls if call[0] == "log"}  # the resumed run's step 4 replaces none
    assert logged == pytest.approx(csv_losses(tmp_path), abs=1e-5)
    assert calls.count(("finish",)) == 2


def test_a_missing_tracker_package_is_one_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match="needs the package 'wandb'.*llmkit\\[wandb\\]"):
        train(tmp_path, 1, "csv,wandb")


def test_evaluation_scores_go_to_the_trackers_at_the_checkpoints_step(tmp_path):
    tasks = {"arc": {"kind": "choice", "metrics": {"accuracy": 0.25, "accuracy_norm": 0.5, "stderr": 0.1, "count": 4}}}
    log_scores("tensorboard", tmp_path, tasks, step=500)
    assert tensorboard_scalars(tmp_path, "eval/arc/accuracy") == {500: 0.25}
