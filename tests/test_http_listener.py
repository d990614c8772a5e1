"""The listening sockets (fastserve.http.listener) on uvloop, the loop the server runs on:
real sockets, real connections."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from fastserve.http.listener import Listener

uvloop = pytest.importorskip("uvloop")


class Echo(asyncio.Protocol):
    made: list[int]
    turn = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Echo.made.append(Echo.turn)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


def on_uvloop(main: Callable[[], Awaitable[Any]]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def test_a_busy_loop_accepts_a_flood_of_connections_in_one_turn() -> None:
    n = 100
    Echo.made = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = Listener(Echo, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]

        def busy() -> None:  # every turn of the loop takes 10 ms
            Echo.turn += 1
            time.sleep(0.01)
            loop.call_soon(busy)

        loop.call_soon(busy)
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
        try:
            for _ in range(400):
                if len(Echo.made) == n:
                    break
                await asyncio.sleep(0)
            assert len(Echo.made) == n
            # one turn accepts them all, the next makes their transports
            assert max(Echo.made) - min(Echo.made) <= 1, Echo.made
        finally:
            for c in clients:
                c.close()
            listener.close()

    on_uvloop(main)


def test_every_address_of_a_name_gets_the_same_port_and_close_stops_accepting() -> None:
    async def main() -> None:
        listener = Listener(Echo, "localhost", 0)
        ports = {s.getsockname()[1] for s in listener.sockets}
        assert len(ports) == 1
        port = ports.pop()
        Echo.made = []
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
        listener.close()
        listener.close()  # twice is harmless
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)

    on_uvloop(main)


def test_a_port_in_use_is_an_error_that_names_the_address() -> None:
    async def main() -> None:
        first = Listener(Echo, "127.0.0.1", 0)
        port = first.sockets[0].getsockname()[1]
        try:
            with pytest.raises(OSError, match=f"cannot listen on \\('127.0.0.1', {port}\\)"):
                Listener(Echo, "127.0.0.1", port)
        finally:
            first.close()

    on_uvloop(main)


CHILD = textwrap.dedent(
    """
    import asyncio, logging, os, resource, sys
    import uvloop
    from fastserve.http import listener
    from fastserve.http.listener import Listener

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    listener.RETRY_AFTER_S = 0.2

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
        def data_received(self, data):
            self.transport.write(data)

    async def main():
        server = Listener(Echo, "127.0.0.1", 0)
        # room for a few more descriptors only
        used = len(os.listdir("/proc/self/fd"))
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 4, hard))
        print("port", server.sockets[0].getsockname()[1], flush=True)
        await asyncio.sleep(30)

    uvloop.run(main())
    """
)


def test_out_of_descriptors_it_backs_off_and_accepts_again_once_some_are_free(
    tmp_path: Path,
) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline().split()[1])
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(12)]
        line = child.stdout.readline()
        assert "cannot accept connections" in line and "again in 0.2 s" in line, line
        for c in clients[:8]:  # the accepted ones go: their descriptors free up
            c.close()
        for c in clients[8:]:  # the ones the kernel kept waiting are accepted and served
            c.sendall(b"hi")
            assert c.recv(2) == b"hi"
            c.close()
    finally:
        child.kill()
        child.communicate()
