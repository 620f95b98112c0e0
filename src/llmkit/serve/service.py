"""What both generation endpoints share: the scheduler, the server's limits, sampling settings built from
a request, usage counts, and the streaming plumbing (Server-Sent Events, the concurrency slot, metrics).

What a request may cost is bounded before anything runs: its sequences (prompts x ``n``), its stop
strings' number and length (400 naming the field). A request is admitted only if its sequences fit
in the scheduler beside the ones it holds, up to ``max_concurrent_requests`` (429 otherwise), so a burst
cannot queue unbounded work behind the batch: sequences, not HTTP requests, are the work. A client that
hangs up, streaming or not, cancels its sequences, so their batch slots are free at the scheduler's
next step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from llmkit.infer.completion import Completion
from llmkit.infer.sampling import GenerationConfig
from llmkit.infer.scheduler import Event, Scheduler
from llmkit.serve.bridge import RequestGroup
from llmkit.serve.metrics import Metrics
from llmkit.serve.openai_errors import APIError, error_body
from llmkit.serve.schemas import SamplingFields, Usage


@dataclass
class Limits:
    max_messages: int
    max_prompt_tokens: int
    max_tokens: int
    max_concurrent_requests: int
    max_choices: int
    max_stop_strings: int
    max_stop_length: int


@dataclass
class Service:
    scheduler: Scheduler
    model_name: str
    limits: Limits
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.tokenizer = self.scheduler.tokenizer
        self.context_length = self.scheduler.context_length
        self.metrics = Metrics(lambda: self.scheduler.num_running, lambda: self.scheduler.num_waiting)

    # ----------------------------------------------------------------------------------- checks
    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404,
                f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                "model",
                "model_not_found",
            )

    def check_prompt(self, prompt_ids: list[int], param: str) -> None:
        if len(prompt_ids) > self.limits.max_prompt_tokens:
            raise APIError(
                400,
                f"{param}: {len(prompt_ids)} tokens is over this server's limit of "
                f"{self.limits.max_prompt_tokens} prompt tokens (the model's context is "
                f"{self.context_length} tokens)",
                param,
                "context_length_exceeded",
            )
        vocab_size = self.scheduler.model.config.vocab_size
        if not all(0 <= token < vocab_size for token in prompt_ids):
            raise APIError(400, f"{param}: token ids must be in [0, {vocab_size})", param)

    def check_max_tokens(self, max_tokens: int, param: str = "max_tokens") -> None:
        if max_tokens > self.limits.max_tokens:
            raise APIError(400, f"{param}: {max_tokens} is over this server's limit of {self.limits.max_tokens}", param)

    def check_choices(self, prompts: int, n: int, param: str) -> None:
        """A request asks for every prompt times ``n`` sequences."""
        if prompts * n > self.limits.max_choices:
            raise APIError(
                400,
                f"{param}: {prompts} prompt{'s' if prompts > 1 else ''} x n={n} is {prompts * n} sequences, "
                f"over this server's limit of {self.limits.max_choices} per request",
                param,
            )

    def check_stop(self, stops: list[str]) -> None:
        if len(stops) > self.limits.max_stop_strings:
            raise APIError(
                400,
                f"stop: {len(stops)} stop strings is over this server's limit of {self.limits.max_stop_strings}",
                "stop",
            )
        longest = max(map(len, stops), default=0)
        if longest > self.limits.max_stop_length:
            raise APIError(
                400,
                f"stop: a stop string of {longest} characters is over this server's limit of "
                f"{self.limits.max_stop_length}",
                "stop",
            )

    def room(self, prompt_ids: list[int]) -> int:
        """Tokens the context leaves after the prompt (at least one: check_prompt keeps prompts shorter)."""
        return max(1, self.context_length - len(prompt_ids))

    # ------------------------------------------------------------------------------ generation
    def generation_config(
        self,
        body: SamplingFields,
        max_new_tokens: int,
        choice: int,
        logprobs: int | None = None,
        echo: bool = False,
        extra_stop: tuple[str, ...] = (),
    ) -> GenerationConfig:
        """The engine's settings for choice ``choice`` of a request. Choices of a seeded request get seeds
        seed, seed+1, ...: reproducible, and not all the same sample."""
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,  # OpenAI's default
            top_p=body.top_p,
            stop=body.stop_strings + list(extra_stop),
            seed=None if body.seed is None else body.seed + choice,
            frequency_penalty=body.frequency_penalty or 0.0,
            presence_penalty=body.presence_penalty or 0.0,
            logprobs=logprobs,
            echo=echo,
        )

    def usage(self, prompts: list[list[int]], completions: list[Completion], count_generated: bool = True) -> Usage:
        """Every prompt counts once, however many choices it has; every choice's tokens count."""
        prompt_tokens = sum(len(prompt) for prompt in prompts)
        completion_tokens = sum(len(completion.token_ids) for completion in completions) if count_generated else 0
        self.metrics.prompt_tokens += prompt_tokens
        self.metrics.generation_tokens += completion_tokens
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )

    # ---------------------------------------------------------------------------- concurrency
    def begin(self, jobs: list[tuple[list[int], GenerationConfig]], http_request: HTTPRequest) -> "Generation":
        """Admit a generation request (429 when its jobs would take the scheduler over the limit) and submit them."""
        held, limit = self.scheduler.num_unfinished, self.limits.max_concurrent_requests
        if held + len(jobs) > limit:
            raise APIError(
                429,
                f"the server holds {held} sequences and this request adds {len(jobs)}, over its limit "
                f"of {limit}; retry shortly",
                code="rate_limit_exceeded",
            )
        self.metrics.in_flight += 1
        generation = Generation(self, RequestGroup(self.scheduler, jobs), http_request)
        try:
            generation.group.start()
        except BaseException:
            generation.close()
            raise
        return generation


