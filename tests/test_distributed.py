"""2 CPU processes (gloo) under torchrun match 1 process with the same global batch, for DDP and FSDP2."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent


def launch(out: Path, parallelism: str, processes: int, grad_accum: int) -> None:
    environment = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    worker = [str(HERE / "distributed_worker.py"), str(out), parallelism, str(grad_accum)]
    if processes == 1:
        command = [sys.executable, *worker]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *worker]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and "exitcode: -6" in result.stderr:
        # gloo has been seen (about 1 run in 20 on a loaded 2-core machine) to abort a rank with
        # "terminate called without an active exception" while the process exits; one fresh try. A
        # deterministic abort fails again, and the results are compared all the same.
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def curve(out: Path) -> list[tuple[float, str]]:
    with open(out / "metrics.csv") as file:
        return [(float(row["loss"]), row["val_loss"]) for row in csv.DictReader(file) if row["loss"]]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    launch(out, "ddp", processes=1, grad_accum=2)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_processes_match_one(single, tmp_path, parallelism):
    launch(tmp_path, parallelism, processes=2, grad_accum=1)
    state = json.loads((tmp_path / "checkpoints/step_00000006/trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["config"]["parallelism"] == parallelism
    for (loss_one, val_one), (loss_two, val_two) in zip(curve(single), curve(tmp_path), strict=True):
        assert loss_two == pytest.approx(loss_one, rel=1e-4)
        assert (val_one == "") == (val_two == "") and (not val_one or float(val_two) == pytest.approx(float(val_one), rel=1e-4))
    one = load_file(single / "checkpoints/step_00000006/model.safetensors")
    two = load_file(tmp_path / "checkpoints/step_00000006/model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)
