"""The HTTP front: Open Inference Protocol (KServe V2) REST routes.

Inference and the read routes (``READS``) are answered by ``answer_inference`` and plain
functions of (state, model, version), which both HTTP layers call: the fast path
(``fastserve.http.fastpath``), which accepts every connection, and aiohttp, which gets
the connections the fast path hands over. On aiohttp, requests go through its low-level
server to ``Dispatcher``, which maps the fixed V2 route set by splitting the path
(``resolve``): aiohttp's router resolves routes with path parameters by regular
expression and builds match-info objects for each request, measured at ~7 µs of the
~80 µs a single-row request cost on one core.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from fastserve import __version__
from fastserve.config import ServerConfig
from fastserve.errors import (
    FastServeError,
    RecordNotFound,
    ServerStopping,
)
from fastserve.http import admin, review_routes
from fastserve.http import errors as http_errors
from fastserve.http.body import read_body
from fastserve.http.codecs import (
    decode_request,
    decode_with_plan,
    encode_every_output_json,
    encode_response,
)
from fastserve.inference import prepare, prepare_planned
from fastserve.model import PLATFORM, ServedModel
from fastserve.monitoring.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from fastserve.protocol import InferenceRequest, InferenceResponse, OutputTensor
from fastserve.registry import Registry
from fastserve.review.service import Review
from fastserve.workers import Worker, from_sibling, group_metrics, group_statistics

if TYPE_CHECKING:
    from fastserve.http.fastpath import FastPath

log = logging.getLogger("fastserve.http")

EXTENSIONS = ["binary_tensor_data", "statistics", "model_configuration", "model_repository"]
_MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack")
COMPRESS_MIN_BYTES = 1024
"""Answers this long or longer are compressed for a client that accepts it."""


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
    admin_token: bytes | None = None
    """The admin routes' bearer token (None: admin routes refused)."""
    review: Review | None = None
    """Predictions, shadow comparisons, feedback and the review queue (None: not recorded)."""
    batching: int = 0
    """Requests waiting on a batcher (queued or running), all models together."""
    http: web.Server | None = None
    """aiohttp's server: the connections the fast path handed over to it."""
    fast: FastPath | None = None
    """The fast path, which accepts every connection (``fastserve.http.fastpath``)."""
    worker: Worker | None = None
    """This process's place in a group of workers (None: the server is this process)."""
    _ids: Iterator[int] = field(default_factory=itertools.count)
    _id_prefix: str = field(default_factory=lambda: secrets.token_hex(6))

    def next_request_id(self) -> str:
        """An id for a request that brought none: unique in this process (a counter) and,
        by its random prefix, across restarts. Cheaper than a uuid4 on the hot path.

        The counter is zero-padded (12 hex digits) so that ids sort in the order they were
        issued: the predictions table's key (model, request_id, role) then grows at its end
        instead of splitting pages all over it. Flushes of 2,400 records into a table of
        500,000: 1.57 -> 1.21-1.27 µs a row (unpadded against padded, one run, CPU 0).
        """
        return f"{self._id_prefix}-{next(self._ids):012x}"

    def __post_init__(self) -> None:
        secret = self.config.admin_token
        if secret is not None and secret.get_secret_value():
            self.admin_token = secret.get_secret_value().encode("utf-8", "surrogateescape")

    def leave(self) -> None:
        """A request is done (successfully or not)."""
        self.inflight -= 1
        if self.draining and not self.inflight:
            self.drained.set()

    def begin_drain(self) -> None:
        self.draining = True
        if not self.inflight:
            self.drained.set()

    def open_connections(self) -> int:
        """Client connections open now, on the fast path and on aiohttp's."""
        count = 0 if self.http is None else len(self.http.connections)
        return count if self.fast is None else count + len(self.fast.connections)

    @property
    def ready(self) -> bool:
        return self.started and not self.draining and self.registry.all_ready


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")


# -- routes -----------------------------------------------------------------------------------

Handler = Callable[
    [web.BaseRequest, ServerState, "str | None", "str | None"], Awaitable[web.StreamResponse]
]
"""(request, state, model name or None, version or None) -> response"""

_MODEL_ACTIONS = (
    "ready", "config", "stats", "infer", "feedback", "shadow", "accuracy", "drift",
)  # fmt: skip


