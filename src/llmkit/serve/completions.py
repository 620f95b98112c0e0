"""``POST /v1/completions``: OpenAI's legacy text completion, including what evaluation harnesses need.

A prompt is text, token ids, or a list of either; each gets ``n`` choices, indexed prompt-major
(choice ``i * n + j`` is sample ``j`` of prompt ``i``, as OpenAI and vLLM order them).

``logprobs`` + ``echo`` is how lm-evaluation-harness's ``local-completions`` model scores multiple
choice: it sends ``context + continuation`` with ``echo=true, logprobs=1, max_tokens=1`` and sums
``token_logprobs[context_length:-1]``. The legacy shape is four parallel lists: ``tokens`` (each token's
text), ``token_logprobs`` (log p(token | tokens before it); None for the first prompt token, which has
no context), ``top_logprobs`` (the most likely tokens at each position) and ``text_offset`` (where each
token starts in the returned text). Prompt log-probs come from the scheduler's echo scoring
(``llmkit.infer.scoring.score_sequences``), generated ones from the raw distribution of each step.
With ``echo`` and ``max_tokens=0`` only the prompt is scored: the request still passes through the
scheduler, which generates one token that is dropped.
"""

from __future__ import annotations

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from llmkit.infer.completion import Completion
from llmkit.serve.openai_errors import APIError
from llmkit.serve.schemas import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from llmkit.serve.service import Generation, Service, new_id, now
from llmkit.tokenizer import Tokenizer

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


class TokenOffsets:
    """Character offsets where tokens start in their decoded text. With byte-level BPE a character may
    span tokens; a token that continues a character is placed at that character's start."""

    def __init__(self, tokenizer: Tokenizer, start: int = 0):
        self.tokenizer, self.length, self.pending = tokenizer, start, []

    def add(self, token_ids: list[int]) -> list[int]:
        offsets = []
        for token in token_ids:
            offsets.append(self.length)
            self.pending.append(token)
            piece = self.tokenizer.decode(self.pending)
            if not piece.endswith("\ufffd"):
                self.length += len(piece)
                self.pending = []
        return offsets


def legacy_logprobs(
    tokenizer: Tokenizer,
    offsets: TokenOffsets,
    token_ids: list[int],
    logprobs: list[float | None],
    top: list[dict[str, float] | None] | None,
    with_top: bool,
) -> CompletionLogprobs:
    logprobs = logprobs if logprobs is not None else [None] * len(token_ids)  # a request's cancellation event has none
    return CompletionLogprobs(
        tokens=[tokenizer.decode([token]) for token in token_ids],
        token_logprobs=list(logprobs),
        top_logprobs=(list(top) if top is not None else [None] * len(token_ids)) if with_top else None,
        text_offset=offsets.add(token_ids),
    )


def prompts_of(prompt) -> list:
    """The request's prompts as a list: a list of texts or of token-id lists as it is, one prompt in a list."""
    return prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]


def prompt_ids_of(service: Service, prompts: list) -> list[list[int]]:
    """Every prompt as token ids (text as the engine encodes it: empty text is <|endoftext|>)."""
    ids = [
        service.tokenizer.encode(item) or [service.tokenizer.eot_id] if isinstance(item, str) else list(item)
        for item in prompts
    ]
    for index, prompt_ids in enumerate(ids):
        service.check_prompt(prompt_ids, f"prompt[{index}]" if len(ids) > 1 else "prompt")
    return ids


