"""Request and response bodies of the HTTP API, in the shapes of OpenAI's API.

Requests are validated strictly (``strict=True``): ``"16"`` is not a number and ``true`` is not an
integer, so a client's type error is a 400 naming the field rather than a silent conversion. Fields
OpenAI defines that this server does not implement are declared only where ignoring them would change
the answer (``logit_bias``, ``suffix``, ``best_of``, ``response_format``): those are refused unless left
at their neutral value. Other unknown fields are ignored, as vLLM does, so clients that send optional
extras (``user``, ``parallel_tool_calls``, ``service_tier``) work unchanged.

The bounds are OpenAI's: ``temperature`` 0..2, ``top_p`` (0, 1], penalties -2..2, ``logprobs`` up to 20
(``llmkit.infer.sampling.MAX_LOGPROBS``). The server's own limits (prompt length, ``max_tokens``,
message count, sequences per request, stop strings) depend on its configuration and are checked in
:mod:`llmkit.serve.service`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmkit.infer.sampling import MAX_LOGPROBS

MAX_CHOICES = 16  # ``n``: completions per prompt


class Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Request):
    include_usage: bool = False


class SamplingFields(Request):
    """What both generation endpoints accept."""

    model: str
    max_tokens: int | None = Field(None, ge=0, description="tokens to generate at most (the server caps it)")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="a 64-bit integer")  # torch's seed range
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if not all(stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, bias):
        if bias:
            raise ValueError("logit_bias is not supported by this server")
        return bias

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop or [])


# ---------------------------------------------------------------------------------------- completions
class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text, token ids, or a list of either (one completion per prompt)"
    )
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="chosen-token log-probs and this many alternatives"
    )
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, prompt):
        if isinstance(prompt, list) and not prompt:
            raise ValueError("at least one prompt is needed")
        if isinstance(prompt, list) and isinstance(prompt[0], list) and not all(prompt):
            raise ValueError("a token-id prompt needs at least one token")
        return prompt

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix):
        if suffix:
            raise ValueError("suffix (insertion) is not supported by this server")
        return suffix


class CompletionLogprobs(BaseModel):
    """The legacy shape: one entry per token, the first prompt token scored None (nothing precedes it)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ------------------------------------------------------------------------------------------------ chat
class TextPart(Request):
    type: Literal["text"]
    text: str


class FunctionCall(Request):
    name: str
    arguments: str


class ToolCall(Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content


class FunctionDefinition(Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDefinition(Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Request):
    name: str


class NamedToolChoice(Request):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormat(Request):
    type: Literal["text"]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="newer name of max_tokens")
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[dict] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


# -------------------------------------------------------------------------------------- tokenizer API
class TokenizeRequest(Request):
    """vLLM's ``/tokenize`` (lm-eval's remote tokenizer uses it): text, or chat messages rendered with
    the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = False
    add_generation_prompt: bool = True


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmkit"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
