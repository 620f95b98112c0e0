"""One request's completion as it grows token by token: its text, its stop conditions, its tool calls.

The scheduler (``llmkit.infer.scheduler``) decides *which* tokens each running request gets; a
:class:`CompletionState` decides what they mean:

* Text is decoded incrementally and released only when final (:class:`TextTracker`): never half of a
  UTF-8 character (byte-level BPE splits characters across tokens), never a prefix of a stop string that
  the next token may complete. Stop strings may span token boundaries; the stop text is left out.
* A request finishes at an end-of-text/end-of-turn token ("stop"), a stop string ("stop"),
  ``max_new_tokens`` sampled tokens or a full context ("length"), or when cancelled ("cancelled").
* Tool calls follow the protocol of ``llmkit.infer.tools``: ``<|tool_call|>PAYLOAD<|end|>``, where that
  ``<|end|>`` closes the call instead of ending the turn. With a tool box the call runs at once and
  ``<|tool_result|>RESULT<|end|>`` is appended to the sequence, marked as injected (the tool's words, not
  the model's: never trained on, no log-probability); generation then goes on. Without one, a closed call
  ends generation with finish reason "tool_calls", for a caller that runs tools itself (OpenAI's API).
* A model with a chat format of its own calls tools in its template's convention (``llmkit.template_tools``:
  Hermes' ``<tool_call>`` JSON, then the end-of-turn token). With a tool box, the end-of-turn token of a
  turn that holds complete calls is kept, every call runs, and the template's result turn is injected,
  marked as above; generation goes on in the next assistant turn. Without one, it is an ordinary stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from llmkit.chat import uses_own_template
from llmkit.errors import ConfigError, InputError
from llmkit.infer.sampling import GenerationConfig
from llmkit.infer.tools import defuse_special_tokens
from llmkit.template_tools import call_payloads, tool_turns
from llmkit.tokenizer import END, TOOL_CALL, TOOL_RESULT, Tokenizer


class Tools(Protocol):
    def run(self, payload: str) -> str: ...


def check_tools(tokenizer: Tokenizer) -> None:
    """Refuse (one line) running tools for a model whose chat format has no tool-call convention the
    engine runs: llmkit's in-turn protocol, or Hermes' ``<tool_call>`` tags in the model's own template."""
    try:
        if uses_own_template(tokenizer):
            tool_turns(tokenizer)
    except InputError as error:
        raise ConfigError("tools", "on", str(error)) from None


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # generated and injected tokens (not the end token that stopped generation)
    finish_reason: str  # "stop", "length", "tool_calls" (a call for the caller to run) or "cancelled"
    prompt_tokens: int
    logprobs: list[float | None] | None = None  # per token of token_ids, None for injected ones
    top_logprobs: list[dict[str, float] | None] | None = None  # the most likely tokens' text -> log-probability
    prompt_logprobs: list[float | None] | None = None  # echo: per prompt token, None for the first
    prompt_top_logprobs: list[dict[str, float] | None] | None = None
    tool_calls: list[dict] = field(default_factory=list)  # {"payload": ..., "result": ... or None}, in order
    injected: list[bool] = field(default_factory=list)  # per token of token_ids: a tool result's token


def border_table(pattern: str) -> list[int]:
    """Knuth-Morris-Pratt's failure function: entry i is the length of the longest proper prefix of
    ``pattern[:i + 1]`` that is also a suffix of it."""
    table, length = [0] * len(pattern), 0
    for index in range(1, len(pattern)):
        while length and pattern[index] != pattern[length]:
            length = table[length - 1]
        if pattern[index] == pattern[length]:
            length += 1
        table[index] = length
    return table


