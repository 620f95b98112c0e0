"""2 CPU processes (gloo) under torchrun match 1 process with the same global batch, for DDP and FSDP2
pretraining and for GRPO (DDP), whose rollouts are split across the processes."""

import csv
import json
from pathlib import Path

import distributed_worker
import pytest
import torch
from helpers import launch_workers
from rl_helpers import char_tokenizer, save_checkpoint, warm_policy
from safetensors.torch import load_file

HERE = Path(__file__).parent


def curve(out: Path) -> list[tuple[float, str]]:
    with open(out / "metrics.csv") as file:
        return [(float(row["loss"]), row["val_loss"]) for row in csv.DictReader(file) if row["loss"]]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """1 process accumulating 2 micro-batches."""
    out = tmp_path_factory.mktemp("single")
    distributed_worker.run(str(out), "ddp", grad_accum=2)
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, start) -> Path:
    """The tests' runs on 2 processes of 1 micro-batch each (``ddp``, ``fsdp``, ``grpo``), one after the other
    in one torchrun launch."""
    root = tmp_path_factory.mktemp("two_processes")
    runs = [dict(out=str(root / mode), mode=mode, grad_accum=1, policy=str(start)) for mode in ("ddp", "fsdp", "grpo")]
    launch_workers(HERE / "distributed_worker.py", 2, [json.dumps(runs)], root)
    return root


@pytest.mark.slow
@pytest.mark.xdist_group("distributed")  # one worker runs the shared 2-process launch
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_processes_match_one(single, two_processes, parallelism):
    run = two_processes / parallelism
    state = json.loads((run / "checkpoints/step_00000006/trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["config"]["parallelism"] == parallelism
    for (loss_one, val_one), (loss_two, val_two) in zip(curve(single), curve(run), strict=True):
        assert loss_two == pytest.approx(loss_one, rel=1e-4)
        assert (val_one == "") == (val_two == "") and (
            not val_one or float(val_two) == pytest.approx(float(val_one), rel=1e-4)
        )
    one = load_file(single / "checkpoints/step_00000006/model.safetensors")
    two = load_file(run / "checkpoints/step_00000006/model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> Path:
    """A tiny policy checkpoint (the RL tests' letter-answering model) for GRPO to start from."""
    folder = tmp_path_factory.mktemp("sft")
    tokenizer = char_tokenizer(folder)
    return save_checkpoint(folder, warm_policy(tokenizer, context_length=384), tokenizer)


def rows(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as file:
        return [row for row in csv.DictReader(file) if row["event"] != "end"]


@pytest.mark.slow
@pytest.mark.xdist_group("distributed")
def test_grpo_on_two_processes_matches_one(two_processes, start, tmp_path):
    """Each process samples, scores and trains on its half of every iteration's prompts (whole groups), with
    each request's seed from its position in the iteration, so the completions, rewards and held-out
    answers are the same as one process's (compared exactly). Losses and weights are compared to 1e-4:
    the gradient of the two micro-batches is summed by gloo's all-reduce instead of in place, which
    rounds differently in the last bits of float32, and that difference grows over 8 optimizer steps."""
    one, two = tmp_path / "one", two_processes / "grpo"
    distributed_worker.run(str(one), "grpo", grad_accum=2, policy=str(start))  # 1 process, 2 micro-batches
    first, second = rows(one), rows(two)
    assert (
        [row["step"] for row in first] == [row["step"] for row in second] == ["0"] + [str(step) for step in range(1, 9)]
    )
    for row_one, row_two in zip(first, second):
        for column in ("reward", "reward_std", "uniform_groups", "generated_tokens", "accuracy", "eval_reward"):
            assert row_one.get(column) == row_two.get(column), column
        for column in ("loss", "kl", "entropy", "clip_fraction", "grad_norm"):
            if row_one.get(column):
                assert float(row_two[column]) == pytest.approx(float(row_one[column]), rel=1e-4, abs=1e-6), column
    assert len({row["reward"] for row in first[1:]}) > 1  # the policy learned from differing rewards
    final = "checkpoints/step_00000008/model.safetensors"
    weights_one, weights_two = load_file(one / final), load_file(two / final)
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-4, atol=1e-5)
