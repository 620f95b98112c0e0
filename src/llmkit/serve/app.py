"""``llmkit serve``: an OpenAI-compatible HTTP server and a browser chat page over one engine.

:func:`create_app` builds the FastAPI app around a :class:`~llmkit.infer.scheduler.Scheduler`, which a
background thread drives while the app runs: every request, from every client and endpoint, joins the
same continuously batched decode steps. The endpoints:

=============================  ========================================================================
``GET /v1/models``             the one served model (``/v1/models/{id}`` too)
``POST /v1/completions``       text completion, logprobs/echo for evaluation harnesses (:mod:`.completions`)
``POST /v1/chat/completions``  chat, streaming, client-side tools (:mod:`.chat_completions`)
``POST /tokenize``             vLLM's shape: text or messages -> ids (lm-eval's remote tokenizer uses it)
``POST /detokenize``           ids -> text; ``GET /tokenizer_info`` names the special tokens and template
``GET /health``                200 while the scheduler thread runs, else 503
``GET /metrics``               Prometheus text (:mod:`.metrics`)
``GET /``                      the chat page (``static/``: plain HTML, CSS and JavaScript)
=============================  ========================================================================

A guard in front of the app (:class:`Guard`, plain ASGI so that streaming is untouched) checks the Host
header of a server without an API key (421 unless a loopback name), the API key (401), that JSON
endpoints get ``Content-Type: application/json`` (415), refuses bodies over ``max_body_bytes`` before
reading more of them (413) and JSON that is not UTF-8 (400), and counts answers by endpoint and status
for ``/metrics``.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles

from llmkit.chat import CHAT_TEMPLATE, render_ids
from llmkit.errors import InputError
from llmkit.infer.engine import Engine
from llmkit.infer.scheduler import Scheduler
from llmkit.serve.chat_completions import conversation, create_chat_completion
from llmkit.serve.completions import create_completion
from llmkit.serve.openai_errors import APIError, error_body, error_response, install_error_handlers
from llmkit.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from llmkit.serve.server import ServeConfig, is_loopback
from llmkit.serve.service import Limits, Service
from llmkit.tokenizer import ENDOFTEXT, PAD

STATIC = resources.files("llmkit.serve") / "static"
PUBLIC_PATHS = ("/", "/health", "/favicon.ico")  # everything else needs the API key, when one is set
LOOPBACK_HOST = re.compile(rb"(localhost|127\.0\.0\.1|\[::1\])(:[0-9]{1,5})?", re.IGNORECASE)
logger = logging.getLogger("llmkit.serve")


class Guard:
    """ASGI middleware: Host header, API key, content type, body size and encoding, answer counting."""

    def __init__(self, app, service: Service, config: ServeConfig, endpoints: set[str], json_endpoints: set[str]):
        self.app, self.service, self.max_body_bytes = app, service, config.max_body_bytes
        self.endpoints, self.json_endpoints = endpoints, json_endpoints
        self.api_key = config.api_key.encode() if config.api_key else None
        # Without a key, a loopback server trusts whoever runs on this machine, and so would serve a web page
        # whose host name the attacker re-resolves to 127.0.0.1 (DNS rebinding); the browser still sends that
        # name as Host. Bound to the network without a key (--allow-public-without-key), it serves anyone anyway.
        self.check_host = config.api_key is None and is_loopback(config.host)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in self.endpoints else "/static" if path.startswith("/static/") else "other"
        status = [500]

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refuse_early(scope, path)
            if refusal is not None:
                return await refusal(scope, receive, counted_send)
            body, refusal = await self._read_body(scope, receive)
            if refusal is not None:
                return await refusal(scope, receive, counted_send)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: the disconnect a streaming response listens for

            await self.app(scope, replay, counted_send)
        finally:
            self.service.metrics.count_request(endpoint, status[0])

    def _refuse_early(self, scope, path: str) -> JSONResponse | None:
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"")
        if self.check_host and not LOOPBACK_HOST.fullmatch(host):
            return error_response(
                421,
                f"Host: {host.decode('latin-1')[:100]!r} is not localhost, 127.0.0.1 or [::1], "
                "the only names this server answers without an API key",
                code="misdirected_request",
            )
        if self.api_key is not None and path not in PUBLIC_PATHS and not path.startswith("/static/"):
            given = headers.get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not secrets.compare_digest(token, self.api_key):
                reason = "missing API key (send 'Authorization: Bearer KEY')" if not token else "incorrect API key"
                return JSONResponse(
                    error_body(401, reason, code="invalid_api_key"),
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        # A web page may send any body cross-origin without asking first, but not one declared as JSON.
        media_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if scope["method"] == "POST" and path in self.json_endpoints and media_type != b"application/json":
            return error_response(415, "Content-Type: must be application/json", code="unsupported_media_type")
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return self._too_large()
        return None

    async def _read_body(self, scope, receive) -> tuple[bytes, JSONResponse | None]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", PlainTextResponse("", status_code=499)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        content_type = dict(scope["headers"]).get(b"content-type", b"")
        if body and b"json" in content_type:
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as error:
                return body, JSONResponse(
                    error_body(400, f"the body is not valid UTF-8 (byte {error.start})"), status_code=400
                )
        return body, None

    def _too_large(self) -> JSONResponse:
        return JSONResponse(
            error_body(
                413,
                f"the request body is over this server's limit of {self.max_body_bytes} bytes",
                code="request_too_large",
            ),
            status_code=413,
        )


def _scheduler_of(engine_or_scheduler: Engine | Scheduler) -> Scheduler:
    return engine_or_scheduler.scheduler if isinstance(engine_or_scheduler, Engine) else engine_or_scheduler


def create_app(engine_or_scheduler: Engine | Scheduler, config: ServeConfig) -> FastAPI:
    """The app serving ``engine_or_scheduler``; its scheduler runs on a background thread while the app
    runs (started and stopped by the app's lifespan)."""
    scheduler = _scheduler_of(engine_or_scheduler)
    context = scheduler.context_length
    model_name = config.model_name or Path(config.engine.checkpoint).resolve().name
    limits = Limits(
        max_messages=config.max_messages,
        max_tokens=config.max_tokens,
        max_prompt_tokens=min(config.max_prompt_tokens or context - 1, context - 1),
        max_concurrent_requests=config.max_concurrent_requests,
        # More sequences than the scheduler may hold could never be admitted: a 400, not a 429 forever.
        max_choices=min(config.max_choices, config.max_concurrent_requests),
        max_stop_strings=config.max_stop_strings,
        max_stop_length=config.max_stop_length,
    )
    service = Service(scheduler, model_name, limits)
    tokenizer = service.tokenizer
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    # No /docs: Swagger UI loads its scripts from a CDN. The schema itself stays at /openapi.json.
    app = FastAPI(title="llmkit", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    install_error_handlers(app)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=created, max_model_len=context)])

    @app.get("/v1/models/{model}", response_model=ModelCard)
    async def get_model(model: str) -> ModelCard:
        service.check_model(model)
        return ModelCard(id=model_name, created=created, max_model_len=context)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http_request: Request):
        return await create_completion(service, body, http_request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http_request: Request):
        return await create_chat_completion(service, body, http_request)

    @app.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", "prompt")
        if body.model is not None:
            service.check_model(body.model)
        if body.prompt is not None:
            ids = tokenizer.encode(body.prompt)
            ids = [tokenizer.eot_id] + ids if body.add_special_tokens else ids
        else:
            try:
                ids, _ = render_ids(
                    tokenizer, conversation(body.messages), add_generation_prompt=body.add_generation_prompt
                )
            except InputError as error:
                raise APIError(400, str(error), "messages") from None
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=context)

    @app.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        if body.model is not None:
            service.check_model(body.model)
        vocab_size = tokenizer.vocab_size
        if not all(0 <= token < vocab_size for token in body.tokens):
            raise APIError(400, f"tokens: ids must be in [0, {vocab_size})", "tokens")
        return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        # llmkit documents start after <|endoftext|>, so it is both the bos and the eos token (as in GPT-2);
        # an imported model's tokens and chat template are its own.
        config = tokenizer.config
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": config.get("bos_token", ENDOFTEXT),
            "eos_token": config.get("eos_token", ENDOFTEXT),
            "pad_token": config.get("pad_token", PAD),
            "chat_template": tokenizer.chat_template or CHAT_TEMPLATE,
            "model_max_length": context,
            "vocab_size": tokenizer.vocab_size,
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = scheduler.in_background
        return JSONResponse(
            {
                "status": "ok" if alive else "scheduler not running",
                "running": scheduler.num_running,
                "waiting": scheduler.num_waiting,
            },
            status_code=200 if alive else 503,
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    endpoints = {route.path for route in app.routes if "{" not in route.path}
    json_endpoints = {route.path for route in app.routes if "POST" in getattr(route, "methods", ())}
    app.add_middleware(Guard, service=service, config=config, endpoints=endpoints, json_endpoints=json_endpoints)
    return app
