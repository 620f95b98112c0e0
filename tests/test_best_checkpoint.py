"""The training loop keeps the checkpoint of the best evaluation (``TrainConfig.best_metric``): the run's
``best`` pointer names it, pruning spares it, a resumed run remembers it, and a run that never betters
its starting model keeps none (the model to ship is then the one it started from)."""

import pytest
import torch
from helpers import SyntheticBatches, tiny_config

from llmkit.config import build
from llmkit.errors import ConfigError
from llmkit.model import Transformer
from llmkit.model.checkpoint import load_model, resolve_checkpoint
from llmkit.train.config import TrainConfig
from llmkit.train.trainer import Trainer, TrainingHooks


class ScriptedScores(TrainingHooks):
    """Evaluations that return the next of a fixed list of scores (the first is the starting model's)."""

    def __init__(self, scores: list[float]):
        self.scores, self.calls = scores, 0

    def evaluate(self, trainer) -> dict[str, float]:
        score = self.scores[self.calls]
        self.calls += 1
        return {"accuracy": score}

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]


def train(out, scores, goal="max", resume=False, max_steps=10) -> dict:
    torch.manual_seed(0)
    hooks = ScriptedScores(scores)
    config = TrainConfig(
        out=str(out),
        batch_size=2,
        max_steps=max_steps,
        eval_interval=2,
        checkpoint_interval=100,
        keep_last=1,
        log_interval=1,
        warmup_steps=1,
        dtype="float32",
        progress=False,
        best_metric="accuracy",
        best_goal=goal,
        resume=resume,
    )
    return Trainer(Transformer(tiny_config()), SyntheticBatches(), config, hooks=hooks).run()


def weights_of(path):
    model, _ = load_model(path)
    return model.state_dict()


def test_the_best_evaluation_keeps_its_checkpoint_through_pruning(tmp_path):
    # Evaluations at steps 0 (the start), 2, 4, 6, 8, 10 and the end: the best is at step 4.
    summary = train(tmp_path, [0.1, 0.3, 0.7, 0.5, 0.6, 0.2, 0.2])
    assert summary["best"] == {
        "metric": "accuracy",
        "value": 0.7,
        "step": 4,
        "checkpoint": str(tmp_path / "checkpoints" / "step_00000004"),
    }
    assert (tmp_path / "best").read_text().strip() == "checkpoints/step_00000004"
    assert resolve_checkpoint(tmp_path / "best") == tmp_path / "checkpoints" / "step_00000004"
    # keep_last=1 pruned every other checkpoint but the final one; the best is spared.
    kept = sorted(path.name for path in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step_00000004", "step_00000010"]
    assert resolve_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000010"
    best, last = weights_of(tmp_path / "best"), weights_of(tmp_path)
    assert any(not torch.equal(best[name], last[name]) for name in best)


def test_a_smaller_metric_can_be_the_better_one(tmp_path):
    summary = train(tmp_path, [0.9, 0.8, 0.85, 0.4, 0.6, 0.5, 0.5], goal="min")
    assert summary["best"]["step"] == 6 and summary["best"]["value"] == 0.4


def test_a_run_that_never_betters_its_start_keeps_no_best_checkpoint(tmp_path):
    summary = train(tmp_path, [0.9, 0.5, 0.9, 0.4, 0.3, 0.2, 0.2])  # a tie with the start is no improvement
    assert summary["best"] == {"metric": "accuracy", "value": 0.9, "step": 0, "checkpoint": None}
    assert not (tmp_path / "best").exists()


def test_a_resumed_run_remembers_its_best(tmp_path):
    train(tmp_path, [0.1, 0.8, 0.2, 0.2], max_steps=4)  # best at step 2
    assert (tmp_path / "best").read_text().strip() == "checkpoints/step_00000002"
    summary = train(tmp_path, [0.1, 0.8, 0.2, 0.2, 0.5, 0.6, 0.6], max_steps=8, resume=True)
    assert summary["best"]["step"] == 2 and summary["best"]["value"] == 0.8
    assert (tmp_path / "checkpoints" / "step_00000002").is_dir()


def test_best_goal_is_max_or_min():
    with pytest.raises(ConfigError, match="best_goal"):
        build(TrainConfig, {"best_goal": "largest"})
