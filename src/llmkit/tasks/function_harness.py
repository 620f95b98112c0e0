"""The program that :mod:`llmkit.tasks.functions` runs inside the sandbox (:mod:`llmkit.sandbox`) to
record the examples of reference functions.

It is sent as source text and reads a JSON request on stdin, so it imports nothing but the standard
library. Functions are defined from source text in a copy of their module's namespace, so a body
may use the module's helpers and imports exactly as the original does.

It calls each function on argument tuples drawn from a fixed pool of plain values and keeps up
to ``examples`` calls that return a literal value (``ast.literal_eval(repr(result)) == result``),
within ``call_seconds``, without printing and without changing their arguments; calls whose results
differ most are kept first. A function that changes an argument is impure and gets no examples.

Candidates are never run here: a candidate shares no process with what judges it
(``llmkit.tasks.functions.check_solutions``).

The answer is one JSON object on stdout.
"""

import ast
import contextlib
import copy
import importlib
import io
import itertools
import json
import random
import signal
import sys

POOL = [
    0,
    1,
    2,
    3,
    7,
    -4,
    10,
    1900,
    2024,
    0.5,
    2.25,
    -1.5,
    True,
    False,
    None,
    "",
    "a",
    "abc",
    "hello world",
    "Hello, World!",
    "  spaced  out ",
    "a/b/c.txt",
    "/usr/lib/../bin/",
    "*.py",
    "3.14",
    "line one\nline two",
    "x=1&y=2",
    "https://example.com/a/b?q=1#top",
    "<b>&amp;</b>",
    b"",
    b"abc",
    b"hello world",
    [],
    [3, 1, 2],
    [1, 2, 2, 5],
    ["b", "a", "c"],
    (1, 2),
    (4, 0.5, 0.25),
    {"a": 1},
]
MAX_CALLS = 1500  # argument tuples tried per function
MAX_RESULT_CHARS = 200


class Slow(Exception):
    pass


def _interrupt(signum, frame):
    raise Slow()


def call(function, arguments, seconds):
    """``(ok, result, arguments_changed)`` of one call that may not print or take too long."""
    given = copy.deepcopy(arguments)
    output = io.StringIO()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            result = function(*given)
    except BaseException:  # a candidate may raise anything, SystemExit included; all count as failure
        return False, None, False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return not output.getvalue(), result, repr(given) != repr(arguments)


def define(module, source, name, seconds):
    namespace = dict(vars(module))
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        exec(compile(source, f"<{name}>", "exec"), namespace)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return namespace[name]


def literal(value):
    """``repr(value)`` when it reads back as an equal literal, else None."""
    try:
        text = repr(value)
        if len(text) > MAX_RESULT_CHARS:
            return None
        return text if ast.literal_eval(text) == value else None
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def record(module, function, request):
    rng = random.Random(function["name"])  # str seeds hash with sha512: the same draws in every process
    required = function["required"]
    if required <= 2:
        tuples = list(itertools.product(range(len(POOL)), repeat=required))
        rng.shuffle(tuples)
    else:
        tuples = [tuple(rng.randrange(len(POOL)) for _ in range(required)) for _ in range(MAX_CALLS)]
    try:
        defined = define(module, function["source"], function["name"], request["call_seconds"])
    except BaseException:  # e.g. a body that relies on a name the module deletes after defining it
        return []
    found = []
    for indices in tuples[:MAX_CALLS]:
        arguments = [POOL[index] for index in indices]
        ok, result, changed = call(defined, arguments, request["call_seconds"])
        if changed:
            return []
        text = literal(result) if ok else None
        if text is not None:
            # A call that hands back its first argument says little about the function: such go last.
            found.append((result == arguments[0], repr(arguments), text))
        if len(found) >= 10 * request["examples"]:
            break
    found.sort(key=lambda example: example[0])
    # Distinct results first: a function that answers the same thing to every call proves little.
    seen, chosen = set(), []
    for _, arguments, result in found:
        if result not in seen and len(chosen) < request["examples"]:
            seen.add(result)
            chosen.append([arguments, result])
    chosen += [[arguments, result] for _, arguments, result in found if [arguments, result] not in chosen][
        : request["examples"] - len(chosen)
    ]
    return chosen


def main():
    request = json.loads(sys.stdin.read())
    signal.signal(signal.SIGALRM, _interrupt)
    module = importlib.import_module(request["module"])
    answer = {function["name"]: record(module, function, request) for function in request["functions"]}
    sys.stdout.write(json.dumps(answer))


if __name__ == "__main__":
    main()