def resolve(path: str) -> tuple[str, str | None, str | None] | None:
    """(action, model, version) of a V2 path, or None when it is none of the protocol's.

    Actions: server, live, ready_server, all_stats, metrics, metadata, ready, config,
    stats, infer, and the admin actions repository_index and repository_{load,unload,
    promote,rollback}. Names reach the filesystem only through ``repository.find``, which
    accepts plain model names inside the repository.
    """
    static = _STATIC.get(path)
    if static is not None:
        return static, None, None
    parts = path.split("/")
    # "", "v2", "repository", "models", model, action
    if len(parts) == 6 and parts[1:4] == ["v2", "repository", "models"]:
        if parts[5] in admin.ACTIONS:
            return f"repository_{parts[5]}", parts[4], None
        return None
    # "", "v2", "models", model, [ "versions", version ], [ action ]
    if len(parts) < 4 or parts[1] != "v2" or parts[2] != "models":
        return None
    model, rest = parts[3], parts[4:]
    version = None
    if rest and rest[0] == "versions":
        if len(rest) < 2:
            return None
        version, rest = rest[1], rest[2:]
    if not rest:
        return "metadata", model, version
    if len(rest) == 1 and rest[0] in _MODEL_ACTIONS:
        return rest[0], model, version
    return None


_STATIC = {
    "/v2": "server",
    "/v2/health/live": "live",
    "/v2/health/ready": "ready_server",
    "/v2/models/stats": "all_stats",
    "/v2/repository/index": "repository_index",
    "/metrics": "metrics",
}


class Dispatcher:
    """aiohttp's low-level request handler: route, check the method, map errors to JSON."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._get: dict[str, Handler] = {
            "metrics": metrics,
            "shadow": review_routes.shadow_summary,
            "accuracy": review_routes.accuracy,
            "drift": model_drift,
        }

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        route = resolve(request.path)
        if route is None:
            if request.path.startswith("/v2/review/"):
                return await self._review(request, request.path.split("/")[3:])
            if request.path == "/review":
                if request.method not in ("GET", "HEAD"):
                    return http_errors.method_not_allowed(request, "GET, HEAD")
                return review_routes.review_page()
            return http_errors.error_response(404, "no such route")
        action, model, version = route
        if action == "infer":
            # the hot path: infer checks the method and maps its errors itself
            return await infer(request, self.state, model, version)
        if action.startswith("repository_"):
            return await self._admin(request, action, model)
        if action == "feedback":
            if request.method != "POST":
                return http_errors.method_not_allowed(request, "POST")
            try:
                return await review_routes.feedback(request, self.state, model, version)
            except Exception as exc:
                return http_errors.response_for(exc, request)
        if request.method not in ("GET", "HEAD"):
            return http_errors.method_not_allowed(request, "GET, HEAD")
        try:
            read = READS.get(action)
            if action in GROUP_READS and self.state.worker and not from_sibling(request):
                own = statistics_doc(self.state, model, version)  # (an unknown model: 404)
                return _json(await group_statistics(self.state.worker, own, request.path_qs))
            if read is not None:
                return read(self.state, model, version)
            return await self._get[action](request, self.state, model, version)
        except Exception as exc:
            return http_errors.response_for(exc, request)

    async def _admin(
        self, request: web.BaseRequest, action: str, model: str | None
    ) -> web.StreamResponse:
        """Admin routes: the token first (whatever the method), then POST only."""
        try:
            admin.authorize(request, self.state.admin_token)
            if request.method != "POST":
                return http_errors.method_not_allowed(request, "POST")
            if model is None:
                return await admin.repository_index(request, self.state)
            return await admin.model_action(
                request, self.state, action.removeprefix("repository_"), model
            )
        except Exception as exc:
            return http_errors.response_for(exc, request)

    async def _review(self, request: web.BaseRequest, parts: list[str]) -> web.StreamResponse:
        """The review queue's admin routes: ``items``, ``items/{id}``, ``items/{id}/label``,
        ``changes/{model}`` (the token first, as for every admin route)."""
        try:
            admin.authorize(request, self.state.admin_token)
            get = request.method in ("GET", "HEAD")
            state = self.state
            if parts == ["items"] and get:
                return await review_routes.list_items(request, state)
            if len(parts) == 2 and parts[0] == "items" and get:
                return await review_routes.show_item(request, state, parts[1])
            if len(parts) == 3 and parts[0] == "items" and parts[2] == "label":
                if request.method != "POST":
                    return http_errors.method_not_allowed(request, "POST")
                return await review_routes.label_item(request, state, parts[1])
            if len(parts) == 2 and parts[0] == "changes" and get:
                return await review_routes.changes(request, state, parts[1])
            if parts and parts[0] in ("items", "changes") and len(parts) <= 2:
                return http_errors.method_not_allowed(request, "GET, HEAD")
            return http_errors.error_response(404, "no such route")
        except Exception as exc:
            return http_errors.response_for(exc, request)


# -- health and metadata ----------------------------------------------------------------------
# Plain functions of (state, model, version): the aiohttp dispatcher and the fast path
# (``fastserve.http.fastpath``) both answer them.

Read = Callable[[ServerState, "str | None", "str | None"], web.Response]


def health_live(state: ServerState, model: str | None, version: str | None) -> web.Response:
    return _json({"live": True})


def health_ready(state: ServerState, model: str | None, version: str | None) -> web.Response:
    ready = state.ready
    return _json({"ready": ready}, status=200 if ready else 503)


def server_metadata(state: ServerState, model: str | None, version: str | None) -> web.Response:
    return _json({"name": "fastserve", "version": __version__, "extensions": EXTENSIONS})


def model_metadata(state: ServerState, model: str | None, version: str | None) -> web.Response:
    served = state.registry.get(str(model), version)
    return _json(served.metadata(state.registry.versions(served.name)))


def model_ready(state: ServerState, model: str | None, version: str | None) -> web.Response:
    name = str(model)
    try:
        state.registry.get(name, version)
    except FastServeError as exc:
        if http_errors.status_of(exc) == 404:
            raise
        return _json({"name": name, "ready": False}, status=503)
    return _json({"name": name, "ready": True})


def model_config(state: ServerState, model: str | None, version: str | None) -> web.Response:
    served = state.registry.get(str(model), version)
    doc = served.config.model_dump(mode="json")
    doc.update(name=served.name, version=served.version, platform=PLATFORM)
    doc["max_batch_size"] = served.config.batching.max_batch_size
    return _json(doc)


def statistics_doc(state: ServerState, model: str | None, version: str | None) -> dict[str, Any]:
    """Triton's statistics extension: every model's (no ``model``) or one version's."""
    registry = state.registry
    models = registry.models() if model is None else [registry.get(model, version)]
    return {"model_stats": [m.statistics() for m in models]}


