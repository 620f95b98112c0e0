"""Tool use: the call protocol in the token stream, tool boxes, and the built-in tools.

Protocol. The model writes ``<|tool_call|>PAYLOAD<|end|>``. Inside a call ``<|end|>``
closes the call rather than the turn: the engine hands PAYLOAD to
:meth:`ToolBox.run` and appends ``<|tool_result|>RESULT<|end|>`` to that sequence
before generation continues. The result tokens are injected, not sampled (the tool's
words, not the model's), so they are marked and never trained on. PAYLOAD takes one
of two forms:

- JSON in the OpenAI tools shape, ``{"name": "calculator", "arguments": {"expression": "3*4+2"}}``
  (``arguments`` may also be a JSON-encoded string, as OpenAI's API sends it, and may be
  called ``parameters``, as Llama 3.1 writes it);
- the compact ``name(raw text)`` for a tool with one string parameter, e.g.
  ``calculator(3*4+2)``: shorter to write, with no quoting or escaping to get right.

:meth:`ToolBox.run` never raises: an unknown tool, malformed payload, arguments
that break the tool's JSON schema or a tool that fails all come back as a short
``error: ...`` result, so the model sees what went wrong and may try again. Results
are cut to ``max_result_chars`` and special-token strings in them are defused, so
a tool's output can never close the call or end the turn by itself.

Every call runs in a worker thread that the engine waits on for at most ``timeout_s``: a
tool that hangs costs the batch that long and comes back as an ``error: ... timed out``
result. Python cannot kill a thread, so the timed-out call runs on in its (daemon) thread;
after ``MAX_ABANDONED_CALLS`` such calls of one tool still running, that tool is refused
rather than started again. Nothing bounds a tool's memory.

Arguments are checked against the tool's JSON schema with the ``jsonschema`` package
when it is installed (it is not a dependency of llmkit), else with a small validator
for the subset OpenAI function schemas use (``type``, ``properties``, ``required``,
``enum``, ``items``, ``additionalProperties``).
"""

from __future__ import annotations

import json
import re
import threading
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from llmkit.chat_templates import BUILTIN_STRING_PARAMETERS
from llmkit.config import check
from llmkit.errors import ConfigError, InputError
from llmkit.infer.calculator import MAX_DIGITS, calculate
from llmkit.infer.retrieval import BM25, load_corpus, tokenize
from llmkit.sandbox import isolated, run_python
from llmkit.tokenizer import END, SPECIAL_TOKENS, TOOL_CALL, TOOL_RESULT

try:
    import jsonschema
except ImportError:
    jsonschema = None

MAX_ABANDONED_CALLS = (
    4  # timed-out calls of one tool still running; past this it is refused, so hangs cannot pile up threads
)
SANDBOX_START_S = (
    5.0  # on top of a sandboxed tool's own limit: bubblewrap and the interpreter starting on a busy machine
)
MAX_QUERY_TERMS = 64  # a search is a few keywords, and scoring costs time in every term's postings
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
_COMPACT_CALL = re.compile(r"\s*([A-Za-z0-9_-]{1,64})\s*\((.*)\)\s*", re.DOTALL)
_SPECIAL_TOKEN = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS))
_EXCHANGE = re.compile(
    re.escape(TOOL_CALL) + "(.*?)" + re.escape(END) + "(?:" + re.escape(TOOL_RESULT) + "(.*?)" + re.escape(END) + ")?",
    re.DOTALL,
)


class ToolCallError(ValueError):
    """A payload that is neither a JSON call nor a compact ``name(text)`` call."""


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any] | str  # a str is the raw text of a compact call


def parse_tool_call(payload: str) -> ToolCall:
    """Read a payload in either form; raises :class:`ToolCallError` saying what is wrong."""
    text = payload.strip()
    if text.startswith("{"):
        try:
            call = json.loads(text)
        except json.JSONDecodeError as error:
            raise ToolCallError(f"the call is not valid JSON ({error.msg} at character {error.pos})") from None
        if not isinstance(call.get("name"), str):
            raise ToolCallError('a JSON call needs a string "name"')
        arguments = call.get("arguments", call.get("parameters", {}))  # Llama 3.1's JSON calls say "parameters"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as error:
                raise ToolCallError(f'"arguments" is a string but not valid JSON ({error.msg})') from None
        if not isinstance(arguments, dict):
            raise ToolCallError(f'"arguments" must be a JSON object, not {type(arguments).__name__}')
        return ToolCall(call["name"], arguments)
    match = _COMPACT_CALL.fullmatch(text)
    if match is None:
        raise ToolCallError('expected {"name": ..., "arguments": {...}} or name(text)')
    return ToolCall(match.group(1), match.group(2))


