"""The first code of every sandboxed process, run as ``python -I -S -B -c <this file's text>``.

It imports nothing from llmkit (site-packages are off): it sets the resource limits, installs the
seccomp filter, reads the program from an inherited file descriptor and runs it as ``__main__``.
Nothing here is a secret or a verdict: the parent judges a run only by what the kernel reports
(exit status, signals) and by its own clock and byte counts, so a program that rewrites this code
through its frames gains nothing.

argv: ``mode limits filter program_fd [channel fds]`` where ``limits`` is JSON ``{RLIMIT_*: value}``,
``filter`` the seccomp program in hex, and ``mode`` one of

- ``run``: run the program;
- ``serve``: the candidate side of a checked run: define the program (optionally inside a copy of a
  module's namespace), answer ``ready``, then answer calls of its entry point, frame by frame;
- ``check``: the checker side: run the program with ``__candidate__`` bound to a proxy that calls the
  candidate in the other process and ``__CandidateError__`` to what the proxy raises when it fails.

Frames are a 4-byte length and a ``marshal`` payload, which holds plain data only (numbers, strings,
bytes, lists, tuples, dicts, sets, None): a candidate cannot hand back an object whose ``__eq__`` lies.
"""

import builtins
import contextlib
import ctypes
import importlib
import io
import json
import linecache
import marshal
import os
import resource
import select
import struct
import sys
import time
import traceback
import types

MAX_FRAME_BYTES = 1 << 24


def limit_resources(limits):
    for name, value in limits.items():
        kind = getattr(resource, name)
        _, hard = resource.getrlimit(kind)
        soft = value if hard == resource.RLIM_INFINITY else min(value, hard)
        # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL one second later if it is caught.
        ceiling = soft + 1 if name == "RLIMIT_CPU" else soft
        resource.setrlimit(kind, (soft, ceiling if hard == resource.RLIM_INFINITY else min(ceiling, hard)))


class _FilterProgram(ctypes.Structure):
    _fields_ = [("length", ctypes.c_ushort), ("instructions", ctypes.c_void_p)]


def install_filter(program):
    libc = ctypes.CDLL(None, use_errno=True)
    instructions = ctypes.create_string_buffer(program, len(program))
    header = _FilterProgram(len(program) // 8, ctypes.addressof(instructions))
    # PR_SET_NO_NEW_PRIVS (38) first: the kernel allows an unprivileged filter only then.
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(header), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "the sandbox could not install its seccomp filter")


def read_all(fd):
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode("utf-8")


def main_module(source):
    module = types.ModuleType("__main__")
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    sys.argv = ["program.py"]
    linecache.cache["program.py"] = (len(source), None, source.splitlines(True), "program.py")
    return module.__dict__


def execute(source, namespace):
    """Run ``source``; an uncaught exception prints the program's frames only and exits 1."""
    try:
        exec(compile(source, "program.py", "exec"), namespace)
    except SystemExit:
        raise
    except MemoryError as error:
        namespace.clear()  # free the program's data so the traceback can be printed
        show(error)
        sys.exit(1)
    except BaseException as error:
        show(error)
        sys.exit(1)


def show(error):
    traceback.print_exception(type(error), error, error.__traceback__.tb_next)
    sys.stderr.flush()


def send(fd, message):
    payload = marshal.dumps(message)
    data = struct.pack("<I", len(payload)) + payload
    while data:
        data = data[os.write(fd, data) :]


def receive(fd, seconds=None):
    """One frame, or None when the other side closed, died or took longer than ``seconds``."""
    deadline = None if seconds is None else time.monotonic() + seconds
    header = read_exactly(fd, 4, deadline)
    if header is None:
        return None
    (size,) = struct.unpack("<I", header)
    payload = read_exactly(fd, size, deadline) if size <= MAX_FRAME_BYTES else None
    return None if payload is None else marshal.loads(payload)


def read_exactly(fd, size, deadline):
    data = b""
    while len(data) < size:
        wait = None if deadline is None else max(deadline - time.monotonic(), 0)
        if not select.select([fd], [], [], wait)[0]:
            return None
        chunk = os.read(fd, size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def serve(source, module_name, calls_fd, replies_fd):
    namespace = dict(vars(importlib.import_module(module_name))) if module_name else main_module(source)
    try:
        exec(compile(source, "program.py", "exec"), namespace)
    except BaseException as error:  # the candidate's top level may raise anything, SystemExit included
        send(replies_fd, ("raised", type(error).__name__, str(error)[:300]))
        return
    send(replies_fd, ("ready",))
    while (call := receive(calls_fd)) is not None:
        send(replies_fd, answer(namespace, *call))


def answer(namespace, name, arguments, keywords):
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            result = namespace[name](*arguments, **keywords)
    except BaseException as error:  # SystemExit inside a call is the call's failure, not the process's end
        return ("raised", type(error).__name__, str(error)[:300])
    try:
        marshal.dumps(result)
    except ValueError:
        return ("raised", "TypeError", f"the result is a {type(result).__name__}, not plain data")
    return ("returned", result, bool(printed.getvalue()))


class CandidateError(Exception):
    """The candidate raised, printed, died, answered out of protocol or ran out of time."""


class Candidate:
    """Calls the entry point in the candidate's process; once it fails, every later call fails at once."""

    def __init__(self, entry_point, calls_fd, replies_fd, call_seconds):
        self.entry_point, self.calls_fd, self.replies_fd, self.call_seconds = (
            entry_point,
            calls_fd,
            replies_fd,
            call_seconds,
        )
        self.failure = None
        self.ready = False

    def __call__(self, *arguments, **keywords):
        if not self.ready:
            self.ready = True
            self.expect(None, "ready")
        send(self.calls_fd, (self.entry_point, arguments, keywords))
        return self.expect(self.call_seconds, "returned")[1]

    def expect(self, seconds, kind):
        if self.failure is not None:
            raise CandidateError(self.failure)
        reply = receive(self.replies_fd, seconds)
        shape = (reply[0], len(reply)) if isinstance(reply, tuple) and reply else None
        if reply is None:
            self.failure = "the candidate died or ran out of time"
        elif shape == ("raised", 3):
            if kind == "ready":  # its definition failed: every call fails
                self.failure = f"{reply[1]}: {reply[2]}"
            raise CandidateError(f"{reply[1]}: {reply[2]}")
        elif shape != (kind, 3 if kind == "returned" else 1):
            self.failure = "the candidate broke the protocol"
        elif kind == "returned" and reply[2]:
            raise CandidateError("the candidate printed")
        else:
            return reply
        raise CandidateError(self.failure)


def check(source, entry_point, calls_fd, replies_fd, call_seconds):
    namespace = main_module(source)
    namespace["__candidate__"] = Candidate(entry_point, calls_fd, replies_fd, call_seconds)
    namespace["__CandidateError__"] = CandidateError
    execute(source, namespace)


def main():
    mode, limits, program, source_fd, *channel = sys.argv[1:]
    limit_resources(json.loads(limits))
    install_filter(bytes.fromhex(program))
    source = read_all(int(source_fd))
    if mode == "run":
        execute(source, main_module(source))
    elif mode == "serve":
        module_name, calls_fd, replies_fd = channel
        serve(source, module_name, int(calls_fd), int(replies_fd))
    else:
        entry_point, calls_fd, replies_fd, call_seconds = channel
        check(
            source, entry_point, int(calls_fd), int(replies_fd), float(call_seconds) if call_seconds != "none" else None
        )


main()
