"""Start a sandboxed interpreter, feed it, collect its output under a deadline and an output cap, and
classify how it ended from what only the parent and the kernel know."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from llmkit.sandbox import isolation, seccomp

_CHILD = Path(__file__).with_name("child.py").read_text(encoding="utf-8")
# Every file, and all files together, in the working directory (tmpfs size / RLIMIT_FSIZE).
WORKDIR_BYTES = 64 << 20
OPEN_FILES = 64  # RLIMIT_NOFILE: the program's own files, the interpreter's and the channel's


@dataclass
class SandboxResult:
    status: str  # "ok" | "error" | "timeout" | "memory_limit" | "output_limit"
    stdout: str
    stderr: str
    returncode: int | None  # None when the sandbox killed the process
    seconds: float


@dataclass
class Limits:
    timeout_s: float
    memory_mb: int
    max_output_bytes: int

    def rlimits(self) -> dict[str, int]:
        return {
            "RLIMIT_CPU": max(1, int(-(-self.timeout_s // 1))),
            "RLIMIT_AS": int(self.memory_mb * (1 << 20)),
            "RLIMIT_FSIZE": WORKDIR_BYTES,
            "RLIMIT_NOFILE": OPEN_FILES,
            "RLIMIT_CORE": 0,
        }


class Sandbox:
    """One sandboxed interpreter: started by :meth:`start`, finished by :meth:`finish` (or killed)."""

    def __init__(self, source: str, limits: Limits, mode: str = "run", channel: tuple = (), channel_fds: tuple = ()):
        self.source, self.limits, self.mode, self.channel, self.channel_fds = source, limits, mode, channel, channel_fds
        self.process: subprocess.Popen | None = None
        self.started = 0.0

    def start(self, stack: ExitStack) -> None:
        isolated = isolation.isolated()
        source_fd = stack.enter_context(_memory_file(self.source))
        arguments = [
            isolation.python(),
            "-I",
            "-S",
            "-B",
            "-X",
            "utf8",
            "-c",
            _CHILD,
            self.mode,
            json.dumps(self.limits.rlimits()),
            seccomp.filter_program().hex(),
            str(source_fd),
            *map(str, self.channel),
        ]
        workdir = (
            isolation.WORKDIR
            if isolated
            else stack.enter_context(tempfile.TemporaryDirectory(prefix="llmkit-sandbox-", ignore_cleanup_errors=True))
        )
        command = isolation.bubblewrap_command(WORKDIR_BYTES) + arguments if isolated else arguments
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            command,
            cwd=None if isolated else workdir,
            env={"HOME": workdir, "TMPDIR": workdir, "PATH": os.defpath},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(source_fd, *self.channel_fds),
            start_new_session=True,
        )  # its own process group: a kill reaches bwrap and, through it, the namespace
        stack.callback(self.kill)

    def finish(self, stdin: str, deadline: float) -> SandboxResult:
        killed_for, stdout, stderr = _communicate(
            self.process, stdin.encode("utf-8"), deadline, self.limits.max_output_bytes
        )
        if killed_for is not None:
            self.stop()
            _wait_for_end_of_file(self.process, time.monotonic() + 5)
        returncode = self.process.wait()
        status = killed_for or _status_from_exit(returncode, stderr)
        cap = self.limits.max_output_bytes
        return SandboxResult(
            status=status,
            stdout=stdout[:cap].decode("utf-8", errors="replace"),
            stderr=stderr[:cap].decode("utf-8", errors="replace"),
            returncode=None if killed_for is not None else returncode,
            seconds=time.monotonic() - self.started,
        )

    def stop(self) -> None:
        """Kill the whole run (bwrap and, through its PID namespace, everything inside)."""
        if self.process.returncode is None:  # once reaped, its process group id may belong to someone else
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """Stop it and release its pipes."""
        self.stop()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            stream.close()
        self.process.wait()


@contextmanager
def _memory_file(text: str):
    """The program's source in an anonymous in-memory file the child reads through its descriptor."""
    fd = os.memfd_create("program.py")  # close-on-exec: only pass_fds hands it on
    try:
        os.write(fd, text.encode("utf-8"))
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)


def _wait_for_end_of_file(process: subprocess.Popen, deadline: float) -> None:
    """Drain stdout and stderr until every process holding them is gone: the kill of bwrap reaches the
    processes inside only as its PID namespace is torn down, a moment later."""
    streams = [process.stdout, process.stderr]
    while streams and (remaining := deadline - time.monotonic()) > 0:
        for stream in selectors_ready(streams, remaining):
            if not os.read(stream.fileno(), 1 << 16):
                streams.remove(stream)


def selectors_ready(streams: list, seconds: float) -> list:
    with selectors.DefaultSelector() as selector:
        for stream in streams:
            selector.register(stream, selectors.EVENT_READ)
        return [key.fileobj for key, _ in selector.select(seconds)]


def _status_from_exit(returncode: int, stderr: bytes) -> str:
    # bwrap reports a child killed by signal N as exit status 128 + N.
    signalled = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    if returncode == 0:
        return "ok"
    if signalled == signal.SIGXCPU:
        return "timeout"
    if signalled == signal.SIGKILL:
        return "memory_limit"  # not sent by us (that path is classified earlier): the kernel's OOM killer
    last_line = stderr.strip().rsplit(b"\n", 1)[-1]
    return "memory_limit" if last_line.startswith(b"MemoryError") else "error"


def _communicate(
    process: subprocess.Popen, stdin: bytes, deadline: float, max_output_bytes: int
) -> tuple[str | None, bytes, bytes]:
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
                        pending = pending[os.write(key.fd, pending) :]
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
