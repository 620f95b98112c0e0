"""Dataset files in the formats people already have, turned into conversations and preferences.

Files are JSON arrays or JSONL (optionally gzipped); every error names the file and line. The column
names are TRL's, plus the formats of the shared data (LLaMA-Factory/FastChat ShareGPT, Anthropic HH):

Conversations (:func:`load_conversations`, supervised fine-tuning)
    ``messages``: OpenAI-shaped ``[{role, content, tool_calls?}]``.
    ``conversations``: ShareGPT ``[{from, value}]`` with ``from`` in system/human/gpt and the
    LLaMA-Factory tool roles ``function_call`` (JSON ``{name, arguments}``, becomes an assistant tool
    call) and ``observation`` (becomes a tool result); an optional ``system`` column. The ``tools``
    column (tool schemas) is not rendered: the chat format has no tool-declaration turn.
    ``prompt`` / ``completion``: strings (a user turn, an assistant turn) or message lists.
    ``instruction`` / ``input`` / ``output``: Alpaca; the user turn is the instruction, then a blank
    line and the input when there is one (the Alpaca prompt without its preamble).
    ``instruction`` / ``instances``: Self-Instruct seed tasks; one instance per ``{input, output}``
    built by :func:`build_instance`, labelled with the task ``name``.

Preferences (:func:`load_preferences`, reward models and DPO)
    ``prompt`` / ``chosen`` / ``rejected``: explicit prompt; each a string or messages.
    ``chosen`` / ``rejected`` alone: implicit prompt, both full conversations (message lists, or
    HH-RLHF ``\\n\\nHuman: ... \\n\\nAssistant: ...`` transcripts). The prompt is their common prefix as in
    TRL's ``extract_prompt``, moved back when needed so that both continuations start with an
    assistant message (the prompt ends where the assistant starts to answer).
    ``conversations`` / ``chosen`` / ``rejected``: LLaMA-Factory, the prompt in ShareGPT form.
    ``prompt`` / ``responses``: K responses ranked best first, a :class:`~llmkit.chat.Ranking`.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Iterator, Sequence

from llmkit.chat import Conversation, Preference, Ranking, check_messages
from llmkit.errors import InputError
from llmkit.io import iter_jsonl

_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "observation": "tool",
    "tool": "tool",
}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def read_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` for each object of a JSON array or JSONL file; ``where`` is ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        head = file.read(4096).lstrip()
    if head.startswith(b"["):
        yield from _json_array_records(path)
        return
    for line_number, record in iter_jsonl(path):
        yield f"{path}:{line_number}", record


def _json_array_records(path: Path) -> Iterator[tuple[str, dict]]:
    """Decode the array one element at a time so each record's line number is known."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            text = file.read().decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not valid UTF-8") from None
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"\s*")
    position = whitespace.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    while position < len(text) and text[position] != "]":
        # Count newlines only since the last record: a large file stays one linear pass.
        line, counted = line + text.count("\n", counted, position), position
        try:
            record, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{line}: expected a JSON object, got {type(record).__name__}")
        yield f"{path}:{line}", record
        position = whitespace.match(text, end).end()
        if position < len(text) and text[position] == ",":
            position = whitespace.match(text, position + 1).end()
        elif position >= len(text) or text[position] != "]":
            raise InputError(
                f"{path}:{line + text.count(chr(10), counted, position)}: expected ',' or ']' after a record"
            )
    if position >= len(text):
        raise InputError(f"{path}: the JSON array is not closed")


def load_conversations(path: str | Path) -> list[Conversation]:
    """Every conversation of a supervised dataset file (formats in the module docstring)."""
    conversations = [
        conversation
        for where, record in read_records(path)
        for conversation in conversations_from_record(record, where)
    ]
    if not conversations:
        raise InputError(f"{path}: no conversations")
    return conversations


