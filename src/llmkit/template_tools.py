"""The engine's tool calls in a model's own chat format: Hermes' convention, which Qwen2/2.5/3 and SmolLM2 use.

The assistant writes each call as a JSON object in ``<tool_call>`` tags and ends its turn; the results
come back in a turn of their own, each in ``<tool_response>`` tags, and a new assistant turn goes on
(``llmkit.chat_templates`` renders such conversations for training). So where llmkit's own protocol runs
a call at the ``<|end|>`` that closes it, here a call runs when the model writes its end-of-turn token
after a turn that holds complete calls: the engine keeps that token (the model wrote it, and training
teaches it), runs every call of the turn, and injects the text the template writes after the assistant's
end-of-turn token up to the next assistant turn's content, e.g. for SmolLM2::

    Cost of the pens: \\n<tool_call>\\n{"name": "calculator", ...}\\n</tool_call><|im_end|>   (sampled)
    \\n<|im_start|>tool\\n<tool_response>\\n12\\n</tool_response><|im_end|>\\n<|im_start|>assistant\\n   (injected)

The injected text is not written here: it is the difference between the template's rendering of a
conversation with the results and without, so whatever the template does (Qwen's user turn holding all
results of a turn, SmolLM2's ``tool`` turns) the engine injects exactly what training rendered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmkit.chat_templates import CALL_CLOSE, CALL_OPEN, render_template, special_texts, with_tool_convention
from llmkit.errors import InputError
from llmkit.tokenizer import Tokenizer

CALLS = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.DOTALL)
_QUESTION = [{"role": "user", "content": "?"}]
_CALLING = {
    "role": "assistant",
    "content": "",
    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}],
}
_SLOT = "\x00{}\x00"  # a result's place when the template's text around results is read back


def call_payloads(text: str) -> list[str]:
    """The JSON of every complete ``<tool_call>`` in ``text``, in order."""
    return CALLS.findall(text)


@dataclass(frozen=True)
class ToolTurns:
    """How a model's template closes an assistant turn with calls and hands back their results."""

    tokenizer: Tokenizer
    end_id: int  # the end-of-turn token the template writes after the calls
    end_text: str

    def injected_text(self, results: list[str]) -> str:
        """What follows the end-of-turn token of an assistant turn with ``len(results)`` calls, up to the
        next assistant turn's content. Results may not spell the model's special tokens: they are defused."""
        specials = special_texts(self.tokenizer)
        return self._after_end([defuse(result, specials) for result in results])

    def read_results(self, text: str, count: int) -> tuple[list[str], int] | None:
        """The ``count`` results at the start of ``text`` (as :meth:`injected_text` wrote them) and the
        length of that injected text; None when ``text`` does not start so."""
        pieces = re.split("\x00\\d+\x00", self._after_end([_SLOT.format(index) for index in range(count)]))
        match = re.compile("(.*?)".join(map(re.escape, pieces)), re.DOTALL).match(text)
        return (list(match.groups()), match.end()) if match else None

    def _after_end(self, results: list[str]) -> str:
        through = _render(self.tokenizer, [*_QUESTION, _CALLING])
        after = _render(
            self.tokenizer,
            [*_QUESTION, _CALLING, *({"role": "tool", "content": result} for result in results)],
            add_generation_prompt=True,
        )
        start = len(_render(self.tokenizer, _QUESTION, add_generation_prompt=True))
        if not after.startswith(through):
            raise InputError(
                "tokenizer_config.json chat_template renders an assistant turn with tool calls differently once "
                "their results follow, so the engine cannot inject the results"
            )
        return after[through.index(self.end_text, start) + len(self.end_text) :]


def tool_turns(tokenizer: Tokenizer) -> ToolTurns:
    """The template's tool turns; a one-line error when it has no convention for them (module docstring)."""
    start = len(_render(tokenizer, _QUESTION, add_generation_prompt=True))
    through = _render(tokenizer, [*_QUESTION, _CALLING])
    if CALL_OPEN not in through[start:]:
        raise InputError(
            "tokenizer_config.json chat_template does not write tool calls in <tool_call> tags (Hermes' "
            "convention, Qwen's and SmolLM2's), the only convention of a model's own that the engine runs"
        )
    ends = [
        (through.find(text, start), token, text)
        for token, text in ((token, tokenizer.decode([token])) for token in tokenizer.stop_ids)
        if through.find(text, start) >= 0
    ]
    if not ends:
        raise InputError(
            "tokenizer_config.json chat_template ends an assistant turn with tool calls without any of the "
            "model's end-of-turn tokens (eos_token, eos_token_ids)"
        )
    _, end_id, end_text = min(ends)
    return ToolTurns(tokenizer, end_id, end_text)


def defuse(text: str, specials: list[str]) -> str:
    """``<|im_end|>`` -> ``< |im_end|>`` (any of ``specials``): a tool's output must not end the turn itself."""
    for special in sorted(specials, key=len, reverse=True):
        text = text.replace(special, special[0] + " " + special[1:])
    return text


def _render(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return render_template(tokenizer, with_tool_convention(tokenizer, messages, None), add_generation_prompt)
