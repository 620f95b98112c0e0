"""The training loop: exact resume, Ctrl-C and SIGTERM, damaged checkpoints, the spike guard, schedules,
optimizer groups, budgets."""

import csv
import json
import logging
import math
import os
import signal

import pytest
import torch
from helpers import SyntheticBatches, tiny_config
from safetensors.torch import load_file

from llmkit.errors import ConfigError, InputError, MismatchError
from llmkit.model import Transformer
from llmkit.model.checkpoint import load_model
from llmkit.train.config import TrainConfig
from llmkit.train.objectives import causal_lm_loss
from llmkit.train.optim import build_optimizer, learning_rate
from llmkit.train.trainer import Trainer, TrainingDiverged


def train_config(out, **changes) -> TrainConfig:
    values = dict(
        out=str(out),
        batch_size=4,
        lr=3e-3,
        warmup_steps=3,
        max_steps=12,
        eval_interval=4,
        eval_batches=2,
        log_interval=1,
        checkpoint_interval=4,
        dtype="float32",
        progress=False,
        seed=7,
    )
    values.update(changes)
    return TrainConfig(**values)


def run(out, batches=None, loss_fn=causal_lm_loss, model_config=None, **changes) -> dict:
    torch.manual_seed(0)
    model = Transformer(model_config or tiny_config())
    trainer = Trainer(
        model,
        batches or SyntheticBatches(),
        train_config(out, **changes),
        val_batches=SyntheticBatches(),
        loss_fn=loss_fn,
    )
    return trainer.run()


def losses(out) -> dict[int, float]:
    with open(out / "metrics.csv") as file:
        return {
            int(row["step"]): float(row["loss"]) for row in csv.DictReader(file) if row["loss"] and not row["event"]
        }


def test_loss_falls_and_files_are_written(tmp_path):
    summary = run(tmp_path, max_steps=40, lr=1e-2)
    curve = losses(tmp_path)
    assert curve[40] < curve[1] - 1.0
    assert summary["val_loss"] < math.log(61)
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / math.log(2), rel=1e-4)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "latest").read_text().strip() == "checkpoints/step_00000040"


class InterruptAt(SyntheticBatches):
    """Sends the process a real signal (SIGINT as Ctrl-C does, SIGTERM as SLURM does) when batch ``at`` is drawn."""

    def __init__(self, at: int, signal_number: int = signal.SIGINT):
        super().__init__()
        self.at, self.signal_number = at, signal_number

    def get_batch(self, index):
        if index == self.at:
            os.kill(os.getpid(), self.signal_number)
        return super().get_batch(index)


def assert_same_final_weights(run_a, run_b):
    final = load_file(run_a / "checkpoints/step_00000012/model.safetensors")
    resumed = load_file(run_b / "checkpoints/step_00000012/model.safetensors")
    for name in final:
        torch.testing.assert_close(resumed[name], final[name], rtol=0, atol=0)


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_then_resume_continues_the_same_loss_curve(tmp_path, signal_number):
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(straight)
    handler = signal.getsignal(signal_number)
    interrupted = run(split, batches=InterruptAt(5, signal_number))
    assert interrupted["interrupted"] and interrupted["steps"] == 6  # the step in flight finishes, then saves
    assert (split / "latest").read_text().strip() == "checkpoints/step_00000006"
    assert signal.getsignal(signal_number) == handler  # given back
    run(split, resume=True)
    assert losses(split) == losses(straight)
    assert_same_final_weights(straight, split)


def truncate(path):
    path.write_bytes(path.read_bytes()[:100])


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, bad_file, reason",
    [
        (lambda folder: truncate(folder / "model.safetensors"), "model.safetensors", "truncated"),
        (lambda folder: flip_a_byte(folder / "optimizer.pt"), "optimizer.pt", "sha256 differs"),
        (lambda folder: (folder / "manifest.json").write_bytes(b"\xff{"), "manifest.json", "utf-8"),
        (lambda folder: (folder / "trainer_state.json").unlink(), "trainer_state.json", "missing"),
    ],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog, damage, bad_file, reason):
    straight, damaged = tmp_path / "straight", tmp_path / "damaged"
    run(straight)
    run(damaged)
    newest = damaged / "checkpoints/step_00000012"
    damage(newest)
    with caplog.at_level(logging.WARNING, logger="llmkit.train.checkpoint"):
        run(damaged, resume=True)
    [message] = [record.getMessage() for record in caplog.records]
    assert message.startswith(f"{newest / bad_file}: ") and reason in message and "\n" not in message
    assert message.endswith("resuming from step_00000008 instead")
    assert losses(damaged) == losses(straight)  # steps 9-12 trained again, on the same curve
    assert_same_final_weights(straight, damaged)


