"""The aiohttp application: Open Inference Protocol (KServe V2) REST routes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from fastserve import __version__
from fastserve.config import ServerConfig
from fastserve.errors import FastServeError, InvalidRequest, ServerStopping
from fastserve.http import errors as http_errors
from fastserve.http.body import read_body
from fastserve.http.codecs import decode_request, encode_response
from fastserve.model import PLATFORM, ServedModel
from fastserve.protocol import InferenceRequest, InferenceResponse, OutputTensor
from fastserve.registry import Registry
from fastserve.validation import validate_inputs, validate_outputs

log = logging.getLogger("fastserve.http")

EXTENSIONS = ["binary_tensor_data", "statistics", "model_configuration"]
_MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack")
_COMPRESS_MIN_BYTES = 1024


@dataclass
class ServerState:
    """Process-wide state the routes read."""

    config: ServerConfig
    registry: Registry
    started: bool = False
    draining: bool = False
    inflight: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once draining and no request is in flight."""

    def leave(self) -> None:
        """A request is done (successfully or not)."""
        self.inflight -= 1
        if self.draining and not self.inflight:
            self.drained.set()

    def begin_drain(self) -> None:
        self.draining = True
        if not self.inflight:
            self.drained.set()

    @property
    def ready(self) -> bool:
        return self.started and not self.draining and self.registry.all_ready


STATE = web.AppKey("fastserve_state", ServerState)


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def endpoint(**methods: Handler) -> Handler:
    """One route's handler: dispatch on the method (JSON 405 with ``Allow`` otherwise) and map
    every error to its status and a JSON body, in one place.

    This is what an error middleware would do. There is none because aiohttp runs
    middlewares on every request, the inference one included, which is registered bare and
    does the same checks inline (see ``infer``): one coroutine layer less on the hot path.
    """
    if "GET" in methods:
        methods.setdefault("HEAD", methods["GET"])
    allow = ", ".join(sorted(methods))

    async def handle(request: web.Request) -> web.StreamResponse:
        handler = methods.get(request.method)
        if handler is None:
            return http_errors.method_not_allowed(request, allow)
        try:
            return await handler(request)
        except Exception as exc:
            return http_errors.response_for(exc, request)

    return handle


async def not_found(request: web.Request) -> web.Response:
    return http_errors.error_response(404, "no such route")


# -- health and metadata ----------------------------------------------------------------------


async def health_live(request: web.Request) -> web.Response:
    return _json({"live": True})


async def health_ready(request: web.Request) -> web.Response:
    ready = request.app[STATE].ready
    return _json({"ready": ready}, status=200 if ready else 503)


async def server_metadata(request: web.Request) -> web.Response:
    return _json({"name": "fastserve", "version": __version__, "extensions": EXTENSIONS})


def _model(request: web.Request) -> ServedModel:
    info = request.match_info
    return request.app[STATE].registry.get(info["model"], info.get("version"))


async def model_metadata(request: web.Request) -> web.Response:
    model = _model(request)
    registry = request.app[STATE].registry
    return _json(model.metadata(registry.versions(model.name)))


async def model_ready(request: web.Request) -> web.Response:
    info = request.match_info
    registry = request.app[STATE].registry
    try:
        registry.get(info["model"], info.get("version"))
    except FastServeError as exc:
        status = http_errors.status_of(exc)
        if status == 404:
            raise
        return _json({"name": info["model"], "ready": False}, status=503)
    return _json({"name": info["model"], "ready": True})


async def model_config(request: web.Request) -> web.Response:
    model = _model(request)
    doc = model.config.model_dump(mode="json")
    doc.update(name=model.name, version=model.version, platform=PLATFORM)
    doc["max_batch_size"] = model.config.batching.max_batch_size
    return _json(doc)


async def model_stats(request: web.Request) -> web.Response:
    info = request.match_info
    registry = request.app[STATE].registry
    if "model" in info:
        models = [registry.get(info["model"], info.get("version"))]
    else:
        models = registry.models()
    return _json({"model_stats": [m.statistics() for m in models]})


# -- inference --------------------------------------------------------------------------------


def _request_options(request: InferenceRequest, model: ServedModel) -> tuple[int, int]:
    """The core priority level and queue timeout (µs, -1: default) of a request."""
    params = request.parameters
    batching = model.config.batching
    priority = params.get("priority", 0)
    if type(priority) is not int or not 0 <= priority <= batching.priority_levels:
        raise InvalidRequest(
            f"parameter 'priority' must be an integer in 0..{batching.priority_levels}"
        )
    timeout = params.get("timeout", -1)
    if timeout != -1 and (type(timeout) is not int or not 0 < timeout <= 3_600_000_000):
        raise InvalidRequest("parameter 'timeout' must be a positive integer (microseconds)")
    return batching.priority_index(priority), timeout