def format_tool_call(name: str, arguments: dict[str, Any] | str) -> str:
    """The payload for a call: compact ``name(text)`` when ``arguments`` is a string, else JSON."""
    if isinstance(arguments, str):
        return f"{name}({arguments})"
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


def render_tool_exchange(payload: str, result: str) -> str:
    """A call and its result as they stand in a token stream (chat/SFT data, the engine's view)."""
    return f"{TOOL_CALL}{payload}{END}{TOOL_RESULT}{defuse_special_tokens(result)}{END}"


@dataclass
class ToolExchange:
    payload: str
    result: str | None  # None for a call that no result follows (yet)
    call_span: tuple[int, int]  # character range of "<|tool_call|>PAYLOAD<|end|>"
    result_span: tuple[int, int] | None  # character range of "<|tool_result|>RESULT<|end|>": injected, not trained on


def find_tool_calls(text: str) -> list[ToolExchange]:
    """Every closed call in ``text`` with its result, if one follows; an unclosed call is left out."""
    exchanges = []
    for match in _EXCHANGE.finditer(text):
        call_end = match.start() + len(TOOL_CALL) + len(match.group(1)) + len(END)
        result_span = (call_end, match.end()) if match.group(2) is not None else None
        exchanges.append(ToolExchange(match.group(1), match.group(2), (match.start(), call_end), result_span))
    return exchanges


def defuse_special_tokens(text: str) -> str:
    """``<|end|>`` -> ``< |end|>`` (and so on), so the tokenizer reads plain text, not a control token."""
    return _SPECIAL_TOKEN.sub(lambda match: "< " + match.group(0)[1:], text)


def _type_matches(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    expected = {"string": str, "boolean": bool, "object": dict, "array": list, "null": type(None)}.get(kind)
    return expected is not None and isinstance(value, expected)


def subset_schema_errors(schema: dict, value: Any, path: str = "arguments") -> list[str]:
    """The validator used without ``jsonschema``: the keywords OpenAI function schemas use."""
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_type_matches(value, kind) for kind in kinds):
            return [f"{path}: {value!r} is not of type {' or '.join(map(repr, kinds))}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} is not one of {schema['enum']!r}"]
    errors = []
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [
            f"{path}: '{name}' is a required property" for name in schema.get("required", []) if name not in value
        ]
        for name, item in value.items():
            if name in properties:
                errors += subset_schema_errors(properties[name], item, f"{path}.{name}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected property '{name}'")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            errors += subset_schema_errors(schema["items"], item, f"{path}[{index}]")
    return errors


def schema_errors(schema: dict, arguments: dict) -> list[str]:
    """Messages naming each argument (``arguments.x``) that breaks ``schema``; empty when valid."""
    if jsonschema is not None:
        validator = jsonschema.validators.validator_for(schema)(schema)
        return [
            "".join(
                ["arguments", *(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.absolute_path)]
            )
            + f": {error.message}"
            for error in sorted(validator.iter_errors(arguments), key=lambda error: list(map(str, error.absolute_path)))
        ]
    return subset_schema_errors(schema, arguments)


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    function: Callable[..., Any]  # called with the arguments as keywords; its result becomes text
    timeout_s: float | None = None  # its own limit, when it keeps one (the sandbox); else the ToolBox's

    def __post_init__(self) -> None:
        check(
            bool(_TOOL_NAME.fullmatch(self.name)), "name", self.name, "a tool name is 1-64 letters, digits, '_' or '-'"
        )
        check(
            isinstance(self.parameters, dict) and self.parameters.get("type") == "object",
            "parameters",
            self.parameters,
            'must be a JSON schema with "type": "object"',
        )
        if jsonschema is not None:
            try:
                jsonschema.validators.validator_for(self.parameters).check_schema(self.parameters)
            except jsonschema.SchemaError as error:
                raise ConfigError("parameters", self.parameters, f"not a valid JSON schema ({error.message})") from None
        check(callable(self.function), "function", self.function, "must be callable")

    def single_string_parameter(self) -> str | None:
        """The parameter a compact call ``name(text)`` fills: the only one, when it is a string."""
        properties = self.parameters.get("properties", {})
        if len(properties) == 1:
            ((name, schema),) = properties.items()
            if schema.get("type") == "string":
                return name
        return None

    def openai_schema(self) -> dict:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass
