"""Run code a model wrote: isolated, limited, and judged only by what it cannot forge.

Three layers, each holding on its own (details in the modules):

- **isolation** (:mod:`~llmkit.sandbox.isolation`): bubblewrap namespaces (no network, no host
  processes, no host files but the Python installation, read-only; a 64 MiB private tmpfs as working
  directory); without bubblewrap code runs only if the user accepts unisolated runs;
- **the kernel's refusals** (:mod:`~llmkit.sandbox.seccomp`): no processes, threads, sockets or
  signals, through a seccomp filter; resource limits on CPU time, address space, file size, open
  files, core dumps;
- **the parent's verdict**: the wall clock, the output cap and the exit status are read by the parent;
  nothing the program prints or writes changes them, and a kill at the deadline ends every process
  of the run.

:func:`run_python` runs one program. :func:`run_checked` runs a candidate (untrusted) and its
checker (trusted test code) in two sandboxes joined by a pipe: the checker calls the candidate's entry
point, receives plain data back, and its own exit status and output are the verdict, which the
candidate has no way to write (HumanEval, the function tasks and the RL rewards built on them).

Statuses: ``ok`` (exit 0 in time); ``error`` (non-zero exit; the traceback is in ``stderr``, with
the sandbox's own frames removed; a refused system call appears as ``PermissionError``); ``timeout``
(wall clock or CPU limit); ``memory_limit`` (an uncaught ``MemoryError`` or a kill by the kernel's
out-of-memory killer); ``output_limit`` (stdout or stderr passed ``max_output_bytes``).
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass

from llmkit.config import check
from llmkit.sandbox.isolation import SandboxUnavailable, allow_unisolated, isolated
from llmkit.sandbox.process import Limits, Sandbox, SandboxResult

__all__ = [
    "CheckedResult",
    "SandboxResult",
    "SandboxUnavailable",
    "allow_unisolated",
    "isolated",
    "run_checked",
    "run_python",
]


@dataclass
class CheckedResult:
    checker: SandboxResult  # its status and stdout are the verdict
    candidate: SandboxResult  # for diagnostics only: it can print anything


def run_python(
    code: str, timeout_s: float = 5, memory_mb: int = 512, max_output_bytes: int = 65536, stdin: str = ""
) -> SandboxResult:
    """Run ``code`` as a program in a fresh, isolated, limited interpreter and classify how it ended."""
    limits = _limits(timeout_s, memory_mb, max_output_bytes)
    with ExitStack() as stack:
        sandbox = Sandbox(code, limits)
        sandbox.start(stack)
        return sandbox.finish(stdin, sandbox.started + timeout_s)


def run_checked(
    candidate: str,
    checker: str,
    entry_point: str,
    module: str = "",
    call_timeout_s: float | None = None,
    timeout_s: float = 5,
    memory_mb: int = 512,
    max_output_bytes: int = 65536,
) -> CheckedResult:
    """Run ``checker`` with ``__candidate__`` calling ``entry_point`` of ``candidate`` in another sandbox.

    ``candidate`` is defined at the top level of its own ``__main__`` or, with ``module``, in a copy of
    that module's namespace. Each call sends its arguments and gets back the result as plain data
    (``marshal``): a call that raises, prints, returns anything else, or takes longer than
    ``call_timeout_s`` raises ``__CandidateError__`` in the checker; after a death or a time-out every
    further call does too. The candidate is killed when the checker ends or at the deadline.
    """
    limits = _limits(timeout_s, memory_mb, max_output_bytes)
    with ExitStack() as stack:
        (calls_read, calls_write), (replies_read, replies_write) = os.pipe(), os.pipe()
        try:
            served = Sandbox(
                candidate, limits, "serve", (module, calls_read, replies_write), (calls_read, replies_write)
            )
            checking = Sandbox(
                checker,
                limits,
                "check",
                (entry_point, calls_write, replies_read, "none" if call_timeout_s is None else call_timeout_s),
                (calls_write, replies_read),
            )
            served.start(stack)
            checking.start(stack)
        finally:
            for fd in (calls_read, calls_write, replies_read, replies_write):
                os.close(fd)  # only the sandboxes hold the pipes now: one side's death is the other's end of file
        deadline = time.monotonic() + timeout_s
        candidate_result: list[SandboxResult] = []
        collector = threading.Thread(target=lambda: candidate_result.append(served.finish("", deadline)), daemon=True)
        collector.start()
        verdict = checking.finish("", deadline)
        served.stop()
        collector.join()
        return CheckedResult(verdict, candidate_result[0])


def _limits(timeout_s: float, memory_mb: int, max_output_bytes: int) -> Limits:
    check(timeout_s > 0, "timeout_s", timeout_s, "must be positive")
    check(memory_mb > 0, "memory_mb", memory_mb, "must be positive")
    check(max_output_bytes > 0, "max_output_bytes", max_output_bytes, "must be positive")
    return Limits(timeout_s, memory_mb, max_output_bytes)
