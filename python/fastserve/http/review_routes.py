"""Routes of shadow review and feedback (a fastserve extension of the V2 protocol).

    POST /v2/models/{m}/feedback   {"id": "<request id>", "label": <class index or value>}
    GET  /v2/models/{m}/shadow     the shadow comparison summary (and accuracy on it)
    GET  /v2/models/{m}/accuracy   accuracy per version from the feedback

    GET  /v2/review/items[?model=M&status=pending|labelled|all&after=ID&limit=N]   (admin)
    GET  /v2/review/items/{id}                      an item with its inputs and answers
    POST /v2/review/items/{id}/label                {"label": ..., "reviewer": "name"}
    GET  /v2/review/changes/{m}                     promotions and rollbacks of a model
    GET  /review                                    the reviewers' page (asks for the token)

Feedback is open like inference (the clients that predict are the ones that learn the
truth later); the review queue and the change history need the admin token.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from fastserve.errors import InvalidRequest, ModelNotFound, RecordNotFound, Unavailable
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
    route = state.registry.route(model.name)
    config = model.config if route is None else route.config
    return _json(await review.feedback(model, config, doc.get("id"), doc["label"]))


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


# -- the review queue (admin) ------------------------------------------------------------------

_MAX_LIMIT = 500


def _int_param(request: web.BaseRequest, key: str, default: int, high: int) -> int:
    text = request.query.get(key)
    if text is None:
        return default
    if not text.isdigit() or len(text) > 18 or int(text) > high:
        raise InvalidRequest(f"'{key}' must be an integer in 0..{high}")
    return int(text)


def item_id(text: str) -> int:
    if not text.isdigit() or len(text) > 18:
        raise RecordNotFound(f"no review item {text[:40]!r}")
    return int(text)


async def list_items(request: web.BaseRequest, state: ServerState) -> web.Response:
    review = _review(state)
    model = request.query.get("model")
    if model is not None and model not in state.registry.known():
        raise ModelNotFound(model)
    items = await review.items(
        model,
        request.query.get("status", "pending"),
        _int_param(request, "limit", 100, _MAX_LIMIT) or 100,
        _int_param(request, "after", 0, 2**62),
    )
    return _json({"items": items})


async def show_item(request: web.BaseRequest, state: ServerState, item: str) -> web.Response:
    return _json(await _review(state).item(item_id(item)))


async def label_item(request: web.BaseRequest, state: ServerState, item: str) -> web.Response:
    review = _review(state)
    number = item_id(item)
    body = await read_body(request, limit=64 * 1024, timeout_s=state.config.body_timeout_s)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"label", "reviewer"}:
        raise InvalidRequest('a label is {"label": <label>, "reviewer": "<name>"}')
    current = await review.item(number)
    route = state.registry.route(current["model"])
    reading = None if route is None else review.reading(route.primary)
    return _json(await review.label_item(number, doc["label"], doc["reviewer"], reading))


async def changes(request: web.BaseRequest, state: ServerState, model: str) -> web.Response:
    if model not in state.registry.known():
        raise ModelNotFound(model)
    return _json({"model_name": model, "changes": await _review(state).changes(model)})


def review_page() -> web.Response:
    page = resources.files("fastserve.http").joinpath("review.html").read_bytes()
    return web.Response(
        body=page,
        content_type="text/html",
        charset="utf-8",
        headers={
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline' 'self'; "
            "style-src 'unsafe-inline'",
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-store",
        },
    )
