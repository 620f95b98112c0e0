"""An assistant's turn in llmkit's chat format, shared by the HTTP chat endpoint and the terminal chat.

A chat answer ends at ``<|end|>`` or ``<|endoftext|>`` (the engine's end tokens). It also ends where the
model starts writing another role's header (``<|user|>``, ``<|system|>``, ``<|assistant|>``): that text
would forge the next turn, so those headers are stop strings. Where no tool can answer, ``<|tool_call|>``
is one too: the turn ends where the model starts a call nobody will run.

:func:`assistant_messages` turns the text of one answer, with tool calls the engine ran and the results
it injected, back into OpenAI-shaped messages, so a transcript renders to the very tokens the model saw.
For a model with a chat format of its own it reads the turns of its template's convention
(``llmkit.template_tools``): a turn ending in ``<tool_call>`` blocks, the end-of-turn token, the result turn
the engine injected, the next turn.
"""

from __future__ import annotations

import json

from llmkit.chat import uses_own_template
from llmkit.chat_templates import CALL_OPEN
from llmkit.errors import InputError
from llmkit.infer.tools import ToolCallError, defuse_special_tokens, find_tool_calls, parse_tool_call
from llmkit.template_tools import CALLS, tool_turns
from llmkit.tokenizer import ASSISTANT, SYSTEM, TOOL_CALL, USER, Tokenizer

OTHER_TURN_HEADERS = (USER, SYSTEM, ASSISTANT)


def turn_stop_strings(user_stops: list[str], calls_allowed: bool) -> list[str]:
    return [*user_stops, *OTHER_TURN_HEADERS, *(() if calls_allowed else (TOOL_CALL,))]


def call_message_entry(payload: str) -> dict | None:
    """OpenAI's shape of one call as llmkit.chat renders it back to the same payload: a JSON call as a
    function call, a compact ``name(text)`` call as a custom-tool call; None when it does not parse."""
    try:
        call = parse_tool_call(payload)
    except ToolCallError:
        return None
    if isinstance(call.arguments, str):
        return {"type": "custom", "custom": {"name": call.name, "input": call.arguments}}
    return {
        "type": "function",
        "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)},
    }


def assistant_messages(text: str, tokenizer: Tokenizer | None = None) -> list[dict]:
    """Messages of one assistant answer: text with tool calls becomes assistant messages with
    ``tool_calls``, each followed by its ``tool`` result, then the rest of the answer. ``tokenizer``: the
    model's, when it may have a chat format of its own."""
    if tokenizer is not None and uses_own_template(tokenizer):
        return template_assistant_messages(tokenizer, text)
    messages, position = [], 0
    for exchange in find_tool_calls(text):
        call = call_message_entry(exchange.payload)
        before = text[position : exchange.call_span[0]]
        if call is None:  # not a call the format can hold: keep what the model wrote, as plain text
            continue
        messages.append({"role": "assistant", "content": defuse_special_tokens(before), "tool_calls": [call]})
        end = exchange.call_span[1]
        if exchange.result is not None:
            messages.append({"role": "tool", "content": exchange.result})
            end = exchange.result_span[1]
        position = end
    rest = text[position:]
    if rest or not messages or messages[-1]["role"] == "tool":
        messages.append({"role": "assistant", "content": defuse_special_tokens(rest)})
    return messages


def template_assistant_messages(tokenizer: Tokenizer, text: str) -> list[dict]:
    """Messages of one answer in the model's own format: each turn that holds only text and then
    ``<tool_call>`` blocks, followed by the result turn the engine injected, becomes an assistant message
    with ``tool_calls`` and its ``tool`` results; whatever does not read so stays the text of the last message."""
    try:
        turns = tool_turns(tokenizer)
    except InputError:  # no tool convention: the engine ran no tools, the answer is one message
        return [{"role": "assistant", "content": text}]
    messages, rest = [], text
    while (end := rest.find(turns.end_text)) >= 0:
        turn, after = rest[:end], rest[end + len(turns.end_text) :]
        first = turn.find(CALL_OPEN)
        calls = [call_message_entry(payload) for payload in CALLS.findall(turn)]
        read = turns.read_results(after, len(calls)) if calls and None not in calls else None
        if read is None or CALLS.sub("", turn[first:]).strip():
            break
        results, length = read
        # The template writes a newline between the text and the first call (Qwen's): not the assistant's text.
        content = turn[:first].removesuffix("\n")
        messages.append({"role": "assistant", "content": content, "tool_calls": calls})
        messages += [{"role": "tool", "content": result} for result in results]
        rest = after[length:]
    return messages + [{"role": "assistant", "content": rest}]