def test_without_an_intact_checkpoint_resume_is_one_error_naming_the_newest_bad_file(tmp_path):
    run(tmp_path, max_steps=4)
    truncate(tmp_path / "checkpoints/step_00000004/model.safetensors")
    with pytest.raises(
        InputError, match=r"no intact checkpoint to resume from \(.*step_00000004/model.safetensors: 100 bytes"
    ):
        run(tmp_path, max_steps=8, resume=True)


@pytest.mark.parametrize(
    "content",
    [
        b"../../..",
        b"/etc",
        b"checkpoints/../../..",
        b"checkpoints/step_4/../..",
        b"checkpoints\\step_4",
        b"\xff\xfecheckpoints",
    ],
)
def test_latest_must_name_a_checkpoint_folder_in_utf8(tmp_path, content):
    run(tmp_path, max_steps=4)
    (tmp_path / "latest").write_bytes(content)
    for attempt in (lambda: run(tmp_path, max_steps=4, resume=True), lambda: load_model(tmp_path)):
        with pytest.raises(InputError) as error:
            attempt()
        assert str(error.value).startswith(f"{tmp_path / 'latest'}: ") and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda config: config["model"].update(n_layers=3), "'n_layers' = 3: unknown field"),
        (lambda config: config["model"].update(n_head=0), "'n_head' = 0"),
        (lambda config: config.pop("model"), "no 'model' section"),
    ],
)
def test_a_bad_config_json_is_an_error_naming_the_file_and_field(tmp_path, damage, expected):
    run(tmp_path, max_steps=4)
    path = tmp_path / "checkpoints/step_00000004/config.json"
    config = json.loads(path.read_text())
    damage(config)
    path.write_text(json.dumps(config))
    with pytest.raises(InputError) as error:
        load_model(tmp_path)
    assert str(error.value).startswith(f"{path}: ") and expected in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("config.json", b"\xff\xfe{}", "cannot read"),
        ("config.json", b'{"model": ', "not valid JSON"),
        ("model.safetensors", None, "not a readable safetensors file"),
    ],
)
def test_unreadable_checkpoint_files_are_errors_naming_them(tmp_path, name, content, expected):
    run(tmp_path, max_steps=4)
    path = tmp_path / "checkpoints/step_00000004" / name
    truncate(path) if content is None else path.write_bytes(content)
    with pytest.raises(InputError) as error:
        load_model(tmp_path)
    assert str(error.value).startswith(f"{path}") and expected in str(error.value) and "\n" not in str(error.value)


def test_pruning_keeps_the_newest_checkpoints_and_clears_the_leftovers_of_killed_saves(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / ".step_00000002.x1y2.tmp").mkdir(parents=True)  # a save killed half-way
    (checkpoints / "step_00000099").mkdir()  # a later step a fallback went past: overwritten when the run gets there
    run(tmp_path, keep_last=2)
    assert sorted(os.listdir(checkpoints)) == ["step_00000008", "step_00000012", "step_00000099"]
    manifest = json.loads((checkpoints / "step_00000012/manifest.json").read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "optimizer.pt", "trainer_state.json"}


def test_resume_refuses_a_different_model_and_overwriting(tmp_path):
    run(tmp_path, max_steps=4)
    with pytest.raises(ConfigError, match="--train.resume"):
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
    assert learning_rate(50, 0.5, peak, 10, "cosine", 0.1, 0.2) == pytest.approx(
        0.1 + 0.45 * (1 + math.cos(math.pi / 2))
    )
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


@pytest.mark.parametrize(
    "field, value",
    [("lr", 0), ("batch_size", 0), ("max_time", "ten minutes"), ("min_lr_ratio", 2), ("checkpoint_format", "zip")],
)
def test_invalid_train_config_names_the_field(tmp_path, field, value):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        train_config(tmp_path, **{field: value})


def test_compiled_training_matches_eager(tmp_path):
    eager = run(tmp_path / "eager", max_steps=3, eval_interval=0)
    compiled = run(tmp_path / "compiled", max_steps=3, eval_interval=0, compile=True)
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-4)


