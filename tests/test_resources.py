"""Resources stay bounded: after warm-up, more traffic leaves memory flat and nothing pending."""

from __future__ import annotations

import asyncio
import itertools
import os

import aiohttp
import pytest

from fastserve.server import Server

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc"),
]

BODY = {
    "inputs": [
        {"name": n, "shape": [2, 4], "datatype": "FP32", "data": [1.0] * 8} for n in ("a", "b")
    ]
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def traffic(client: aiohttp.ClientSession, requests: int, concurrency: int = 30) -> None:
    async def worker(n: int) -> None:
        for _ in range(n):
            async with client.post("/v2/models/adder/infer", json=BODY) as resp:
                assert resp.status == 200
                await resp.read()

    assert requests % concurrency == 0
    await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))


async def test_memory_is_flat_and_nothing_is_left_pending(
    client: aiohttp.ClientSession, server: Server
) -> None:
    model = server.registry.get("adder")
    await traffic(client, 3000)  # warm-up: allocator arenas, caches, connection pool
    rounds = []
    for _ in range(8):
        await traffic(client, 3000)
        rounds.append(rss_bytes())
    # two more rounds of warm-up: a fresh-clone CI run once saw RSS step by 6.6 MiB between
    # its first readings (534,652 -> 541,388 KiB), which a local run never showed
    rounds = rounds[2:]
    steps = [b - a for a, b in itertools.pairwise(rounds)]
    # A leak grows RSS in every round, a one-time allocation (an allocator arena: once
    # 5.6 MiB between two later readings in a full local run, then flat) in one: leave the
    # largest step out. 15,000 requests over the five steps (measured growth: a few KiB
    # over 30,000): a leak of 170 bytes per request would still show.
    steady = sum(steps) - max(steps)
    assert steady < 1024 * 1024, [r // 1024 for r in rounds]
    assert model.batcher.queue_depth == 0
    assert not model.batcher._pending
    stats = model.batcher.core_stats()
    assert stats["submitted"] == stats["completed"] == 27_000
