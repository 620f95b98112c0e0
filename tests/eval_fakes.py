"""A scripted stand-in for the inference engine, for evaluation tests whose expected numbers come from
known replies: the tokenizer maps characters to code points, and ``reply(prompt, config)`` writes the
completion of each prompt."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

from llmkit.infer import Completion


class CharacterTokenizer:
    eot_id = 0

    def encode(self, text: str) -> list[int]:
        return [ord(character) for character in text]

    def decode(self, ids) -> str:
        return "".join(chr(token) for token in ids)


class ScriptedEngine:
    """``generate_ids`` answers every prompt with ``reply(prompt_text, its config)`` and records each call."""

    def __init__(self, reply: Callable, context_length: int = 100_000):
        self.reply = reply
        self.tokenizer = CharacterTokenizer()
        self.model = SimpleNamespace(config=SimpleNamespace(context_length=context_length))
        self.calls: list[dict] = []

    def generate_ids(self, prompts: list[list[int]], config, tools=None) -> list[Completion]:
        texts = [self.tokenizer.decode(ids) for ids in prompts]
        configs = config if isinstance(config, list) else [config] * len(prompts)
        self.calls.append({"prompts": texts, "configs": configs, "tools": tools})
        completions = []
        for text, ids, prompt_config in zip(texts, prompts, configs):
            reply = self.reply(text, prompt_config)
            completions.append(
                Completion(
                    text=reply, token_ids=self.tokenizer.encode(reply), finish_reason="stop", prompt_tokens=len(ids)
                )
            )
        return completions
