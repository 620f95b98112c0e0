"""Sharded checkpoints (--train.checkpoint-format sharded) in one process: the same curve and weights as the
full format, read by every loader, exported to one model.safetensors, guarded by the manifest, never
unpickled. Saving on one layout and resuming on another is tested with 4 processes in
test_parallel_layouts.py."""

import pickle
import signal
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from safetensors.torch import load_file
from test_train import InterruptAt, flip_a_byte, losses, run

from llmkit.errors import InputError, MismatchError
from llmkit.interop import ExportConfig, export_checkpoint
from llmkit.model.checkpoint import load_model
from llmkit.model.shard_io import Piece, load_pieces
from llmkit.model.sharded import SHARDS
from llmkit.train.checkpoint import resumable_checkpoint, verify_checkpoint
from llmkit.train.parallel import interleave, row_pieces

# Biases too: the fused q/k/v and gate/up biases are saved as row blocks like the weights.
MODEL = tiny_config(bias=True)


@pytest.mark.parametrize("sizes, parts", [([8, 4, 4], 2), ([8, 4, 4], 4), ([6, 6], 3), ([4, 2, 2], 1)])
def test_row_pieces_locate_every_interleaved_row_in_its_block(sizes, parts):
    total = sum(sizes)
    starts = [sum(sizes[:block]) for block in range(len(sizes))]
    mixed = interleave(torch.arange(total), sizes, parts)  # entry i: the one-process row at interleaved row i
    for start in range(total):
        for stop in range(start + 1, total + 1):
            covered = []
            for block, first, row, rows in row_pieces(start, stop, sizes, parts):
                got = mixed[start + first : start + first + rows]
                assert got.tolist() == list(range(starts[block] + row, starts[block] + row + rows))
                covered += range(first, first + rows)
            assert covered == list(range(stop - start))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A full-format run straight through 12 steps, and a sharded one stopped by SIGTERM after step 6 and
    resumed (checkpoints at steps 4, 6, 8, 12)."""
    folder = tmp_path_factory.mktemp("sharded")
    full, sharded = folder / "full", folder / "sharded"
    run(full, model_config=MODEL)
    stopped = run(sharded, model_config=MODEL, batches=InterruptAt(5, signal.SIGTERM), checkpoint_format="sharded")
    assert stopped["interrupted"] and (sharded / "latest").read_text().strip() == "checkpoints/step_00000006"
    run(sharded, model_config=MODEL, resume=True, checkpoint_format="sharded")
    return full, sharded


def test_a_sharded_run_resumes_on_the_same_curve_and_loads_as_the_full_format(runs):
    full, sharded = runs
    newest = sharded / "checkpoints/step_00000012"
    assert (newest / SHARDS).is_dir() and not (newest / "model.safetensors").exists()
    assert not (newest / "optimizer.pt").exists()
    assert losses(sharded) == losses(full)
    expected = load_file(full / "checkpoints/step_00000012/model.safetensors")
    model, _ = load_model(sharded)  # through ``latest``, consolidated on read in one process
    got = model.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0)


def test_export_consolidates_a_sharded_checkpoint_into_one_model_file(runs, tmp_path):
    full, sharded = runs
    export_checkpoint(ExportConfig(checkpoint=str(sharded), format="llmkit", out=str(tmp_path / "one")))
    expected = load_file(full / "checkpoints/step_00000012/model.safetensors")
    got = load_file(tmp_path / "one/model.safetensors")
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0)
    model, config = load_model(tmp_path / "one")
    assert config["model"]["bias"] is True and model.config == MODEL


def test_a_damaged_or_planted_shard_is_caught_by_the_manifest(runs, tmp_path):
    _, sharded = runs
    copy = tmp_path / "run"
    copy.mkdir()
    for path in sharded.rglob("*"):
        if path.is_file():
            (copy / path.relative_to(sharded)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(sharded)).write_bytes(path.read_bytes())
    newest = copy / "checkpoints/step_00000012"
    [shard, *_] = sorted((newest / SHARDS).iterdir())
    flip_a_byte(shard)
    with pytest.raises(InputError, match=f"^{shard}: sha256 differs from manifest.json"):
        verify_checkpoint(newest)
    assert resumable_checkpoint(copy).name == "step_00000008"  # the newest intact one
    planted = copy / "checkpoints/step_00000008" / SHARDS / "shard-00009-model-00001-of-00001.safetensors"
    planted.write_bytes(shard.read_bytes())
    with pytest.raises(InputError, match=f"^{planted}: not listed in manifest.json"):
        verify_checkpoint(planted.parent.parent)


class Planted:
    """Unpickling this creates ``marker``: proof that a file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_nothing_is_unpickled_when_a_sharded_checkpoint_loads(runs, tmp_path, monkeypatch):
    _, sharded = runs
    checkpoint = sharded / "checkpoints/step_00000012"
    marker = tmp_path / "unpickled"
    # What DCP's default reader would unpickle: its metadata file and a data file, beside the shards.
    for name in (".metadata", "__0_0.distcp"):
        (checkpoint / SHARDS / name).write_bytes(pickle.dumps(Planted(marker)))

    def refuse(*args, **kwargs):
        raise AssertionError("unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    try:
        model, _ = load_model(checkpoint)
    finally:
        for name in (".metadata", "__0_0.distcp"):
            (checkpoint / SHARDS / name).unlink()
    assert not marker.exists()
    # Resuming reads the optimizer state and hyperparameters too, and still unpickles nothing.
    resumed = run(sharded, model_config=MODEL, resume=True, checkpoint_format="sharded")
    assert resumed["steps"] == 12 and not marker.exists()


def test_a_shard_that_does_not_fit_the_model_is_one_line_naming_it(runs):
    _, sharded = runs
    source = sharded / "checkpoints/step_00000012" / SHARDS
    wrong = torch.empty(3, 3)
    with pytest.raises(MismatchError, match=r"'model.token_embedding.weight' has shape \[61, 16\] in the shards"):
        load_pieces(source, {"model.token_embedding.weight": Piece(wrong, (0, 0), wrong.shape)})
    with pytest.raises(MismatchError, match="no tensor 'model.nothing'"):
        load_pieces(source, {"model.nothing": Piece(wrong, (0, 0), wrong.shape)})
