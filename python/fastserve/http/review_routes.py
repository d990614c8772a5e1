"""Routes of shadow review and feedback (a fastserve extension of the V2 protocol).

    POST /v2/models/{m}/feedback   {"id": "<request id>", "label": <class index or value>}
    GET  /v2/models/{m}/shadow     the shadow comparison summary (and accuracy on it)
    GET  /v2/models/{m}/accuracy   accuracy per version from the feedback

Feedback is open like inference (the clients that predict are the ones that learn the
truth later); the review queue and promotion are admin routes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from fastserve.errors import InvalidRequest, Unavailable
from fastserve.http.body import read_body
from fastserve.review.service import Review

if TYPE_CHECKING:
    from fastserve.http.app import ServerState

_MAX_FEEDBACK_BODY = 1024 * 1024


def _review(state: ServerState) -> Review:
    if state.review is None:
        raise Unavailable("the review store is not open")
    return state.review


def _json(doc: Any) -> web.Response:
    return web.Response(body=orjson.dumps(doc), content_type="application/json")


async def feedback(
    request: web.BaseRequest, state: ServerState, name: str | None, version: str | None
) -> web.Response:
    review = _review(state)
    model = state.registry.get(str(name), version)
    body = await read_body(request, limit=_MAX_FEEDBACK_BODY, timeout_s=state.config.body_timeout_s)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(doc, dict) or set(doc) - {"id", "label"} or "label" not in doc:
        raise InvalidRequest('feedback is {"id": "<request id>", "label": <label>}')
    return _json(await review.feedback(model, doc.get("id"), doc["label"]))


async def shadow_summary(
    request: web.BaseRequest, state: ServerState, name: str | None, version: str | None
) -> web.Response:
    review = _review(state)
    model = state.registry.get(str(name))
    route = state.registry.route(model.name)
    assert route is not None
    return _json(await review.shadow_summary(model.name, route.config, route.primary.version))


async def accuracy(
    request: web.BaseRequest, state: ServerState, name: str | None, version: str | None
) -> web.Response:
    review = _review(state)
    model = state.registry.get(str(name))
    versions = await review.accuracy(model.name)
    return _json({"model_name": model.name, "versions": list(versions.values())})