def model_stats(state: ServerState, model: str | None, version: str | None) -> web.Response:
    return _json(statistics_doc(state, model, version))


READS: dict[str, Read] = {
    "server": server_metadata,
    "live": health_live,
    "ready_server": health_ready,
    "all_stats": model_stats,
    "metadata": model_metadata,
    "ready": model_ready,
    "config": model_config,
    "stats": model_stats,
}
"""The GET routes that need nothing of the request but its path."""
GROUP_READS = frozenset({"stats", "all_stats"})
"""The reads that one of several workers answers for the group (``fastserve.workers``)."""


async def model_drift(
    request: web.BaseRequest, state: ServerState, model: str | None, version: str | None
) -> web.Response:
    """``GET /v2/models/{m}[/versions/{v}]/drift``: live inputs against the reference."""
    served = state.registry.get(str(model), version)
    if served.drift is None:
        raise RecordNotFound(
            f"model '{served.label}' has no reference profile (reference.json): drift is "
            "not measured"
        )
    return _json({"model_name": served.name, "model_version": served.version,
                  **served.drift.report()})  # fmt: skip


async def metrics(
    request: web.BaseRequest, state: ServerState, model: str | None, version: str | None
) -> web.Response:
    if state.review is not None:
        await state.review.refresh_metrics(state.registry.known())
    body = state.registry.metrics.exposition()
    if state.worker is not None and not from_sibling(request):
        body = await group_metrics(state.worker, body)
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


# -- inference --------------------------------------------------------------------------------


def _response_format(content_type: str, accept: str) -> str:
    """msgpack when the request was msgpack or asks for it, else JSON."""
    if (
        "msgpack" in content_type
        and content_type.partition(";")[0].strip().lower() in _MSGPACK_TYPES
    ):
        return "msgpack"
    if accept and ("application/msgpack" in accept or "application/x-msgpack" in accept):
        return "msgpack"
    return "json"


async def infer(
    request: web.BaseRequest, state: ServerState, name: str | None, version: str | None
) -> web.StreamResponse:
    """``POST /v2/models/{name}[/versions/{version}]/infer`` through aiohttp."""
    if request.method != "POST":
        return http_errors.method_not_allowed(request, "POST")
    config = state.config

    def body() -> Awaitable[bytes]:
        return read_body(request, limit=config.max_body_bytes, timeout_s=config.body_timeout_s)

    try:
        payload, headers = await answer_inference(state, str(name), version, request.headers, body)
    except Exception as exc:
        return http_errors.response_for(exc, request)
    result = web.Response(body=payload, headers=headers)
    if len(payload) >= COMPRESS_MIN_BYTES and request.headers.get("Accept-Encoding"):
        result.enable_compression()
    return result


