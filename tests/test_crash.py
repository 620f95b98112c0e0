"""Crash-proof training: a run SIGKILLed again and again (many times inside checkpoint writes) and one
stopped by SIGTERM each resume and continue the uninterrupted run's loss curve exactly, to the bit; a
GRPO run stopped by Ctrl-C finishes the iteration in flight, saves, falls back past a damaged checkpoint
and resumes to the uninterrupted run's metrics and weights.

The runs are forked child processes, so a kill costs no interpreter start-up. A seeded RNG picks every
kill: by the parent after a random delay, or by the child itself at a random training step or at a
random fsync of its writes, which lands kills deterministically in every phase of a save (files written
but not renamed, the manifest not yet written, the folder renamed but ``latest`` not yet moved, metrics
rows past the checkpoint)."""

import csv
import logging
import multiprocessing
import os
import random
import signal
import time

import pytest
import torch
from helpers import SyntheticBatches, tiny_config
from rl_helpers import policy, save_checkpoint, tokenizer

import llmkit.io
from llmkit.align.grpo import GRPOConfig, grpo, grpo_update
from llmkit.align.rl_source import RolloutConfig, RolloutSource
from llmkit.align.rl_stage import RLStageConfig, rl_training
from llmkit.model import Transformer
from llmkit.train.checkpoint import resumable_checkpoint
from llmkit.train.config import TrainConfig
from llmkit.train.trainer import Trainer

__all__ = ["policy", "tokenizer"]  # the shared fixtures of rl_helpers, which pytest finds by name
STEPS = 40
FORK = multiprocessing.get_context("fork")


def train(out, batches=None) -> dict:
    config = TrainConfig(
        out=str(out),
        batch_size=4,
        lr=3e-3,
        warmup_steps=3,
        max_steps=STEPS,
        eval_interval=0,
        log_interval=1,
        checkpoint_interval=1,
        keep_last=2,
        dtype="float32",
        progress=False,
        seed=7,
        resume=(out / "latest").is_file(),
    )
    torch.manual_seed(0)
    return Trainer(Transformer(tiny_config()), batches or SyntheticBatches(), config).run()


def metrics(out) -> dict[int, tuple[str, str, str]]:
    """Step -> (loss, learning rate, tokens) of every training row of ``metrics.csv``."""
    with open(out / "metrics.csv", newline="") as file:
        return {
            int(row["step"]): (row["loss"], row["lr"], row["tokens"])
            for row in csv.DictReader(file)
            if not row["event"]
        }


