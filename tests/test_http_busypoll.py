"""Busy polling once the server is idle (``fastserve.http.busypoll``): the window's
adaptation on a clock the test moves, then a real server's loop over a real socket."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from fastserve.config import ServerConfig
from fastserve.http.busypoll import GROW_START_NS, BusyPoll
from fastserve.server import Server
from test_http_fastpath import RawClient, infer_request, sums

pytestmark = pytest.mark.timeout(60)

US = 1000


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000_000

    def __call__(self) -> int:
        return self.now


async def test_the_window_grows_on_short_pauses_and_closes_on_long_ones() -> None:
    clock = Clock()
    poll = BusyPoll(asyncio.get_running_loop(), 200, clock)
    assert poll.window_ns == GROW_START_NS

    def pause(ns: int) -> int:
        poll.idle()
        clock.now += ns
        poll.arrived()
        return poll.window_ns

    # a request 80 µs after the server went idle: missed by the 50 µs window, which doubles
    assert [pause(80 * US), pause(150 * US), pause(150 * US)] == [100 * US, 200 * US, 200 * US]
    assert poll.pauses == {"caught": 1, "short": 2, "long": 0}
    # pauses past the maximum halve it, and below 50 µs it closes
    assert [pause(1000 * US) for _ in range(3)] == [100 * US, 50 * US, 0]
    assert poll.pauses["long"] == 3
    poll.stop()  # (the first pause's spin is still on: this clock stands still)
    await asyncio.sleep(0)
    assert not poll.spinning
    # closed: going idle starts no spin, and a short pause reopens it at 50 µs
    poll.idle()
    await asyncio.sleep(0)
    assert not poll.spinning
    clock.now += 10 * US
    poll.arrived()
    assert poll.window_ns == GROW_START_NS
    # a request that arrives without the server having gone idle changes nothing
    poll.arrived()
    assert sum(poll.pauses.values()) == 7


async def test_the_loop_keeps_polling_until_the_window_closes() -> None:
    clock = Clock()
    poll = BusyPoll(asyncio.get_running_loop(), 200, clock)
    poll.idle()
    assert poll.spinning
    for _ in range(5):  # turns of the loop within the window: it stays on
        await asyncio.sleep(0)
        assert poll.spinning
    clock.now += 10 * US
    poll.idle()  # going idle again within it extends it (and starts no second spin)
    clock.now += GROW_START_NS - 1
    await asyncio.sleep(0)
    assert poll.spinning
    clock.now += 1
    for _ in range(2):
        await asyncio.sleep(0)
    assert not poll.spinning


async def test_zero_turns_it_off() -> None:
    poll = BusyPoll(asyncio.get_running_loop(), 0)
    poll.idle()
    poll.arrived()
    assert not poll.spinning and poll.window_ns == 0 and sum(poll.pauses.values()) == 0


async def metrics(server: Server) -> dict[str, float]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{server.port}/metrics") as response,
    ):
        text = await response.text()
    return {
        name: float(value)
        for name, value in re.findall(r"^(fastserve_busy_poll\S*) (\S+)$", text, re.MULTILINE)
    }


async def one_client_in_turn(server: Server, requests: int) -> None:
    conn = await RawClient.open(server)
    try:
        for i in range(requests):
            await conn.send(infer_request([i, i, i, i], f"r{i}"))
            answers = await conn.answers_until(i + 1)
            assert sums(answers[i]) == [i + 1.0] * 4
    finally:
        conn.close()


async def test_a_server_counts_its_pauses_and_stops_spinning_when_idle(server: Server) -> None:
    await one_client_in_turn(server, 20)
    fast = server.state.fast
    assert fast is not None
    # every answer left the server idle; each next request ended a pause
    assert sum(fast.poll.pauses.values()) >= 19
    found = await metrics(server)
    assert found["fastserve_busy_poll_window_seconds"] == fast.poll.window_ns / 1e9
    assert sum(v for k, v in found.items() if k.startswith("fastserve_busy_poll_pauses")) >= 19
    await asyncio.sleep(0.05)  # past the largest window: nothing keeps the loop awake
    assert not fast.poll.spinning


async def test_busy_poll_zero_never_spins(server_config: ServerConfig) -> None:
    server = Server(server_config.model_copy(update={"busy_poll_us": 0}))
    await server.start()
    try:
        await one_client_in_turn(server, 5)
        assert server.state.fast is not None and not server.state.fast.poll.spinning
        found = await metrics(server)
        assert found["fastserve_busy_poll_window_seconds"] == 0
        assert sum(v for k, v in found.items() if k.startswith("fastserve_busy_poll_pauses")) == 0
    finally:
        await server.stop()
