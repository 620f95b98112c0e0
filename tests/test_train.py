"""The training loop: exact resume, Ctrl-C, the spike guard, schedules, optimizer groups, budgets."""

import csv
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from helpers import SyntheticBatches, tiny_config
from llmkit.errors import ConfigError, MismatchError
from llmkit.model import Transformer
from llmkit.train.config import TrainConfig
from llmkit.train.objectives import causal_lm_loss
from llmkit.train.optim import build_optimizer, learning_rate
from llmkit.train.trainer import Trainer, TrainingDiverged


def train_config(out, **changes) -> TrainConfig:
    values = dict(out=str(out), batch_size=4, lr=3e-3, warmup_steps=3, max_steps=12, eval_interval=4, eval_batches=2,
                  log_interval=1, checkpoint_interval=4, dtype="float32", progress=False, seed=7)
    values.update(changes)
    return TrainConfig(**values)


def run(out, batches=None, loss_fn=causal_lm_loss, model_config=None, **changes) -> dict:
    torch.manual_seed(0)
    model = Transformer(model_config or tiny_config())
    trainer = Trainer(model, batches or SyntheticBatches(), train_config(out, **changes), val_batches=SyntheticBatches(),
                      loss_fn=loss_fn)
    return trainer.run()


def losses(out) -> dict[int, float]:
    with open(out / "metrics.csv") as file:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(file) if row["loss"] and not row["event"]}


def test_loss_falls_and_files_are_written(tmp_path):
    summary = run(tmp_path, max_steps=40, lr=1e-2)
    curve = losses(tmp_path)
    assert curve[40] < curve[1] - 1.0
    assert summary["val_loss"] < math.log(61)
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / math.log(2), rel=1e-4)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "latest").read_text().strip() == "checkpoints/step_00000040"


