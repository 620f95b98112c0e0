"""Where a sandboxed program runs: inside bubblewrap's namespaces, or, only when the user says so,
unisolated.

Under bubblewrap (Debian package ``bubblewrap``) the program gets new user, PID, network, IPC, UTS and
cgroup namespaces: it runs as ``nobody`` with no capabilities, sees no host process, has only a
loopback network of its own, and its filesystem holds only the Python installation and the system
libraries (read-only), a minimal ``/dev`` and a size-capped private tmpfs as its working directory.
``--die-with-parent`` and the PID namespace end every process it has when the run is killed.

Without bubblewrap, code execution refuses with a one-line error naming the package, unless the user
accepts unisolated runs (``--allow-unisolated-code`` or ``LLMKIT_ALLOW_UNISOLATED_CODE=1``): then the
program still gets the resource limits and the seccomp filter (no processes, sockets or signals) but
can read every file the user can and write wherever the user can; a warning says so on every run.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys

from llmkit.errors import LlmkitError

ALLOW_UNISOLATED = "LLMKIT_ALLOW_UNISOLATED_CODE"
WORKDIR = "/sandbox"
NOBODY = "65534"


class SandboxUnavailable(LlmkitError):
    """Code must run, bubblewrap cannot isolate it, and the user has not accepted unisolated runs."""


def allow_unisolated() -> None:
    """Accept unisolated code execution for this process (and the ones it starts)."""
    os.environ[ALLOW_UNISOLATED] = "1"


def isolated() -> bool:
    """True when runs go through bubblewrap; False when the user accepted unisolated runs and it is
    missing; otherwise :class:`SandboxUnavailable`."""
    problem = _bubblewrap_problem()
    if problem is None:
        return True
    if os.environ.get(ALLOW_UNISOLATED) != "1":
        raise SandboxUnavailable(
            f"model-written code needs bubblewrap to run isolated ({problem}); install the "
            f"Debian package 'bubblewrap', or pass --allow-unisolated-code to run it unisolated"
        )
    _warn_unisolated(problem)
    return False


def python() -> str:
    return os.path.realpath(sys.executable)


def bubblewrap_command(workdir_bytes: int) -> list[str]:
    """bwrap's arguments up to (not including) the program it runs."""
    command = [
        "bwrap",
        "--unshare-user",
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--disable-userns",
        "--uid",
        NOBODY,
        "--gid",
        NOBODY,
        "--cap-drop",
        "ALL",
        "--die-with-parent",
        "--new-session",
        "--hostname",
        "sandbox",
        "--clearenv",
        "--setenv",
        "HOME",
        WORKDIR,
        "--setenv",
        "TMPDIR",
        WORKDIR,
        "--setenv",
        "PATH",
        os.path.dirname(python()),
    ]
    for source, target in _read_only_binds():
        command += ["--ro-bind", source, target]
    for link, target in _library_links():
        command += ["--symlink", target, link]
    command += [
        "--dev",
        "/dev",
        "--remount-ro",
        "/dev",
        "--size",
        str(workdir_bytes),
        "--tmpfs",
        WORKDIR,
        "--chdir",
        WORKDIR,
        "--remount-ro",
        "/",
    ]
    return command


def _read_only_binds() -> list[tuple[str, str]]:
    """The Python installation, the shared libraries it loads, and the loader's cache; nothing else."""
    roots = {os.path.realpath(sys.base_prefix), os.path.dirname(os.path.dirname(python()))}
    roots |= {path for path in ("/usr/lib", "/usr/lib64", "/usr/lib32") if os.path.isdir(path)}
    roots |= {path for path in ("/lib", "/lib64", "/lib32") if os.path.isdir(path) and not os.path.islink(path)}
    kept = sorted(root for root in roots if not any(root.startswith(other + os.sep) for other in roots))
    binds = [(root, root) for root in kept]
    if os.path.exists("/etc/ld.so.cache"):
        binds.append(("/etc/ld.so.cache", "/etc/ld.so.cache"))
    return binds


def _library_links() -> list[tuple[str, str]]:
    """Merged-/usr systems link /lib to usr/lib: the same links inside, so the loader's paths resolve."""
    return [(path, os.readlink(path)) for path in ("/lib", "/lib64", "/lib32") if os.path.islink(path)]


@functools.cache
def _bubblewrap_problem() -> str | None:
    """None when bwrap can start a sandbox here; else why not (missing, or user namespaces refused)."""
    if shutil.which("bwrap") is None:
        return "bwrap is not installed"
    probe = subprocess.run(
        bubblewrap_command(1 << 20) + [python(), "-I", "-S", "-c", "pass"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env={},
        timeout=30,
    )
    if probe.returncode != 0:
        return (
            f"bwrap cannot start a sandbox here: "
            f"{probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else probe.returncode}"
        )
    return None


@functools.cache
def _warn_unisolated(problem: str) -> None:
    print(
        f"warning: running model-written code UNISOLATED ({problem}): it can read your files and write where you can",
        file=sys.stderr,
    )