class CompletionJob:
    """One request's prompts, settings and the choice texts and log-probs built from its events."""

    def __init__(self, service: Service, body: CompletionRequest):
        service.check_model(body.model)
        if body.best_of not in (None, body.n):
            raise APIError(400, "best_of: must equal n (this server returns every sample it draws)", "best_of")
        max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        if body.stream and body.echo and body.logprobs is not None:
            # Events carry the generated tokens' log-probs; the prompt's arrive with the finished completion only.
            raise APIError(400, "echo with logprobs cannot be streamed; send stream=false", "stream")
        if max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens: 0 is only allowed with echo (scoring the prompt)", "max_tokens")
        service.check_max_tokens(max_tokens)
        prompts = prompts_of(body.prompt)
        service.check_choices(len(prompts), body.n, "prompt" if len(prompts) > 1 else "n")  # before encoding them
        service.check_stop(body.stop_strings)
        self.service, self.body, self.tokenizer = service, body, service.tokenizer
        self.scoring_only = max_tokens == 0
        self.prompts = prompt_ids_of(service, prompts)
        self.jobs = [
            (prompt, service.generation_config(body, max(max_tokens, 1), choice, body.logprobs, body.echo))
            for prompt in self.prompts
            for choice in range(body.n)
        ]
        self.id, self.created = new_id("cmpl"), now()

    def prompt_of(self, index: int) -> list[int]:
        return self.prompts[index // self.body.n]

    def echo_part(
        self, index: int, completion: Completion, offsets: TokenOffsets
    ) -> tuple[str, CompletionLogprobs | None]:
        """The prompt's text and log-probs, for a choice of an ``echo`` request."""
        prompt = self.prompt_of(index)
        logprobs = None
        if self.body.logprobs is not None:
            logprobs = legacy_logprobs(
                self.tokenizer,
                offsets,
                prompt,
                completion.prompt_logprobs,
                completion.prompt_top_logprobs,
                self.body.logprobs > 0,
            )
        return self.tokenizer.decode(prompt), logprobs

    def choice(self, index: int, completion: Completion) -> CompletionChoice:
        text, offsets, logprobs = "", TokenOffsets(self.tokenizer), None
        if self.body.echo:
            text, logprobs = self.echo_part(index, completion, offsets)
        if not self.scoring_only:
            text += completion.text
            if self.body.logprobs is not None:
                generated = legacy_logprobs(
                    self.tokenizer,
                    offsets,
                    completion.token_ids,
                    completion.logprobs,
                    completion.top_logprobs,
                    self.body.logprobs > 0,
                )
                logprobs = merge(logprobs, generated)
        return CompletionChoice(
            index=index, text=text, logprobs=logprobs, finish_reason=finish_reason(completion, self.scoring_only)
        )

    def response(self, choices: list[CompletionChoice], completions: list[Completion]) -> CompletionResponse:
        return CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.service.model_name,
            choices=choices,
            usage=self.service.usage(self.prompts, completions, not self.scoring_only),
        )


def merge(first: CompletionLogprobs | None, second: CompletionLogprobs) -> CompletionLogprobs:
    if first is None:
        return second
    top = first.top_logprobs + second.top_logprobs if first.top_logprobs is not None else None
    return CompletionLogprobs(
        tokens=first.tokens + second.tokens,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        top_logprobs=top,
        text_offset=first.text_offset + second.text_offset,
    )


def finish_reason(completion: Completion, scoring_only: bool) -> str:
    """Legacy completions know "stop" and "length"; a tool call the model closed ended its text, a stop."""
    return "length" if scoring_only or completion.finish_reason == "length" else "stop"


async def create_completion(
    service: Service, body: CompletionRequest, http_request: HTTPRequest
) -> CompletionResponse | StreamingResponse:
    job = CompletionJob(service, body)
    generation = service.begin(job.jobs, http_request)
    if body.stream:
        return generation.stream(stream_chunks(job, generation))
    completions = await generation.collect(lambda index, event: None)
    return job.response([job.choice(index, completion) for index, completion in enumerate(completions)], completions)


async def stream_chunks(job: CompletionJob, generation: Generation):
    body, service = job.body, job.service
    offsets = [TokenOffsets(job.tokenizer) for _ in job.jobs]
    started_choices: set[int] = set()

    def chunk(index: int, text: str, logprobs: CompletionLogprobs | None, reason: str | None) -> dict:
        return {
            "id": job.id,
            "object": "text_completion",
            "created": job.created,
            "model": service.model_name,
            "choices": [CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=reason).model_dump()],
        }

    async for index, event in generation.events():
        text, logprobs = "", None
        if body.echo and index not in started_choices:
            text = job.tokenizer.decode(job.prompt_of(index))
            offsets[index].add(job.prompt_of(index))
        started_choices.add(index)
        if not job.scoring_only:
            text += event.text
            if body.logprobs is not None:
                logprobs = merge(
                    logprobs,
                    legacy_logprobs(
                        job.tokenizer,
                        offsets[index],
                        event.token_ids,
                        event.logprobs,
                        event.top_logprobs,
                        body.logprobs > 0,
                    ),
                )
        reason = finish_reason(event.finished, job.scoring_only) if event.finished else None
        if text or logprobs or reason:
            yield chunk(index, text, logprobs, reason)
    if body.stream_options is not None and body.stream_options.include_usage:
        yield {
            "id": job.id,
            "object": "text_completion",
            "created": job.created,
            "model": service.model_name,
            "choices": [],
            "usage": service.usage(job.prompts, generation.completions, not job.scoring_only).model_dump(),
        }
