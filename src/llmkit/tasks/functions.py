"""Docstring -> function tasks mined from the Python standard library, with an execution checker.

Mining reads the source of a list of standard-library modules with ``ast`` (nothing is imported
from them in this process) and keeps the small, plausibly pure functions: top level, public, no
decorator, a docstring, a body of at most ``MAX_BODY_LINES`` lines after it, no generator, no
``global``/``nonlocal``, no use of ``open``, ``print``, ``input``, ``exec``, ``eval`` and similar or of file-system,
environment and clock attributes (``os.lstat``, ``os.environ``, ``time.time``), and at least one
required positional parameter. A task is

- ``prompt``: the ``def`` line(s) and docstring as written in the module;
- ``reference``: the function without its docstring, in ``ast.unparse``'s canonical layout (so a
  reference and its corrupted variant differ only in the corruption, never in formatting);
- ``examples``: calls recorded by running the reference in the sandbox (:mod:`llmkit.sandbox`,
  program :mod:`llmkit.tasks.function_harness`) on argument tuples drawn from a fixed pool of plain
  values. Only calls that return a literal value, within a time limit, without printing and
  without changing their arguments are kept, in two separate processes that must agree (string
  hashing is randomised per process, so this drops results that depend on set order); a function
  that changes its arguments is dropped, and a task needs ``MIN_EXAMPLES`` examples with at least
  two different results.

What the checker verifies, and nothing more: the answer (the first fenced code block, else the
whole text) parses as Python; it defines a top-level function of the task's name whose parameters
match the reference's (names, kinds, how many have defaults); defined in a copy of the module's
namespace, as the original is, it returns on every recorded example a value of the same type equal
to the reference's. Agreement on a handful of pool inputs is necessary, not sufficient, for a
correct function: a body that special-cases the examples passes.

Splits are by module (``HELDOUT_MODULES``), so held-out tasks come from code the model was not tuned
on. Preference pairs put the reference against a mutant (a flipped comparison, a swapped
arithmetic or boolean operator, an integer off by one, a negated or un-negated condition, a deleted
statement: the classic operators of mutation testing) that the checker rejects.
The standard library differs between Python versions, and so do the tasks.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib
import inspect
import json
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from llmkit.chat import Conversation, Preference
from llmkit.config import check
from llmkit.sandbox import run_checked, run_python
from llmkit.tasks import function_harness

# Modules whose small functions are mostly pure string, number and path manipulation.
DEFAULT_MODULES = (
    "base64",
    "calendar",
    "difflib",
    "email.base64mime",
    "email.quoprimime",
    "email.utils",
    "encodings.punycode",
    "fnmatch",
    "html",
    "ipaddress",
    "ntpath",
    "operator",
    "posixpath",
    "quopri",
    "re",
    "shlex",
    "statistics",
    "string",
    "textwrap",
    "urllib.parse",
    "xml.sax.saxutils",
)
HELDOUT_MODULES = ("calendar", "shlex", "statistics", "textwrap")
MAX_BODY_LINES = 15
EXAMPLES_PER_TASK = 8
MIN_EXAMPLES = 3
CALL_SECONDS = 0.05
_IMPURE_NAMES = {
    "open",
    "print",
    "input",
    "exec",
    "eval",
    "compile",
    "__import__",
    "breakpoint",
    "globals",
    "locals",
    "vars",
    "id",
    "exit",
    "quit",
}
# Attributes that read the file system, the environment or the clock (os.lstat, os.environ, time.time, ...).
_IO_ATTRIBUTES = {
    "stat",
    "lstat",
    "listdir",
    "scandir",
    "getcwd",
    "getcwdb",
    "environ",
    "getenv",
    "urandom",
    "readlink",
    "access",
    "walk",
    "time",
    "monotonic",
}
_HARNESS = Path(function_harness.__file__).read_text(encoding="utf-8")
# The checker's side of a checked run: the examples stay in its process; the candidate only answers calls.
_CHECKER = """import ast, json
passed, error, examples = 0, None, {examples}
for arguments, expected in examples:
    wanted = ast.literal_eval(expected)
    try:
        result = __candidate__(*ast.literal_eval(arguments))
    except __CandidateError__ as failure:
        error = error or str(failure)
        continue
    passed += type(result) is type(wanted) and result == wanted