class InterruptAt(SyntheticBatches):
    """Sends the process a real SIGINT (as Ctrl-C does) when batch ``at`` is drawn."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def get_batch(self, index):
        if index == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().get_batch(index)


def test_interrupt_then_resume_continues_the_same_loss_curve(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(straight)
    interrupted = run(split, batches=InterruptAt(5))
    assert interrupted["interrupted"] and interrupted["steps"] == 6  # the step in flight finishes, then saves
    run(split, resume=True)
    assert losses(split) == losses(straight)
    final = load_file(straight / "checkpoints/step_00000012/model.safetensors")
    resumed = load_file(split / "checkpoints/step_00000012/model.safetensors")
    for name in final:
        torch.testing.assert_close(resumed[name], final[name], rtol=0, atol=0)


def test_resume_refuses_a_different_model_and_overwriting(tmp_path):
    run(tmp_path, max_steps=4)
    with pytest.raises(ConfigError, match="--resume"):
        run(tmp_path, max_steps=4)
    with pytest.raises(MismatchError, match="n_layer"):
        run(tmp_path, max_steps=8, resume=True, model_config=tiny_config(n_layer=3))


def spiking_loss(bad_indices):
    """Loss that is 50x too large (or NaN) on the micro-batches whose first token marks them bad."""
    def loss_fn(model, batch):
        loss, metrics = causal_lm_loss(model, batch)
        marker = int(batch["input_ids"][0, 0])
        if marker in bad_indices:
            return (loss * 50 if bad_indices[marker] == "spike" else loss * float("nan")), metrics
        return loss, metrics
    return loss_fn


class MarkedBatches(SyntheticBatches):
    """Micro-batch i starts with token i % vocab, so a loss function can recognise it."""

    def get_batch(self, index):
        batch = super().get_batch(index)
        batch["input_ids"][0, 0] = index % self.vocab_size
        return batch


def test_spike_and_nan_batches_are_skipped_without_updating(tmp_path):
    summary = run(tmp_path, batches=MarkedBatches(), loss_fn=spiking_loss({15: "spike", 17: "nan"}), max_steps=20)
    assert summary["skipped_batches"] == 2 and summary["rollbacks"] == 0
    assert summary["steps"] == 20  # skipped batches do not count as steps
    with open(tmp_path / "metrics.csv") as file:
        events = [row["event"] for row in csv.DictReader(file) if row["event"]]
    assert events.count("skipped") == 2


def test_repeated_spikes_roll_back_and_skip_the_data_window(tmp_path):
    bad = {index: "spike" for index in (14, 15, 16)}
    summary = run(tmp_path, batches=MarkedBatches(), loss_fn=spiking_loss(bad), max_steps=20, checkpoint_interval=4)
    assert summary["rollbacks"] == 1 and summary["skipped_batches"] == 3
    with open(tmp_path / "metrics.csv") as file:
        events = [row["event"] for row in csv.DictReader(file) if row["event"]]
    # Spikes at data positions 14-16 happen after step 14 (checkpointed at 12): back to step 12.
    assert "rollback to step 12" in events
    assert summary["steps"] == 20


def test_endless_spikes_raise_training_diverged(tmp_path):
    bad = {index: "nan" for index in range(8, 61)}
    with pytest.raises(TrainingDiverged):
        run(tmp_path, batches=MarkedBatches(), loss_fn=spiking_loss(bad), max_steps=40, max_rollbacks=1)


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    """Two micro-batches of 4 with accumulation give the same update as one batch of 8."""

    class Halves(SyntheticBatches):
        def get_batch(self, index):
            whole = SyntheticBatches(batch_size=8).get_batch(index // 2)
            half = slice(0, 4) if index % 2 == 0 else slice(4, 8)
            return {key: value[half] for key, value in whole.items()}

    run(tmp_path / "big", batches=SyntheticBatches(batch_size=8), max_steps=3, eval_interval=0)
    run(tmp_path / "accumulated", batches=Halves(), grad_accum=2, max_steps=3, eval_interval=0)
    big = load_file(tmp_path / "big/checkpoints/step_00000003/model.safetensors")
    accumulated = load_file(tmp_path / "accumulated/checkpoints/step_00000003/model.safetensors")
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-5, atol=1e-6)


def test_bfloat16_autocast_trains(tmp_path):
    summary = run(tmp_path, dtype="bfloat16", max_steps=30, lr=1e-2)
    curve = losses(tmp_path)
    assert curve[30] < curve[1] - 0.5 and math.isfinite(summary["val_loss"])


def test_time_and_token_budgets_stop_the_run(tmp_path):
    assert run(tmp_path / "tokens", max_steps=None, max_tokens=4 * 16 * 5)["steps"] == 5
    summary = run(tmp_path / "time", max_steps=None, max_time="1s", eval_interval=0)
    assert 0.9 <= summary["seconds"] < 5
    with pytest.raises(ConfigError, match="budget"):
        run(tmp_path / "none", max_steps=None)


def test_learning_rate_schedules_by_hand():
    peak = 1.0
    assert learning_rate(0, 0.0, peak, 10, "cosine", 0.1, 0.2) == pytest.approx(0.1)
    assert learning_rate(9, 0.0, peak, 10, "cosine", 0.1, 0.2) == pytest.approx(1.0)
    assert learning_rate(50, 0.5, peak, 10, "cosine", 0.1, 0.2) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert learning_rate(99, 1.0, peak, 10, "cosine", 0.1, 0.2) == pytest.approx(0.1)
    assert learning_rate(50, 0.79, peak, 10, "wsd", 0.1, 0.2) == pytest.approx(1.0)
    assert learning_rate(90, 0.9, peak, 10, "wsd", 0.1, 0.2) == pytest.approx(1.0 - 0.9 * 0.5)
    assert learning_rate(90, 0.9, peak, 10, "constant", 0.1, 0.2) == 1.0


def test_weight_decay_applies_to_matrices_only():
    model = Transformer(tiny_config(bias=True, norm="layernorm"))
    decay, no_decay = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("field, value", [("lr", 0), ("batch_size", 0), ("max_time", "ten minutes"), ("min_lr_ratio", 2)])
def test_invalid_train_config_names_the_field(tmp_path, field, value):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        train_config(tmp_path, **{field: value})


def test_compiled_training_matches_eager(tmp_path):
    eager = run(tmp_path / "eager", max_steps=3, eval_interval=0)
    compiled = run(tmp_path / "compiled", max_steps=3, eval_interval=0, compile=True)
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-4)
