"""The fast path: V2 inference and the protocol's read routes on httptools, beside aiohttp.

Every connection is accepted here. A request is answered here when it has one of the data
plane's common shapes: ``POST .../infer`` or a ``GET``/``HEAD`` of health, server or model
metadata, readiness, config or statistics, with its body framed by ``Content-Length``
(at most ``max_body_bytes``). Anything else (the admin, review, feedback and metrics
routes, a chunked body, an upgrade, a percent-encoded path, a head that httptools
refuses) hands the connection to aiohttp's protocol together with every byte received
since that request began, and aiohttp serves the connection from then on, errors
included. Both answer the same routes with the same code (``fastserve.http.app``).

Why a second HTTP layer: aiohttp builds a request object with its stream reader, a
response object with its header multidict, and runs a task loop per connection; on this
VM that costs several times what llhttp's parse and one ``transport.write`` do (bench:
``bench/suite.py``'s two HTTP-stack ceilings). The parse itself stays llhttp's, through
httptools; this module frames requests and writes answers.

Requests on one connection are answered one at a time, in order (pipelined requests
wait in the buffer). Bounds: a connection with no complete head ``idle_timeout_s`` after
it opened or after its last answer is closed, as aiohttp's keep-alive timer does; a body
not received within ``body_timeout_s`` of its head gets 408 and the connection is closed.

When its last request in flight is answered the loop polls instead of sleeping for a
short, adaptive window (``busy_poll_us``, see ``fastserve.http.busypoll``), so that a
request that follows at once finds the loop, and the core, still running.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import http
import logging
import zlib
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, cast

import httptools
from aiohttp import web

from fastserve.errors import RequestTimeout
from fastserve.http import errors as http_errors
from fastserve.http.app import (
    COMPRESS_MIN_BYTES,
    GROUP_READS,
    READS,
    Read,
    ServerState,
    answer_inference,
    resolve,
)
from fastserve.http.body import decompress
from fastserve.http.busypoll import BusyPoll

log = logging.getLogger("fastserve.http")

MAX_HEAD_BYTES = 8190
"""A longer head goes to aiohttp, which applies its limits (8,190 bytes a line or field)."""
_LINGER_S = 1.0
"""After a 408, what the client still sends is read and dropped this long, then the
connection closes (closing on unread data would reset it before the answer is read)."""
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n" for s in http.HTTPStatus}
_CODINGS = (("deflate", zlib.MAX_WBITS), ("gzip", 16 + zlib.MAX_WBITS))
"""Answer codings, in aiohttp's order of preference."""


@dataclass(frozen=True, slots=True)
class _Route:
    """What a request line asks for, when the fast path answers it."""

    action: str
    read: Read | None
    """The read route's function; None: inference."""
    model: str | None
    version: str | None
    path: str
    method: str


_ROUTES_KEPT = 1024
"""Request lines whose route is remembered (``FastPath.routes``): a client sends the same
few again and again; past this many distinct ones, the rest are resolved each time."""


@dataclass(slots=True)
class _Head:
    """A request head the fast path answers, parsed; its body is the next ``size`` -
    ``head_size`` bytes."""

    route: _Route
    headers: dict[str, str]
    head_size: int
    size: int
    keep_alive: bool
    expect: str | None
    """``Expect``: ``100-continue`` is met (once), any other expectation answered 417."""


def _resolve(method: bytes, url: bytes) -> _Route | None:
    """The route of a request line if the fast path answers it: inference, or a read."""
    try:
        method_name = method.decode("ascii")
        path = url.partition(b"?")[0].decode("ascii")
    except UnicodeDecodeError:
        return None
    route = resolve(path) if path[:1] == "/" and "%" not in path else None
    if route is None:
        return None
    action, model, version = route
    read = READS.get(action)
    if (method_name == "POST" and action == "infer") or (
        read is not None and method_name in ("GET", "HEAD")
    ):
        return _Route(action, read, model, version, path, method_name)
    return None


_HEADS_KEPT = 256
"""Answer heads kept (``FastPath.heads``); past this many distinct ones, each is built."""


def _answer_head(
    status: int, fields: tuple[tuple[str, str], ...], coding: str | None, close: bool, echo: bool
) -> bytes:
    """An answer's status line and headers, all but its length and date."""
    lines = [_STATUS_LINES[status]]
    lines.extend(f"{name}: {value}\r\n" for name, value in fields)
    if coding is not None:
        lines.append(f"Content-Encoding: {coding}\r\n")
    if close:
        lines.append("Connection: close\r\n")
    elif echo:
        lines.append("Connection: keep-alive\r\n")
    return "".join(lines).encode("latin-1")


