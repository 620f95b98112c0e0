"""Conversations in a model's own chat format: its Jinja chat template, as ``transformers`` renders it.

A model imported with a chat template (ChatML for SmolLM2 and Qwen, Llama 3's headers, ...) keeps it,
and every stage renders conversations with it (:func:`llmkit.chat.render_ids` dispatches here). The
template runs in Jinja's immutable sandbox with what ``apply_chat_template`` gives it: ``messages``,
``add_generation_prompt``, ``tools``, the special tokens by role, ``raise_exception``,
``strftime_now``, a ``tojson`` that keeps non-ASCII text, and ``{% generation %}`` blocks rendered as
their content.

The assistant mask (what SFT trains on) comes from the template itself, without markers: the text an
assistant message adds is the difference between the conversation rendered up to and including it
and the conversation before it rendered with the generation prompt. Its tokens up to and including
the end-of-turn token are True (what follows it, e.g. a newline, is never sampled): the mask
``apply_chat_template(return_assistant_tokens_mask=True)`` gives for templates with ``{% generation %}``.
That needs a template that renders a conversation prefix by prefix (ChatML, Llama 3 and most others
do); one that rewrites earlier turns (e.g. strips the reasoning of past turns) is refused with a
one-line error rather than trained on the wrong tokens.

Tool calls and results (OpenAI-shaped ``tool_calls`` and ``tool`` messages) follow the template's own
convention where it has one: a template that renders ``tool_calls`` itself (Qwen2/2.5's, Hermes',
Llama 3.1's) gets the calls with their arguments as JSON objects, as ``transformers`` documents for
chat templates. A ChatML template without tool support (SmolLM2-135M's) gets them in Hermes' convention,
the one Qwen's template writes into ChatML (:mod:`llmkit.template_tools` runs it in the engine)::

    <|im_start|>assistant
    The pens cost
    <tool_call>
    {"name": "calculator", "arguments": {"expression": "4*3"}}
    </tool_call><|im_end|>
    <|im_start|>tool
    <tool_response>
    12
    </tool_response><|im_end|>

A compact call ``name(text)`` (a custom tool call, :mod:`llmkit.chat`) becomes the JSON call of the tool's
one string parameter, named by the ``tools`` given or else by llmkit's built-in tool of that name.
Any other template with tool messages is refused with a one-line error.
"""

from __future__ import annotations

import datetime
import functools
import json
import re

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmkit.errors import InputError
from llmkit.tokenizer import Tokenizer

ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
_NATIVE_TOOLS = re.compile(r"tool_calls|<tool_call>")  # what a template that renders calls itself mentions

# The one string parameter of each built-in tool (llmkit.infer.tools): a compact call name(text) fills it.
BUILTIN_STRING_PARAMETERS = {"calculator": "expression", "python": "code", "search": "query"}


class _GenerationBlock(Extension):
    """transformers' ``{% generation %}...{% endgeneration %}``: marks assistant text; rendered as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise(message: str):
    raise jinja2.TemplateError(message)


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationBlock]
    )
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    environment.globals["raise_exception"] = _raise
    environment.globals["strftime_now"] = lambda format: datetime.datetime.now().strftime(format)
    try:
        return environment.from_string(template)
    except jinja2.TemplateError as error:
        raise InputError(f"tokenizer_config.json chat_template: not a valid Jinja template ({error})") from None


def _token(tokenizer: Tokenizer, role: str) -> str:
    value = tokenizer.config.get(role)
    return (value.get("content") if isinstance(value, dict) else value) or ""


def render_template(
    tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None
) -> str:
    """The conversation as the model's template renders it."""
    try:
        return _compiled(tokenizer.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            **{role: _token(tokenizer, role) for role in ROLES},
        )
    except jinja2.TemplateError as error:
        raise InputError(f"tokenizer_config.json chat_template does not render this conversation ({error})") from None


