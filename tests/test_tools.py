"""The calculator, the tool-call protocol, schema validation, tool boxes and the built-in tools."""

import math
import time

import pytest

from llmkit.errors import ConfigError, InputError
from llmkit.infer.calculator import CalculatorError, calculate, evaluate
from llmkit.infer.tools import (
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

# Trusted literals: Python's own evaluation of them is the independent reference.
ARITHMETIC = [
    "3*4+2", "(1+2)*(3-4)", "2**10", "-2**2", "(-2)**3", "7//2", "-7//2", "7 % 3", "-7 % 3", "5/2", "1/3",
    "2**-3", "1e3 + 0.5", "12.0", "3.5*4", "100 - 99.9", "0.1 + 0.2", "2**0.5", "9**0.5", "abs(-3.25)", "round(7/3)",
    "round(3.14159, 3)", "min(4, 2.5, 3)", "max(1, 2**3, 7)", "sqrt(2)", "sqrt(144)", "sqrt(6.25)", "10**50 + 1",
    "123456789 * 987654321", "((48 / 2) + 48) * 3", "17 * 0.15", "-(+5)", "1_000 * 3", "7.5 % 2", "2 ** 3 ** 2",
]


@pytest.mark.parametrize("expression", ARITHMETIC)
def test_calculator_agrees_with_python_on_arithmetic(expression):
    expected = eval(expression, {"__builtins__": {}}, {"sqrt": math.sqrt, "abs": abs, "round": round, "min": min, "max": max})
    value = evaluate(expression)
    if isinstance(expected, int):
        assert calculate(expression) == str(expected)  # exact, and printed as a whole number
    else:
        assert float(value) == pytest.approx(expected, rel=1e-12)
        assert float(calculate(expression)) == pytest.approx(expected, rel=1e-11)


@pytest.mark.parametrize(
    "expression, shown",
    [("12.0", "12"), ("5/2", "2.5"), ("0.1 + 0.2", "0.3"), ("7 / 2 * 2", "7"), ("-7/4", "-1.75"), ("1/1024", "0.0009765625"),
     ("1/3", "0.333333333333"), ("2/3", "0.666666666667"), ("sqrt(2)", "1.41421356237"), ("2**0.5 * 2**0.5", "2"),
     ("-0.0", "0"), ("17 * 0.15", "2.55"), ("round(2.675, 2)", "2.68"), ("10**20", "100000000000000000000")],
)
def test_calculator_results_read_the_way_a_person_writes_them(expression, shown):
    # Exact decimals: 0.1 is one tenth here (so 2.675 rounds up), unlike the binary floats of eval.
    assert calculate(expression) == shown


@pytest.mark.parametrize(
    "expression, message",
    [
        ("__import__('os')", "function '__import__' is not available"),
        ("__import__('os').system('echo hi')", "attribute access"),
        ("x + 1", "a name ('x')"),
        ("pi * 2", "a name ('pi')"),
        ("(1).real", "attribute access"),
        ("(lambda: 1)()", "a lambda"),
        ("[i for i in range(3)]", "a list comprehension"),
        ("sum(i for i in range(3))", "function 'sum' is not available"),
        ("open('/etc/passwd')", "function 'open' is not available"),
        ("'a' * 3", "'a' is not a number"),
        ("True + 1", "True is not a number"),
        ("1j * 2", "1j is not a number"),
        ("2 ^ 3", "write ** for a power"),
        ("1,000 + 1", "write 1000, not 1,000"),
        ("1 < 2", "a comparison"),
        ("[1, 2][0]", "indexing"),
        ("(x := 3)", "an assignment"),
        ("round(2.5, ndigits=1)", "positional arguments only"),
        ("max()", "max() cannot take 0 argument(s)"),
        ("9**9**9", "too large"),
        ("10**1001", "too large"),
        ("(10**999) * 10**5", "too large"),
        ("2.0 ** 10000", "too large"),
        ("1e999", "too large"),
        ("1 / 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("sqrt(-4)", "square root of a negative number"),
        ("(-8) ** (1/3)", "not a real number"),
        ("3 +", "not a valid expression"),
        ("", "empty"),
        ("(" * 5000 + "1" + ")" * 5000, "longer than"),
    ],
)
def test_calculator_refuses_anything_but_arithmetic(expression, message):
    started = time.monotonic()
    with pytest.raises(CalculatorError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*").replace("^", r"\^")):
        evaluate(expression)
    assert time.monotonic() - started < 0.5  # refused before any huge computation


def test_calculator_allows_results_up_to_the_digit_limit():
    assert calculate("10**999") == "1" + "0" * 999
    assert calculate("-(2**3000) // 2**2999") == "-2"
    assert calculate("1 / 10**999") == "1e-999"  # exact, but with no short decimal form


def test_payload_forms_parse():
    assert parse_tool_call('{"name": "calculator", "arguments": {"expression": "1+1"}}') == ToolCall("calculator", {"expression": "1+1"})
    assert parse_tool_call(' {"name": "f", "arguments": "{\\"a\\": [1, 2]}"} ') == ToolCall("f", {"a": [1, 2]})
    assert parse_tool_call('{"name": "f", "parameters": {"a": 1}}') == ToolCall("f", {"a": 1})
    assert parse_tool_call('{"name": "now"}') == ToolCall("now", {})
    assert parse_tool_call("calculator((1+2)*3)") == ToolCall("calculator", "(1+2)*3")
    assert parse_tool_call("python(for i in range(2):\n    print(i))\n") == ToolCall("python", "for i in range(2):\n    print(i)")
    assert parse_tool_call("search()") == ToolCall("search", "")


@pytest.mark.parametrize(
    "payload, message",
    [("", "expected"), ("just words", "expected"), ("calc(1", "expected"), ("two words(1)", "expected"),
     ('{"name": "f", "arguments": {', "not valid JSON"), ('{"arguments": {}}', 'string "name"'),
     ('{"name": 3}', 'string "name"'), ('{"name": "f", "arguments": [1]}', "must be a JSON object, not list"),
     ('{"name": "f", "arguments": "{oops"}', "a string but not valid JSON")],
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

    box = ToolBox([calculator_tool(), Tool("weather", "Weather now.", WEATHER_SCHEMA, weather),
                   Tool("explode", "Fails.", {"type": "object", "properties": {"text": {"type": "string"}}}, explode)],
                  max_result_chars=30)
    assert box.run("calculator(3*4+2)") == "14"
    assert box.run('{"name": "calculator", "arguments": {"expression": "48/2 + 48"}}') == "72"
    assert box.run('{"name": "weather", "arguments": {"city": "Oslo", "unit": "celsius"}}') == '{"city": "Oslo", "temperature": 21, "days": 1}'[:30] + " ... [cut at 30 characters]"
    assert box.run("calculator(__import__('os'))").startswith("error: calculator failed: CalculatorError: function '__import__'")
    assert box.run("calc(1)") == "error: unknown tool 'calc'; the tools are calculator, weather, explode"
    assert box.run("weather(Oslo)").startswith("error: weather takes structured arguments")
    assert box.run('{"name": "weather", "arguments": {"city": "Oslo", "unit": "K"}}').startswith("error: bad arguments for weather: arguments.unit")
    assert box.run("explode(x)") == "error: explode failed: RuntimeError: the tool broke"
    assert box.run("not a call") == 'error: expected {"name": ..., "arguments": {...}} or name(text)'


def test_tools_and_toolboxes_check_their_definitions():
    with pytest.raises(ConfigError, match="name"):
        Tool("two words", "", {"type": "object"}, print)
    with pytest.raises(ConfigError, match="parameters"):
        Tool("f", "", {"type": "string"}, print)
    with pytest.raises(ConfigError, match="unique"):
        ToolBox([calculator_tool(), calculator_tool()])


def test_a_malformed_schema_is_refused_when_jsonschema_can_check_it():
    pytest.importorskip("jsonschema")
    with pytest.raises(ConfigError, match="not a valid JSON schema"):
        Tool("f", "", {"type": "object", "properties": {"a": {"type": "strin"}}}, print)


def test_from_openai_round_trips_openai_schema():
    original = ToolBox([calculator_tool(), Tool("weather", "Weather now.", WEATHER_SCHEMA, weather)])
    functions = {tool.name: tool.function for tool in original.tools}
    rebuilt = ToolBox.from_openai(original.openai_schema(), functions)
    assert rebuilt.openai_schema() == original.openai_schema()
    assert rebuilt.openai_schema()[1] == {"type": "function", "function": {"name": "weather", "description": "Weather now.", "parameters": WEATHER_SCHEMA}}
    assert rebuilt.run('{"name": "weather", "arguments": "{\\"city\\": \\"Rome\\", \\"unit\\": \\"fahrenheit\\"}"}') == '{"city": "Rome", "temperature": 70, "days": 1}'


@pytest.mark.parametrize(
    "tools, message",
    [({"type": "function"}, "expected a list"), ([{"type": "retrieval"}], r"tools\[0\]: expected"),
     ([{"type": "function", "function": {"description": "x"}}], r"tools\[0\].function.name: missing"),
     ([{"type": "function", "function": {"name": "nobody"}}], "no function given for tool 'nobody'"),
     ([{"type": "function", "function": {"name": "weather", "parameters": {"type": "array"}}}], r"tools\[0\].function: .*parameters")],
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
    passages = ["Paris is the capital of France.", "The Nile is a river in Africa.", "France borders Spain; Paris is large.", "Cats purr."]
    tool = retrieval_tool(passages, k=2)
    assert tool.function(query="Paris France") == "[1] Paris is the capital of France.\n\n[2] France borders Spain; Paris is large."
    assert tool.function(query="quantum chromodynamics") == "no passage matches the query"
    (tmp_path / "corpus.txt").write_text("\n\n".join(passages), encoding="utf-8")
    assert retrieval_tool(tmp_path / "corpus.txt", k=1).function(query="river") == "[1] The Nile is a river in Africa."


def test_default_toolbox_has_calculator_and_python():
    box = default_toolbox()
    assert [schema["function"]["name"] for schema in box.openai_schema()] == ["calculator", "python"]
    assert box.run("calculator(sqrt(2)**2)") == "2"
