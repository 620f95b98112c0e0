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

# Run in a child process: the setting is process-wide and would stay on in the test worker. Each "step" allocates a
# 64 MiB and a 16 MiB tensor (as a step's logits and gradients) and frees them.
STEPS = """
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
mapped, heaps = [], []
for step in range(16):
    logits, gradients = torch.ones(2**24), torch.ones(2**22)
    mapped.append(mallinfo2().hblkhd - before.hblkhd)
    del logits, gradients
    heaps.append(mallinfo2().arena)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
block = libc.malloc(2**26)  # at the heap's top, nothing allocated after it
held = mallinfo2().arena
libc.free(block)
print(json.dumps({
    "applied": applied,
    "top_returned": held - mallinfo2().arena,
    "mapped_apart": mapped,
    "kept_after_free": mallinfo2().fordblks - before.fordblks,
    "heap_growth": [after - before for before, after in zip(heaps, heaps[1:])],
}))
"""


def run_steps(mode: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(result.stdout)


@pytest.mark.skipif(not GLIBC_WITH_MALLINFO2, reason="needs Linux with glibc 2.33+ (mallinfo2)")
def test_freed_large_tensors_stay_in_the_heap_and_later_steps_reuse_them():
    mebibytes = 2**20
    default = run_steps("default")
    # glibc's default: the 64 MiB tensor (above its largest mmap threshold, 32 MiB) gets pages of its own every step
    assert all(mapped >= 64 * mebibytes for mapped in default["mapped_apart"])
    kept = run_steps("keep")
    assert kept["applied"] is True
    assert kept["mapped_apart"] == [0] * 16  # from the heap
    assert kept["kept_after_free"] >= 80 * mebibytes  # still the process's after the tensors are gone
    # the heap grows over the first steps (freed blocks between small live ones do not fit an aligned request of
    # the same size at first), then the steps run in memory the process already holds
    assert kept["heap_growth"][-8:] == [0] * 8
    assert kept["top_returned"] == 0  # a freed block at the top is not trimmed away either


@pytest.mark.parametrize("keep", [True, False])
def test_the_trainer_keeps_freed_memory_on_the_cpu_unless_told_not_to(tmp_path, monkeypatch, keep):
    calls = []
    monkeypatch.setattr(trainer_module, "keep_freed_memory", lambda: calls.append(True))
    config = TrainConfig(out=str(tmp_path), batch_size=2, max_steps=1, device="cpu", progress=False)
    config.keep_freed_memory = keep
    trainer_module.Trainer(Transformer(tiny_config()), SyntheticBatches(), config)
    assert calls == ([True] if keep else [])
