"""The one table that maps fastserve errors to HTTP statuses."""

from __future__ import annotations

import logging
import math

import orjson
from aiohttp import web

from fastserve import errors

_STATUS: tuple[tuple[type[errors.FastServeError], int], ...] = (
    (errors.InvalidRequest, 400),
    (errors.ChangeRefused, 400),
    (errors.Unauthorized, 401),
    (errors.Forbidden, 403),
    (errors.ModelNotFound, 404),
    (errors.RecordNotFound, 404),
    (errors.RequestTimeout, 408),
    (errors.GateFailed, 409),
    (errors.PayloadTooLarge, 413),
    (errors.UnsupportedMediaType, 415),
    (errors.ModelNotReady, 503),
    (errors.Unavailable, 503),
    (errors.InferenceFailed, 500),
)

_MAX_MESSAGE = 300

log = logging.getLogger("fastserve.http")


def status_of(exc: errors.FastServeError) -> int:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None, **extra: object
) -> web.Response:
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 3] + "..."
    return web.Response(
        status=status,
        body=orjson.dumps({"error": message, **extra}),
        content_type="application/json",
        headers=headers,
    )


def from_exception(exc: errors.FastServeError) -> web.Response:
    status = status_of(exc)
    headers = None
    if isinstance(exc, errors.Unavailable | errors.ModelNotReady):
        retry = getattr(exc, "retry_after_s", 1.0)
        headers = {"Retry-After": str(max(1, math.ceil(retry)))}
    elif isinstance(exc, errors.Unauthorized):
        headers = {"WWW-Authenticate": 'Bearer realm="fastserve admin"'}
    extra: dict[str, object] = {}
    if isinstance(exc, errors.GateFailed):
        extra["conditions"] = exc.conditions
    elif isinstance(exc, errors.SchemaViolation):
        extra["failures"] = exc.failures[:20]
    response = error_response(status, str(exc), headers, **extra)
    if isinstance(exc, errors.RequestTimeout | errors.PayloadTooLarge | errors.ClientDisconnected):
        # the rest of the body is still on the connection (or never comes): do not reuse it
        response.force_close()
    return response


def outcome_of(exc: errors.FastServeError) -> str:
    """The bounded outcome label of a failed request (for statistics and metrics)."""
    if isinstance(exc, errors.Overloaded | errors.ServerStopping | errors.ModelNotReady):
        return "rejected"
    if isinstance(exc, errors.QueueTimeout):
        return "timeout"
    if status_of(exc) < 500:
        return "invalid"
    return "error"


def response_for(exc: Exception, request: web.BaseRequest) -> web.Response:
    """The JSON error answer for any exception a handler raised (unexpected ones are logged
    and answered 500 without detail)."""
    return error_for(exc, request.method, request.path)


def error_for(exc: Exception, method: str, path: str) -> web.Response:
    """``response_for`` of a request known by its method and path."""
    if isinstance(exc, errors.FastServeError):
        return from_exception(exc)
    if isinstance(exc, web.HTTPException) and exc.status >= 400:
        return error_response(exc.status, exc.reason)
    log.error("unhandled error on %s %s", method, path[:200], exc_info=exc)
    return error_response(500, "internal server error")


def method_not_allowed(request: web.BaseRequest, allow: str) -> web.Response:
    return error_response(405, f"method {request.method[:16]} not allowed here", {"Allow": allow})