class Generation:
    """One admitted request in flight: its scheduler requests, its timing. :meth:`close` (cancel what
    still runs, count the request out of the in-flight gauge) runs however it ends."""

    def __init__(self, service: Service, group: RequestGroup, http_request: HTTPRequest):
        self.service, self.group, self.http_request = service, group, http_request
        self.started = time.perf_counter()
        self.closed = False

    @property
    def completions(self) -> list[Completion]:
        return self.group.completions

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        waiting_for_first = True
        async for index, event in self.group.events():
            if waiting_for_first and (event.token_ids or event.finished):
                self.service.metrics.time_to_first_token.observe(time.perf_counter() - self.started)
                waiting_for_first = False
            yield index, event

    async def collect(self, on_event: Callable[[int, Event], None]) -> list[Completion]:
        """Run to the end, handing each event to ``on_event``; a client that hangs up cancels the requests."""
        watcher = asyncio.create_task(self._cancel_on_disconnect())
        try:
            async for index, event in self.events():
                on_event(index, event)
            return self.completions
        finally:
            watcher.cancel()
            self.close()

    def stream(self, chunks: AsyncIterator[BaseModel | dict]) -> StreamingResponse:
        """An SSE response of ``chunks``, ending with ``data: [DONE]``. A client that hangs up cancels the
        response's task, which closes this generation like any other ending."""

        async def events() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield sse(chunk)
                yield "data: [DONE]\n\n"
            except APIError as error:
                yield sse(error_body(error.status, error.message, error.param, error.code))
            except Exception as error:  # the headers are sent: the error can only travel as an event
                yield sse(error_body(500, f"internal server error ({type(error).__name__})"))
            finally:
                self.close()

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.group.cancel()
        self.service.metrics.in_flight -= 1
        self.service.metrics.request_latency.observe(time.perf_counter() - self.started)

    async def _cancel_on_disconnect(self) -> None:
        # The body has been read: the next message is the disconnect, whenever it comes.
        while (await self.http_request.receive())["type"] != "http.disconnect":
            pass
        self.group.cancel()


def sse(chunk: BaseModel | dict) -> str:
    body = chunk.model_dump_json() if isinstance(chunk, BaseModel) else json.dumps(chunk, ensure_ascii=False)
    return f"data: {body}\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())
