"""Run untrusted Python (a model's tool call, a HumanEval completion) in a separate, limited process.

Each call starts a fresh interpreter (``python -I -S -B``: no environment variables,
no site-packages, no user site, no bytecode writes; the standard library stays
importable) in a new process group, with a fresh temporary directory as its working
directory and ``TMPDIR``, the program's stdin fed from ``stdin`` and then closed.

Two layers keep it contained:

- **Operating-system limits** (the hard part), set in the child before the program
  runs: ``RLIMIT_CPU`` (CPU seconds), ``RLIMIT_AS`` (address space, so a memory bomb
  gets a ``MemoryError`` instead of swapping the machine), ``RLIMIT_FSIZE`` (size of
  any file written) and ``RLIMIT_NPROC`` = 0 (no new processes or threads; the kernel
  does not enforce it for root). The parent enforces a wall-clock deadline and an
  output cap, and on either kills the whole process group.
- **An audit hook** (PEP 578), installed in the child before the program's first
  line, that ends the program on socket use (any ``socket.*`` event), process
  creation (``subprocess``, ``os.system``, ``exec*``, ``spawn*``, ``fork``), signals to
  other processes, foreign calls through ``ctypes``, and any write, creation,
  removal or rename of a path outside the temporary directory.

The audit hook is a guard against accidents and weak models, *not* a security
boundary: audit hooks are documented as unsuitable for sandboxing (code can reach
the interpreter's internals, use ``dir_fd``-relative opens, and so on). Code from a
determined attacker needs a container or VM; the OS limits above are what hold in
any case.

Statuses: ``ok``; ``error`` (non-zero exit; the traceback is in ``stderr``, with the
sandbox's own frames removed); ``timeout`` (wall clock or CPU limit); ``memory_limit``
(an uncaught ``MemoryError``, or a kill by the kernel's out-of-memory killer);
``output_limit`` (stdout or stderr passed ``max_output_bytes``; what came before is
kept); ``forbidden`` (the audit hook refused an operation; ``stderr`` names it).
"""

from __future__ import annotations

import math
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from llmkit.config import check

# Files the program writes inside its directory; larger writes fail with OSError (EFBIG)
# because Python ignores SIGXFSZ.
_MAX_FILE_BYTES = 64 << 20

# The child's bootstrap, run with ``-c``; argv: CPU seconds, address-space bytes, file bytes, status fd.
# It reports "forbidden" / "memory_limit" on the status pipe (not by exit code, so a program that
# calls sys.exit(n) is never mistaken for the sandbox's own verdict).
_CHILD = r"""
import os, resource, sys, traceback

cpu_seconds, memory_bytes, file_bytes, status_fd = map(int, sys.argv[1:5])
workdir = os.path.realpath(os.getcwd())
with open("program.py", encoding="utf-8") as file:
    source = file.read()


def limit(name, soft, hard):
    kind = getattr(resource, name, None)
    if kind is None:
        return
    _, current_hard = resource.getrlimit(kind)
    if current_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    resource.setrlimit(kind, (soft, hard))


limit("RLIMIT_CPU", cpu_seconds, cpu_seconds + 1)
limit("RLIMIT_AS", memory_bytes, memory_bytes)
limit("RLIMIT_FSIZE", file_bytes, file_bytes)
limit("RLIMIT_NPROC", 0, 0)

PROCESS_EVENTS = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                  "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill"}
PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
               "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
               "os.mkfifo": (0,), "os.mknod": (0,), "shutil.rmtree": (0,)}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def inside(path):
    if isinstance(path, int):  # an already open file descriptor
        return True
    real = os.path.realpath(os.fsdecode(path))
    return real in (workdir, os.devnull) or real.startswith(workdir + os.sep)


def refused(event, args):
    if event.startswith("socket.") or event in PROCESS_EVENTS:
        return True
    if event.startswith("ctypes."):
        return not (event == "ctypes.dlopen" and args[0] is None)  # importing ctypes opens the main program
    if event == "open":
        path, _, flags = args
        return bool(flags & WRITE_FLAGS) and not inside(path)
    return event in PATH_EVENTS and not all(inside(args[index]) for index in PATH_EVENTS[event])


def report(status):
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(status_fd, status.encode())


def hook(event, args):
    if refused(event, args):
        described = repr(args)
        described = described if len(described) <= 200 else described[:200] + "...)"
        report("forbidden")
        os.write(2, f"SandboxViolation: {event}{described} is not allowed in the sandbox\n".encode())
        os._exit(1)


def show(error):
    traceback.print_exception(type(error), error, error.__traceback__.tb_next)


namespace = {"__name__": "__main__", "__builtins__": __builtins__}
sys.argv = ["program.py"]
sys.addaudithook(hook)
try:
    exec(compile(source, "program.py", "exec"), namespace)
except SystemExit:
    raise
except MemoryError as error:
    namespace.clear()  # free the program's data so the traceback can be printed
    report("memory_limit")
    show(error)
    sys.exit(1)
except BaseException as error:
    show(error)
    sys.exit(1)
"""


