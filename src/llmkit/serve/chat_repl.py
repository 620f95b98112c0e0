"""``llmkit chat``: a conversation with a checkpoint in the terminal.

Each turn renders the whole conversation with llmkit's chat format (:func:`llmkit.chat.render_ids`, as
SFT trained it) and streams the answer from the engine's scheduler, the same path the HTTP server
takes. With ``--tools`` the engine runs the built-in calculator and Python sandbox when the model calls
them and the results appear inline; the saved transcript keeps the calls and results as OpenAI-shaped
messages, so it renders back to the very tokens the model saw and can serve as SFT data.

Commands: ``/system TEXT`` sets the system prompt (``/system`` alone shows it), ``/reset`` forgets the
conversation (the system prompt stays), ``/save PATH`` writes the conversation as one JSONL row
``{"messages": [...]}``, ``/quit`` (or Ctrl-D) leaves. Ctrl-C while the model writes stops the answer
there and keeps what it wrote.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator

from llmkit.chat import render_ids
from llmkit.config import check
from llmkit.infer.completion import Tools
from llmkit.infer.engine import Engine, EngineConfig
from llmkit.infer.sampling import GenerationConfig
from llmkit.infer.tools import ToolSelection, select_tools
from llmkit.io import atomic_write_text
from llmkit.serve.turns import assistant_messages, turn_stop_strings

HELP = "/system TEXT  set the system prompt | /reset  forget the conversation | /save PATH  write it as JSONL | /quit"


@dataclass
class ChatConfig:
    system: str = field(default="", metadata={"help": "system prompt"})
    max_new_tokens: int = field(default=512, metadata={"help": "longest answer in tokens"})
    temperature: float = field(default=0.7, metadata={"help": "softmax temperature; 0 = greedy"})
    top_p: float | None = field(default=None, metadata={"help": "nucleus sampling probability mass"})
    seed: int | None = field(
        default=None, metadata={"help": "random seed of every answer (the same conversation gets the same answer)"}
    )
    tools: ToolSelection = field(
        default="none",
        metadata={"help": "tools run when the model calls them: none, calculator, all (calculator + Python sandbox)"},
    )
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(checkpoint="runs/sft", max_batch_size=1))

    def __post_init__(self) -> None:
        check(self.max_new_tokens > 0, "max_new_tokens", self.max_new_tokens, "must be positive")
        check(self.temperature >= 0, "temperature", self.temperature, "must be >= 0")


class ChatSession:
    """A conversation on an engine: :meth:`reply` streams an answer, :meth:`command` runs a /command."""

    def __init__(self, engine: Engine, generation: GenerationConfig, system: str = "", tools: Tools | None = None):
        self.engine, self.tools = engine, tools
        self.generation = dataclasses.replace(generation, stop=turn_stop_strings(generation.stop, tools is not None))
        self.system = system
        self.messages: list[dict] = []

    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def reply(self, user_text: str) -> Iterator[str]:
        """Add the user's message and stream the answer. Closing the iterator early (Ctrl-C) cancels the
        request and keeps the answer written so far; a refused message (too long, a reserved token)
        raises before anything is added."""
        messages = self.conversation() + [{"role": "user", "content": user_text}]
        prompt, _ = render_ids(self.engine.tokenizer, messages, add_generation_prompt=True)
        request = self.engine.scheduler.submit(prompt, self.generation, self.tools)
        self.messages.append({"role": "user", "content": user_text})
        written = ""
        try:
            for event in request.events():
                written += event.text
                if event.text:
                    yield event.text
        finally:
            if request.completion is None:
                request.cancel()
            text = request.completion.text if request.completion else written
            self.messages += assistant_messages(text, self.engine.tokenizer)

    def command(self, line: str) -> str | None:
        """Run a /command; returns what to show, or None for /quit."""
        name, _, argument = line.strip().partition(" ")
        argument = argument.strip()
        if name == "/quit":
            return None
        if name == "/system":
            if argument:
                self.system = argument
                return "system prompt set"
            return f"system prompt: {self.system!r}"
        if name == "/reset":
            self.messages = []
            return "conversation forgotten"
        if name == "/save":
            if not argument:
                return "usage: /save PATH"
            atomic_write_text(argument, json.dumps({"messages": self.conversation()}, ensure_ascii=False) + "\n")
            return f"saved {len(self.conversation())} messages to {argument}"
        return f"unknown command {name}; {HELP}"


def repl(
    session: ChatSession, read: Callable[[str], str] = input, write: Callable[[str], None] = sys.stdout.write
) -> None:
    """The read-answer loop: lines starting with / are commands, others are the user's messages."""
    write(f"llmkit chat  ({HELP})\n")
    while True:
        try:
            line = read("> ")
        except EOFError:
            write("\n")
            return
        if not line.strip():
            continue
        if line.startswith("/"):
            output = session.command(line)
            if output is None:
                return
            write(output + "\n")
            continue
        answer = session.reply(line)
        try:
            for delta in answer:
                write(delta)
                sys.stdout.flush()
        except KeyboardInterrupt:
            answer.close()
            write(" [stopped]")
        write("\n")


def run_chat(config: ChatConfig) -> None:
    engine = Engine.from_config(config.engine)
    generation = GenerationConfig(
        max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p, seed=config.seed
    )
    repl(ChatSession(engine, generation, config.system, select_tools(config.tools)))
