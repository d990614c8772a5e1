"""The repository API (the V2 model-repository extension, as in Triton and MLServer) and
the admin token that guards it.

    POST /v2/repository/index                 every model version: state, reason, primary
    POST /v2/repository/models/{m}/load       apply the model's folder now (load or reload)
    POST /v2/repository/models/{m}/unload     stop serving it until it is loaded again
    POST /v2/repository/models/{m}/promote    {"version": "2"}: make it primary (edits config);
                                              no version: the shadow, if its gate passes
                                              ({"force": true} overrides, recorded)
    POST /v2/repository/models/{m}/rollback   make the previous primary primary again

Changes of primary take ``actor`` and ``reason`` and are recorded in the review store.

Every route needs ``Authorization: Bearer <token>``. With no token configured they are
refused: an admin API is never open by default. The token is compared in constant time
and never logged.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from fastserve.errors import (
    ChangeRefused,
    Forbidden,
    GateFailed,
    InvalidRequest,
    Unauthorized,
    Unavailable,
)
from fastserve.http.body import read_body
from fastserve.registry import Route
from fastserve.workers import from_sibling, tell_siblings

if TYPE_CHECKING:
    from fastserve.http.app import ServerState

ACTIONS = ("load", "unload", "promote", "rollback")
_MAX_ADMIN_BODY = 64 * 1024


def authorize(request: web.BaseRequest, token: bytes | None) -> None:
    """Raise Unauthorized (no usable credentials) or Forbidden (wrong token, or no token
    configured) unless the request carries the admin token."""
    if token is None:
        raise Forbidden(
            "the admin API is disabled: set FASTSERVE_ADMIN_TOKEN or --admin-token-file"
        )
    header = request.headers.get("Authorization")
    if header is None:
        raise Unauthorized("admin route: send 'Authorization: Bearer <token>'")
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials or " " in credentials:
        raise Unauthorized("admin route: malformed Authorization header (want 'Bearer <token>')")
    if not hmac.compare_digest(credentials.encode("utf-8", "surrogateescape"), token):
        raise Forbidden("admin route: the token is not valid")


async def _json_body(request: web.BaseRequest, state: ServerState) -> dict[str, Any]:
    body = await read_body(request, limit=_MAX_ADMIN_BODY, timeout_s=state.config.body_timeout_s)
    if not body.strip():
        return {}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("the body must be a JSON object")
    return doc


def _route_doc(name: str, route: Route, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "primary": route.primary.version,
        "versions": sorted(route.versions, key=int),
        **extra,
    }


def _json(doc: Any) -> web.Response:
    return web.Response(body=orjson.dumps(doc), content_type="application/json")


async def repository_index(request: web.BaseRequest, state: ServerState) -> web.Response:
    doc = await _json_body(request, state)
    ready_only = doc.get("ready", False)
    if not isinstance(ready_only, bool):
        raise InvalidRequest("'ready' must be true or false")
    rows = state.registry.index()
    return _json(
        [row.as_index_entry() for row in rows if not ready_only or row.state.value == "READY"]
    )


async def model_action(
    request: web.BaseRequest, state: ServerState, action: str, name: str
) -> web.Response:
    """Apply ``action`` to model ``name``; in a group of workers, then have every sibling
    apply the model's folder as it now is (``workers`` in the answer: how each fared)."""
    answer = await _act(request, state, action, name)
    if state.worker is not None and not from_sibling(request):
        answer["workers"] = await tell_siblings(
            state.worker,
            "unload" if action == "unload" else "load",
            name,
            request.headers["Authorization"],
        )
    return _json(answer)


async def _act(
    request: web.BaseRequest, state: ServerState, action: str, name: str
) -> dict[str, Any]:
    registry = state.registry
    doc = await _json_body(request, state)
    if action == "load":
        return _route_doc(name, await registry.load(name))
    if action == "unload":
        await registry.unload(name)
        return {"name": name, "state": "UNAVAILABLE", "reason": "unloaded"}
    previous = registry.get(name).version if registry.versions(name) else None
    actor, reason, force = _change_fields(doc)
    review = state.review
    if action == "promote" and doc.get("version") is None:
        return await _promote_shadow(state, name, previous, actor, reason, force)
    if action == "promote":
        version = doc["version"]
        if isinstance(version, int) and not isinstance(version, bool):
            version = str(version)
        if not isinstance(version, str) or not version.isdigit() or len(version) > 18:
            raise InvalidRequest(
                'promote needs {"version": "<version number>"} (or none: the shadow)'
            )
        route = await registry.set_primary(name, version)
    else:
        route = await registry.rollback(name)
    if review is not None:
        await review.record_change(
            name,
            action if action == "rollback" else "set_primary",
            previous,
            route.primary.version,
            forced=False,
            actor=actor,
            reason=reason,
            gate=None,
        )
    return _route_doc(name, route, previous=previous)


def _change_fields(doc: dict[str, Any]) -> tuple[str, str, bool]:
    """Who asks for a change of primary, why, and whether a failed gate is overridden."""
    actor = doc.get("actor", "admin")
    reason = doc.get("reason", "")
    force = doc.get("force", False)
    if type(actor) is not str or not 0 < len(actor) <= 100:
        raise InvalidRequest("'actor' must be a name of 1..100 characters")
    if type(reason) is not str or len(reason) > 1000:
        raise InvalidRequest("'reason' must be a string of at most 1000 characters")
    if type(force) is not bool:
        raise InvalidRequest("'force' must be true or false")
    return actor, reason, force


async def _promote_shadow(
    state: ServerState, name: str, previous: str | None, actor: str, reason: str, force: bool
) -> dict[str, Any]:
    """Check the gate; if it passes (or ``force``), make the shadow primary, and record it."""
    registry, review = state.registry, state.review
    route = registry.route(name)
    if route is None or route.shadow is None:
        raise ChangeRefused(name, 'no shadow version to promote (give {"version": ...})')
    if review is None:
        raise Unavailable("the review store is not open: the gate cannot be checked")
    conditions = await review.gate(name, route.config, route.primary.version)
    passed = all(c["passed"] for c in conditions)
    if not passed and not force:
        raise GateFailed(name, conditions)
    target = route.shadow.version
    new_route = await registry.set_primary(name, target, drop_shadow=True)
    record = await review.record_change(
        name,
        "promote",
        previous,
        target,
        forced=not passed,
        actor=actor,
        reason=reason,
        gate=conditions,
    )
    return _route_doc(
        name, new_route, previous=previous, gate=conditions, forced=not passed, record=record
    )