def template_ids(
    tokenizer: Tokenizer,
    messages: list[dict],
    add_generation_prompt: bool = False,
    mask_from: int = 0,
    tools: list[dict] | None = None,
) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation in the model's format, and the mask that is True on the text of
    the assistant messages from index ``mask_from`` on (module docstring)."""
    refuse_special_text(tokenizer, messages)
    messages = with_tool_convention(tokenizer, messages, tools)
    text = render_template(tokenizer, messages, add_generation_prompt, tools)
    spans = [
        _assistant_span(tokenizer, messages, index, text, tools)
        for index, message in enumerate(messages)
        if message["role"] == "assistant" and index >= mask_from
    ]
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    mask = [any(start <= begin < end for start, end in spans) for begin, _ in encoding.offsets]
    return encoding.ids, mask


def _assistant_span(
    tokenizer: Tokenizer, messages: list[dict], index: int, full: str, tools: list[dict] | None
) -> tuple[int, int]:
    before = render_template(tokenizer, messages[:index], add_generation_prompt=True, tools=tools)
    through = render_template(tokenizer, messages[: index + 1], tools=tools)
    if not (through.startswith(before) and full.startswith(through)):
        raise InputError(
            "tokenizer_config.json chat_template renders earlier turns differently as the conversation "
            f"grows (at message {index}), so the assistant's tokens cannot be told apart for training"
        )
    # Generation stops at the end-of-turn token: what the template writes after it is never sampled.
    ends = [
        through.rfind(stop, len(before)) + len(stop)
        for stop in map(tokenizer.decode, ([i] for i in tokenizer.stop_ids))
        if through.rfind(stop, len(before)) >= 0
    ]
    return len(before), max(ends, default=len(through))


def tool_convention(tokenizer: Tokenizer) -> str | None:
    """``"native"`` (the template renders tool calls itself), ``"hermes"`` (ChatML without tool support:
    Hermes' tags in the text) or None (no convention llmkit can render)."""
    template = tokenizer.chat_template or ""
    if _NATIVE_TOOLS.search(template):
        return "native"
    return "hermes" if "<|im_start|>" in template else None


def with_tool_convention(tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The messages with their tool calls and results in the shape the template's convention needs
    (module docstring); messages without tools are returned as they are."""
    if not any(message["role"] == "tool" or message.get("tool_calls") for message in messages):
        return messages
    convention = tool_convention(tokenizer)
    if convention is None:
        raise InputError(
            "tokenizer_config.json chat_template has no tool-call convention llmkit knows (its own tool_calls, "
            "or ChatML for Hermes' <tool_call> tags), so a conversation with tool calls cannot be rendered"
        )
    converted = []
    for index, message in enumerate(messages):
        calls = [
            _json_call(call, tools, f"messages[{index}].tool_calls[{n}]")
            for n, call in enumerate(message.get("tool_calls") or [])
        ]
        if convention == "native":
            converted.append({**message, **({"tool_calls": calls} if calls else {})})
        elif message["role"] == "tool":
            converted.append({**message, "content": f"{RESPONSE_OPEN}\n{message['content']}\n{RESPONSE_CLOSE}"})
        elif calls:
            # Qwen's template writes a newline before each call, and none at the very start of the turn.
            text = "".join(f"\n{call_text(call['function'])}" for call in calls)
            content = message.get("content") or ""
            converted.append({"role": message["role"], "content": content + text if content else text[1:]})
        else:
            converted.append(message)
    return converted


def call_text(function: dict) -> str:
    """One call in Hermes' tags, as Qwen's template writes it."""
    payload = json.dumps({"name": function["name"], "arguments": function["arguments"]}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{payload}\n{CALL_CLOSE}"


def _json_call(call: dict, tools: list[dict] | None, where: str) -> dict:
    """An OpenAI-shaped call with its arguments as a JSON object (a compact call's text under its tool's
    one string parameter)."""
    if "custom" in call:
        name = call["custom"]["name"]
        return {
            "type": "function",
            "function": {"name": name, "arguments": {_compact_parameter(name, tools, where): call["custom"]["input"]}},
        }
    arguments = call["function"]["arguments"]
    if isinstance(arguments, str):
        arguments = json.loads(arguments)  # llmkit.chat.check_messages has checked it is a JSON object
    return {"type": "function", "function": {"name": call["function"]["name"], "arguments": arguments}}


def _compact_parameter(name: str, tools: list[dict] | None, where: str) -> str:
    for tool in tools or []:
        function = tool.get("function", {})
        properties = function.get("parameters", {}).get("properties", {})
        if function.get("name") == name and len(properties) == 1:
            ((parameter, schema),) = properties.items()
            if schema.get("type") == "string":
                return parameter
    if name in BUILTIN_STRING_PARAMETERS and not tools:
        return BUILTIN_STRING_PARAMETERS[name]
    raise InputError(
        f"{where}: the compact call of '{name}' needs a tool '{name}' with one string parameter among the tools "
        "to be written as the model's JSON call"
    )


def special_texts(tokenizer: Tokenizer) -> list[str]:
    """The strings of the model's special tokens (``<|im_start|>``, ...)."""
    return [token.content for token in tokenizer.backend.get_added_tokens_decoder().values() if token.special]


def refuse_special_text(tokenizer: Tokenizer, messages: list[dict]) -> None:
    """Message text that spells a special token would smuggle a role change into the conversation."""
    specials = special_texts(tokenizer)
    for index, message in enumerate(messages):
        content = message.get("content")
        for text in content if isinstance(content, list) else [content]:
            found = next((special for special in specials if isinstance(text, str) and special in text), None)
            if found:
                raise InputError(f"messages[{index}].content contains the special token {found!r}")
