"""``POST /v1/chat/completions``: messages rendered in the model's chat format, answered by the engine.

The conversation goes through :func:`llmkit.chat.render_ids` with the generation prompt, exactly as SFT
rendered training conversations: system, user, assistant and tool messages (``developer`` is OpenAI's
newer name for ``system``), assistant tool calls in the in-stream protocol, tool results where the
engine would have injected them. A malformed conversation (a tool message that answers no call, text
that spells a special token) is a 400 naming the message.

Streaming sends OpenAI's ``chat.completion.chunk`` events: a first chunk with the role, content
deltas as the engine releases text, a tool-call delta when a call closes, a last chunk with the finish
reason, with ``stream_options.include_usage`` a usage chunk, then ``data: [DONE]``. Tools are the
client's (see :mod:`llmkit.serve.tool_calls`); where a turn ends, :mod:`llmkit.serve.turns`.
"""

from __future__ import annotations

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from llmkit.chat import render_ids, uses_own_template
from llmkit.errors import InputError
from llmkit.serve.openai_errors import APIError
from llmkit.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChoiceLogprobs,
)
from llmkit.serve.service import Generation, Service, new_id, now
from llmkit.serve.tool_calls import AssistantTurn, TemplateTurn, calls_allowed, client_tools, forced_prefix
from llmkit.serve.turns import turn_stop_strings
from llmkit.tokenizer import TOOL_CALL, Tokenizer


def conversation(messages: list[ChatMessage]) -> list[dict]:
    """The request's messages as llmkit.chat's dicts."""
    rendered = []
    for index, message in enumerate(messages):
        entry = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
        if message.role != "assistant" and entry["content"] is None:
            raise APIError(
                400, f"messages.{index}.content: a {message.role} message needs content", f"messages.{index}.content"
            )
        if message.tool_calls:
            entry["tool_calls"] = [
                {"type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}
                for call in message.tool_calls
            ]
        rendered.append(entry)
    return rendered


def prompt_ids(tokenizer: Tokenizer, messages: list[ChatMessage], tools: list[dict] | None = None) -> list[int]:
    try:
        ids, _ = render_ids(tokenizer, conversation(messages), add_generation_prompt=True, tools=tools)
    except InputError as error:
        raise APIError(400, str(error), "messages") from None
    return ids


class ChatJob:
    """One chat request: its prompt, per-choice settings and per-choice assistant turns."""

    def __init__(self, service: Service, body: ChatCompletionRequest):
        service.check_model(body.model)
        if len(body.messages) > service.limits.max_messages:
            raise APIError(
                400,
                f"messages: {len(body.messages)} messages is over this server's limit of {service.limits.max_messages}",
                "messages",
            )
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs=true", "top_logprobs")
        service.check_choices(1, body.n, "n")
        service.check_stop(body.stop_strings)
        self.service, self.body, self.tokenizer = service, body, service.tokenizer
        self.tools = client_tools(body.tools)
        self.prefix = forced_prefix(body.tool_choice, self.tools)
        own_format = uses_own_template(self.tokenizer)
        if own_format and self.prefix is not None:
            raise APIError(
                400, "tool_choice: this model has a chat format of its own; it takes 'auto' or 'none'", "tool_choice"
            )
        definitions = [tool.model_dump(exclude_none=True) for tool in body.tools] if own_format and body.tools else None
        prompt = prompt_ids(self.tokenizer, body.messages, definitions)
        if self.prefix is not None:
            prompt += [self.tokenizer.special_ids[TOOL_CALL], *self.tokenizer.encode(self.prefix)]
        service.check_prompt(prompt, "messages")
        self.prompt = prompt
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        if requested == 0:
            raise APIError(400, f"{param}: must be at least 1", param)
        if requested is not None:
            service.check_max_tokens(requested, param)
        max_new_tokens = requested or min(service.limits.max_tokens, service.room(prompt))
        self.detect_calls = calls_allowed(body.tool_choice, self.tools)
        extra_stop = () if own_format else tuple(turn_stop_strings([], self.detect_calls))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        self.jobs = [
            (prompt, service.generation_config(body, max_new_tokens, choice, logprobs, extra_stop=extra_stop))
            for choice in range(body.n)
        ]
        self.turns = [
            TemplateTurn(self.tokenizer, self.tools, self.detect_calls, body.logprobs)
            if own_format
            else AssistantTurn(self.tokenizer, self.tools, self.detect_calls, self.prefix, body.logprobs)
            for _ in range(body.n)
        ]
        self.id, self.created = new_id("chatcmpl"), now()

    def chunk(self, index: int, delta: dict, reason: str | None = None, logprobs: list | None = None) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        if logprobs:
            choice["logprobs"] = {"content": [entry.model_dump() for entry in logprobs]}
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.service.model_name,
            "choices": [choice],
        }


async def create_chat_completion(
    service: Service, body: ChatCompletionRequest, http_request: HTTPRequest
) -> ChatCompletionResponse | StreamingResponse:
    job = ChatJob(service, body)
    generation = service.begin(job.jobs, http_request)
    if body.stream:
        return generation.stream(stream_chunks(job, generation))
    completions = await generation.collect(lambda index, event: job.turns[index].feed(event))
    choices = []
    for index, (turn, completion) in enumerate(zip(job.turns, completions)):
        result = turn.finish(completion)
        message = AssistantMessage(
            content=turn.content if turn.content or not result.tool_calls else None, tool_calls=result.tool_calls
        )
        logprobs = ChoiceLogprobs(content=turn.logprobs) if body.logprobs else None
        choices.append(ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=result.finish_reason))
    return ChatCompletionResponse(
        id=job.id,
        created=job.created,
        model=service.model_name,
        choices=choices,
        usage=service.usage([job.prompt], completions),
    )


async def stream_chunks(job: ChatJob, generation: Generation):
    for index in range(len(job.jobs)):
        yield job.chunk(index, {"role": "assistant", "content": ""})
    async for index, event in generation.events():
        turn = job.turns[index]
        delta, logprobs = turn.feed(event)
        if delta or logprobs:
            yield job.chunk(index, {"content": delta}, logprobs=logprobs)
        if event.finished is not None:
            result = turn.finish(event.finished)
            if result.content_delta:
                yield job.chunk(index, {"content": result.content_delta})
            if result.tool_calls:
                calls = [{"index": position, **call} for position, call in enumerate(result.tool_calls)]
                yield job.chunk(index, {"tool_calls": calls})
            yield job.chunk(index, {}, result.finish_reason)
    if job.body.stream_options is not None and job.body.stream_options.include_usage:
        usage = job.service.usage([job.prompt], generation.completions)
        yield {
            "id": job.id,
            "object": "chat.completion.chunk",
            "created": job.created,
            "model": job.service.model_name,
            "choices": [],
            "usage": usage.model_dump(),
        }
