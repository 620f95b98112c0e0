"""The chat format: conversations rendered with the reserved special tokens, with a loss mask.

A conversation is a list of OpenAI-shaped messages ``{"role", "content"}`` with roles ``system``,
``user``, ``assistant`` and ``tool``. It renders as::

    <|endoftext|><|system|>You are terse.<|end|><|user|>3*4?<|end|><|assistant|>12<|end|>

It starts with ``<|endoftext|>``: pretraining shards put that token between documents, so the
pretrained model has always seen it right before a new text begins, and it keeps packed conversations
apart in one training row.

Tool use follows the inference engine's in-stream protocol (``llmkit.infer.tools``): inside its turn
the assistant writes ``<|tool_call|>PAYLOAD<|end|>``, the engine injects ``<|tool_result|>RESULT<|end|>``
and the assistant goes on in the same turn, with no new ``<|assistant|>`` header. So an assistant
message with ``tool_calls`` does not close its turn, each ``tool`` message renders as a tool result,
and an assistant message right after tool messages continues the open turn::

    <|assistant|>Pencils: <|tool_call|>calculator(4*3)<|end|><|tool_result|>12<|end|>
    #### 12<|end|>

A tool call is OpenAI-shaped. ``{"type": "function", "function": {"name", "arguments"}}`` has the JSON
payload ``{"name": ..., "arguments": {...}}``; ``{"type": "custom", "custom": {"name", "input"}}``
(OpenAI's free-form custom tools) has the compact payload ``name(input)`` the engine accepts for tools
with one string parameter. Several calls in one message render one after the other, before their
results; the engine itself injects each result right after its call, so data meant to teach the
engine's pattern gives one call per message (the embedded arithmetic tasks do).

:func:`render_ids` returns the token ids and a mask that is True exactly on the tokens the assistant
writes: its text, its tool calls and the ``<|end|>`` that closes its turn (so the model learns to stop).
Role headers, system and user text, and tool results (injected by the engine, never sampled) are
False. The ids are built segment by segment, special tokens by id, so a special token is never the
accidental product of encoding text; message text that spells a special token is refused, because
it would smuggle a role change into the conversation.

:data:`CHAT_TEMPLATE` is the same format as a Jinja chat template, written into every saved
``tokenizer_config.json``: ``transformers``' ``apply_chat_template`` renders the identical ids, and with
``return_assistant_tokens_mask=True`` (the template's ``{% generation %}`` blocks) the identical mask.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from llmkit.chat_templates import template_ids
from llmkit.errors import InputError
from llmkit.tokenizer import ASSISTANT, END, ENDOFTEXT, SPECIAL_TOKENS, SYSTEM, TOOL_CALL, TOOL_RESULT, USER, Tokenizer

ROLES = ("system", "user", "assistant", "tool")
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names, which compact calls follow
_HEADERS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# Whitespace control (``{%-``/``-%}``) everywhere: the template emits nothing but the format itself.
# ``tojson`` is transformers' (json.dumps with ensure_ascii=False and the default separators), which
# :func:`tool_call_payload` reproduces.
CHAT_TEMPLATE = (
    "{{- '<|endoftext|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'tool' -%}"
    "{{- '<|tool_result|>' + message.content + '<|end|>' -}}"
    "{%- elif message.role == 'assistant' -%}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|assistant|>' -}}{%- endif -%}"
    "{%- generation -%}"
    "{%- if message.content -%}{{- message.content -}}{%- endif -%}"
    "{%- if message.tool_calls -%}"
    "{%- for call in message.tool_calls -%}"
    "{{- '<|tool_call|>' -}}"
    "{%- if call.custom is defined -%}"
    "{{- call.custom.name + '(' + call.custom.input + ')' -}}"
    "{%- else -%}"
    "{{- '{\"name\": ' + call.function.name | tojson + ', \"arguments\": ' -}}"
    "{%- if call.function.arguments is string -%}{{- call.function.arguments -}}"
    "{%- else -%}{{- call.function.arguments | tojson -}}{%- endif -%}"
    "{{- '}' -}}"
    "{%- endif -%}"
    "{{- '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- else -%}{{- '<|end|>' -}}{%- endif -%}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{{- '<|' + message.role + '|>' + message.content + '<|end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and not (messages[-1].role == 'tool' or messages[-1].tool_calls) -%}"
    "{{- '<|assistant|>' -}}"
    "{%- endif -%}"
)


@dataclass
class Conversation:
    """One training conversation; ``task`` names the task it instantiates (for per-task mixing caps)."""

    messages: list[dict]
    task: str | None = None


@dataclass
class Preference:
    """A prompt and two continuations, the first preferred (DPO and reward-model pairs)."""

    prompt_messages: list[dict]
    chosen_messages: list[dict]
    rejected_messages: list[dict]

    def pairs(self) -> list["Preference"]:
        """Itself, so files that mix pairs and rankings expand uniformly."""
        return [self]


@dataclass
class Ranking:
    """A prompt and K continuations, best first (InstructGPT's ranked comparisons)."""

    prompt_messages: list[dict]
    responses: list[list[dict]] = field(default_factory=list)

    def pairs(self) -> list[Preference]:
        """All K(K-1)/2 (better, worse) pairs; InstructGPT trains on every pair of one ranking together."""
        return [
            Preference(self.prompt_messages, better, worse)
            for index, better in enumerate(self.responses)
            for worse in self.responses[index + 1 :]
        ]


def tool_call_payload(call: dict) -> str:
    """The text between ``<|tool_call|>`` and ``<|end|>`` for one OpenAI-shaped tool call."""
    if "custom" in call:
        return f"{call['custom']['name']}({call['custom']['input']})"
    function = call["function"]
    arguments = function["arguments"]
    # OpenAI sends arguments as JSON text: spliced as is, the payload stays one JSON object.
    arguments_json = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return '{"name": ' + json.dumps(function["name"], ensure_ascii=False) + ', "arguments": ' + arguments_json + "}"


def check_messages(messages, where: str = "messages") -> None:
    """Raise InputError naming ``where`` and the message unless ``messages`` is a well-formed conversation."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: expected a non-empty list of messages, got {messages!r:.80}")
    for index, message in enumerate(messages):
        place = f"{where}[{index}]"
        if not isinstance(message, dict):
            raise InputError(f"{place}: expected a message object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise InputError(f"{place}: role {role!r} is not one of {', '.join(ROLES)}")
        calls = message.get("tool_calls") or []
        content = message.get("content")
        if not (isinstance(content, str) or (content is None and role == "assistant")):
            raise InputError(f"{place}: content must be a string, got {type(content).__name__}")
        _check_text(content or "", f"{place} content")
        if calls and role != "assistant":
            raise InputError(f"{place}: only assistant messages may have tool_calls")
        if not isinstance(calls, list):
            raise InputError(f"{place}: tool_calls must be a list")
        for call_index, call in enumerate(calls):
            _check_tool_call(call, f"{place}.tool_calls[{call_index}]")
        previous = messages[index - 1] if index else None
        opens_call = previous is not None and (previous["role"] == "tool" or previous.get("tool_calls"))
        if role == "tool" and not opens_call:
            raise InputError(
                f"{place}: a tool message must follow an assistant message with tool_calls or another tool message"
            )
        if previous is not None and previous["role"] == "tool" and role not in ("tool", "assistant"):
            raise InputError(f"{place}: after tool results the assistant must finish its turn, got a {role} message")


def _check_text(text: str, where: str) -> None:
    for token in SPECIAL_TOKENS:
        if token in text:
            raise InputError(f"{where}: contains the reserved token {token}")


def _check_tool_call(call, where: str) -> None:
    if not isinstance(call, dict) or ("function" in call) == ("custom" in call):
        raise InputError(
            f"{where}: expected {{'type': 'function', 'function': {{name, arguments}}}} "
            f"or {{'type': 'custom', 'custom': {{name, input}}}}, got {call!r}"
        )
    kind = "custom" if "custom" in call else "function"
    if call.get("type", kind) != kind:
        raise InputError(f"{where}: type {call.get('type')!r} does not match its '{kind}' field")
    body = call[kind]
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        raise InputError(f"{where}: '{kind}' needs a string 'name'")
    if kind == "custom":
        if not _TOOL_NAME.fullmatch(body["name"]) or not isinstance(body.get("input"), str):
            raise InputError(
                f"{where}: a custom call needs a 'name' of 1-64 letters, digits, '_' or '-' and a string 'input'"
            )
        _check_text(body["input"], f"{where} input")
        return
    arguments = body.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            raise InputError(f"{where}: arguments are not valid JSON ({error.msg})") from None
    if not isinstance(arguments, dict):
        raise InputError(f"{where}: arguments must be a JSON object")
    _check_text(tool_call_payload(call), f"{where} arguments")


def _turn_is_open(messages: list[dict]) -> bool:
    """The assistant is between a tool call and the end of its turn: the engine continues it, no new header."""
    return messages[-1]["role"] == "tool" or bool(messages[-1].get("tool_calls"))


def _segments(messages: list[dict], add_generation_prompt: bool) -> list[tuple[str, bool, bool, int]]:
    """``(text, is_special_token, written_by_assistant, message_index)`` in rendering order."""
    segments = [(ENDOFTEXT, True, False, -1)]
    for index, message in enumerate(messages):
        role = message["role"]
        if role == "tool":
            segments += [
                (TOOL_RESULT, True, False, index),
                (message["content"], False, False, index),
                (END, True, False, index),
            ]
            continue
        if role != "assistant":
            segments += [
                (_HEADERS[role], True, False, index),
                (message["content"], False, False, index),
                (END, True, False, index),
            ]
            continue
        if index == 0 or messages[index - 1]["role"] != "tool":
            segments.append((ASSISTANT, True, False, index))
        segments.append((message.get("content") or "", False, True, index))
        calls = message.get("tool_calls") or []
        for call in calls:
            segments += [
                (TOOL_CALL, True, True, index),
                (tool_call_payload(call), False, True, index),
                (END, True, True, index),
            ]
        if not calls:
            segments.append((END, True, True, index))
    if add_generation_prompt and not _turn_is_open(messages):
        segments.append((ASSISTANT, True, False, len(messages)))
    return segments


def uses_own_template(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer's model has a chat format of its own (a template other than llmkit's);
    a model with neither that nor llmkit's special tokens cannot hold a conversation."""
    if tokenizer.chat_template and tokenizer.chat_template != CHAT_TEMPLATE:
        return True
    if not tokenizer.llmkit_format:
        raise InputError(
            "the model has neither a chat template nor llmkit's chat tokens: tokenizer_config.json "
            "chat_template is missing"
        )
    return False


def render_text(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text (what :data:`CHAT_TEMPLATE` renders)."""
    check_messages(messages)
    return "".join(text for text, _, _, _ in _segments(messages, add_generation_prompt))


def render_ids(
    tokenizer: Tokenizer,
    messages: list[dict],
    add_generation_prompt: bool = False,
    mask_from: int = 0,
    tools: list[dict] | None = None,
) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation and the assistant mask (True on tokens the assistant wrote).

    ``add_generation_prompt`` appends the ``<|assistant|>`` header that asks the model for a reply
    (nothing when the assistant's turn is still open after a tool result). Assistant tokens of the
    messages before index ``mask_from`` stay False: a preference pair scores only its continuation.
    A model with a chat format of its own renders in it instead (:mod:`llmkit.chat_templates`), with
    OpenAI-shaped ``tools`` given to its template; llmkit's format has no place for them.
    """
    check_messages(messages)
    if uses_own_template(tokenizer):
        return template_ids(tokenizer, messages, add_generation_prompt, mask_from, tools)
    ids: list[int] = []
    mask: list[bool] = []
    for text, special, by_assistant, index in _segments(messages, add_generation_prompt):
        piece = [tokenizer.special_ids[text]] if special else tokenizer.encode(text)
        ids += piece
        mask += [by_assistant and index >= mask_from] * len(piece)
    return ids, mask


def render_completion(
    tokenizer: Tokenizer, prompt_messages: list[dict], completion_messages: list[dict]
) -> tuple[list[int], list[bool]]:
    """Ids of prompt + completion with the mask on the completion's assistant tokens only."""
    return render_ids(tokenizer, prompt_messages + completion_messages, mask_from=len(prompt_messages))