class ToolBox:
    tools: list[Tool]
    max_result_chars: int = field(
        default=2000, metadata={"help": "longer tool results are cut (they go into the context)"}
    )
    timeout_s: float = field(
        default=10.0,
        metadata={
            "help": "a call still running after this many seconds is reported as timed out; "
            "generation waits this long at most "
            "(a tool with a limit of its own, the Python sandbox, gets that limit plus its start-up time)"
        },
    )

    def __post_init__(self) -> None:
        names = [tool.name for tool in self.tools]
        check(len(set(names)) == len(names), "tools", names, "tool names must be unique")
        check(self.max_result_chars > 0, "max_result_chars", self.max_result_chars, "must be positive")
        check(self.timeout_s > 0, "timeout_s", self.timeout_s, "must be positive")
        self.by_name = {tool.name: tool for tool in self.tools}
        self.abandoned: dict[str, list[threading.Thread]] = {name: [] for name in names}

    @classmethod
    def from_openai(cls, tools: list[dict], functions: dict[str, Callable[..., Any]], **options) -> ToolBox:
        """Tools from OpenAI's ``[{"type": "function", "function": {"name", "description", "parameters"}}]``,
        each run by the entry of ``functions`` with its name."""
        if not isinstance(tools, list):
            raise InputError(f"tools: expected a list of tool definitions, got {type(tools).__name__}")
        built = []
        for index, entry in enumerate(tools):
            if not (
                isinstance(entry, dict) and entry.get("type") == "function" and isinstance(entry.get("function"), dict)
            ):
                raise InputError(f'tools[{index}]: expected {{"type": "function", "function": {{...}}}}, got {entry!r}')
            definition = entry["function"]
            name = definition.get("name")
            if not isinstance(name, str):
                raise InputError(f"tools[{index}].function.name: missing or not a string")
            if name not in functions:
                raise InputError(f"tools[{index}].function.name: no function given for tool '{name}'")
            parameters = definition.get("parameters", {"type": "object", "properties": {}})
            try:
                built.append(Tool(name, definition.get("description", ""), parameters, functions[name]))
            except ConfigError as error:
                raise InputError(f"tools[{index}].function: {error}") from None
        return cls(built, **options)

    def openai_schema(self) -> list[dict]:
        return [tool.openai_schema() for tool in self.tools]

    def run(self, payload: str) -> str:
        """Execute one call and return its result text; every failure is an ``error: ...`` result."""
        try:
            call = parse_tool_call(payload)
        except ToolCallError as error:
            return f"error: {error}"
        tool = self.by_name.get(call.name)
        if tool is None:
            return f"error: unknown tool '{call.name}'; the tools are {', '.join(self.by_name)}"
        arguments = call.arguments
        if isinstance(arguments, str):
            parameter = tool.single_string_parameter()
            if parameter is None:
                return (
                    f"error: {tool.name} takes structured arguments; "
                    f'call it as {{"name": "{tool.name}", "arguments": {{...}}}}'
                )
            arguments = {parameter: arguments}
        errors = schema_errors(tool.parameters, arguments)
        if errors:
            return f"error: bad arguments for {tool.name}: " + "; ".join(errors)
        text = self._call(tool, arguments)
        if len(text) > self.max_result_chars:
            text = text[: self.max_result_chars] + f" ... [cut at {self.max_result_chars} characters]"
        return defuse_special_tokens(text)

    def _call(self, tool: Tool, arguments: dict) -> str:
        """The tool's result text, run in a worker thread so that a tool that hangs cannot hang generation."""
        running = self.abandoned[tool.name] = [thread for thread in self.abandoned[tool.name] if thread.is_alive()]
        if len(running) >= MAX_ABANDONED_CALLS:
            return f"error: {tool.name} is unavailable: {len(running)} earlier calls timed out and are still running"
        outcome: list[str] = []
        # A daemon thread: a call that never returns must not keep the process from exiting either.
        worker = threading.Thread(
            target=lambda: outcome.append(_result_text(tool, arguments)), name=tool.name, daemon=True
        )
        worker.start()
        timeout_s = self.timeout_s if tool.timeout_s is None else tool.timeout_s + SANDBOX_START_S
        worker.join(timeout_s)
        if worker.is_alive():
            running.append(worker)
            return f"error: {tool.name} timed out: no result within {timeout_s} s"
        return outcome[0] if outcome else f"error: {tool.name} failed, and so did describing its error"


