"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for every way a request can fail.

Messages name the field, the value and what is allowed; internal failures say what failed, never how (no
tracebacks leave the server; they go to its log).
"""
from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("pernode.serve.server")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
          404: "invalid_request_error", 405: "invalid_request_error", 408: "invalid_request_error",
          413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "service_unavailable_error"}
_MAX_VALUE_REPR = 80


class APIError(Exception):
    """A request that ends with an HTTP error in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


_FIELD_PREFIX = re.compile(r"^(\w+)=")


def param_of(message: str, default: str | None = None) -> str | None:
    """The field an engine or SamplingParams message is about (they start with `field=value`)."""
    m = _FIELD_PREFIX.match(message)
    if m:
        return m.group(1)
    if "max_tokens" in message:
        return "max_tokens"
    return default


def short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_VALUE_REPR else text[:_MAX_VALUE_REPR] + "...'"


def from_validation_error(exc: ValidationError, field_names: set[str],
                          type_hints: dict[str, str]) -> APIError:
    """One 400 from pydantic's errors: the first problem, with its field path, its value and what is expected."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    kind, loc = first["type"], first["loc"]
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", first["msg"])
        return bad_request(f"the request body is not valid JSON ({detail}): send a JSON object")
    if not loc:
        got = type(first.get("input")).__name__
        return bad_request(f"the request body must be a JSON object, got a JSON {_json_type(got)}")
    # Union members show up in `loc` as tags like 'list[int]'; keep only field names and list indices.
    parts = [p for p in loc if isinstance(p, int) or p in field_names]
    path = ""
    for p in parts:
        path += f"[{p}]" if isinstance(p, int) else (f".{p}" if path else p)
    top = parts[0] if parts else str(loc[0])
    if kind == "missing":
        return bad_request(f"{path} is required", param=top)
    # For a union every member fails; the field's hint says what is accepted better than the first member's msg.
    union_failed = len(errors) > 1 and all(e["loc"][:1] == loc[:1] for e in errors)
    if union_failed and top in type_hints and len(parts) == 1:
        return bad_request(f"{top}={short_repr(first.get('input'))} has the wrong type: expected "
                           f"{type_hints[top]}", param=top)
    value = first.get("input")
    return bad_request(f"{path}={short_repr(value)} is invalid: {first['msg'].lower()}", param=top)


def _json_type(python_type: str) -> str:
    return {"list": "array", "str": "string", "int": "number", "float": "number", "bool": "boolean",
            "NoneType": "null"}.get(python_type, python_type)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}: see GET /v1/models, POST /v1/completions, " \
                      f"POST /v1/chat/completions, POST /tokenize, POST /detokenize, GET /health, GET /metrics, " \
                      f"GET /metrics/steps"
            return APIError(404, message, code="unknown_route").response()
        if exc.status_code == 405:
            return APIError(405, f"method {request.method} is not allowed on {request.url.path}",
                            code="method_not_allowed", headers=dict(exc.headers or {})).response()
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error ({type(exc).__name__}); the server log has the details",
                        code="internal_error").response()
