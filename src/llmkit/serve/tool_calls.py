"""Client-side tools for the chat endpoint: OpenAI's ``tools``/``tool_choice`` on llmkit's in-stream
tool-call protocol.

The model writes a call as ``<|tool_call|>PAYLOAD<|end|>`` (``llmkit.infer.tools``). The server runs no
tool: it submits the request without a tool box, so the engine ends generation when the call closes,
with finish reason ``"tool_calls"``; the payload becomes OpenAI's
``{"id", "type": "function", "function": {"name", "arguments"}}`` and the client runs the tool and sends
the result back as a ``tool`` message, which the chat format renders as ``<|tool_result|>...<|end|>``.

``tool_choice``:

* ``"auto"`` (the default with tools): the model decides;
* ``"none"`` (and no tools at all): the text ``<|tool_call|>`` is a stop string, so a model that starts a
  call ends its turn there, with the text before it;
* ``"required"``: the answer is prefilled with ``<|tool_call|>``, so the model can only write a call;
* a named function: prefilled up to the arguments, ``<|tool_call|>{"name": "NAME", "arguments": ``,
  so the model writes only the arguments of that function.

A call that does not parse, names a tool the client did not offer, or is cut off by ``max_tokens`` is
returned as text, so the client sees what the model wrote instead of a call it cannot run. A compact
call ``name(text)`` maps to a function whose only parameter is a string.

The chat format has no place for tool definitions (llmkit's training data teaches a tool through the
system prompt, e.g. ``llmkit.tasks.arithmetic.TOOL_SYSTEM_PROMPT``), so ``tools`` tells the server which
calls to accept; describe them to the model in the system message, as in training.

A model with a chat format of its own gets ``tools`` through its template (which places them where its
training did, if it has a place for them) and writes calls in its own convention; :class:`TemplateTurn`
reads Hermes/Qwen's ``<tool_call>`` JSON blocks, with ``tool_choice`` ``auto`` or ``none``.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

from llmkit.chat_templates import CALL_OPEN
from llmkit.errors import ConfigError
from llmkit.infer.completion import Completion
from llmkit.infer.scheduler import Event
from llmkit.infer.tools import Tool, ToolCallError, parse_tool_call
from llmkit.serve.openai_errors import APIError
from llmkit.serve.schemas import NamedToolChoice, TokenLogprob, ToolDefinition, TopLogprob
from llmkit.template_tools import call_payloads
from llmkit.tokenizer import TOOL_CALL, Tokenizer


def _runs_on_the_client(**arguments):
    raise RuntimeError("a client-side tool: the server returns its calls to the client and never runs it")


def client_tools(definitions: list[ToolDefinition] | None) -> dict[str, Tool]:
    """The offered tools by name, their names and parameter schemas checked as the engine's tools are."""
    tools: dict[str, Tool] = {}
    for index, definition in enumerate(definitions or []):
        function = definition.function
        parameters = function.parameters if function.parameters is not None else {"type": "object", "properties": {}}
        try:
            tool = Tool(function.name, function.description or "", parameters, _runs_on_the_client)
        except ConfigError as error:
            raise APIError(
                400, f"tools[{index}].function.{error.field}: {error.reason}", f"tools[{index}].function"
            ) from None
        if tool.name in tools:
            raise APIError(400, f"tools[{index}]: the tool name '{tool.name}' is given twice", f"tools[{index}]")
        tools[tool.name] = tool
    return tools


def forced_prefix(tool_choice, tools: dict[str, Tool]) -> str | None:
    """Text the answer is prefilled with after ``<|tool_call|>``: None when the model may answer freely."""
    if tool_choice is not None and not tools:
        raise APIError(400, "tool_choice: only allowed when tools are given", "tool_choice")
    if tool_choice == "required":
        return ""
    if isinstance(tool_choice, NamedToolChoice):
        name = tool_choice.function.name
        if name not in tools:
            raise APIError(400, f"tool_choice: no tool named '{name}' among the tools", "tool_choice")
        return (
            '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '
        )  # llmkit.chat.tool_call_payload's form
    return None


def calls_allowed(tool_choice, tools: dict[str, Tool]) -> bool:
    return bool(tools) and tool_choice != "none"