def _result_text(tool: Tool, arguments: dict) -> str:
    """Call the tool and turn its result into text; in the worker thread, so a huge result's conversion is timed too."""
    try:
        result = tool.function(**arguments)
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)
    except (
        BaseException
    ) as error:  # a tool's failure is the model's feedback; in a thread, even SystemExit would vanish
        return f"error: {tool.name} failed: {type(error).__name__}: {error}"


def _string_parameter(name: str, description: str) -> dict:
    return {"type": "object", "properties": {name: {"type": "string", "description": description}}, "required": [name]}


def calculator_tool() -> Tool:
    return Tool(
        "calculator",
        f"Evaluate an arithmetic expression exactly: numbers, + - * / // % **, parentheses, sqrt, abs, round, min, max "
        f"(results up to {MAX_DIGITS} digits).",
        _string_parameter(BUILTIN_STRING_PARAMETERS["calculator"], "for example (3 + 4) * 12 / 5"),
        calculate,
    )


def python_tool(timeout_s: float = 5, memory_mb: int = 512) -> Tool:
    """Runs a program in the sandbox; the result is what it prints, or why it failed. Refuses at once
    (:class:`llmkit.sandbox.SandboxUnavailable`) where code cannot run isolated and the user has not
    accepted unisolated runs, rather than at the model's first call."""
    isolated()

    def run_program(code: str) -> str:
        result = run_python(code, timeout_s=timeout_s, memory_mb=memory_mb)
        if result.status == "ok":
            return result.stdout.rstrip() or "(the program printed nothing)"
        explanation = {
            "timeout": f"the program ran longer than {timeout_s} s",
            "memory_limit": f"the program used more than {memory_mb} MB",
            "output_limit": "the program printed too much",
        }.get(result.status, result.stderr.strip()[-800:])
        printed = result.stdout.rstrip()
        return (
            f"{printed}\nerror ({result.status}): {explanation}"
            if printed
            else f"error ({result.status}): {explanation}"
        )

    return Tool(
        "python",
        f"Run a Python program (standard library only, {timeout_s} s, no network) and return what it prints.",
        _string_parameter(BUILTIN_STRING_PARAMETERS["python"], "a complete program; print the answer"),
        run_program,
        timeout_s=timeout_s,
    )


def retrieval_tool(corpus: list[str] | str | Path, k: int = 3) -> Tool:
    """BM25 search over ``corpus`` (passages, or a path :func:`load_corpus` reads); returns the ``k`` best matches."""
    check(k > 0, "k", k, "must be positive")
    passages = list(corpus) if isinstance(corpus, list) else load_corpus(corpus)
    index = BM25(passages)

    def search(query: str) -> str:
        terms = len(tokenize(query))
        if terms > MAX_QUERY_TERMS:
            return f"error: the query has {terms} words; search takes at most {MAX_QUERY_TERMS} keywords"
        scores = index.scores(query)
        best = [position for position in index.top(query, k) if scores[position] > 0]
        if not best:
            return "no passage matches the query"
        return "\n\n".join(f"[{rank}] {passages[position]}" for rank, position in enumerate(best, start=1))

    return Tool(
        "search",
        f"Search a local collection of {len(passages)} passages by keywords; returns the {k} best.",
        _string_parameter(BUILTIN_STRING_PARAMETERS["search"], "keywords to look for"),
        search,
    )


def default_toolbox() -> ToolBox:
    """The calculator and the Python sandbox."""
    return ToolBox([calculator_tool(), python_tool()])


ToolSelection = Literal["none", "calculator", "all"]  # the one spelling of every command's ``tools`` field


def select_tools(selection: ToolSelection) -> ToolBox | None:
    """The tools a ``tools`` field names: none, the calculator alone, or all (the calculator and the Python
    sandbox)."""
    if selection not in typing.get_args(ToolSelection):
        raise ValueError(f"tools={selection!r}: must be one of {', '.join(typing.get_args(ToolSelection))}")
    if selection == "none":
        return None
    return ToolBox([calculator_tool()]) if selection == "calculator" else default_toolbox()