class StopPrefixes:
    """How much of a growing text's end may be the start of a stop string: for each stop string, the
    longest suffix of the text that is a prefix of it, updated as text is appended (Knuth-Morris-Pratt).
    That costs amortized constant time per appended character and stop string, where testing each prefix
    of a stop string against the text's end costs its length squared per token (1.9 s per 2,048 tokens
    for a 10,000-character stop string). The text never holds a whole stop string: the caller stops first."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.tables = [border_table(stop) for stop in stops]
        self.matched = [0] * len(stops)

    def extend(self, text: str) -> None:
        self.matched = self._advance(text)

    def held_back(self, pending: str = "") -> int:
        """Characters at the end of the text, followed by ``pending`` (not kept), that may begin a stop string."""
        return max(self._advance(pending), default=0)

    def _advance(self, text: str) -> list[int]:
        advanced = []
        for stop, table, length in zip(self.stops, self.tables, self.matched):
            for char in text:
                while length and stop[length] != char:
                    length = table[length - 1]
                if stop[length] == char:
                    length += 1
            advanced.append(length)
        return advanced


class TextTracker:
    """Incremental detokenisation of one sequence that finds stop strings and releases only final text.

    Decoding only the tokens after the last complete character keeps the cost per token constant: with
    byte-level BPE, text splits exactly at character boundaries (``decode(a + b) == decode(a) + decode(b)``
    when ``a`` ends a character). Stop strings cost time in the new text and the longest stop string per
    token, never in the text so far: matches are searched from longest_stop - 1 characters before the new
    text, and what to hold back comes from :class:`StopPrefixes`."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.longest_stop = max((len(stop) for stop in stop), default=0)
        self.prefixes = StopPrefixes(stop)  # of settled_text
        self.ids: list[int] = []
        self.settled, self.settled_text = 0, ""  # ids[:settled] decode to settled_text, which ends a character
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Take one token; return the text that became final."""
        self.ids.append(token_id)
        tail = self.tokenizer.decode(self.ids[self.settled :])
        # A new stop match must end in the new text, so it starts at most longest_stop - 1 characters before it.
        search_from = max(0, len(self.settled_text) - self.longest_stop + 1)
        self.text = self.settled_text + tail
        matches = [position for position in (self.text.find(stop, search_from) for stop in self.stop) if position != -1]
        if matches:
            self.text, self.stopped = self.text[: min(matches)], True
            return self._release(len(self.text))
        if not tail.endswith("\ufffd"):
            self.prefixes.extend(tail)
            self.settled, self.settled_text = len(self.ids), self.text
        safe = len(self.text.rstrip("\ufffd"))  # half a character: wait for the rest of its bytes
        return self._release(safe - self.prefixes.held_back(self.text[len(self.settled_text) : safe]))

    def finish(self) -> str:
        """The text held back so far (a stop-string prefix that never completed, a final partial character)."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        delta = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return delta