def openai_tool_call(payload: str, tools: dict[str, Tool]) -> dict | None:
    """The payload as OpenAI's tool call with a fresh id, or None when it is not a call of an offered tool."""
    try:
        call = parse_tool_call(payload)
    except ToolCallError:
        return None
    tool = tools.get(call.name)
    if tool is None:
        return None
    arguments = call.arguments
    if isinstance(arguments, str):
        parameter = tool.single_string_parameter()
        if parameter is None:
            return None
        arguments = {parameter: arguments}
    return {
        "id": f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {"name": call.name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def token_logprobs(
    tokenizer: Tokenizer, token_ids: list[int], logprobs: list[float | None], top: list[dict[str, float] | None] | None
) -> list[TokenLogprob]:
    """OpenAI's chat ``logprobs.content`` entries of sampled tokens."""
    entries = []
    for position, (token, logprob) in enumerate(zip(token_ids, logprobs)):
        if logprob is None:
            continue
        text = tokenizer.decode([token])
        alternatives = (top[position] if top else None) or {}
        entries.append(
            TokenLogprob(
                token=text,
                logprob=logprob,
                bytes=list(text.encode("utf-8")),
                top_logprobs=[
                    TopLogprob(token=t, logprob=v, bytes=list(t.encode("utf-8"))) for t, v in alternatives.items()
                ],
            )
        )
    return entries


@dataclass
class TurnResult:
    content_delta: str  # text released only at the end (a call that turned out not to be one)
    tool_calls: list[dict] | None
    finish_reason: str


@dataclass
class AssistantTurn:
    """One choice of a chat answer as its events arrive: the content to show, then perhaps a tool call."""

    tokenizer: Tokenizer
    tools: dict[str, Tool]
    detect_calls: bool  # tools offered and allowed
    prefix: str | None  # the forced call's prefilled payload text (see forced_prefix)
    want_logprobs: bool = False
    ids: list[int] = field(default_factory=list)
    content: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.call_token = self.tokenizer.special_ids[TOOL_CALL]
        self.call_start = 0 if self.prefix is not None else None  # index in ids where the call begins

    def feed(self, event: Event) -> tuple[str, list[TokenLogprob]]:
        """The content text and log-probabilities this event adds (none once a call has begun)."""
        start = len(self.ids)
        self.ids += event.token_ids
        if self.call_start is not None:
            return "", []
        tokens, delta = event.token_ids, event.text
        if self.call_token in tokens:  # where calls are not allowed it is a stop string: the text is cut already
            cut = tokens.index(self.call_token)
            tokens = tokens[:cut]
            if self.detect_calls:
                self.call_start = start + cut
                # The text before the call, of which a prefix has been released already.
                delta = self.tokenizer.decode(self.ids[: self.call_start])[len(self.content) :]
        self.content += delta
        entries = []
        if self.want_logprobs and event.logprobs is not None:
            entries = token_logprobs(self.tokenizer, tokens, event.logprobs, event.top_logprobs)
            self.logprobs += entries
        return delta, entries

    def finish(self, completion: Completion) -> TurnResult:
        reason = "length" if completion.finish_reason == "length" else "stop"
        if self.call_start is None:
            return TurnResult("", None, reason)
        if self.prefix is not None:  # the call began in the prompt: the engine saw its <|end|> as the end of the turn
            payload, closed = self.prefix + completion.text, completion.finish_reason == "stop"
        else:
            closed = completion.finish_reason == "tool_calls"
            payload = completion.tool_calls[-1]["payload"] if closed else ""
        call = openai_tool_call(payload, self.tools) if closed else None
        if call is not None:
            return TurnResult("", [call], "tool_calls")
        written = TOOL_CALL + payload if self.prefix is not None else self.tokenizer.decode(self.ids[self.call_start :])
        self.content += written
        return TurnResult(written, None, reason)


@dataclass
class TemplateTurn:
    """One choice of a chat answer from a model with a chat format of its own, whose template's tool
    convention is Hermes/Qwen's (SmolLM2's and Qwen's): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
    in the text. Content is released up to the first ``<tool_call>``; at the end the calls of offered
    tools become OpenAI tool calls, and anything else is released as the text the model wrote."""

    tokenizer: Tokenizer
    tools: dict[str, Tool]
    detect_calls: bool
    want_logprobs: bool = False
    text: str = ""
    content: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def feed(self, event: Event) -> tuple[str, list[TokenLogprob]]:
        self.text += event.text
        cut = self.text.find(CALL_OPEN) if self.detect_calls else -1
        # Hold back whatever may be the start of a call: the whole marker, or a prefix of it at the end.
        visible = (
            self.text[:cut] if cut >= 0 else self.text[: len(self.text) - _marker_prefix(self.text) * self.detect_calls]
        )
        delta = visible[len(self.content) :]
        self.content += delta
        entries = []
        if self.want_logprobs and event.logprobs is not None and cut < 0:
            entries = token_logprobs(self.tokenizer, event.token_ids, event.logprobs, event.top_logprobs)
            self.logprobs += entries
        return delta, entries

    def finish(self, completion: Completion) -> TurnResult:
        reason = "length" if completion.finish_reason == "length" else "stop"
        calls = (
            [openai_tool_call(payload, self.tools) for payload in call_payloads(self.text)] if self.detect_calls else []
        )
        if calls and all(call is not None for call in calls) and reason == "stop":
            self.content = self.content.rstrip()
            return TurnResult("", calls, "tool_calls")
        rest = self.text[len(self.content) :]
        self.content += rest
        return TurnResult(rest, None, reason)


def _marker_prefix(text: str) -> int:
    """Length of the longest end of ``text`` that begins ``<tool_call>``."""
    return next(
        (size for size in range(min(len(text), len(CALL_OPEN) - 1), 0, -1) if CALL_OPEN.startswith(text[-size:])),
        0,
    )