async def answer_inference(
    state: ServerState,
    name: str,
    version: str | None,
    headers: Mapping[str, str],
    body: bytes | Callable[[], Awaitable[bytes]],
) -> tuple[bytes, dict[str, str]]:
    """The encoded answer (body, headers) to one inference request, whatever carried it.

    ``headers`` is looked up by lower-case name; ``body`` is the request's body, or reads
    it (called once the model is known: an unknown model is refused before the body is
    read). Raises what the request failed with, after counting the failure in the model's
    statistics.
    """
    started = time.perf_counter_ns()
    if state.draining:
        raise ServerStopping()
    registry = state.registry
    model = registry.get(name, version)
    state.inflight += 1
    held: ServedModel | None = None
    try:
        data = body if isinstance(body, bytes) else await body()
        # Resolve again: a swap may have happened while the body arrived. ``inflight``
        # keeps this version from being unloaded until the request is answered.
        model = held = registry.get(name, version)
        model.inflight += 1
        return await _infer(state, model, headers, data, started)
    except Exception as exc:
        outcome = http_errors.outcome_of(exc) if isinstance(exc, FastServeError) else "error"
        model.request_stats.record_failure(outcome, time.perf_counter_ns() - started)
        raise
    finally:
        if held is not None:
            held.inflight -= 1
        state.leave()


async def _infer(
    state: ServerState,
    model: ServedModel,
    headers: Mapping[str, str],
    body: bytes,
    started: int,
) -> tuple[bytes, dict[str, str]]:
    content_type = headers.get("content-type", "")
    header_length = headers.get("inference-header-content-length")
    # every element takes at least one byte in any encoding: a small body that declares a
    # huge shape is refused before anything is allocated
    max_elements = len(body)
    metrics = state.registry.metrics
    decode_start = time.perf_counter_ns()
    plan = model.json_plan
    planned = None
    if plan is None:
        inference = decode_request(body, content_type, header_length, max_elements=max_elements)
    else:  # the common request read natively, anything else decoded (or refused) in Python
        read = decode_with_plan(body, content_type, header_length, plan, max_elements=max_elements)
        if isinstance(read, InferenceRequest):
            inference = read
        else:
            planned = read
    decoded = time.perf_counter_ns()
    if planned is not None:
        prepared = prepare_planned(model, *planned, metrics, decoded)
    else:
        prepared = await prepare(model, inference, metrics, decoded)
    inference, arrays = prepared.request, prepared.arrays
    validated = time.perf_counter_ns()
    # When every open connection has a request waiting on a batch, no one can send the
    # request the delay would wait for (a closed loop: e.g. one client at a time).
    last = (
        model.config.batching.release_when_idle and state.batching + 1 >= state.open_connections()
    )
    state.batching += 1
    try:
        completion = await model.batcher.infer(
            arrays, priority=prepared.priority, timeout_us=prepared.timeout_us, last=last
        )
    finally:
        state.batching -= 1

    # every answer carries an id to send feedback with: the client's, or one made here
    request_id = inference.id or state.next_request_id()
    elapsed = time.perf_counter_ns() - started
    parameters = None
    review = state.review
    if review is not None:
        route = state.registry.route(model.name)
        if route is not None:
            parameters = review.observe(
                route.config,
                model,
                route.shadow if route.primary is model else None,
                request_id,
                arrays,
                completion.outputs,
                elapsed / 1e6,
            )
    encode_start = time.perf_counter_ns()
    fmt = _response_format(content_type, headers.get("accept", ""))
    if inference.outputs is None and fmt == "json" and not parameters:  # every output
        payload, response_headers = encode_every_output_json(
            model.name,
            model.version,
            request_id,
            model.signature.outputs,
            completion.outputs,
            binary=inference.binary_output,
        )
    else:
        # every output; the codec picks (and orders) the ones the request asked for
        outputs = [
            OutputTensor(spec.name, spec.datatype, array)
            for spec, array in zip(model.signature.outputs, completion.outputs, strict=True)
        ]
        response = InferenceResponse(
            model.name, model.version, outputs, id=request_id, parameters=parameters or {}
        )
        payload, response_headers = encode_response(response, inference, fmt)
    done = time.perf_counter_ns()
    model.request_stats.record_success(
        int(arrays[0].shape[0]),
        done - started,
        completion.queue_ns,
        completion.compute_ns,
        decoded - decode_start,
        validated - prepared.preprocessed,
        done - encode_start,
        stages=state.config.monitoring,  # (drift is fed per batch, by the batcher)
        preprocess_ns=prepared.preprocess_ns,
    )
    return payload, response_headers


def create_server(state: ServerState, **handler_options: Any) -> web.Server:
    """aiohttp's low-level server around ``Dispatcher``; options go to its request handler."""
    limit = state.config.max_body_bytes

    def make_request(
        message: Any, payload: Any, protocol: Any, writer: Any, task: Any
    ) -> web.BaseRequest:
        return web.BaseRequest(
            message, payload, protocol, writer, task, task.get_loop(), client_max_size=limit
        )

    server = web.Server(Dispatcher(state), request_factory=make_request, **handler_options)
    state.http = server
    return server
