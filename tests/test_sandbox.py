"""The sandbox runs ordinary programs and stops infinite loops, memory bombs, network use, file writes
outside its directory and runaway output, each with its own status."""

import resource
import time

import pytest

from llmkit.errors import ConfigError
from llmkit.infer.sandbox import run_python


def test_ordinary_program_returns_its_stdout_and_reads_stdin():
    result = run_python("import sys\nwords = sys.stdin.read().split()\nprint(len(words), sorted(words)[0])", stdin="pear apple fig")
    assert (result.status, result.stdout, result.stderr, result.returncode) == ("ok", "3 apple\n", "", 0)


def test_stdin_is_closed_when_empty():
    result = run_python("input()", timeout_s=2)
    assert result.status == "error" and result.stderr.rstrip().endswith("EOFError: EOF when reading a line")


def test_exception_is_an_error_with_the_programs_traceback_only():
    result = run_python("def f(x):\n    return 1 / x\nprint('before')\nf(0)")
    assert result.status == "error" and result.returncode == 1 and result.stdout == "before\n"
    assert 'File "program.py", line 4' in result.stderr and 'File "program.py", line 2, in f' in result.stderr
    assert result.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    assert result.stderr.count("File ") == 2  # the sandbox's own bootstrap frame is not shown


def test_a_programs_own_exit_code_is_an_error_not_a_sandbox_verdict():
    for code in range(1, 4):
        result = run_python(f"import sys; sys.exit({code})")
        assert (result.status, result.returncode) == ("error", code)


@pytest.mark.parametrize("program", ["while True:\n    pass", "import time\ntime.sleep(60)"])
def test_infinite_loop_and_sleep_are_killed_at_the_deadline(program):
    started = time.monotonic()
    result = run_python(program, timeout_s=1)
    elapsed = time.monotonic() - started
    assert result.status == "timeout" and result.returncode is None
    assert 1 <= result.seconds and elapsed < 3


def test_os_limits_are_set_in_the_child():
    program = "import resource\nfor name in ('RLIMIT_CPU', 'RLIMIT_AS', 'RLIMIT_FSIZE'):\n    print(*resource.getrlimit(getattr(resource, name)))"
    result = run_python(program, timeout_s=2.5, memory_mb=200)
    assert result.status == "ok"
    cpu, memory, file_size = (tuple(map(int, line.split())) for line in result.stdout.splitlines())
    assert cpu == (3, 4) and memory == (200 << 20, 200 << 20)
    assert 0 < file_size[0] == file_size[1] != resource.RLIM_INFINITY


def test_files_larger_than_the_limit_cannot_be_written():
    result = run_python("with open('big.bin', 'wb') as f:\n    f.truncate(1 << 40)", timeout_s=2)
    assert result.status == "error" and "File too large" in result.stderr


@pytest.mark.parametrize(
    "program",
    ["x = bytearray(10**10)", "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))"],
)
def test_memory_bomb_ends_as_memory_limit_without_touching_the_parent(program):
    parent_peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run_python(program, timeout_s=5, memory_mb=128)
    assert result.status == "memory_limit" and result.stderr.rstrip().endswith("MemoryError")
    assert result.seconds < 4  # it failed on allocation, not at the deadline
    growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - parent_peak_before
    assert growth_kib < 100 * 1024


def test_a_memory_error_the_program_handles_is_not_a_limit():
    result = run_python("try:\n    x = bytearray(10**10)\nexcept MemoryError:\n    print('handled')", memory_mb=128)
    assert (result.status, result.stdout) == ("ok", "handled\n")


@pytest.mark.parametrize(
    "program, refused",
    [
        ("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)", "socket.getaddrinfo"),
        ("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))", "socket.__new__"),
        ("import subprocess\nsubprocess.run(['true'])", "subprocess.Popen"),
        ("import os\nos.system('true')", "os.system"),
        ("import os\nos.kill(os.getppid(), 9)", "os.kill"),
        ("import ctypes\nctypes.CDLL('libc.so.6')", "ctypes.dlopen"),
    ],
)
def test_network_process_and_foreign_calls_are_forbidden(program, refused):
    result = run_python("print('started')\n" + program, timeout_s=2)
    assert result.status == "forbidden" and result.stdout == "started\n"
    assert f"SandboxViolation: {refused}" in result.stderr


def test_writes_outside_the_temporary_directory_are_forbidden(tmp_path):
    target = tmp_path / "escape.txt"
    for program in (f"open({str(target)!r}, 'w')", f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
                    "import os\nos.symlink('/etc/hostname', 'link')\nopen('link', 'a')",
                    f"import os\nos.rename('program.py', {str(target)!r})"):
        result = run_python(program, timeout_s=2)
        assert result.status == "forbidden", program
        assert not target.exists()
    outside_reader = run_python(f"print(open({__file__!r}).readline().strip())", timeout_s=2)
    assert outside_reader.status == "ok" and outside_reader.stdout.startswith('"""The sandbox')


def test_files_inside_the_temporary_directory_are_fine():
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
    first = run_python("open('state.txt', 'w').write('x'); import os; print(os.getcwd())")
    second = run_python("import os; print(os.path.exists('state.txt'), os.getcwd())")
    assert second.stdout.split()[0] == "False" and first.stdout.strip() != second.stdout.split()[1]


@pytest.mark.parametrize("program", ["print('x' * 10**7)", "while True:\n    print('spam')", "import sys\nsys.stderr.write('e' * 10**6)"])
def test_huge_output_is_truncated_and_stopped(program):
    result = run_python(program, timeout_s=5, max_output_bytes=1000)
    assert result.status == "output_limit" and result.returncode is None and result.seconds < 4
    assert max(len(result.stdout), len(result.stderr)) == 1000


def test_utf8_output_and_settings_are_checked():
    assert run_python("print('naïve ∑ 🙂')").stdout == "naïve ∑ 🙂\n"
    for keyword, value in [("timeout_s", 0), ("memory_mb", -1), ("max_output_bytes", 0)]:
        with pytest.raises(ConfigError, match=keyword):
            run_python("pass", **{keyword: value})