def final_weights(out) -> bytes:
    return (out / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors").read_bytes()


class KillAtDraw(SyntheticBatches):
    """SIGKILLs its own process when the ``draws``-th batch is drawn: a kill in the middle of a step."""

    def __init__(self, draws: int):
        super().__init__()
        self.draws = draws

    def get_batch(self, index):
        self.draws -= 1
        if self.draws == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().get_batch(index)


def kill_at_fsync(count: int) -> None:
    """SIGKILL this process at its ``count``-th fsync: inside a checkpoint, ``latest`` or metrics write."""
    fsync = llmkit.io.fsync_path

    def counting(path):
        nonlocal count
        count -= 1
        if count == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        fsync(path)

    llmkit.io.fsync_path = counting


def crash_child(out, kind: str, moment: int) -> None:
    """A run (resumed when it can be) that kills itself where ``kind`` and ``moment`` say (or that the parent kills)."""
    if kind == "fsync":
        kill_at_fsync(moment)
    train(out, batches=KillAtDraw(moment) if kind == "step" else None)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_continues_the_same_curve_exactly(tmp_path, monkeypatch):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    fsyncs = []
    monkeypatch.setattr(
        llmkit.io, "fsync_path", lambda path, fsync=llmkit.io.fsync_path: fsyncs.append(path) or fsync(path)
    )
    train(reference)
    monkeypatch.undo()
    curve = metrics(reference)
    # A kill at each fsync of a step's writes (a resumed run's first step: the same writes in the same
    # order), at a random draw of a batch and after a random delay; in a random order.
    rng = random.Random(15)
    plan = [("fsync", count) for count in range(1, len(fsyncs) // STEPS + 2)]
    plan += [("step", rng.randint(1, 3)) for _ in range(3)] + [("timer", rng.randint(0, 20)) for _ in range(3)]
    rng.shuffle(plan)
    inside_saves = 0
    for kind, moment in plan + [("none", 0)]:
        child = FORK.Process(target=crash_child, args=(crashed, kind, moment))
        temporaries = set((crashed / "checkpoints").glob(".step_*"))
        child.start()
        child.join(timeout=moment / 1000 if kind == "timer" else 60)
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
            child.join()
        assert child.exitcode == (0 if kind == "none" else -signal.SIGKILL), (
            f"{kind} {moment}: exit code {child.exitcode}"
        )
        inside_saves += bool(
            set((crashed / "checkpoints").glob(".step_*")) - temporaries
        )  # a checkpoint was being built
        if (crashed / "metrics.csv").is_file():  # every row written so far lies on the uninterrupted curve
            assert all(curve[step] == row for step, row in metrics(crashed).items())
        if (crashed / "latest").is_file():
            resumable_checkpoint(crashed)  # an intact checkpoint is always there to resume from
    assert len(plan) >= 10 and inside_saves >= 3, (len(plan), inside_saves)
    assert metrics(crashed) == curve
    assert final_weights(crashed) == final_weights(reference)


@pytest.mark.slow
def test_sigterm_saves_the_step_it_was_at_and_resume_continues_exactly(tmp_path):
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    train(reference)
    child = FORK.Process(target=train, args=(stopped,))
    child.start()
    # Some random number of checkpoints in (the handlers are in place by then), well before the end.
    wanted = stopped / "checkpoints" / f"step_{random.Random(6).randint(1, STEPS // 2):08d}"
    deadline = time.time() + 60
    while not wanted.is_dir() and time.time() < deadline:
        time.sleep(0.002)
    os.kill(child.pid, signal.SIGTERM)
    child.join(timeout=60)
    assert child.exitcode == 0
    with open(stopped / "metrics.csv", newline="") as file:
        step = next(int(row["step"]) for row in csv.DictReader(file) if row["event"] == "interrupted")
    assert 0 < step < STEPS, "the signal should land before the run's end"
    assert resumable_checkpoint(stopped).name == f"step_{step:08d}"
    train(stopped)  # resumes at `step` and runs to STEPS
    assert metrics(stopped) == metrics(reference)
    assert final_weights(stopped) == final_weights(reference)


def grpo_run(start, out, resume=False) -> dict:
    """GRPO on 2 prompts x 4 samples an iteration in minibatches of 4: 2 steps an iteration, 4 iterations."""
    stage = RLStageConfig(
        policy=str(start), task="arithmetic_plain", train_problems=4, validation_problems=2, missing_end_penalty=0.5
    )
    return grpo(
        GRPOConfig(
            group_size=4,
            stage=stage,
            rollout=RolloutConfig(prompts_per_iteration=2, max_new_tokens=3, temperature=3.0, tools="none"),
            update=grpo_update(iterations=4, minibatch_size=4),
            train=rl_training(out=str(out), checkpoint_interval=2, device="cpu", progress=False, resume=resume),
        )
    )


def test_ctrl_c_finishes_the_grpo_iteration_saves_and_resume_continues_exactly(
    tokenizer, policy, tmp_path, monkeypatch, caplog
):
    (tmp_path / "sft").mkdir()
    start = save_checkpoint(tmp_path / "sft", policy, tokenizer)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    grpo_run(start, straight)
    begin = RolloutSource._start_iteration

    def interrupted_in_the_second(source, iteration):
        if iteration == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, during the iteration's sampling
        return begin(source, iteration)

    monkeypatch.setattr(RolloutSource, "_start_iteration", interrupted_in_the_second)
    summary = grpo_run(start, stopped)
    monkeypatch.setattr(RolloutSource, "_start_iteration", begin)
    # The iteration in flight finished (both its steps), then the run saved and ended without evaluating again.
    assert (
        summary["interrupted"]
        and summary["iterations"] == 2
        and summary["steps"] == 4
        and summary["accuracy_after"] is None
    )
    assert (stopped / "latest").read_text().strip() == "checkpoints/step_00000004"
    damaged = stopped / "checkpoints/step_00000004/model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-1])
    with caplog.at_level(logging.WARNING, logger="llmkit.train.checkpoint"):
        resumed = grpo_run(start, stopped, resume=True)
    [message] = [record.getMessage() for record in caplog.records]
    assert message.startswith(f"{damaged}: ") and message.endswith("resuming from step_00000002 instead")

    def curve(out):
        with open(out / "metrics.csv", newline="") as file:
            return [
                (row["step"], row["reward"], row["loss"], row["kl"], row["lr"])
                for row in csv.DictReader(file)
                if not row["event"]
            ]

    assert curve(stopped) == curve(straight) and len({row[1] for row in curve(straight)}) > 1
    last = "checkpoints/step_00000008/model.safetensors"
    assert (stopped / last).read_bytes() == (straight / last).read_bytes()
    assert (straight / last).read_bytes() != (start / "model.safetensors").read_bytes()
    assert resumed["accuracy_before"] == summary["accuracy_before"] and resumed["generated_tokens"] > 0