def load_preferences(path: str | Path) -> list[Preference | Ranking]:
    """Every preference pair or ranking of a file; ``row.pairs()`` expands either into pairs."""
    rows = [preference_from_record(record, where) for where, record in read_records(path)]
    if not rows:
        raise InputError(f"{path}: no preference rows")
    return rows


def conversations_from_record(record: dict, where: str) -> list[Conversation]:
    if "messages" in record:
        messages = to_messages(record["messages"], f"{where}: messages", "user")
    elif "conversations" in record:
        messages = to_messages(record["conversations"], f"{where}: conversations", "user")
    elif "prompt" in record and "completion" in record:
        messages = to_messages(record["prompt"], f"{where}: prompt", "user") + to_messages(
            record["completion"], f"{where}: completion", "assistant"
        )
    elif "instruction" in record and "instances" in record:
        return _seed_task_instances(record, where)
    elif "instruction" in record and "output" in record:
        instruction, given = _string(record, "instruction", where), record.get("input") or ""
        if not isinstance(given, str):
            raise InputError(f"{where}: field 'input' must be a string")
        user = f"{instruction}\n\n{given}" if given else instruction
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _string(record, "output", where)},
        ]
    else:
        raise InputError(
            f"{where}: no conversation format matches the keys {sorted(record)} (expected 'messages', "
            "'conversations', 'prompt'+'completion', 'instruction'+'output' or 'instruction'+'instances')"
        )
    messages = _with_system(record, messages, where)
    check_messages(messages, where)
    return [Conversation(messages)]


