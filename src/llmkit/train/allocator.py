"""Keep freed CPU memory in the process for the next step's tensors (glibc's malloc, Linux).

glibc hands every allocation above its mmap threshold (128 KiB at first, raised as blocks are freed, up to
32 MiB) its own fresh pages, and gives them back to the system when the tensor is freed. A training step on the
CPU allocates the same large tensors every time: SmolLM2's output-head logits for a few hundred positions
(49,152 floats each, 120 MiB), the cast weights of bfloat16 autocast, the gradients of the backward pass. Each
such tensor is then faulted in page by page and zeroed by the kernel before PyTorch writes it: a log-softmax
over 635 x 49,152 float32 logits took 43 ms into fresh memory and 13-15 ms into memory already held, and
SmolLM2's bfloat16 autocast fine-tuning step spent 15 % of its time in copies and fills of fresh tensors.

:func:`keep_freed_memory` makes malloc serve every size from its heap (``M_MMAP_MAX`` 0) and keep up to 2 GiB of
freed memory at the heap's top (``M_TRIM_THRESHOLD``). The heap grows over the first few steps (a freed block
between small live ones does not fit an aligned request of the same size at first: a few times the largest tensor
in tests/test_allocator.py), then a step's tensors take pages the process already holds. It is process-wide and
stays on: the process's resident memory then stays near its peak until it ends
(the ``train.keep_freed_memory`` option turns it off). The same settings can be given to any process, llmkit or
not, as environment variables: ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``.
"""

from __future__ import annotations

import ctypes
import functools
import platform

__all__ = ["keep_freed_memory"]

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
KEPT_BYTES = 2**31 - 1  # the largest value mallopt takes (an int)


@functools.cache
def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and keep freed memory for reuse (see the module docstring); True
    where it applied (Linux with glibc), False elsewhere, where nothing changes. Once per process."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEPT_BYTES))
