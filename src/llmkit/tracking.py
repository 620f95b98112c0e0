"""Where metrics go besides ``metrics.csv``: the experiment trackers people already look at, chosen
like Hugging Face's ``report_to`` (``--report-to csv,tensorboard``).

``metrics.csv`` (and the PNG curves drawn from it) are always written: they are the run's own record,
which resume truncates and continues. The trackers receive every numeric value of every row as it is
logged, keyed by the row's ``step``:

- ``tensorboard``: ``torch.utils.tensorboard`` event files in ``<run>/tensorboard`` (package
  ``tensorboard``); a resumed run purges the events past the resumed step, so the curve continues
  as the CSV does;
- ``wandb``: Weights & Biases in offline mode under ``<run>/wandb`` (``wandb sync`` uploads it later);
- ``mlflow``: an MLflow run in the local file store ``<run>/mlruns`` (``mlflow ui --backend-store-uri``);
  its store cannot delete points, so after a resume the steps logged twice hold both values, the
  resumed run's the newer.

A tracker whose package is missing is a one-line error naming the package and the extra.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from llmkit.errors import ConfigError

TRACKERS = ("csv", "tensorboard", "wandb", "mlflow")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # tracker -> package = extra


def parse_report_to(value: str) -> list[str]:
    """``csv,tensorboard`` -> the trackers besides the CSV; ``all`` is every one, ``none`` the CSV alone."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    if names == ["all"]:
        return list(TRACKERS[1:])
    if names == ["none"]:
        return []
    unknown = [name for name in names if name not in TRACKERS]
    if unknown or not names:
        raise ConfigError("report_to", value, f"a comma-separated list of {', '.join(TRACKERS)} (or all, none)")
    return [name for name in dict.fromkeys(names) if name != "csv"]


class Tracker:
    """One experiment tracker: :meth:`log` numeric values at a step, :meth:`close` at the end."""

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, directory: Path, resume_step: int | None, name: str):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events logged past the checkpoint by the interrupted run.
        self.writer = SummaryWriter(
            str(directory / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1
        )

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, directory: Path, resume_step: int | None, name: str):
        import wandb

        self.run = wandb.init(
            mode="offline", dir=str(directory), project="llmkit", name=name, id=_run_id(directory), resume="allow"
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflowTracker(Tracker):
    def __init__(self, directory: Path, resume_step: int | None, name: str):
        # MLflow keeps its file store for local use behind this switch (it steers servers to databases).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        import mlflow

        self.client = mlflow.tracking.MlflowClient(tracking_uri=(directory / "mlruns").resolve().as_uri())
        experiment = self.client.get_experiment_by_name("llmkit")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("llmkit")
        runs = self.client.search_runs([experiment_id], max_results=1)
        self.run_id = runs[0].info.run_id if runs else self.client.create_run(experiment_id, run_name=name).info.run_id

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(key, value, timestamp, step) for key, value in values.items()]
        )

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def open_trackers(names: list[str], directory: Path, resume_step: int | None) -> list[Tracker]:
    """The trackers ``names`` for the run directory ``directory``."""
    trackers = []
    for name in names:
        try:
            __import__(_PACKAGES[name])
        except ImportError:
            raise ConfigError(
                "report_to", name, f"needs the package '{_PACKAGES[name]}' (pip install 'llmkit[{name}]')"
            ) from None
        directory.mkdir(parents=True, exist_ok=True)
        trackers.append(_CLASSES[name](directory, resume_step, directory.name))
    return trackers


_CLASSES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MLflowTracker}


def numeric(row: dict) -> dict[str, float]:
    """The row's values that are numbers (logged rows hold formatted strings; events and blanks are not)."""
    values = {}
    for name, value in row.items():
        try:
            values[name] = float(value)
        except (TypeError, ValueError):
            continue
    return values


def _run_id(directory: Path) -> str:
    """One W&B run per run directory, so a resumed run appends to the same one."""
    return hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