print(json.dumps({{"passed": passed, "total": len(examples), "error": error}}))
"""
_FENCED = re.compile(r"```[a-zA-Z0-9_+-]*\n(.*?)```", re.DOTALL)
# Mutation operators (the classic ones of mutation testing): each replaces one node by a near miss.
_COMPARE_SWAPS = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
_OPERATOR_SWAPS = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Add,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Mult,
    ast.Mod: ast.FloorDiv,
    ast.Pow: ast.Mult,
    ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
    ast.And: ast.Or,
    ast.Or: ast.And,
}


@dataclass(frozen=True)
class FunctionTask:
    module: str
    name: str
    prompt: str
    reference: str
    examples: tuple[tuple[str, str], ...]  # (arguments as a list literal, result literal)


@dataclass
class FunctionCheck:
    parsed: bool
    signature_matches: bool
    examples_passed: int
    examples_total: int
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.parsed and self.signature_matches and self.examples_passed == self.examples_total


# ------------------------------------------------------------------------------------- mining
def is_candidate(node: ast.stmt) -> bool:
    if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.decorator_list:
        return False
    if ast.get_docstring(node) is None or len(node.body) < 2:
        return False
    if node.end_lineno - node.body[1].lineno + 1 > MAX_BODY_LINES:
        return False
    arguments = node.args
    required = len(arguments.posonlyargs) + len(arguments.args) - len(arguments.defaults)
    if required == 0 or any(default is None for default in arguments.kw_defaults):
        return False
    for inner in ast.walk(node):
        if isinstance(inner, (ast.Yield, ast.YieldFrom, ast.Await, ast.Global, ast.Nonlocal)):
            return False
        if isinstance(inner, ast.Name) and inner.id in _IMPURE_NAMES:
            return False
        if isinstance(inner, ast.Attribute) and inner.attr in _IO_ATTRIBUTES:
            return False
    return True


def _without_docstring(node: ast.FunctionDef) -> ast.FunctionDef:
    stripped = copy.deepcopy(node)
    stripped.body = stripped.body[1:]
    return stripped


def _candidates(module: str) -> list[tuple[ast.FunctionDef, str]]:
    """``(function node, prompt)`` for each candidate function of ``module``."""
    source = Path(inspect.getsourcefile(importlib.import_module(module))).read_text(encoding="utf-8")
    lines = source.splitlines()
    # A name defined twice keeps its last definition, the one the module ends up with.
    nodes = {node.name: node for node in ast.parse(source).body if is_candidate(node)}
    return [(node, "\n".join(lines[node.lineno - 1 : node.body[0].end_lineno])) for node in nodes.values()]


def _harness(module: str, request: dict, timeout_s: float):
    result = run_python(
        _HARNESS,
        timeout_s=timeout_s,
        max_output_bytes=1 << 22,
        stdin=json.dumps({"module": module, "call_seconds": CALL_SECONDS, **request}),
    )
    if result.status != "ok":
        return None, f"{result.status}: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ''}"
    return json.loads(result.stdout), None


def mine_module(module: str) -> list[FunctionTask]:
    """The tasks of one module (two sandbox runs record the examples)."""
    candidates = _candidates(module)
    functions = [
        {
            "name": node.name,
            "source": ast.unparse(_without_docstring(node)),
            "required": len(node.args.posonlyargs) + len(node.args.args) - len(node.args.defaults),
        }
        for node, _ in candidates
    ]
    request = {"functions": functions, "examples": EXAMPLES_PER_TASK}
    runs = []
    for _ in range(2):
        recorded, error = _harness(module, request, timeout_s=120)
        if recorded is None:
            raise RuntimeError(f"recording examples for module {module} failed ({error})")
        runs.append(recorded)
    tasks = []
    for (node, prompt), function in zip(candidates, functions):
        second = {tuple(example) for example in runs[1][node.name]}
        examples = tuple(tuple(example) for example in runs[0][node.name] if tuple(example) in second)
        if len(examples) >= MIN_EXAMPLES and len({result for _, result in examples}) >= 2:
            tasks.append(FunctionTask(module, node.name, prompt, function["source"], examples))
    return tasks


def function_tasks(split: str = "train", modules: tuple[str, ...] = DEFAULT_MODULES) -> list[FunctionTask]:
    """The tasks of the modules of ``split`` among ``modules`` (held-out: those in ``HELDOUT_MODULES``)."""
    check(split in ("train", "heldout"), "split", split, "must be 'train' or 'heldout'")
    chosen = [module for module in modules if (module in HELDOUT_MODULES) == (split == "heldout")]
    return [
        task
        for module in tqdm(chosen, desc=f"functions: mining {split}", unit=" modules")
        for task in mine_module(module)
    ]


# ------------------------------------------------------------------------------------ checking
def extract_code(text: str) -> str:
    """The first fenced code block of a reply, else the reply itself."""
    fenced = _FENCED.search(text)
    return fenced.group(1) if fenced else text


def _signature(node: ast.FunctionDef) -> tuple:
    arguments = node.args
    return (
        [argument.arg for argument in arguments.posonlyargs],
        [argument.arg for argument in arguments.args],
        arguments.vararg and arguments.vararg.arg,
        [argument.arg for argument in arguments.kwonlyargs],
        arguments.kwarg and arguments.kwarg.arg,
        len(arguments.defaults),
        sum(default is not None for default in arguments.kw_defaults),
    )


def _static_check(task: FunctionTask, code: str) -> FunctionCheck:
    """Parse and signature; examples_passed stays 0 until the sandbox runs them."""
    total = len(task.examples)
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        return FunctionCheck(False, False, 0, total, f"does not parse ({error})")
    definitions = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == task.name]
    if not definitions:
        return FunctionCheck(True, False, 0, total, f"defines no top-level function '{task.name}'")
    if _signature(definitions[-1]) != _signature(ast.parse(task.reference).body[0]):
        return FunctionCheck(True, False, 0, total, "its parameters differ from the reference's")
    return FunctionCheck(True, True, 0, total)


def check_solutions(task: FunctionTask, texts: list[str]) -> list[FunctionCheck]:
    """Check several answers to one task; each that parses with the right signature runs in its own
    sandbox, against a checker in another (:func:`llmkit.sandbox.run_checked`), several at a time."""
    codes = [extract_code(text) for text in texts]
    checks = [_static_check(task, code) for code in codes]
    runnable = [index for index, result in enumerate(checks) if result.signature_matches]
    with ThreadPoolExecutor(max_workers=min(len(runnable), os.cpu_count() or 1) or 1) as pool:
        verdicts = pool.map(lambda index: _run_examples(task, codes[index]), runnable)
        for index, (passed, error) in zip(runnable, verdicts):
            checks[index].examples_passed, checks[index].error = passed, error
    return checks


def _run_examples(task: FunctionTask, code: str) -> tuple[int, str | None]:
    """How many recorded examples the candidate gets right, as the checker's process counts them."""
    checker = _CHECKER.format(examples=repr(task.examples))
    result = run_checked(code, checker, task.name, module=task.module, call_timeout_s=CALL_SECONDS, timeout_s=10)
    verdict = result.checker
    try:
        answer = json.loads(verdict.stdout) if verdict.status == "ok" else None
    except json.JSONDecodeError:
        answer = None
    if not (
        isinstance(answer, dict)
        and answer.get("total") == len(task.examples)
        and isinstance(answer.get("passed"), int)
        and 0 <= answer["passed"] <= len(task.examples)
    ):
        last_line = verdict.stderr.strip().splitlines()[-1] if verdict.stderr.strip() else ""
        return 0, f"the checker did not finish ({verdict.status}: {last_line})"
    return answer["passed"], answer.get("error")