def test_a_step_the_device_cannot_hold_is_refused_before_it_starts(tmp_path, monkeypatch):
    from llmkit.train import memory
    from llmkit.train import trainer as trainer_module

    model = Transformer(tiny_config())
    config = model.config
    # By hand: 4 rows x 32 tokens, float32, no checkpointing: 2 layers x 128 tokens x (16 h + 4 f) values x 4 bytes.
    estimate = memory.estimate_step_memory(model, 128, torch.float32, "none")
    assert estimate.activation_bytes == config.n_layer * 128 * (16 * config.n_embd + 4 * config.ffn_hidden) * 4
    assert estimate.optimizer_bytes == 12 * sum(p.numel() for p in model.parameters())
    assert estimate.logit_bytes == 12 * 128 * config.vocab_size
    # Selective recomputation frees no scores that the fused attention kernels would have kept.
    assert memory.estimate_step_memory(model, 128, torch.float32, "selective") == estimate
    checkpointed = memory.estimate_step_memory(model, 128, torch.float32, "full")
    assert checkpointed.activation_bytes < estimate.activation_bytes
    monkeypatch.setattr(trainer_module, "available_bytes", lambda device: 1024)  # almost nothing free
    with pytest.raises(
        ConfigError, match="--train.activation-checkpointing full.*--train.batch-size.*--sequence-length"
    ):
        run(tmp_path / "refused", max_steps=2)
    assert not (tmp_path / "refused" / "latest").exists()
    assert run(tmp_path / "allowed", max_steps=2, memory_check=False)["steps"] == 2


def test_a_peak_timed_on_a_busy_cpu_is_not_cached(tmp_path, monkeypatch):
    """MFU's peak: a matmul timed beside other jobs serves its own run only; an idle machine's timing is cached
    and read back (the busy figure never replaces it)."""
    from llmkit.train import metrics

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "llmkit" / "peak_flops.json"
    monkeypatch.setattr(os, "getloadavg", lambda: (8.0, 8.0, 8.0))
    busy = metrics.measured_peak_flops(torch.float32, torch.device("cpu"), max_size=64)
    assert busy > 0 and not cache.exists()
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    idle = metrics.measured_peak_flops(torch.float32, torch.device("cpu"), max_size=64)
    assert list(json.loads(cache.read_text()).values()) == [idle]
    monkeypatch.setattr(os, "getloadavg", lambda: (8.0, 8.0, 8.0))
    assert metrics.measured_peak_flops(torch.float32, torch.device("cpu"), max_size=64) == idle


def test_the_peak_stops_growing_the_matrices_once_a_product_is_slow(tmp_path, monkeypatch):
    """On a CPU without bfloat16 instructions one 2048 product takes a minute: the matrices grow from 256 only
    while a product takes under PEAK_PRODUCT_SECONDS, and the peak is that size's FLOP over its best time."""
    from llmkit.train import metrics

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    sizes = []

    def product_seconds(a, device, repeats):
        sizes.append(a.shape[0])
        return (a.shape[0] / 512) ** 3 * 0.015  # 512: 15 ms, 1024: 120 ms

    monkeypatch.setattr(metrics, "_best_product_seconds", product_seconds)
    assert metrics.measured_peak_flops(torch.float32, torch.device("cpu")) == pytest.approx(2 * 1024**3 / 0.12)
    assert sizes == [256, 512, 1024, 1024]
    monkeypatch.setattr(metrics, "PEAK_PRODUCT_SECONDS", 1.0)  # a fast machine stops at max_size
    sizes.clear()
    metrics.measured_peak_flops(torch.bfloat16, torch.device("cpu"), max_size=512)
    assert sizes == [256, 512, 512]


def test_auto_dtype_trains_in_bfloat16_only_where_its_matmul_is_faster(monkeypatch):
    from llmkit.train import trainer

    cpu = torch.device("cpu")
    assert trainer.resolve_dtype("float16", cpu) == torch.float16  # an explicit dtype is taken as it is
    peaks = {torch.float32: 60e9, torch.bfloat16: 1.3e9}  # an AVX2 machine, measured
    monkeypatch.setattr(trainer, "measured_peak_flops", lambda dtype, device: peaks[dtype])
    assert trainer.resolve_dtype("auto", cpu) == torch.float32
    assert trainer.resolve_dtype("bfloat16", cpu) == torch.bfloat16
    peaks[torch.bfloat16] = 120e9  # AVX512-BF16 / AMX
    assert trainer.resolve_dtype("auto", cpu) == torch.bfloat16
