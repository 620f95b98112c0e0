"""The seccomp filter every sandboxed program runs under: the kernel refuses the system calls that
would let code leave its process (Linux ``seccomp(2)``, classic BPF).

Namespaces (bubblewrap) already hide the host's network, processes and files; the filter closes what
namespaces leave open and also holds where bubblewrap is missing: no new processes or threads
(``clone``, ``fork``, ``execve``...), so nothing can outlive the wall-clock kill; no sockets; no signals
to other processes; no tracing or reading other processes' memory; no new namespaces; and none of the
kernel interfaces most often used in container escapes (``bpf``, ``userfaultfd``, ``io_uring``,
``perf_event_open``, keyrings). Refused calls fail with ``EPERM``, so Python raises ``PermissionError``.
"""

from __future__ import annotations

import platform
import struct

_LOAD_WORD = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JUMP_IF_EQUAL = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JUMP_IF_AT_LEAST = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_RETURN = 0x06  # BPF_RET | BPF_K
_KILL_PROCESS = 0x80000000
_ERRNO_EPERM = 0x00050000 | 1
_ALLOW = 0x7FFF0000
_NUMBER_OFFSET, _ARCH_OFFSET = 0, 4  # struct seccomp_data {int nr; __u32 arch; ...}
_X32_BIT = 0x40000000  # x32 ABI calls on x86-64 carry this bit: refuse them all

# (AUDIT_ARCH_*, {name: number}) per machine; the numbers are the kernel's unistd tables.
_TABLES = {
    "x86_64": (
        0xC000003E,
        {
            "clone": 56,
            "fork": 57,
            "vfork": 58,
            "execve": 59,
            "execveat": 322,
            "clone3": 435,
            "socket": 41,
            "socketpair": 53,
            "kill": 62,
            "tkill": 200,
            "tgkill": 234,
            "ptrace": 101,
            "process_vm_readv": 310,
            "process_vm_writev": 311,
            "unshare": 272,
            "setns": 308,
            "bpf": 321,
            "userfaultfd": 323,
            "io_uring_setup": 425,
            "perf_event_open": 298,
            "keyctl": 250,
            "add_key": 248,
            "request_key": 249,
        },
    ),
    "aarch64": (
        0xC00000B7,
        {
            "clone": 220,
            "execve": 221,
            "execveat": 281,
            "clone3": 435,
            "socket": 198,
            "socketpair": 199,
            "kill": 129,
            "tkill": 130,
            "tgkill": 131,
            "ptrace": 117,
            "process_vm_readv": 270,
            "process_vm_writev": 271,
            "unshare": 97,
            "setns": 268,
            "bpf": 280,
            "userfaultfd": 282,
            "io_uring_setup": 425,
            "perf_event_open": 241,
            "keyctl": 219,
            "add_key": 217,
            "request_key": 218,
        },
    ),
}


def refused_calls(machine: str | None = None) -> dict[str, int]:
    """The system calls the filter refuses on ``machine`` (default: this one), by name."""
    return dict(_table(machine)[1])


def filter_program(machine: str | None = None) -> bytes:
    """The filter as ``struct sock_filter`` instructions, ready for ``prctl(PR_SET_SECCOMP)``."""
    arch, calls = _table(machine)
    numbers = sorted(set(calls.values()))
    # Layout: check arch, load nr, [x32 check], one test per refused call, ALLOW, EPERM, KILL.
    x32 = machine_name(machine) == "x86_64"
    tests = len(numbers) + x32
    program = [
        _instruction(_LOAD_WORD, 0, 0, _ARCH_OFFSET),
        _instruction(_JUMP_IF_EQUAL, 0, tests + 3, arch),  # another ABI: kill
        _instruction(_LOAD_WORD, 0, 0, _NUMBER_OFFSET),
    ]
    if x32:
        program.append(_instruction(_JUMP_IF_AT_LEAST, tests + 1, 0, _X32_BIT))
    for position, number in enumerate(numbers):
        remaining = len(numbers) - position - 1
        program.append(_instruction(_JUMP_IF_EQUAL, remaining + 1, 0, number))
    program += [
        _instruction(_RETURN, 0, 0, _ALLOW),
        _instruction(_RETURN, 0, 0, _ERRNO_EPERM),
        _instruction(_RETURN, 0, 0, _KILL_PROCESS),
    ]
    return b"".join(program)


def machine_name(machine: str | None = None) -> str:
    return machine or platform.machine()


def _table(machine: str | None) -> tuple[int, dict[str, int]]:
    name = machine_name(machine)
    if name not in _TABLES:
        raise OSError(
            f"the sandbox's seccomp filter knows no system-call table for the machine '{name}' "
            f"(known: {', '.join(_TABLES)})"
        )
    return _TABLES[name]


def _instruction(code: int, jump_true: int, jump_false: int, value: int) -> bytes:
    return struct.pack("=HBBI", code, jump_true, jump_false, value)