def check_solution(task: FunctionTask, text: str) -> FunctionCheck:
    return check_solutions(task, [text])[0]


# ------------------------------------------------------------------------------ conversations
def prompt_messages(task: FunctionTask) -> list[dict]:
    return [{"role": "user", "content": f"Write this function from Python's {task.module} module:\n\n{task.prompt}"}]


def to_conversation(task: FunctionTask) -> Conversation:
    return Conversation(prompt_messages(task) + [{"role": "assistant", "content": task.reference}], task="functions")


def mutants(reference: str) -> list[str]:
    """Every single-site mutation of ``reference`` (unparsed, so the layout matches the reference's)."""
    tree = ast.parse(reference)
    results = []
    for index in range(len(_mutation_sites(tree))):
        mutated = copy.deepcopy(tree)  # the copy walks in the same order, so site ``index`` is the same place
        _mutation_sites(mutated)[index]()
        results.append(ast.unparse(mutated))
    return [text for text in dict.fromkeys(results) if text != ast.unparse(tree)]


def _mutation_sites(tree: ast.AST) -> list[Callable[[], None]]:
    """One callable per place a mutation operator applies; calling it mutates ``tree`` in place."""
    sites: list[Callable[[], None]] = []

    def swap_comparison(node: ast.Compare) -> None:
        node.ops[0] = _COMPARE_SWAPS[type(node.ops[0])]()

    def swap_operator(node: ast.BinOp | ast.BoolOp) -> None:
        node.op = _OPERATOR_SWAPS[type(node.op)]()

    def increment(node: ast.Constant) -> None:
        node.value += 1

    def negate(node: ast.If | ast.While) -> None:
        node.test = ast.UnaryOp(ast.Not(), node.test)

    def replace_in(parent: ast.AST, field: str, position: int | None, new: ast.AST | None) -> None:
        """Put ``new`` at ``parent.field`` (or at ``position`` of that list; None deletes the statement)."""
        if position is None:
            setattr(parent, field, new)
        elif new is None:
            del getattr(parent, field)[position]
        else:
            getattr(parent, field)[position] = new

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and type(node.ops[0]) in _COMPARE_SWAPS:
            sites.append(functools.partial(swap_comparison, node))
        elif isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in _OPERATOR_SWAPS:
            sites.append(functools.partial(swap_operator, node))
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            sites.append(functools.partial(increment, node))
        elif isinstance(node, (ast.If, ast.While)):
            sites.append(functools.partial(negate, node))
        for field, value in ast.iter_fields(node):
            if isinstance(value, ast.UnaryOp) and isinstance(value.op, ast.Not):  # "not x" -> "x"
                sites.append(functools.partial(replace_in, node, field, None, value.operand))
            if isinstance(value, list) and len(value) > 1 and all(isinstance(item, ast.stmt) for item in value):
                sites += [functools.partial(replace_in, node, field, position, None) for position in range(len(value))]
    return sites


def preference_pairs(tasks: list[FunctionTask], seed: int = 0, tries: int = 4) -> list[Preference]:
    """(reference, a mutant the checker rejects) per task, trying up to ``tries`` mutants in a seeded order."""
    rng = random.Random(seed)
    pairs = []
    for task in tqdm(tasks, desc="functions: preference pairs", unit=" tasks"):
        options = mutants(task.reference)
        rng.shuffle(options)
        checks = check_solutions(task, options[:tries])
        rejected = next((option for option, result in zip(options, checks) if not result.passed), None)
        if rejected is not None:
            pairs.append(
                Preference(
                    prompt_messages(task),
                    [{"role": "assistant", "content": task.reference}],
                    [{"role": "assistant", "content": rejected}],
                )
            )
    return pairs
