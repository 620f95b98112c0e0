"""Errors in OpenAI's JSON shape, ``{"error": {"message", "type", "param", "code"}}``, with its status codes.

Clients branch on the status (the ``openai`` package raises ``BadRequestError`` for 400,
``AuthenticationError`` for 401, ``NotFoundError`` for 404, ``RateLimitError`` for 429 ...), so every
failure the server can name gets the status OpenAI would give it: a malformed body is 400 (not
FastAPI's 422), a missing or wrong key 401, an unknown model or route 404, a body over the limit 413, a
body not declared as JSON 415, a Host header the server does not answer 421, too much work at once 429.
Only a bug is a 500, and its message does not leak a traceback.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit.errors import LlmkitError

logger = logging.getLogger("llmkit.serve")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error to answer with: its status, message, and the request field at fault (``param``)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _is_type_tag(part) -> bool:
    """Pydantic names the member of a union it tried (``'list[int]'``, ``'TextPart'``) in an error's location."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool") or part[:1].isupper())


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """A one-line message naming the field of the first error, and that field as OpenAI's ``param``."""
    if not errors:
        return "invalid request body", None
    first = errors[0]
    location = [part for part in first.get("loc", ()) if part != "body" and not _is_type_tag(part)]
    field = ".".join(str(part) for part in location) or None
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))})", None
    message = first.get("msg", "invalid value")
    # A union's members each report a failure; they say the same thing about one field.
    others = len({tuple(error.get("loc", ())[:2]) for error in errors[1:]} - {tuple(first.get("loc", ())[:2])})
    suffix = f" (and {others} more problem{'s' if others > 1 else ''})" if others else ""
    return (f"{field}: {message}" if field else message) + suffix, field


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can raise, answered in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return error_response(error.status, error.message, error.param, error.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(error.errors()))
        return error_response(400, message, param)

    @app.exception_handler(LlmkitError)
    async def _llmkit_error(request: Request, error: LlmkitError) -> JSONResponse:
        # The engine's refusals (a prompt too long for the context, a malformed conversation, a bad
        # sampling setting) are the client's to fix.
        return error_response(400, str(error), getattr(error, "field", None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = error.detail if isinstance(error.detail, str) else str(error.detail)
        if error.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(error.status_code, message, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("internal error while serving %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error ({type(error).__name__})")
