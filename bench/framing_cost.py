"""What the fast path's HTTP framing costs a request, in-process, next to the llhttp ceiling:

    taskset -c 0 python bench/framing_cost.py [--connections 64] [--requests 50000] [--rounds 8]
    taskset -c 0 python bench/framing_cost.py --whole   # the whole server, through the fast path

No sockets and no load generator: ``--connections`` connections get in-memory transports,
and each answer written sends that connection's next request (the single-row JSON body of
bench/suite.py, with the head wrk sends) on the next turn of the loop, as a client would.
Printed: CPU µs a request, each figure the median of ``--rounds`` rounds that alternate:

- ``fast path``: ``fastserve.http.fastpath`` (parse the head, frame the body, write the
  answer) around an inference that parses the body with orjson and answers a fixed
  document, as the llhttp ceiling does;
- ``llhttp ceiling``: bench/baselines.py's ``LlhttpCeiling`` protocol, which does no more
  than that on the same parser (the HTTP stack's floor for this answer).

``--whole``: instead, a real server (the demo ``breast_cancer`` as bench/suite.py serves it,
as bench/request_cost.py starts it) answers through the fast path, against the same server
answering the same requests called in-process (``answer_inference``, as
bench/request_cost.py does): the difference is what the framing costs in the whole path.
What the socket calls cost is in neither: bench/suite.py's two ceiling lines show it.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import uvloop

import baselines  # bench/baselines.py
import request_cost  # bench/request_cost.py

FIXED = orjson.dumps({"model_name": "m", "model_version": "1", "outputs": []})


def request_bytes(body: bytes) -> bytes:
    return (
        b"POST /v2/models/breast_cancer/infer HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
        b"Content-Length: %d\r\nContent-Type: application/json\r\n\r\n%s" % (len(body), body)
    )


class Transport:
    """An in-memory transport: each answer written sends the connection's next request."""

    def __init__(self, run: Run, protocol: asyncio.Protocol) -> None:
        self.run, self.protocol = run, protocol

    def write(self, data: bytes) -> None:
        self.run.answered(self.protocol, data)

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


class Run:
    """``requests`` requests, each answer bringing its connection's next one (``cpu_us``)."""

    def __init__(self, request: bytes, requests: int) -> None:
        self.request = request
        self.left = requests
        self.outstanding = 0
        self.failed = 0
        """Answers other than 200."""
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()

    def claim(self) -> bool:
        """Whether a request is left to send (then it counts as outstanding)."""
        if self.left <= 0:
            return False
        self.left -= 1
        self.outstanding += 1
        return True

    def send(self, protocol: asyncio.Protocol) -> None:
        protocol.data_received(self.request)

    def answered(self, protocol: asyncio.Protocol, answer: bytes) -> None:
        self.outstanding -= 1
        if not answer.startswith(b"HTTP/1.1 200 "):
            self.failed += 1
        if self.claim():
            self.loop.call_soon(self.send, protocol)  # the client's turn, then its next request
        elif not self.outstanding and not self.done.done():
            self.done.set_result(None)

    async def cpu_us(self, factory: Callable[[], asyncio.Protocol], connections: int) -> float:
        """CPU µs a request, every thread of the process counted."""
        protocols = [factory() for _ in range(connections)]
        for protocol in protocols:
            protocol.connection_made(Transport(self, protocol))  # type: ignore[arg-type]
        requests = self.left
        started = time.process_time()
        for protocol in protocols:
            if self.claim():
                self.send(protocol)
        await self.done
        used = time.process_time() - started
        for protocol in protocols:
            protocol.connection_lost(None)
        if self.failed:
            raise RuntimeError(f"{self.failed} of {requests} requests were not answered 200")
        return used / requests * 1e6


def report(results: dict[str, list[float]], rounds: int) -> None:
    print(f"| path | CPU µs/request (median of {rounds}) | rounds |")
    print("|---|---:|---|")
    for name, figures in results.items():
        spread = ", ".join(f"{f:.1f}" for f in figures)
        print(f"| {name} | {statistics.median(figures):.1f} | {spread} |")


async def framing(body: bytes, connections: int, requests: int, rounds: int) -> None:
    from fastserve.config import ServerConfig
    from fastserve.http import fastpath

    async def fixed_answer(
        state: Any, name: str, version: Any, headers: Any, given: Any
    ) -> tuple[bytes, dict[str, str]]:
        orjson.loads(given if isinstance(given, bytes) else await given())
        return FIXED, {"Content-Type": "application/json"}

    fastpath.answer_inference = fixed_answer  # type: ignore[assignment]  # the framing alone
    # the server state as far as the fast path reads it when the inference is not its own
    config = ServerConfig(repository=tempfile.gettempdir(), port=0)  # (no model is read)
    state = types.SimpleNamespace(config=config, inflight=0, batching=0)
    fast = fastpath.FastPath(state, asyncio.Protocol)  # type: ignore[arg-type]
    request = request_bytes(body)
    results: dict[str, list[float]] = {"fast path": [], "llhttp ceiling": []}
    try:
        for _ in range(rounds + 1):  # the first round warms up
            for name, factory in (("fast path", fast), ("llhttp ceiling", baselines.LlhttpCeiling)):
                figure = await Run(request, requests).cpu_us(factory, connections)
                results[name].append(figure)
    finally:
        fast.close()
    report({name: figures[1:] for name, figures in results.items()}, rounds)


async def whole(body: bytes, connections: int, requests: int, rounds: int) -> None:
    from fastserve.config import ServerConfig
    from fastserve.demo import build_demo_repository
    from fastserve.server import Server

    work = Path(tempfile.mkdtemp(prefix="fastserve-framing-"))
    repo = request_cost.served_repository(build_demo_repository(work / "demo"), work / "repo")
    server = Server(ServerConfig(repository=repo, port=0, watch="off"))
    await server.start()
    fast = server.state.fast
    assert fast is not None
    server.state.open_connections = lambda: connections  # type: ignore[method-assign]
    request = request_bytes(body)
    results: dict[str, list[float]] = {"through the fast path": [], "in-process": []}
    try:
        for _ in range(rounds + 1):
            cpu = await Run(request, requests).cpu_us(fast, connections)
            await server.review.store.flush()  # (what it recorded, written: counted below)
            results["through the fast path"].append(cpu)
            used = await request_cost.run_clients(server, body, connections, requests)
            results["in-process"].append(used / requests * 1e6)
    finally:
        await server.stop()
        shutil.rmtree(work, ignore_errors=True)
    report({name: figures[1:] for name, figures in results.items()}, rounds)
    diffs = [a - b for a, b in zip(*results.values(), strict=True)][1:]
    print(f"the framing in the whole path: {statistics.median(diffs):.1f} µs a request "
          f"(round by round {min(diffs):.1f} to {max(diffs):.1f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--whole", action="store_true", help="the whole server, see above")
    args = parser.parse_args()

    body = request_cost.single_row_body()
    measure = whole if args.whole else framing
    uvloop.run(measure(body, args.connections, args.requests, args.rounds))


if __name__ == "__main__":
    main()