@dataclass
class Step:
    """What one step added to a request: the scheduler turns it into an event."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)


class CompletionState:
    """A running request: its whole token sequence (prompt, generated, injected), its text and its
    finish. ``sequence`` is what the model has to have seen before the next token is drawn."""

    def __init__(
        self,
        prompt_ids: list[int],
        config: GenerationConfig,
        tokenizer: Tokenizer,
        tools: Tools | None,
        context_length: int,
        device,
    ):
        self.config, self.tokenizer, self.tools, self.context_length = config, tokenizer, tools, context_length
        self.prompt_tokens = len(prompt_ids)
        self.sequence = list(prompt_ids)
        # Its own random stream: a seeded request draws the same tokens whatever shares its batch.
        self.generator = torch.Generator(device=device).manual_seed(config.seed) if config.seed is not None else None
        self.tracker = TextTracker(tokenizer, config.stop)
        self.sampled = 0
        self.token_ids: list[int] = []
        self.injected: list[bool] = []
        self.logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.prompt_logprobs: list[float | None] | None = None
        self.prompt_top_logprobs: list[dict[str, float] | None] | None = None
        self.tool_calls: list[dict] = []
        self.open_call: int | None = None  # index in token_ids of the payload's first token while a call is open
        self.finish_reason: str | None = None
        # Tools run in the model's own convention when it has a chat format of its own, else in llmkit's
        # in-turn protocol, whose ids are None (never matched) for a model without llmkit's tokens.
        self.turns = tool_turns(tokenizer) if tools is not None and uses_own_template(tokenizer) else None
        self.turn_start = 0  # index in token_ids where the assistant's current turn began
        special = {} if self.turns else tokenizer.special_ids
        self.end_of_turn, self.call_id, self.result_id = (
            special.get(END),
            special.get(TOOL_CALL),
            special.get(TOOL_RESULT),
        )
        self.end_ids = set(tokenizer.stop_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def accept(self, token: int, logprob: float | None = None, top: dict[str, float] | None = None) -> Step:
        """Take one sampled token (with its log-probability and top alternatives when asked for)."""
        step = Step()
        self.sampled += 1
        closes_call = self.open_call is not None and token == self.end_of_turn
        ends_calling_turn = self.turns is not None and self.tools is not None and token == self.turns.end_id
        if closes_call and self.tools is not None:
            self._append(token, step, False, logprob, top)
            self._run_tool(step)
        elif ends_calling_turn and (payloads := self._turn_calls()):
            self._append(token, step, False, logprob, top)
            self._run_turn_calls(payloads, step)
        elif token in self.end_ids and self.config.stop_at_end_of_text:
            if closes_call:
                self.tool_calls.append({"payload": self._payload(len(self.token_ids)), "result": None})
            self.finish_reason = "tool_calls" if closes_call else "stop"
        else:
            self._append(token, step, False, logprob, top)
            if token == self.call_id:
                self.open_call = len(self.token_ids)
        if self.finish_reason is None and self.tracker.stopped:
            self.finish_reason = "stop"
        if self.finish_reason is None and (
            self.sampled >= self.config.max_new_tokens or len(self.sequence) >= self.context_length
        ):
            self.finish_reason = "length"
        return step

    def cancel(self) -> None:
        self.finish_reason = "cancelled"

    def _append(
        self, token: int, step: Step, injected: bool, logprob: float | None, top: dict[str, float] | None
    ) -> None:
        self.sequence.append(token)
        self.token_ids.append(token)
        self.injected.append(injected)
        self.logprobs.append(logprob)
        self.top_logprobs.append(top)
        step.token_ids.append(token)
        step.logprobs.append(logprob)
        step.top_logprobs.append(top)
        step.text += self.tracker.add(token)

    def _payload(self, end: int) -> str:
        return self.tokenizer.decode(self.token_ids[self.open_call : end])

    def _run_tool(self, step: Step) -> None:
        """Run the call just closed and inject its result, if the context has room for it."""
        payload = self._payload(len(self.token_ids) - 1)
        self.open_call = None
        # Defused again here: whatever the tool box, its output must not forge protocol tokens.
        result = defuse_special_tokens(self.tools.run(payload))
        self.tool_calls.append({"payload": payload, "result": result})
        injected = [self.result_id, *self.tokenizer.encode(result), self.end_of_turn]
        if len(self.sequence) + len(injected) > self.context_length:
            self.finish_reason = "length"
            return
        for token in injected:
            self._append(token, step, True, None, None)

    def _turn_calls(self) -> list[str]:
        return call_payloads(self.tokenizer.decode(self.token_ids[self.turn_start :]))

    def _run_turn_calls(self, payloads: list[str], step: Step) -> None:
        """Run the calls of the turn just ended and inject the template's result turn, if the context has room."""
        results = [self.tools.run(payload) for payload in payloads]
        self.tool_calls += [{"payload": payload, "result": result} for payload, result in zip(payloads, results)]
        injected = self.tokenizer.encode(self.turns.injected_text(results))
        if len(self.sequence) + len(injected) > self.context_length:
            self.finish_reason = "length"
            return
        for token in injected:
            self._append(token, step, True, None, None)
        self.turn_start = len(self.token_ids)

    def completion(self) -> Completion:
        wants_logprobs = self.config.logprobs is not None
        return Completion(
            self.tracker.text,
            self.token_ids,
            self.finish_reason or "length",
            self.prompt_tokens,
            logprobs=self.logprobs if wants_logprobs else None,
            top_logprobs=self.top_logprobs if wants_logprobs and self.config.logprobs else None,
            prompt_logprobs=self.prompt_logprobs,
            prompt_top_logprobs=self.prompt_top_logprobs,
            tool_calls=self.tool_calls,
            injected=self.injected,
        )