@dataclass
class SandboxResult:
    status: str  # "ok" | "error" | "timeout" | "memory_limit" | "output_limit" | "forbidden"
    stdout: str
    stderr: str
    returncode: int | None  # None when the sandbox killed the process
    seconds: float


def run_python(code: str, timeout_s: float = 5, memory_mb: int = 512, max_output_bytes: int = 65536, stdin: str = "") -> SandboxResult:
    """Run ``code`` as a program in a fresh, limited interpreter and classify how it ended."""
    check(timeout_s > 0, "timeout_s", timeout_s, "must be positive")
    check(memory_mb > 0, "memory_mb", memory_mb, "must be positive")
    check(max_output_bytes > 0, "max_output_bytes", max_output_bytes, "must be positive")
    with tempfile.TemporaryDirectory(prefix="llmkit-sandbox-", ignore_cleanup_errors=True) as workdir:
        Path(workdir, "program.py").write_text(code, encoding="utf-8")
        status_read, status_write = os.pipe()
        started = time.monotonic()
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", "-X", "utf8", "-c", _CHILD,
                 str(math.ceil(timeout_s)), str(int(memory_mb * (1 << 20))), str(_MAX_FILE_BYTES), str(status_write)],
                cwd=workdir,
                env={"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir},
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(status_write,),
                start_new_session=True,  # its own process group, so a kill reaches anything it started
            )
        except BaseException:
            os.close(status_read)
            raise
        finally:
            os.close(status_write)
        with process:
            killed_for, stdout, stderr = _communicate(process, stdin.encode("utf-8"), started + timeout_s, max_output_bytes)
            if killed_for is not None:
                _kill_group(process)
            returncode = process.wait()
        seconds = time.monotonic() - started
        reported = _read_status(status_read)
    status = reported or killed_for or _status_from_exit(returncode)
    return SandboxResult(
        status=status,
        stdout=stdout[:max_output_bytes].decode("utf-8", errors="replace"),
        stderr=stderr[:max_output_bytes].decode("utf-8", errors="replace"),
        returncode=None if killed_for is not None else returncode,
        seconds=seconds,
    )


def _status_from_exit(returncode: int) -> str:
    if returncode == 0:
        return "ok"
    if returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == -signal.SIGKILL:
        return "memory_limit"  # not sent by us (that path is classified earlier): the kernel's OOM killer
    return "error"


def _read_status(status_read: int) -> str:
    # Non-blocking: a descendant that escaped the limits could hold the write end open forever.
    os.set_blocking(status_read, False)
    try:
        return os.read(status_read, 64).decode()
    except BlockingIOError:
        return ""
    finally:
        os.close(status_read)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _communicate(process: subprocess.Popen, stdin: bytes, deadline: float, max_output_bytes: int) -> tuple[str | None, bytes, bytes]:
    """Feed stdin and collect stdout/stderr until the process closes them, passes the deadline
    (-> "timeout") or writes more than ``max_output_bytes`` to either (-> "output_limit")."""
    outputs = {process.stdout: bytearray(), process.stderr: bytearray()}
    pending = memoryview(stdin)
    with selectors.DefaultSelector() as selector:
        for stream in outputs:
            selector.register(stream, selectors.EVENT_READ)
        if pending:
            os.set_blocking(process.stdin.fileno(), False)
            selector.register(process.stdin, selectors.EVENT_WRITE)
        else:
            process.stdin.close()
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout", bytes(outputs[process.stdout]), bytes(outputs[process.stderr])
            for key, _ in selector.select(remaining):
                if key.fileobj is process.stdin:
                    try:
                        pending = pending[os.write(key.fd, pending):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # the program stopped reading; the rest of stdin is moot
                        pending = pending[:0]
                    if not pending:
                        selector.unregister(process.stdin)
                        process.stdin.close()
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                outputs[key.fileobj] += chunk
                if len(outputs[key.fileobj]) > max_output_bytes:
                    return "output_limit", bytes(outputs[process.stdout]), bytes(outputs[process.stderr])
    try:
        process.wait(max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:  # it closed its output but kept running
        return "timeout", bytes(outputs[process.stdout]), bytes(outputs[process.stderr])
    return None, bytes(outputs[process.stdout]), bytes(outputs[process.stderr])
