"""The tool-call protocol, schema validation, tool boxes (time and size limits included) and the built-in tools."""

import threading
import time

import pytest

from llmkit.errors import ConfigError, InputError
from llmkit.infer.tools import (
    MAX_ABANDONED_CALLS,
    MAX_QUERY_TERMS,
    Tool,
    ToolBox,
    ToolCall,
    ToolCallError,
    calculator_tool,
    default_toolbox,
    find_tool_calls,
    format_tool_call,
    parse_tool_call,
    python_tool,
    render_tool_exchange,
    retrieval_tool,
    schema_errors,
    subset_schema_errors,
)
from llmkit.tokenizer import END, TOOL_CALL, TOOL_RESULT


def test_payload_forms_parse():
    assert parse_tool_call('{"name": "calculator", "arguments": {"expression": "1+1"}}') == ToolCall(
        "calculator", {"expression": "1+1"}
    )
    assert parse_tool_call(' {"name": "f", "arguments": "{\\"a\\": [1, 2]}"} ') == ToolCall("f", {"a": [1, 2]})
    assert parse_tool_call('{"name": "f", "parameters": {"a": 1}}') == ToolCall("f", {"a": 1})
    assert parse_tool_call('{"name": "now"}') == ToolCall("now", {})
    assert parse_tool_call("calculator((1+2)*3)") == ToolCall("calculator", "(1+2)*3")
    assert parse_tool_call("python(for i in range(2):\n    print(i))\n") == ToolCall(
        "python", "for i in range(2):\n    print(i)"
    )
    assert parse_tool_call("search()") == ToolCall("search", "")


@pytest.mark.parametrize(
    "payload, message",
    [
        ("", "expected"),
        ("just words", "expected"),
        ("calc(1", "expected"),
        ("two words(1)", "expected"),
        ('{"name": "f", "arguments": {', "not valid JSON"),
        ('{"arguments": {}}', 'string "name"'),
        ('{"name": 3}', 'string "name"'),
        ('{"name": "f", "arguments": [1]}', "must be a JSON object, not list"),
        ('{"name": "f", "arguments": "{oops"}', "a string but not valid JSON"),
    ],
)
def test_malformed_payloads_are_refused(payload, message):
    with pytest.raises(ToolCallError, match=message):
        parse_tool_call(payload)


def test_format_and_parse_round_trip():
    for name, arguments in [("calculator", "3*4"), ("f", {"a": 1, "b": ["x", "é"]}), ("g", {})]:
        assert parse_tool_call(format_tool_call(name, arguments)) == ToolCall(name, arguments)


def test_exchanges_are_found_with_spans_for_masking():
    first = render_tool_exchange("calculator(2+2)", "4")
    text = "Let me compute. " + first + " So 4. " + TOOL_CALL + "search(cats)" + END + " and " + TOOL_CALL + "unclosed"
    exchanges = find_tool_calls(text)
    assert [(e.payload, e.result) for e in exchanges] == [("calculator(2+2)", "4"), ("search(cats)", None)]
    start = len("Let me compute. ")
    assert text[slice(*exchanges[0].call_span)] == TOOL_CALL + "calculator(2+2)" + END
    assert text[slice(*exchanges[0].result_span)] == TOOL_RESULT + "4" + END
    assert exchanges[0].call_span[0] == start and exchanges[1].result_span is None


def test_a_result_that_contains_special_tokens_cannot_close_the_exchange():
    text = render_tool_exchange("python(code)", "<|end|><|tool_call|>x")
    assert text.count(END) == 2 and text.count(TOOL_CALL) == 1
    (exchange,) = find_tool_calls(text)
    assert exchange.result == "< |end|>< |tool_call|>x"


WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"},
        "hours": {"type": "array", "items": {"type": "number"}},
        "options": {"type": "object", "properties": {"detailed": {"type": "boolean"}}, "required": ["detailed"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ARGUMENT_CASES = [
    ({"city": "Paris", "unit": "celsius"}, None),
    ({"city": "Paris", "unit": "celsius", "days": 3, "hours": [1, 2.5], "options": {"detailed": True}}, None),
    ({"unit": "celsius"}, "'city'"),
    ({"city": "Paris", "unit": "kelvin"}, "arguments.unit"),
    ({"city": 7, "unit": "celsius"}, "arguments.city"),
    ({"city": "Paris", "unit": "celsius", "days": True}, "arguments.days"),
    ({"city": "Paris", "unit": "celsius", "days": 2.5}, "arguments.days"),
    ({"city": "Paris", "unit": "celsius", "hours": [1, "two"]}, "arguments.hours[1]"),
    ({"city": "Paris", "unit": "celsius", "options": {"detailed": "yes"}}, "arguments.options.detailed"),
    ({"city": "Paris", "unit": "celsius", "options": {}}, "'detailed'"),
    ({"city": "Paris", "unit": "celsius", "country": "FR"}, "'country'"),
]


@pytest.mark.parametrize("arguments, named", ARGUMENT_CASES)
def test_schema_errors_name_the_field(arguments, named):
    for errors in (schema_errors(WEATHER_SCHEMA, arguments), subset_schema_errors(WEATHER_SCHEMA, arguments)):
        if named is None:
            assert errors == []
        else:
            assert len(errors) == 1 and named in errors[0]


def test_subset_validator_agrees_with_jsonschema():
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(WEATHER_SCHEMA)
    for arguments, _ in ARGUMENT_CASES:
        assert (subset_schema_errors(WEATHER_SCHEMA, arguments) == []) == validator.is_valid(arguments), arguments


def weather(city, unit, days=1, hours=(), options=None):
    return {"city": city, "temperature": 21 if unit == "celsius" else 70, "days": days}


def test_toolbox_runs_calls_and_turns_every_failure_into_an_error_result():
    def explode(text):
        raise RuntimeError("the tool broke")

    box = ToolBox(
        [
            calculator_tool(),
            Tool("weather", "Weather now.", WEATHER_SCHEMA, weather),
            Tool("explode", "Fails.", {"type": "object", "properties": {"text": {"type": "string"}}}, explode),
        ],
        max_result_chars=100,
    )
    assert box.run("calculator(3*4+2)") == "14"
    assert box.run('{"name": "calculator", "arguments": {"expression": "48/2 + 48"}}') == "72"
    assert (
        box.run('{"name": "weather", "arguments": {"city": "Oslo", "unit": "celsius"}}')
        == '{"city": "Oslo", "temperature": 21, "days": 1}'
    )
    assert box.run("calculator(__import__('os'))").startswith(
        "error: calculator failed: CalculatorError: function '__import__'"
    )
    assert box.run("calc(1)") == "error: unknown tool 'calc'; the tools are calculator, weather, explode"
    assert box.run("weather(Oslo)").startswith("error: weather takes structured arguments")
    assert box.run('{"name": "weather", "arguments": {"city": "Oslo", "unit": "K"}}').startswith(
        "error: bad arguments for weather: arguments.unit"
    )
    assert box.run("explode(x)") == "error: explode failed: RuntimeError: the tool broke"
    assert box.run("not a call") == 'error: expected {"name": ..., "arguments": {...}} or name(text)'


def test_tools_and_toolboxes_check_their_definitions():
    with pytest.raises(ConfigError, match="name"):
        Tool("two words", "", {"type": "object"}, print)
    with pytest.raises(ConfigError, match="parameters"):
        Tool("f", "", {"type": "string"}, print)
    with pytest.raises(ConfigError, match="unique"):
        ToolBox([calculator_tool(), calculator_tool()])
    with pytest.raises(ConfigError, match="timeout_s"):
        ToolBox([calculator_tool()], timeout_s=0)


TEXT_PARAMETER = {"type": "object", "properties": {"text": {"type": "string"}}}


def test_a_tool_that_hangs_times_out_quickly_and_cannot_pile_up_threads():
    release = threading.Event()

    def hang(text):
        release.wait(30)
        return "late"

    box = ToolBox([calculator_tool(), Tool("hang", "Never answers in time.", TEXT_PARAMETER, hang)], timeout_s=0.2)
    try:
        for _ in range(MAX_ABANDONED_CALLS):
            started = time.perf_counter()
            assert box.run("hang(x)") == "error: hang timed out: no result within 0.2 s"
            assert time.perf_counter() - started < 1.0
        started = time.perf_counter()
        assert (
            box.run("hang(x)")
            == f"error: hang is unavailable: {MAX_ABANDONED_CALLS} earlier calls timed out and are still running"
        )
        assert time.perf_counter() - started < 0.1  # refused without waiting
        assert box.run("calculator(6*7)") == "42"  # the other tools are unaffected
    finally:
        release.set()
    for thread in box.abandoned["hang"]:
        thread.join(5)
    assert box.run("hang(x)") == "late"  # the earlier calls ended, so the tool runs again


def test_a_calculator_violation_is_a_prompt_one_line_error_result():
    box = ToolBox([calculator_tool()])
    started = time.perf_counter()
    result = box.run("calculator(round(1/3, 10**9))")
    assert time.perf_counter() - started < 0.1
    assert result == "error: calculator failed: CalculatorError: round(x, digits) takes digits from -1000 to 1000"


def test_oversized_results_and_failures_are_cut_and_odd_ones_reported():
    def shout(text):
        return "a" * 10**7

    def fail_loudly(text):
        raise ValueError("b" * 10**6)

    def cyclic(text):
        loop = []
        loop.append(loop)
        return loop

    def leave(text):
        raise SystemExit(3)

    box = ToolBox(
        [Tool(function.__name__, "", TEXT_PARAMETER, function) for function in (shout, fail_loudly, cyclic, leave)],
        max_result_chars=100,
    )
    assert box.run("shout(x)") == "a" * 100 + " ... [cut at 100 characters]"
    assert (
        box.run("fail_loudly(x)")
        == ("error: fail_loudly failed: ValueError: " + "b" * 100)[:100] + " ... [cut at 100 characters]"
    )
    assert box.run("cyclic(x)") == "error: cyclic failed: ValueError: Circular reference detected"
    assert box.run("leave(x)") == "error: leave failed: SystemExit: 3"


class Indescribable(Exception):
    def __str__(self):
        raise RuntimeError("no words")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_failure_that_cannot_be_described_is_still_an_error_result():
    def mute(text):
        raise Indescribable()

    assert (
        ToolBox([Tool("mute", "", TEXT_PARAMETER, mute)]).run("mute(x)")
        == "error: mute failed, and so did describing its error"
    )


def test_a_malformed_schema_is_refused_when_jsonschema_can_check_it():
    pytest.importorskip("jsonschema")
    with pytest.raises(ConfigError, match="not a valid JSON schema"):
        Tool("f", "", {"type": "object", "properties": {"a": {"type": "strin"}}}, print)


def test_from_openai_round_trips_openai_schema():
    original = ToolBox([calculator_tool(), Tool("weather", "Weather now.", WEATHER_SCHEMA, weather)])
    functions = {tool.name: tool.function for tool in original.tools}
    rebuilt = ToolBox.from_openai(original.openai_schema(), functions)
    assert rebuilt.openai_schema() == original.openai_schema()
    assert rebuilt.openai_schema()[1] == {
        "type": "function",
        "function": {"name": "weather", "description": "Weather now.", "parameters": WEATHER_SCHEMA},
    }
    assert (
        rebuilt.run('{"name": "weather", "arguments": "{\\"city\\": \\"Rome\\", \\"unit\\": \\"fahrenheit\\"}"}')
        == '{"city": "Rome", "temperature": 70, "days": 1}'
    )


@pytest.mark.parametrize(
    "tools, message",
    [
        ({"type": "function"}, "expected a list"),
        ([{"type": "retrieval"}], r"tools\[0\]: expected"),
        ([{"type": "function", "function": {"description": "x"}}], r"tools\[0\].function.name: missing"),
        ([{"type": "function", "function": {"name": "nobody"}}], "no function given for tool 'nobody'"),
        (
            [{"type": "function", "function": {"name": "weather", "parameters": {"type": "array"}}}],
            r"tools\[0\].function: .*parameters",
        ),
    ],
)
def test_from_openai_errors_name_the_entry(tools, message):
    with pytest.raises(InputError, match=message):
        ToolBox.from_openai(tools, {"weather": weather})


def test_python_tool_returns_output_or_the_failure():
    tool = python_tool(timeout_s=1, memory_mb=256)
    assert tool.function(code="print(sum(range(101)))") == "5050"
    assert tool.function(code="x = 1") == "(the program printed nothing)"
    failed = tool.function(code="print('partial')\nraise ValueError('bad input')")
    assert failed.startswith("partial\nerror (error): Traceback") and failed.endswith("ValueError: bad input")
    assert tool.function(code="while True:\n    pass") == "error (timeout): the program ran longer than 1 s"


def test_retrieval_tool_returns_the_best_passages_in_bm25_order(tmp_path):
    passages = [
        "Paris is the capital of France.",
        "The Nile is a river in Africa.",
        "France borders Spain; Paris is large.",
        "Cats purr.",
    ]
    tool = retrieval_tool(passages, k=2)
    assert (
        tool.function(query="Paris France")
        == "[1] Paris is the capital of France.\n\n[2] France borders Spain; Paris is large."
    )
    assert tool.function(query="quantum chromodynamics") == "no passage matches the query"
    (tmp_path / "corpus.txt").write_text("\n\n".join(passages), encoding="utf-8")
    assert retrieval_tool(tmp_path / "corpus.txt", k=1).function(query="river") == "[1] The Nile is a river in Africa."
    long_query = " ".join(["Paris"] * (MAX_QUERY_TERMS + 1))
    assert (
        tool.function(query=long_query)
        == f"error: the query has {MAX_QUERY_TERMS + 1} words; search takes at most {MAX_QUERY_TERMS} keywords"
    )
    assert tool.function(query=" ".join(["Paris"] * MAX_QUERY_TERMS)).startswith("[1] Paris is the capital of France.")


def test_default_toolbox_has_calculator_and_python():
    box = default_toolbox()
    assert [schema["function"]["name"] for schema in box.openai_schema()] == ["calculator", "python"]
    assert box.run("calculator(sqrt(2)**2)") == "2"
