"""Freed CPU memory kept for the next step (llmkit.train.allocator), checked against glibc's own accounting."""

import ctypes
import json
import platform
import subprocess
import sys

import pytest
from helpers import SyntheticBatches, tiny_config

from llmkit.model import Transformer
from llmkit.train import trainer as trainer_module
from llmkit.train.config import TrainConfig

GLIBC_WITH_MALLINFO2 = platform.libc_ver()[0] == "glibc" and hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")

# Run in a child process: the setting is process-wide and would stay on in the test worker.
ALLOCATE_TWICE = """
import ctypes, json, sys
import torch
from llmkit.train.allocator import keep_freed_memory

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = Info
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
before = mallinfo2()
first = torch.ones(2**24)  # 64 MiB, as a step's logits
during = mallinfo2()
del first
freed = mallinfo2()
second = torch.ones(2**24)
again = mallinfo2()
print(json.dumps({
    "applied": applied,
    "mapped_apart": during.hblkhd - before.hblkhd,
    "kept_after_free": freed.fordblks - before.fordblks,
    "heap_growth_on_second": again.arena - freed.arena,
}))
"""


def allocate_twice(mode: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", ALLOCATE_TWICE, mode], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(result.stdout)


@pytest.mark.skipif(not GLIBC_WITH_MALLINFO2, reason="needs Linux with glibc 2.33+ (mallinfo2)")
def test_a_freed_large_tensor_stays_in_the_heap_and_the_next_one_reuses_it():
    mebibytes = 2**20
    default = allocate_twice("default")
    # glibc's default: a 64 MiB block gets pages of its own, returned to the system when freed
    assert default["mapped_apart"] >= 64 * mebibytes and default["kept_after_free"] < mebibytes
    kept = allocate_twice("keep")
    assert kept["applied"] is True
    assert kept["mapped_apart"] == 0  # from the heap
    assert kept["kept_after_free"] >= 64 * mebibytes  # still the process's after the tensor is gone
    assert kept["heap_growth_on_second"] == 0  # the second tensor took the first one's pages


@pytest.mark.parametrize("keep", [True, False])
def test_the_trainer_keeps_freed_memory_on_the_cpu_unless_told_not_to(tmp_path, monkeypatch, keep):
    calls = []
    monkeypatch.setattr(trainer_module, "keep_freed_memory", lambda: calls.append(True))
    config = TrainConfig(out=str(tmp_path), batch_size=2, max_steps=1, device="cpu", progress=False)
    config.keep_freed_memory = keep
    trainer_module.Trainer(Transformer(tiny_config()), SyntheticBatches(), config)
    assert calls == ([True] if keep else [])
