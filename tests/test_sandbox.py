"""The sandbox runs ordinary programs, holds every escape an attacker tried (the catalogue below),
keeps its time, memory, file and output limits, and cannot be talked into a verdict."""

import os
import resource
import socket
import time

import pytest

from llmkit.errors import ConfigError
from llmkit.sandbox import SandboxUnavailable, isolation, run_checked, run_python
from llmkit.sandbox.process import WORKDIR_BYTES

CHILD_MARKER = "The first code of every sandboxed process"


@pytest.fixture
def bubblewrap():
    problem = isolation._bubblewrap_problem()
    if problem is not None:
        pytest.skip(f"needs bubblewrap ({problem}; Debian package 'bubblewrap', which .ci/run installs)")


def sandbox_processes(settle_s: float = 2.0) -> list[int]:
    """Processes still running a sandbox's bootstrap once the kernel has had ``settle_s`` to end them: killing a
    PID namespace's first process ends the others asynchronously, and while they exit (or a sibling worker's
    sandbox is torn down) they can be seen for a moment. A process that outlives its deadline (a 60 s sleep)
    is still there after it."""
    deadline = time.monotonic() + settle_s
    while (found := sandbox_processes_now()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def sandbox_processes_now() -> list[int]:
    """Processes running a sandbox's bootstrap (its text is on their command line), leaving out those of the
    sandboxes a sibling of this process runs now (another pytest-xdist worker's tests)."""
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as file:
                parents[int(entry)] = int(file.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    siblings = {pid for pid, parent in parents.items() if parent == os.getppid() and pid != os.getpid()}
    found = []
    for pid in parents:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                if CHILD_MARKER.encode() not in file.read():
                    continue
        except OSError:
            continue
        ancestor = pid
        while ancestor > 1 and ancestor not in siblings:
            ancestor = parents.get(ancestor, 0)
        if ancestor not in siblings:
            found.append(pid)
    return found


# ------------------------------------------------------------------------ ordinary programs
def test_ordinary_program_returns_its_stdout_and_reads_stdin():
    result = run_python(
        "import sys\nwords = sys.stdin.read().split()\nprint(len(words), sorted(words)[0])", stdin="pear apple fig"
    )
    assert (result.status, result.stdout, result.stderr, result.returncode) == ("ok", "3 apple\n", "", 0)


def test_stdin_is_closed_when_empty():
    result = run_python("input()", timeout_s=2)
    assert result.status == "error" and result.stderr.rstrip().endswith("EOFError: EOF when reading a line")


def test_exception_is_an_error_with_the_programs_traceback_only():
    result = run_python("def f(x):\n    return 1 / x\nprint('before')\nf(0)")
    assert result.status == "error" and result.returncode == 1 and result.stdout == "before\n"
    assert 'File "program.py", line 4' in result.stderr and 'File "program.py", line 2, in f' in result.stderr
    assert "    return 1 / x" in result.stderr  # the program's source lines are shown
    assert result.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    assert result.stderr.count("File ") == 2  # the sandbox's own bootstrap frame is not shown


def test_a_programs_own_exit_code_is_an_error_not_a_sandbox_verdict():
    for code in range(1, 4):
        result = run_python(f"import sys; sys.exit({code})")
        assert (result.status, result.returncode) == ("error", code)


def test_files_inside_the_working_directory_are_fine():
    program = (
        "import os, tempfile\n"
        "with open('notes.txt', 'w') as f:\n    f.write('kept')\n"
        "os.mkdir('sub'); os.rename('notes.txt', 'sub/notes.txt')\n"
        "with tempfile.NamedTemporaryFile('w') as t:\n    t.write('scratch')\n"
        "print(open('sub/notes.txt').read(), os.getcwd() == tempfile.gettempdir())"
    )
    result = run_python(program, timeout_s=2)
    assert (result.status, result.stdout) == ("ok", "kept True\n")


def test_each_run_gets_a_fresh_directory():
    first = run_python("open('state.txt', 'w').write('x'); import os; print(os.path.exists('state.txt'))")
    second = run_python("import os; print(os.path.exists('state.txt'))")
    assert (first.stdout, second.stdout) == ("True\n", "False\n")


def test_utf8_output_and_settings_are_checked():
    assert run_python("print('naïve ∑ 🙂')").stdout == "naïve ∑ 🙂\n"
    for keyword, value in [("timeout_s", 0), ("memory_mb", -1), ("max_output_bytes", 0)]:
        with pytest.raises(ConfigError, match=keyword):
            run_python("pass", **{keyword: value})


# ------------------------------------------------------------------------ limits
@pytest.mark.parametrize("program", ["while True:\n    pass", "import time\ntime.sleep(60)"])
def test_infinite_loop_and_sleep_are_killed_at_the_deadline(program):
    started = time.monotonic()
    result = run_python(program, timeout_s=1)
    elapsed = time.monotonic() - started
    assert result.status == "timeout" and result.returncode is None
    assert 1 <= result.seconds and elapsed < 3
    assert sandbox_processes() == []


def test_os_limits_are_set_in_the_child():
    program = (
        "import resource\nfor name in ('RLIMIT_CPU', 'RLIMIT_AS', 'RLIMIT_FSIZE', 'RLIMIT_NOFILE', 'RLIMIT_CORE'):\n"
        "    print(*resource.getrlimit(getattr(resource, name)))"
    )
    result = run_python(program, timeout_s=2.5, memory_mb=200)
    assert result.status == "ok"
    cpu, memory, file_size, open_files, core = (tuple(map(int, line.split())) for line in result.stdout.splitlines())
    assert cpu == (3, 4) and memory == (200 << 20, 200 << 20) and core == (0, 0)
    assert file_size == (WORKDIR_BYTES, WORKDIR_BYTES) and open_files[0] == open_files[1] <= 64


def test_files_larger_than_the_limit_cannot_be_written():
    result = run_python("with open('big.bin', 'wb') as f:\n    f.truncate(1 << 40)", timeout_s=2)
    assert result.status == "error" and "File too large" in result.stderr


@pytest.mark.parametrize(
    "program", ["x = bytearray(10**10)", "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))"]
)
def test_memory_bomb_ends_as_memory_limit_without_touching_the_parent(program):
    parent_peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run_python(program, timeout_s=5, memory_mb=128)
    assert result.status == "memory_limit" and result.stderr.rstrip().endswith("MemoryError")
    assert result.seconds < 4  # it failed on allocation, not at the deadline
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - parent_peak_before < 100 * 1024


def test_a_memory_error_the_program_handles_is_not_a_limit():
    result = run_python("try:\n    x = bytearray(10**10)\nexcept MemoryError:\n    print('handled')", memory_mb=128)
    assert (result.status, result.stdout) == ("ok", "handled\n")


@pytest.mark.parametrize(
    "program", ["print('x' * 10**7)", "while True:\n    print('spam')", "import sys\nsys.stderr.write('e' * 10**6)"]
)
def test_huge_output_is_truncated_and_stopped(program):
    result = run_python(program, timeout_s=5, max_output_bytes=1000)
    assert result.status == "output_limit" and result.returncode is None and result.seconds < 4
    assert max(len(result.stdout), len(result.stderr)) == 1000


# ------------------------------------------------------------------------ the escape catalogue
# Each attack tries to create ``marker`` on the host (or reach the parent); none may succeed.
ATTACKS = {
    "audit hook override": (
        "import __main__\n__main__.refused = lambda event, args: False\nopen(MARKER, 'w').write('x')"
    ),
    "dir_fd write": (
        "import os\nd = os.open(DIRECTORY, os.O_RDONLY)\n"
        "os.close(os.open('marker', os.O_WRONLY | os.O_CREAT, dir_fd=d))"
    ),
    "ctypes system()": "import ctypes\nassert ctypes.CDLL(None).system(('touch ' + MARKER).encode()) == 0",
    "os.fork": "import os\nif os.fork() == 0:\n    open(MARKER, 'w')",
    "_posixsubprocess.fork_exec": (
        "import _posixsubprocess, os, sys\n"
        "_posixsubprocess.fork_exec([sys.executable, '-c', f'open({MARKER!r}, \"w\")'],"
        " [os.fsencode(sys.executable)], True, (), None, None, -1, -1, -1, -1, -1, -1, *os.pipe(), False, False,"
        " -1, None, None, None, -1, None, False)"
    ),
    "multiprocessing spawn": (
        "import multiprocessing as mp\nctx = mp.get_context('spawn')\n"
        "p = ctx.Process(target=open, args=(MARKER, 'w'))\np.start()\np.join()"
    ),
    "os.system": "import os\nassert os.system('touch ' + MARKER) == 0",
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_escape_attempts_leave_no_trace_on_the_host(attack, bubblewrap, tmp_path):
    marker = tmp_path / "marker"
    program = f"MARKER = {str(marker)!r}\nDIRECTORY = {str(tmp_path)!r}\n" + ATTACKS[attack]
    result = run_python(program, timeout_s=3)
    time.sleep(0.2)  # anything that escaped would have had time to write
    assert result.status == "error", (attack, result)
    assert not marker.exists() and os.listdir(tmp_path) == []
    assert sandbox_processes() == []


def test_the_audit_hook_and_status_channel_of_old_are_gone_from_main():
    result = run_python("import __main__\nprint(sorted(k for k in vars(__main__) if not k.startswith('__')))")
    assert result.stdout == "[]\n"


def test_dir_fd_unlink_cannot_delete_host_files(bubblewrap, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    result = run_python(f"import os\nd = os.open({str(tmp_path)!r}, os.O_RDONLY)\nos.unlink('victim.txt', dir_fd=d)")
    assert result.status == "error" and victim.read_text() == "keep"


def test_host_files_and_the_parents_environment_are_invisible(bubblewrap, monkeypatch):
    monkeypatch.setenv("LLMKIT_SANDBOX_SECRET", "s3cr3t-value")
    program = (
        "import os\nfound = []\n"
        "for path in ['/etc/passwd', '/etc/hostname', f'/proc/{os.getppid()}/environ', '/proc/1/environ',"
        " '/proc/self/environ', os.path.expanduser('~root/.bashrc'), " + repr(__file__) + "]:\n"
        "    try:\n        found.append(open(path, 'rb').read())\n    except OSError:\n        pass\n"
        "print(len(found), b's3cr3t' in b''.join(found), dict(os.environ).get('LLMKIT_SANDBOX_SECRET'))"
    )
    result = run_python(program)
    assert result.stdout == "0 False None\n", result


def test_a_socket_to_a_listener_on_the_host_fails(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        result = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)", timeout_s=3)
        assert result.status == "error" and "PermissionError" in result.stderr
        with pytest.raises(socket.timeout):
            listener.accept()


def test_a_setsid_child_does_not_outlive_the_deadline():
    program = (
        "import os, time\ntry:\n    if os.fork() == 0:\n        os.setsid()\n        time.sleep(60)\n"
        "except PermissionError:\n    pass\ntime.sleep(60)"
    )
    result = run_python(program, timeout_s=1)
    assert result.status == "timeout" and sandbox_processes() == []


def test_many_large_files_are_stopped_by_the_working_directory_cap(bubblewrap):
    program = (
        "written = 0\ntry:\n    for index in range(8):\n        with open(f'f{index}', 'wb') as file:\n"
        "            for _ in range(64):\n                written += file.write(b'x' * (1 << 20))\n"
        "except OSError as error:\n    print(written, error.strerror)"
    )
    result = run_python(program, timeout_s=10, memory_mb=256)
    written, reason = result.stdout.split(" ", 1)
    assert int(written) <= WORKDIR_BYTES and reason.strip() in {"No space left on device", "File too large"}


def test_writing_ok_to_any_descriptor_cannot_beat_the_timeout():
    program = (
        "import os\nfor fd in range(64):\n    try:\n        os.write(fd, b'ok')\n    except OSError:\n        pass\n"
        "while True:\n    pass"
    )
    assert run_python(program, timeout_s=1).status == "timeout"


def test_unisolated_runs_need_consent_and_still_refuse_processes(monkeypatch, capsys):
    monkeypatch.setattr(isolation, "_bubblewrap_problem", lambda: "bwrap is not installed")
    monkeypatch.delenv(isolation.ALLOW_UNISOLATED, raising=False)
    with pytest.raises(SandboxUnavailable, match="bubblewrap.*--allow-unisolated-code"):
        run_python("print(1)")
    monkeypatch.setenv(isolation.ALLOW_UNISOLATED, "1")
    isolation._warn_unisolated.cache_clear()
    assert run_python("print(1)").stdout == "1\n"
    assert "UNISOLATED" in capsys.readouterr().err
    assert "PermissionError" in run_python("import os\nos.fork()").stderr


# ------------------------------------------------------------------------ checked runs
SQUARE_CHECK = "assert __candidate__(3) == 9\nassert __candidate__(-4) == 16\nprint('all checks ran')\n"


def test_a_checked_candidate_passes_only_with_the_right_values():
    right = run_checked("def square(x):\n    return x * x\n", SQUARE_CHECK, "square")
    wrong = run_checked("def square(x):\n    return x + x\n", SQUARE_CHECK, "square")
    assert (right.checker.status, right.checker.stdout) == ("ok", "all checks ran\n")
    assert wrong.checker.status == "error" and "AssertionError" in wrong.checker.stderr


@pytest.mark.parametrize(
    "forgery",
    [
        "import sys\nsys.exit(0)",
        "import os\nos._exit(0)",
        "raise SystemExit",
        "print('all checks ran')\nimport os\nos._exit(0)",
        # An object that claims to equal everything: only plain data crosses the pipe.
        "class Anything(int):\n    def __eq__(self, other):\n        return True\n"
        "def square(x):\n    return Anything(0)",
        # Writing verdict-looking bytes to every descriptor, then exiting.
        "import os\nfor fd in range(64):\n    try:\n        os.write(fd, b'all checks ran\\n')\n"
        "    except OSError:\n        pass\nos._exit(0)",
    ],
)
def test_a_candidate_cannot_forge_the_checkers_verdict(forgery):
    result = run_checked(forgery, SQUARE_CHECK, "square")
    assert result.checker.status != "ok" and "all checks ran" not in result.checker.stdout


def test_the_checkers_expected_values_are_out_of_the_candidates_reach():
    # The candidate searches its frames and every object the garbage collector knows for a large int
    # (the expected answer is one); in-process graders hand it over this way.
    candidate = (
        "import gc, sys\ndef secret(x):\n    frame, seen = sys._getframe(), []\n    while frame:\n"
        "        seen += [v for v in frame.f_globals.values()] + [v for v in frame.f_locals.values()]\n"
        "        frame = frame.f_back\n    seen += [v for o in gc.get_objects() if isinstance(o, (dict, list, tuple))"
        " for v in (o.values() if isinstance(o, dict) else o)]\n"
        "    return max([v for v in seen if type(v) is int and v > 10**8], default=0)\n"
    )
    result = run_checked(candidate, "assert __candidate__(0) == 738261945\n", "secret")
    assert result.checker.status == "error" and "AssertionError" in result.checker.stderr


def test_a_slow_call_fails_alone_and_later_calls_fail_fast():
    candidate = "def f(x):\n    while x:\n        pass\n    return 1\n"
    checker = (
        "import time\nfor x in (1, 0):\n    started = time.monotonic()\n"
        "    try:\n        print(__candidate__(x))\n"
        "    except __CandidateError__ as error:\n"
        "        print('failed', round(time.monotonic() - started, 1), error)\n"
    )
    result = run_checked(candidate, checker, "f", call_timeout_s=0.3, timeout_s=5)
    first, second = result.checker.stdout.splitlines()
    # The call's own 0.3 s, plus what a loaded machine takes to notice and kill it (0.4 s has been seen).
    failed, seconds, reason = first.split(" ", 2)
    assert failed == "failed" and 0.3 <= float(seconds) < 1.5 and reason == "the candidate died or ran out of time"
    assert second == "failed 0.0 the candidate died or ran out of time"
    assert sandbox_processes() == []


def test_a_raising_call_fails_alone_and_a_printing_call_fails():
    candidate = (
        "def f(x):\n    if x == 0:\n        raise ValueError('zero')\n    if x == 1:\n        print('noise')\n"
        "    return x\n"
    )
    checker = (
        "for x in (0, 1, 2):\n    try:\n        print(__candidate__(x))\n"
        "    except __CandidateError__ as error:\n        print('failed:', error)\n"
    )
    assert run_checked(candidate, checker, "f").checker.stdout.splitlines() == [
        "failed: ValueError: zero",
        "failed: the candidate printed",
        "2",
    ]


def test_a_candidate_defined_in_a_modules_namespace_uses_its_helpers():
    candidate = "def joined(parts):\n    return join(*parts)\n"
    result = run_checked(candidate, "print(__candidate__(['a', 'b']))", "joined", module="posixpath")
    assert result.checker.stdout == "a/b\n"