class FastPath:
    """The protocol factory of the listening socket, and its connections' clock.

    ``fallback`` makes aiohttp's protocol (``web.Server``) for connections handed over.
    """

    def __init__(self, state: ServerState, fallback: Callable[[], asyncio.Protocol]) -> None:
        config = state.config
        self.state = state
        self.fallback = fallback
        self.limit = config.max_body_bytes
        self.idle_s = config.idle_timeout_s
        self.body_s = config.body_timeout_s
        self.connections: set[Connection] = set()
        self.date = b""
        """The ``Date`` header line, refreshed every tick."""
        self.loop = asyncio.get_running_loop()
        self._tick_s = max(0.02, min(1.0, self.idle_s / 5, self.body_s / 5))
        """Bounds are checked every tick: they hold to a tick's precision."""
        self._timer: asyncio.TimerHandle | None = None
        self.outbox: list[tuple[Connection, bytes]] = []
        self.poll = BusyPoll(self.loop, config.busy_poll_us)
        self.routes: dict[tuple[bytes, bytes], _Route | None] = {}
        """(method, URL) -> its route; None: not the fast path's (see ``route``)."""
        self.heads: dict[tuple[Any, ...], bytes] = {}
        """An answer's head without its length and date, by what it is made of (see
        ``Connection._write``): a server sends the same few again and again."""

    def route(self, method: bytes, url: bytes) -> _Route | None:
        """The route of a request line if the fast path answers it, remembered."""
        key = (method, url)
        try:
            return self.routes[key]
        except KeyError:
            pass
        route = _resolve(method, url)
        if route is not None and route.action in GROUP_READS and self.state.worker is not None:
            route = None  # one of several workers: aiohttp's side asks the others too
        if len(self.routes) < _ROUTES_KEPT:
            self.routes[key] = route
        return route

    def __call__(self) -> Connection:
        return Connection(self)

    def start(self) -> None:
        self._tick()

    def _tick(self) -> None:
        """Once a tick: the date line, and the bounds of every connection."""
        self.date = f"Date: {email.utils.formatdate(usegmt=True)}\r\n".encode()
        now = self.loop.time()
        for connection in list(self.connections):
            connection.check(now)
        self._timer = self.loop.call_later(self._tick_s, self._tick)

    def send_later(self, connection: Connection, data: bytes) -> None:
        """Write ``data`` to ``connection`` after the callbacks ready now have run.

        A batch's completion wakes all its requests in one turn of the loop; each encodes
        its answer and queues it here, and the answers are written back to back. Written one
        by one, with a request's encoding between two writes, a py-spy profile put 16 % of
        the server's GIL time in ``transport.write`` at 64 connections, several times what a
        write costs the llhttp ceiling, whose client is never idle: each write presumably
        woke the idle client on the other CPU by itself. Back to back: 1.09x and 1.16x the
        requests/s in two same-session A/B runs (bench/ab.py, 64 connections).
        """
        self.outbox.append((connection, data))
        if len(self.outbox) == 1:
            self.loop.call_soon(self._send)

    def _send(self) -> None:
        outbox, self.outbox = self.outbox, []
        for connection, data in outbox:
            connection.sent(data)

    def close(self) -> None:
        """Stop the clock and close every connection still here (after the drain)."""
        self.poll.stop()
        if self._timer is not None:
            self._timer.cancel()
        for connection in list(self.connections):
            connection.close()


