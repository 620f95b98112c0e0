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
"""

from __future__ import annotations

import datetime
import functools
import json

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmkit.errors import InputError
from llmkit.tokenizer import Tokenizer

ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")


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
