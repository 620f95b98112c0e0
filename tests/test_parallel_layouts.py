"""Tensor x pipeline x data parallel layouts on CPU processes (gloo) reproduce one process, and a checkpoint
resumes on another layout. The tiny model has grouped-query attention and a gated MLP, so both fused projections are
split across the tensor-parallel ranks (and put back in one process's order in the checkpoints).

Tolerance: losses to 1e-4 relative, weights 1e-4 / 1e-5. Row-parallel projections add their partial
matmuls by all-reduce, and FSDP averages gradients by reduce-scatter, in another order than one process's
single matmul and in-place accumulation: float32 rounding in the last bits, which 4 AdamW steps amplify
(the same bound as the DDP/FSDP test, test_distributed.py)."""

import csv
import json
from pathlib import Path

import parallel_worker
import pytest
import torch
from helpers import launch_workers
from safetensors.torch import load_file

from llmkit.errors import ConfigError
from llmkit.model import Transformer, preset
from llmkit.model.checkpoint import load_model
from llmkit.model.config import ModelConfig
from llmkit.model.sharded import SHARDS
from llmkit.train.config import TrainConfig
from llmkit.train.distributed import World, wrap_model
from llmkit.train.parallel import check_tensor_parallel, deinterleave, interleave
from llmkit.train.pipeline import balanced_split, even_split

HERE = Path(__file__).parent


def launch_one_process(out: Path, **layout) -> None:
    """``parallel_worker.train`` in this process, resuming the checkpoint ``out`` holds."""
    parallel_worker.train(out=str(out), resume=(out / "latest").exists(), **layout)


def losses(out: Path) -> list[tuple[str, float, str]]:
    with open(out / "metrics.csv") as file:
        return [(row["step"], float(row["loss"]), row["val_loss"]) for row in csv.DictReader(file) if row["loss"]]


def assert_same_weights(one: Path, two: Path) -> None:
    first, second = load_file(one), load_file(two)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=1e-4, atol=1e-5)


def test_interleave_puts_whole_heads_on_each_rank():
    rows = torch.arange(8).view(8, 1)  # q = 0..3, k = 4..5, v = 6..7
    mixed = interleave(rows, [4, 2, 2], 2)
    assert mixed.flatten().tolist() == [0, 1, 4, 6, 2, 3, 5, 7]  # rank 0: q0 q1 k0 v0; rank 1: q2 q3 k1 v1
    assert torch.equal(deinterleave(mixed, [4, 2, 2], 2), rows)


def test_pipeline_splits():
    assert even_split(5, 2) == [range(0, 3), range(3, 5)]
    # BLOOM's 70 blocks on 12 stages: evenly 6 blocks on the first 10 and 5 on the last two, where the head
    # (250,880 x 14,336 = 3.6e9 weights, 1.46 blocks of 12·14336² = 2.47e9) makes the last stage the busiest
    # at 6.46 blocks' work; balanced, the last stage takes 4 blocks and the head (5.46), the others 6 each.
    assert [len(blocks) for blocks in even_split(70, 12)] == [6] * 10 + [5] * 2
    assert [len(blocks) for blocks in balanced_split(preset("bloom-176b"), 12)] == [6] * 11 + [4]
    tiny = ModelConfig(n_layer=4, n_embd=32, n_head=2, vocab_size=10)  # a head of 320 weights, blocks of 12,288
    assert balanced_split(tiny, 2) == even_split(4, 2) == [range(0, 2), range(2, 4)]
    with pytest.raises(ConfigError, match="'pp' = 3"):
        even_split(2, 3)


def test_tensor_parallel_refuses_what_it_cannot_split():
    with pytest.raises(ConfigError, match="'n_kv_head' = 1"):
        check_tensor_parallel(ModelConfig(n_head=4, n_kv_head=1, n_embd=32), 2)
    with pytest.raises(ConfigError, match="'position' = 'alibi'"):
        check_tensor_parallel(ModelConfig(position="alibi"), 2)
    with pytest.raises(ConfigError, match="'norm_placement' = 'post'"):
        check_tensor_parallel(ModelConfig(norm_placement="post"), 2, sequence_parallel=True)
    check_tensor_parallel(ModelConfig(norm_placement="post"), 2)  # without sequence parallelism it splits
    with pytest.raises(ConfigError, match="'vocab_size' = 61.*tp=2.*--train.vocab-parallel"):  # refused, not padded
        check_tensor_parallel(ModelConfig(vocab_size=61), 2, vocab_parallel=True)
    check_tensor_parallel(ModelConfig(vocab_size=61), 2)  # a replicated embedding and head take any vocabulary
    with pytest.raises(ConfigError, match="'vocab_parallel' = True.*--train.pp 1"):
        TrainConfig(tp=2, pp=2, grad_accum=2, vocab_parallel=True)
    with pytest.raises(ConfigError, match="'tp' = 2"):  # one process cannot hold two tensor-parallel ranks
        wrap_model(Transformer(ModelConfig(n_layer=1, n_embd=32)), World(), TrainConfig(tp=2), torch.device("cpu"))


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    """One process accumulating 2 micro-batches of 4 rows for 4 steps (full checkpoints at steps 2 and 4)."""
    out = tmp_path_factory.mktemp("layouts") / "one"
    launch_one_process(out, tp=1, pp=1, grad_accum=2, max_steps=4)
    return out