class Connection(asyncio.Protocol):
    """One client connection while the fast path serves it."""

    def __init__(self, fast: FastPath) -> None:
        self.fast = fast
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.head: _Head | None = None
        """The head whose body is still arriving."""
        self.busy = False
        """A request is being answered: what arrives meanwhile waits in the buffer."""
        self.done = False
        """Closed, closing, or handed over: nothing more is served here."""
        self.write_paused = False
        self.read_paused = False
        self.since = fast.loop.time()
        """When the current wait began: for a head (idle) or for the body of ``head``."""
        self._url = b""
        self._headers: dict[str, str] = {}
        self._parser: httptools.HttpRequestParser | None = None
        self._keep_alive = True

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)
        self.fast.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True
        self.fast.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return  # a 408 lingering: dropped
        self.fast.poll.arrived()
        self.buffer += data
        if not self.busy:
            self._serve()
        # more than one request can need: a client that pipelines far ahead of its answers
        # (or does not read them) is not read from until they are written
        if len(self.buffer) > self.fast.limit + MAX_HEAD_BYTES and not self.read_paused:
            assert self.transport is not None
            self.read_paused = True
            self.transport.pause_reading()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.busy:
            self._serve()
            self._read_on()

    def _read_on(self) -> None:
        """Read again once what was buffered is served."""
        small = len(self.buffer) <= self.fast.limit + MAX_HEAD_BYTES
        if self.read_paused and small and not self.done and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()

    # -- httptools callbacks (the head only) --------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        # (asked here: once a message without a body completes, llhttp forgets its flags)
        assert self._parser is not None
        self._keep_alive = self._parser.should_keep_alive()

    # -- serving ------------------------------------------------------------------------------

    def check(self, now: float) -> None:
        """Close a connection idle too long; answer 408 to a body that is too slow."""
        if self.busy or self.done:
            return
        head = self.head
        if head is None:
            if now - self.since > self.fast.idle_s:
                self.close()
        elif now - self.since > self.fast.body_s:
            self._time_out(head)

    def close(self) -> None:
        self.done = True
        self.fast.connections.discard(self)
        if self.transport is not None:
            self.transport.close()

    def _serve(self) -> None:
        """Answer what the buffer holds, a request at a time, in order."""
        buffer = self.buffer
        while not (self.busy or self.done or self.write_paused):
            head = self.head
            if head is None:
                end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES)
                if end < 0:
                    if len(buffer) >= MAX_HEAD_BYTES:
                        self._hand_over()
                    return
                head = self._parse(end + 4)
                if head is None:
                    self._hand_over()
                    return
                self.head = head
                self.since = self.fast.loop.time()
            if head.expect is not None:
                if head.expect.lower() != "100-continue":
                    self.head = None
                    error = http_errors.error_response(417, "only 100-continue is expected")
                    self._respond(head, error, linger=True)
                    return
                if len(buffer) < head.size:
                    assert self.transport is not None
                    self.transport.write(_CONTINUE)
                head.expect = None
            if len(buffer) < head.size:
                return
            with memoryview(buffer) as view:
                body = bytes(view[head.head_size : head.size])
            del buffer[: head.size]
            self.head = None
            self._answer(head, body)

    def _parse(self, head_size: int) -> _Head | None:
        """The head of the request at the buffer's start if the fast path answers it."""
        self._url = b""
        headers: dict[str, str] = {}
        self._headers = headers
        self._parser = parser = httptools.HttpRequestParser(self)
        try:
            parser.feed_data(bytes(self.buffer[:head_size]))
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return None
        route = self.fast.route(parser.get_method(), self._url)
        if route is None or "transfer-encoding" in headers:
            return None
        length = int(headers.get("content-length", "0"))  # (llhttp checked its digits)
        if length > self.fast.limit:
            return None  # aiohttp answers 413, then drops the rest of the body
        expect = headers.get("expect")
        return _Head(route, headers, head_size, head_size + length, self._keep_alive, expect)

    def _hand_over(self) -> None:
        """From the current request on, aiohttp serves this connection."""
        transport = self.transport
        assert transport is not None
        self.done = True
        self.fast.connections.discard(self)
        protocol = self.fast.fallback()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        data, self.buffer = bytes(self.buffer), bytearray()
        if data:
            protocol.data_received(data)
        transport.resume_reading()

    def _answer(self, head: _Head, body: bytes) -> None:
        route = head.route
        if route.read is None:
            self.busy = True
            self._drive(self._infer(head, body))
            return
        try:
            response = route.read(self.fast.state, route.model, route.version)
        except Exception as exc:
            response = http_errors.error_for(exc, route.method, route.path)
        self._respond(head, response)

    def _drive(self, coro: Coroutine[Any, Any, None], _done: object = None) -> None:
        """Run the request's coroutine now, up to its next wait, and again each time what
        it waits on is done, without a task (as Python 3.12's eager tasks start one).

        A request run alone (one connection) never waits: it is answered in the turn of
        the loop that read it, with no task to create and no second turn. One that waits
        on its batch resumes from the future's callback, as a task's wake-up would. The
        request path therefore runs outside any task: it must not need
        ``asyncio.current_task()`` (``asyncio.timeout`` does; ``wait_for`` does from 3.12),
        and it handles its own errors (``_infer`` answers every exception).
        """
        try:
            waited = coro.send(None)
        except StopIteration:
            return
        if waited is None:  # a bare yield (``asyncio.sleep(0)``): on the next turn
            self.fast.loop.call_soon(self._drive, coro)
            return
        # a future awaited (``Future.__await__`` yields it): resumed once it is done
        assert asyncio.isfuture(waited), f"the request path waited on {waited!r}"
        waited._asyncio_future_blocking = False
        waited.add_done_callback(functools.partial(self._drive, coro))

    async def _infer(self, head: _Head, body: bytes) -> None:
        headers = head.headers
        route = head.route
        given: bytes | Callable[[], Awaitable[bytes]] = body
        encoding = headers.get("content-encoding")
        if encoding:
            limit = self.fast.limit

            async def inflated() -> bytes:  # (a failure counts against the model)
                return decompress(body, encoding.strip().lower(), limit)

            given = inflated
        later = False
        try:
            payload, answer = await answer_inference(
                self.fast.state, str(route.model), route.version, headers, given
            )
        except Exception as exc:
            self._respond(head, http_errors.error_for(exc, route.method, route.path))
        else:
            later = self._write(head, 200, answer.items(), payload, close=False, compress=True,
                                later=True)  # fmt: skip
        finally:
            if not later:
                self._next()

    def sent(self, data: bytes) -> None:
        """``FastPath.send_later`` writes ``data`` now: then serve what arrived meanwhile."""
        if not self.done and self.transport is not None:
            self.transport.write(data)
        self._next()

    def _next(self) -> None:
        """The answer is written: serve what arrived meanwhile."""
        self.busy = False
        self.since = self.fast.loop.time()
        if not self.fast.state.inflight:
            self.fast.poll.idle()
        if not self.done:
            self._serve()
            self._read_on()

    def _respond(self, head: _Head, response: web.Response, *, linger: bool = False) -> None:
        body = response.body
        assert isinstance(body, bytes)
        self._write(head, response.status, response.headers.items(), body,
                    close=response.keep_alive is False, linger=linger)  # fmt: skip

    def _write(
        self,
        head: _Head,
        status: int,
        headers: Iterable[tuple[str, str]],
        payload: bytes,
        *,
        close: bool,
        linger: bool = False,
        compress: bool = False,
        later: bool = False,
    ) -> bool:
        """Write one answer (an inference answer is ``compress``ed for a client that accepts
        it, as the aiohttp route does); close after it when asked to or when the client said
        so (after ``_LINGER_S`` of dropping what it still sends if ``linger``).

        ``later``: an answer that keeps the connection open goes out with the other answers
        of this turn of the loop (``FastPath.send_later``) when there are others, and True
        says so: the connection moves on to its next request once it is written. A lone
        answer (nothing else waiting on a batch) is written at once.
        """
        transport = self.transport
        if self.done or transport is None:
            return False  # the client left: nothing to answer
        coding = None
        if compress:
            accepted = head.headers.get("accept-encoding")
            if accepted and len(payload) >= COMPRESS_MIN_BYTES:
                accepted = accepted.lower()
                for coding, wbits in _CODINGS:
                    if coding in accepted:
                        deflater = zlib.compressobj(wbits=wbits)
                        payload = deflater.compress(payload) + deflater.flush()
                        break
                else:
                    coding = None
        close = close or linger or not head.keep_alive
        # an HTTP/1.0 client that asked for keep-alive is told it is kept
        echo = not close and head.headers.get("connection", "").lower() == "keep-alive"
        fields = tuple(headers)
        key = (status, fields, coding, close, echo)
        start = self.fast.heads.get(key)
        if start is None:
            start = _answer_head(status, fields, coding, close, echo)
            if len(self.fast.heads) < _HEADS_KEPT:
                self.fast.heads[key] = start
        out = b"%sContent-Length: %d\r\n%s\r\n" % (start, len(payload), self.fast.date)
        data = out if head.route.method == "HEAD" else out + payload
        if later and not close and (self.fast.outbox or self.fast.state.batching):
            self.fast.send_later(self, data)  # other answers are (or may be) on their way
            return True
        transport.write(data)
        if linger:
            self.done = True
            self.fast.connections.discard(self)
            self.fast.loop.call_later(_LINGER_S, transport.close)
        elif close:
            self.close()
        return False

    def _time_out(self, head: _Head) -> None:
        """The body did not come in time: 408, and close."""
        try:
            route = head.route
            model = self.fast.state.registry.get(str(route.model), route.version)
            model.request_stats.record_failure("invalid", int(self.fast.body_s * 1e9))
        except Exception:  # (the model went away meanwhile: nothing to count it against)
            pass
        error = RequestTimeout(f"request body not received within {self.fast.body_s:g} s")
        self._respond(head, http_errors.from_exception(error), linger=True)