def preference_from_record(record: dict, where: str) -> Preference | Ranking:
    if "responses" in record:
        prompt = to_messages(_required(record, "prompt", where), f"{where}: prompt", "user")
        responses = record["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise InputError(f"{where}: 'responses' must be a list of at least two responses, best first")
        ranked = [
            to_messages(response, f"{where}: responses[{index}]", "assistant")
            for index, response in enumerate(responses)
        ]
        for messages in ranked:
            check_messages(prompt + messages, where)
        return Ranking(prompt, ranked)
    if "chosen" not in record or "rejected" not in record:
        raise InputError(
            f"{where}: no preference format matches the keys {sorted(record)} (expected "
            "'chosen'+'rejected' with an optional 'prompt' or 'conversations', or 'prompt'+'responses')"
        )
    if "prompt" in record or "conversations" in record:
        key = "prompt" if "prompt" in record else "conversations"
        prompt = _with_system(record, to_messages(record[key], f"{where}: {key}", "user"), where)
        chosen = to_messages(record["chosen"], f"{where}: chosen", "assistant")
        rejected = to_messages(record["rejected"], f"{where}: rejected", "assistant")
    else:
        prompt, chosen, rejected = extract_prompt(
            _conversation(record["chosen"], f"{where}: chosen"),
            _conversation(record["rejected"], f"{where}: rejected"),
            where,
        )
    check_messages(prompt + chosen, where)
    check_messages(prompt + rejected, where)
    return Preference(prompt, chosen, rejected)


def extract_prompt(
    chosen: list[dict], rejected: list[dict], where: str = "preference"
) -> tuple[list[dict], list[dict], list[dict]]:
    """Split two full conversations into (shared prompt, chosen continuation, rejected continuation)."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) == len(rejected):
        raise InputError(f"{where}: chosen and rejected are the same conversation")

    def answers_at(messages: list[dict], index: int) -> bool:
        return index < len(messages) and messages[index]["role"] == "assistant"

    while shared > 0 and not (answers_at(chosen, shared) and answers_at(rejected, shared)):
        shared -= 1
    if shared == 0:
        raise InputError(f"{where}: chosen and rejected share no prompt that ends before an assistant reply")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def parse_transcript(text: str, where: str) -> list[dict]:
    """An Anthropic HH-RLHF transcript ``\\n\\nHuman: ...\\n\\nAssistant: ...`` as messages."""
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise InputError(f"{where}: not a '\\n\\nHuman: ... \\n\\nAssistant: ...' transcript")
    return [
        {"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
        for speaker, content in zip(parts[1::2], parts[2::2])
    ]


def to_messages(value, where: str, role: str) -> list[dict]:
    """A string (one message of ``role``), one message object, or a list of OpenAI or ShareGPT messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        return [_message(value, where)]
    if isinstance(value, list) and value:
        return [_message(message, f"{where}[{index}]") for index, message in enumerate(value)]
    raise InputError(f"{where}: expected a string or a non-empty list of messages, got {value!r:.80}")


def build_instance(
    task_description: str,
    input: str,
    output: str,
    demonstrations: Sequence[tuple[str, str]] = (),
    task: str | None = None,
) -> Conversation:
    """An instruction instance in the Super-NaturalInstructions encoding (Wang et al. 2022): the task
    definition, optional positive examples as (input, output) pairs, then the instance's input; the
    output is the assistant's reply."""
    parts = [f"Definition: {task_description}"]
    parts += [
        f"Example {number}:\nInput: {example_input}\nOutput: {example_output}"
        for number, (example_input, example_output) in enumerate(demonstrations, start=1)
    ]
    if input:
        parts.append(("Now complete the following example:\n" if demonstrations else "") + f"Input: {input}")
    return Conversation(
        [{"role": "user", "content": "\n\n".join(parts)}, {"role": "assistant", "content": output}], task
    )


def _seed_task_instances(record: dict, where: str) -> list[Conversation]:
    instruction, instances = _string(record, "instruction", where), record["instances"]
    if not isinstance(instances, list) or not instances:
        raise InputError(f"{where}: 'instances' must be a non-empty list of {{input, output}}")
    conversations = []
    for index, instance in enumerate(instances):
        place = f"{where}: instances[{index}]"
        if not isinstance(instance, dict):
            raise InputError(f"{place}: expected an object with 'input' and 'output'")
        conversation = build_instance(
            instruction, instance.get("input") or "", _string(instance, "output", place), task=record.get("name")
        )
        check_messages(conversation.messages, place)
        conversations.append(conversation)
    return conversations


def _conversation(value, where: str) -> list[dict]:
    """A full conversation for implicit-prompt preferences: messages, or an HH-RLHF transcript."""
    if isinstance(value, str):
        return parse_transcript(value, where)
    return to_messages(value, where, "assistant")


def _message(message, where: str) -> dict:
    if not isinstance(message, dict):
        raise InputError(f"{where}: expected a message object, got {type(message).__name__}")
    if "role" in message:
        return {key: message[key] for key in ("role", "content", "tool_calls") if key in message}
    if "from" not in message or "value" not in message:
        raise InputError(
            f"{where}: a message needs 'role'/'content' or ShareGPT 'from'/'value', got keys {sorted(message)}"
        )
    speaker, value = message["from"], message["value"]
    if speaker == "function_call":
        try:
            call = json.loads(value)
            function = {"name": call["name"], "arguments": call.get("arguments", {})}
        except (json.JSONDecodeError, TypeError, KeyError):
            raise InputError(f'{where}: a function_call value must be JSON {{"name": ..., "arguments": ...}}') from None
        return {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": function}]}
    if speaker not in _SHAREGPT_ROLES:
        raise InputError(
            f"{where}: unknown ShareGPT speaker {speaker!r} (expected one of {', '.join(sorted(_SHAREGPT_ROLES))}, "
            f"function_call)"
        )
    return {"role": _SHAREGPT_ROLES[speaker], "content": value}


def _with_system(record: dict, messages: list[dict], where: str) -> list[dict]:
    """LLaMA-Factory's optional ``system`` column becomes the first message."""
    system = record.get("system")
    if not system or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": _string(record, "system", where)}] + messages


def _required(record: dict, key: str, where: str):
    if key not in record:
        raise InputError(f"{where}: missing field '{key}'")
    return record[key]


def _string(record: dict, key: str, where: str) -> str:
    value = _required(record, key, where)
    if not isinstance(value, str):
        raise InputError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value