@pytest.fixture(scope="module")
def four_processes(tmp_path_factory) -> Path:
    """The two tests' runs on 4 processes, as segments of one torchrun launch (see parallel_worker.py); each
    segment after the first of its run resumes from the checkpoint on disk, in a new Trainer and model.

    - ``layouts``: pp 2 x dp 2 (GPipe, 1 micro-batch) for steps 1-2, then tp 2 x pp 2 (interleaved 1F1B, 2
      stages a process, 2 micro-batches, sequence parallel, attention cores recomputed) for steps 3-4;
    - ``sharded``: tp 2 x dp 2 sharded checkpoints after step 2 (FSDP row shards of each rank's interleaved
      q/k/v and gate/up rows; norms replicated, embedding and head split along the vocabulary with the loss
      on the split logits, whole blocks recomputed), copied to ``alone`` then, resumed on tp 2 x pp 2
      (interleaved 1F1B: pieces read into other ranks' rows and stages, then saved by pipeline stages)."""
    root = tmp_path_factory.mktemp("four_processes")
    layouts, sharded = str(root / "layouts"), str(root / "sharded")
    segments = [
        dict(out=layouts, tp=1, pp=2, grad_accum=1, max_steps=2, schedule="gpipe"),
        dict(out=layouts, tp=2, pp=2, grad_accum=2, max_steps=4, schedule="interleaved-1f1b", recompute="selective"),
        dict(
            out=sharded,
            tp=2,
            pp=1,
            grad_accum=1,
            max_steps=2,
            recompute="full",
            sequence_parallel=False,
            vocab_parallel=True,
            checkpoint_format="sharded",
            copy_to=str(root / "alone"),
        ),
        dict(
            out=sharded, tp=2, pp=2, grad_accum=2, max_steps=4, schedule="interleaved-1f1b", checkpoint_format="sharded"
        ),
    ]
    for index, segment in enumerate(segments):
        segment["resume"] = any(earlier["out"] == segment["out"] for earlier in segments[:index])
    launch_workers(HERE / "parallel_worker.py", 4, [json.dumps(segments)], root)
    return root


def assert_same_curve(one: Path, run: Path) -> None:
    expected, got = losses(one), losses(run)
    assert [row[0] for row in got] == [row[0] for row in expected] == ["1", "2", "3", "4"]
    for (_, loss_one, val_one), (_, loss_two, val_two) in zip(expected, got):
        assert loss_two == pytest.approx(loss_one, rel=1e-4)
        assert (val_one == "") == (val_two == "") and (
            not val_one or float(val_two) == pytest.approx(float(val_one), rel=1e-4)
        )


@pytest.mark.slow
@pytest.mark.xdist_group("parallel_layouts")  # one worker runs the shared 4-process launch
def test_layouts_reproduce_one_process_and_resume_across_layouts(one, four_processes):
    """One process (the ``one`` fixture), against the ``layouts`` run, which changes layout at its resume,
    each layout with the same global batch of 8 rows. Its losses, validation losses and weights are one
    process's, and the pp 2 x dp 2 checkpoint is in one process's layout: one process could load it as it is."""
    layouts = four_processes / "layouts"
    for step in ("step_00000002", "step_00000004"):
        assert_same_weights(
            one / f"checkpoints/{step}/model.safetensors", layouts / f"checkpoints/{step}/model.safetensors"
        )
    assert_same_curve(one, layouts)


def assert_same_model(full: Path, sharded: Path) -> None:
    """The weights of a sharded checkpoint, read in one process (no process group), are the full one's."""
    expected, (model, _) = load_file(full / "model.safetensors"), load_model(sharded)
    got = model.state_dict()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.xdist_group("parallel_layouts")
def test_sharded_checkpoints_resume_on_other_layouts(one, four_processes):
    """The ``sharded`` run's checkpoints resume on tp 2 x pp 2 (the launch) and in one process (every piece
    into whole tensors, with the optimizer state: here), both on one process's curve; every checkpoint loads
    as the full format's."""
    sharded, alone = four_processes / "sharded", four_processes / "alone"
    step_2 = sharded / "checkpoints/step_00000002"
    assert len(list((step_2 / SHARDS).iterdir())) == 4 and not (step_2 / "model.safetensors").exists()
    assert_same_model(one / "checkpoints/step_00000002", step_2)
    launch_one_process(alone, tp=1, pp=1, grad_accum=2, max_steps=4, checkpoint_format="sharded")
    for run in (sharded, alone):
        assert_same_curve(one, run)
        assert_same_model(one / "checkpoints/step_00000004", run / "checkpoints/step_00000004")
