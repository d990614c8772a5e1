"""The fast path (``fastserve.http.fastpath``) at the HTTP/1.1 level, over raw sockets:
pipelining, keep-alive and close, ``Expect``, ``HEAD``, and the hand-over of a connection
to aiohttp for everything it does not serve, mid-connection and mid-pipeline."""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
import orjson
import pytest

from fastserve.server import Server

pytestmark = pytest.mark.timeout(60)


def infer_request(a: list[float], request_id: str, version: bytes = b"1.1") -> bytes:
    body = orjson.dumps(
        {
            "id": request_id,
            "inputs": [
                {"name": "a", "shape": [1, 4], "datatype": "FP32", "data": a},
                {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]},
            ],
        }
    )
    return (
        b"POST /v2/models/adder/infer HTTP/%s\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (version, len(body), body)
    )


def get(path: bytes, method: bytes = b"GET", extra: bytes = b"") -> bytes:
    return b"%s %s HTTP/1.1\r\nHost: t\r\n%s\r\n" % (method, path, extra)


class Answer:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.complete = False

    def json(self) -> Any:
        return orjson.loads(self.body)


class RawClient:
    """One connection; answers parsed by llhttp as they come."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.answers: list[Answer] = []
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = 0

    @classmethod
    async def open(cls, server: Server) -> RawClient:
        return cls(*await asyncio.open_connection("127.0.0.1", server.port))

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.answers.append(Answer())

    def on_header(self, name: bytes, value: bytes) -> None:
        self.answers[-1].headers[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self.answers[-1].status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.answers[-1].body += body

    def on_message_complete(self) -> None:
        self.answers[-1].complete = True

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answers_until(self, count: int, within_s: float = 10) -> list[Answer]:
        async def read() -> None:
            while sum(a.complete for a in self.answers) < count:
                data = await self.reader.read(65536)
                assert data, f"closed after {len(self.answers)} answers"
                self._parser.feed_data(data)

        await asyncio.wait_for(read(), within_s)
        return self.answers[:count]

    async def closed_by_server(self, within_s: float = 5) -> bool:
        return await asyncio.wait_for(self.reader.read(), within_s) == b""

    def close(self) -> None:
        self.writer.close()


def sums(answer: Answer) -> list[float]:
    doc = answer.json()
    return {o["name"]: o["data"] for o in doc["outputs"]}["sum"]  # type: ignore[no-any-return]


async def test_pipelined_requests_are_answered_in_order(server: Server) -> None:
    conn = await RawClient.open(server)
    try:
        await conn.send(b"".join(infer_request([i, i, i, i], f"r{i}") for i in range(30)))
        answers = await conn.answers_until(30)
        assert [a.status for a in answers] == [200] * 30
        assert [a.json()["id"] for a in answers] == [f"r{i}" for i in range(30)]
        assert [sums(a) for a in answers] == [[i + 1.0] * 4 for i in range(30)]
        assert all(a.headers["date"].endswith("GMT") for a in answers)
        assert server.state.fast is not None and len(server.state.fast.connections) == 1
    finally:
        conn.close()


async def test_no_request_becomes_a_task_of_its_own(server: Server) -> None:
    """The fast path drives each request's coroutine itself (``Connection._drive``): none
    is wrapped in a task, whether it is answered in the turn that read it (alone on its
    connection) or waits on a batch (requests on several connections at once)."""
    loop = asyncio.get_running_loop()
    default = loop.get_task_factory()
    made: list[str] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        made.append(getattr(coro, "__qualname__", repr(coro)))
        return asyncio.Task(coro, loop=loop, **kwargs)

    clients = [await RawClient.open(server) for _ in range(9)]
    loop.set_task_factory(factory)
    try:
        alone, others = clients[0], clients[1:]
        await alone.send(infer_request([1, 2, 3, 4], "alone"))
        (answer,) = await alone.answers_until(1)
        assert sums(answer) == [2.0, 3.0, 4.0, 5.0]
        for i, client in enumerate(others):
            client.writer.write(infer_request([i, i, i, i], f"c{i}"))
        answers = await asyncio.gather(*(client.answers_until(1) for client in others))
        assert [a[0].json()["id"] for a in answers] == [f"c{i}" for i in range(8)]
        assert [sums(a[0]) for a in answers] == [[i + 1.0] * 4 for i in range(8)]
    finally:
        loop.set_task_factory(default)
        for client in clients:
            client.close()
    assert made, "the task factory saw nothing: the test's own tasks should be there"
    assert not [name for name in made if "_infer" in name or "_drive" in name]


async def test_a_connection_handed_to_aiohttp_keeps_its_order_and_is_served(
    server: Server,
) -> None:
    """infer (fast), then, in one write: metrics (aiohttp's), infer, a chunked infer."""
    conn = await RawClient.open(server)
    try:
        await conn.send(infer_request([1, 2, 3, 4], "first"))
        (first,) = await conn.answers_until(1)
        assert first.status == 200 and sums(first) == [2.0, 3.0, 4.0, 5.0]
        assert server.state.fast is not None and len(server.state.fast.connections) == 1

        chunked = infer_request([5, 5, 5, 5], "chunked")
        head, _, body = chunked.partition(b"\r\n\r\n")
        head = head.replace(b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked")
        chunked = head + b"\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        await conn.send(
            get(b"/metrics") + infer_request([7, 7, 7, 7], "after") + chunked
            + infer_request([9, 9, 9, 9], "last")
        )  # fmt: skip
        answers = await conn.answers_until(5)
        metrics, after, via_chunks, last = answers[1:]
        assert metrics.status == 200 and b"fastserve_requests_total" in metrics.body
        assert after.json()["id"] == "after" and sums(after) == [8.0] * 4
        assert via_chunks.json()["id"] == "chunked" and sums(via_chunks) == [6.0] * 4
        assert last.json()["id"] == "last" and sums(last) == [10.0] * 4
        assert not server.state.fast.connections  # aiohttp has it now
        assert server.state.open_connections() == 1
    finally:
        conn.close()


async def test_keep_alive_and_close(server: Server) -> None:
    # HTTP/1.0 without keep-alive: answered, then closed
    conn = await RawClient.open(server)
    await conn.send(infer_request([0, 0, 0, 0], "old", version=b"1.0"))
    (answer,) = await conn.answers_until(1)
    assert answer.status == 200 and answer.headers["connection"] == "close"
    assert await conn.closed_by_server()
    conn.close()

    # HTTP/1.0 asking for keep-alive: told so, and the connection serves a second request
    conn = await RawClient.open(server)
    request = infer_request([0, 0, 0, 0], "old", version=b"1.0")
    request = request.replace(b"Host: t\r\n", b"Host: t\r\nConnection: keep-alive\r\n")
    await conn.send(request)
    await conn.send(request)
    answers = await conn.answers_until(2)
    assert [a.headers.get("connection") for a in answers] == ["keep-alive"] * 2
    conn.close()

    # HTTP/1.1 with Connection: close
    conn = await RawClient.open(server)
    await conn.send(get(b"/v2/health/live", extra=b"Connection: close\r\n"))
    (answer,) = await conn.answers_until(1)
    assert answer.json() == {"live": True} and answer.headers["connection"] == "close"
    assert await conn.closed_by_server()
    conn.close()


async def test_expect_100_continue(server: Server) -> None:
    conn = await RawClient.open(server)
    try:
        request = infer_request([2, 2, 2, 2], "expect")
        head, _, body = request.partition(b"\r\n\r\n")
        await conn.send(head + b"\r\nExpect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await conn.send(body)
        (answer,) = await conn.answers_until(1)
        assert answer.status == 200 and sums(answer) == [3.0] * 4
    finally:
        conn.close()

    conn = await RawClient.open(server)  # an expectation nobody meets: aiohttp's 417
    try:
        await conn.send(head + b"\r\nExpect: something-else\r\n\r\n")
        (answer,) = await conn.answers_until(1)
        assert answer.status == 417
    finally:
        conn.close()


async def test_head_answers_no_body_and_the_connection_goes_on(server: Server) -> None:
    conn = await RawClient.open(server)
    try:
        await conn.send(get(b"/v2/health/ready", b"HEAD") + get(b"/v2/models/adder"))
        conn._parser.set_dangerous_leniencies(lenient_keep_alive=True)
        # a HEAD answer has a length but no body: read it as a head only
        raw = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 5)
        assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 14\r\n" in raw
        (metadata,) = await conn.answers_until(1)
        assert metadata.status == 200 and metadata.json()["name"] == "adder"
    finally:
        conn.close()


async def test_what_the_fast_path_refuses_gets_aiohttp_answers(server: Server) -> None:
    cases = [
        (b"GARBAGE\r\n\r\n", {400}),
        (get(b"/v2/models/adder", extra=b"X-Big: " + b"x" * 9000 + b"\r\n"), {400, 431}),
        (get(b"/v2/models/ad%64er"), {200}),  # percent-encoded: aiohttp decodes it
        (get(b"/v2/models/nope"), {404}),
        (b"DELETE /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n", {405}),
    ]
    for request, statuses in cases:
        conn = await RawClient.open(server)
        try:
            await conn.send(request)
            (answer,) = await conn.answers_until(1)
            assert answer.status in statuses, (request[:40], answer.body[:80])
        finally:
            conn.close()


async def test_a_client_that_leaves_mid_request_leaves_nothing_behind(server: Server) -> None:
    for _ in range(20):
        conn = await RawClient.open(server)
        request = infer_request([1, 1, 1, 1], "gone")
        await conn.send(request)  # answered into a closed socket, or not at all
        conn.close()
    conn = await RawClient.open(server)
    await conn.send(infer_request([1, 1, 1, 1], "here"))
    (answer,) = await conn.answers_until(1)
    assert answer.json()["id"] == "here"
    conn.close()
    fast = server.state.fast
    assert fast is not None
    for _ in range(100):
        if not fast.connections:
            break
        await asyncio.sleep(0.02)
    assert not fast.connections
    assert server.state.inflight == 0


async def test_a_client_far_ahead_of_its_answers_is_not_read_from_meanwhile(
    server: Server,
) -> None:
    """80,000 pipelined requests (3.5 MB, over the 1 MiB body limit; their answers, 30 MB,
    more than the sockets' buffers hold) sent before reading a single answer: the server
    stops reading while its answers are unread, and then answers every one, in order."""
    conn = await RawClient.open(server)
    try:
        count = 80_000
        request = get(b"/v2/models/adder")
        conn.writer.write(request * count)  # not drained: the server must read it
        await asyncio.sleep(1)
        fast = server.state.fast
        assert fast is not None
        (connection,) = fast.connections
        assert connection.read_paused and connection.write_paused
        # (paused past the limit + a head, at most one read of the socket later)
        assert len(connection.buffer) < 1.5 * server.config.max_body_bytes < len(request) * count
        answers = await conn.answers_until(count, within_s=50)
        assert all(a.status == 200 and a.body == answers[0].body for a in answers)
        assert answers[0].json()["name"] == "adder"
        await asyncio.wait_for(conn.writer.drain(), 10)
    finally:
        conn.close()


async def test_remembered_routes_and_heads_stay_bounded_and_right(server: Server) -> None:
    """Request lines' routes and answers' heads are remembered, each up to a bound: past
    it, every request is still resolved and answered as before."""
    from fastserve.http import fastpath

    fast = server.state.fast
    assert fast is not None
    conn = await RawClient.open(server)
    distinct = fastpath._ROUTES_KEPT + 20
    for start in range(0, distinct, 200):
        batch = range(start, min(start + 200, distinct))
        await conn.send(b"".join(get(b"/v2/models/nobody%d/ready" % i) for i in batch))
    answers = await conn.answers_until(distinct)
    assert {a.status for a in answers} == {404}
    assert all(b"nobody" in a.body for a in answers[-20:])  # resolved past the bound
    # the same line under another method has its own route: this one goes to aiohttp
    await conn.send(get(b"/v2/models/adder/ready") + get(b"/v2/models/adder/ready", b"DELETE"))
    got, other = (await conn.answers_until(distinct + 2))[-2:]
    assert (got.status, other.status) == (200, 405)
    assert len(fast.routes) <= fastpath._ROUTES_KEPT
    assert len(fast.heads) <= fastpath._HEADS_KEPT
    conn.close()
