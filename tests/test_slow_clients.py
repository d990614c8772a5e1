"""Slow and vanishing clients cost nothing: slow heads and bodies are cut off, clients that
hang up mid-request leave no trace, normal traffic keeps being served, descriptors return."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import aiohttp
import orjson
import pytest

from conftest import running
from fastserve.config import ServerConfig

pytestmark = pytest.mark.timeout(60)

BODY = orjson.dumps(
    {
        "inputs": [
            {"name": n, "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]} for n in "ab"
        ]
    }
)
HEAD = (
    b"POST /v2/models/adder/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
)


@pytest.fixture
def strict_config(repo: Path) -> ServerConfig:
    return ServerConfig(repository=repo, port=0, idle_timeout_s=0.5, body_timeout_s=0.5)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def closed_by_server(reader: asyncio.StreamReader, within_s: float) -> bytes:
    """What the server sent before closing; fails if it keeps the connection open."""
    data = await asyncio.wait_for(reader.read(), within_s)
    assert reader.at_eof()
    return data


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_slow_heads_and_bodies_are_cut_off_while_others_are_served(
    strict_config: ServerConfig, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(strict_config) as srv:
        baseline = open_fds()
        port = srv.port

        async def slow_head() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"POST /v2/models/adder/infer HTTP/1.1\r\nHost: x\r\n")
                for _ in range(20):  # a header line every 0.1 s, never finishing
                    await asyncio.sleep(0.1)
                    if reader.at_eof():
                        break
                    writer.write(b"X-Slow: 1\r\n")
                    await writer.drain()
                return await closed_by_server(reader, 3)
            except ConnectionResetError:
                return b""
            finally:
                writer.close()

        async def slow_body() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(HEAD % len(BODY) + BODY[:10])  # the rest never comes
                await writer.drain()
                return await closed_by_server(reader, 3)
            finally:
                writer.close()

        async def hang_up() -> None:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(HEAD % len(BODY) + BODY[:10])
            await writer.drain()
            writer.close()

        async def normal_traffic(session: aiohttp.ClientSession) -> list[int]:
            statuses = []
            for _ in range(40):
                async with session.post(
                    "/v2/models/adder/infer",
                    data=BODY,
                    headers={"Content-Type": "application/json"},
                ) as resp:
                    statuses.append(resp.status)
                await asyncio.sleep(0.02)
            return statuses

        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            results = await asyncio.gather(
                *(slow_head() for _ in range(100)),
                *(slow_body() for _ in range(50)),
                *(hang_up() for _ in range(50)),
                normal_traffic(session),
            )
        heads, bodies, statuses = results[:100], results[100:150], results[-1]
        assert all(h == b"" for h in heads)  # closed with nothing sent
        for answer in bodies:
            assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
            assert b"not received within" in answer
        assert statuses == [200] * 40
        for _ in range(100):
            if open_fds() <= baseline + 2:
                break
            await asyncio.sleep(0.05)
        assert open_fds() <= baseline + 2
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