def _response_format(request: web.Request, content_type: str) -> str:
    """msgpack when the request was msgpack or asks for it, else JSON."""
    if (
        "msgpack" in content_type
        and content_type.partition(";")[0].strip().lower() in _MSGPACK_TYPES
    ):
        return "msgpack"
    accept = request.headers.get("Accept", "")
    if accept and ("application/msgpack" in accept or "application/x-msgpack" in accept):
        return "msgpack"
    return "json"


async def infer(request: web.Request) -> web.StreamResponse:
    """``POST .../infer``. Registered as the route's handler itself, without ``endpoint()``'s
    wrapper (one coroutine less per request on the hot path): it checks the method and maps
    errors the same way."""
    if request.method != "POST":
        return http_errors.method_not_allowed(request, "POST")
    started = time.perf_counter_ns()
    state = request.app[STATE]
    try:
        if state.draining:
            raise ServerStopping()
        model = _model(request)
    except Exception as exc:
        return http_errors.response_for(exc, request)
    state.inflight += 1
    try:
        return await _infer(request, state, model, started)
    except Exception as exc:
        if isinstance(exc, FastServeError):
            model.request_stats.record_failure(
                http_errors.outcome_of(exc), time.perf_counter_ns() - started
            )
        return http_errors.response_for(exc, request)
    finally:
        state.leave()


async def _infer(
    request: web.Request, state: ServerState, model: ServedModel, started: int
) -> web.StreamResponse:
    config = state.config
    body = await read_body(request, limit=config.max_body_bytes, timeout_s=config.body_timeout_s)
    headers = request.headers
    # the raw header: aiohttp's parsed request.content_type costs ~6 µs on first access
    content_type = headers.get("Content-Type", "")
    inference = decode_request(
        body,
        content_type,
        headers.get("Inference-Header-Content-Length"),
        # every element takes at least one byte in any encoding: a small body that declares
        # a huge shape is refused before anything is allocated
        max_elements=len(body),
    )
    arrays = validate_inputs(
        inference, model.signature, max_batch_size=model.config.batching.max_batch_size
    )
    wanted = validate_outputs(inference, model.signature)
    priority, timeout_us = _request_options(inference, model)
    completion = await model.batcher.infer(arrays, priority=priority, timeout_us=timeout_us)

    outputs = [
        OutputTensor(spec.name, spec.datatype, array)
        for spec, array in zip(model.signature.outputs, completion.outputs, strict=True)
        if wanted is None or spec.name in wanted
    ]
    if wanted is not None:
        outputs.sort(key=lambda out: wanted.index(out.name))
    response = InferenceResponse(model.name, model.version, outputs, id=inference.id)
    fmt = _response_format(request, content_type)
    payload, response_headers = encode_response(response, inference, fmt)
    model.request_stats.record_success(
        int(arrays[0].shape[0]),
        time.perf_counter_ns() - started,
        completion.queue_ns,
        completion.compute_ns,
    )
    result = web.Response(body=payload, headers=response_headers)
    if len(payload) >= _COMPRESS_MIN_BYTES and request.headers.get("Accept-Encoding"):
        result.enable_compression()
    return result


def create_app(state: ServerState) -> web.Application:
    app = web.Application(client_max_size=state.config.max_body_bytes)
    app[STATE] = state
    add = app.router.add_route
    prefixes = ("/v2/models/{model}", "/v2/models/{model}/versions/{version}")
    # the router tries dynamic routes in order: the hot one first
    for prefix in prefixes:
        add("*", prefix + "/infer", infer)
    add("*", "/v2/health/live", endpoint(GET=health_live))
    add("*", "/v2/health/ready", endpoint(GET=health_ready))
    add("*", "/v2", endpoint(GET=server_metadata))
    add("*", "/v2/models/stats", endpoint(GET=model_stats))
    for prefix in prefixes:
        add("*", prefix, endpoint(GET=model_metadata))
        add("*", prefix + "/ready", endpoint(GET=model_ready))
        add("*", prefix + "/config", endpoint(GET=model_config))
        add("*", prefix + "/stats", endpoint(GET=model_stats))
    add("*", "/{path:.*}", not_found)  # any other path, any method: a JSON 404
    return app
