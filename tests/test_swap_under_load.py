"""Swaps while traffic flows: no failed request, no answer from a version that was not
primary during the request, bad edits change nothing; and 50 swaps leak nothing."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import running, write_atomically
from fastserve.config import ServerConfig
from fastserve.model import ServedModel
from fastserve.server import Server

pytestmark = pytest.mark.timeout(180)

TOKEN = "swap-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLIENTS = 8
BODY = {
    "inputs": [
        {"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]},
        {"name": "b", "shape": [1, 4], "datatype": "FP32", "data": [4.0, 3.0, 2.0, 1.0]},
    ]
}
BATCHING = "batching:\n  max_batch_size: 8\n  max_queue_delay_us: 500\n"


def only(version: int) -> str:
    """Serve ``version`` and nothing else, so every swap loads and unloads sessions."""
    return f"{BATCHING}version_policy:\n  specific: [{version}]\nprimary: {version}\n"


def copy_version(repo: Path, version: int) -> None:
    staging = repo / "adder" / f".{version}.new"
    shutil.copytree(repo / "adder" / "1", staging)
    os.rename(staging, repo / "adder" / str(version))


class Timeline:
    """When each version became primary, sampled from the registry every millisecond."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.changes: list[tuple[float, str]] = []

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            version = self.server.registry.get("adder").version
            if not self.changes or self.changes[-1][1] != version:
                self.changes.append((time.monotonic(), version))
            await asyncio.sleep(0.001)

    def primary_during(self, version: str, start: float, end: float, slack: float) -> bool:
        for i, (since, primary) in enumerate(self.changes):
            until = self.changes[i + 1][0] if i + 1 < len(self.changes) else float("inf")
            if primary == version and since - slack <= end and start <= until + slack:
                return True
        return False


async def client_loop(
    session: aiohttp.ClientSession, stop: asyncio.Event, answers: list[tuple[Any, ...]]
) -> None:
    while not stop.is_set():
        sent = time.monotonic()
        try:
            async with session.post("/v2/models/adder/infer", json=BODY) as resp:
                doc = await resp.json()
                status = resp.status
        except aiohttp.ClientError as exc:  # a failure too: counted, never hidden
            doc, status = {"error": repr(exc)}, -1
        answers.append((sent, time.monotonic(), status, doc.get("model_version"), doc))


async def test_swaps_under_load_fail_no_request(repo: Path) -> None:
    copy_version(repo, 2)
    config_file = repo / "adder" / "config.yaml"
    config_file.write_text(only(1))
    config = ServerConfig(
        repository=repo, port=0, admin_token=TOKEN, watch_debounce_ms=30, drain_timeout_s=5
    )
    async with (
        running(config) as srv,
        aiohttp.ClientSession(
            f"http://127.0.0.1:{srv.port}", connector=aiohttp.TCPConnector(limit=CLIENTS)
        ) as load,
        # admin calls on connections of their own: the load's busy pool would starve them
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as session,
    ):
        registry = srv.registry
        stop = asyncio.Event()
        timeline = Timeline(srv)
        answers: list[tuple[Any, ...]] = []
        tasks = [asyncio.create_task(timeline.run(stop))]
        tasks += [asyncio.create_task(client_loop(load, stop, answers)) for _ in range(CLIENTS)]
        done_at: list[tuple[float, str]] = []  # (reported done, primary)
        edits: list[float] = []  # when each edit of the repository (or admin call) began

        async def applied(primary: str, loaded: set[str]) -> None:
            """Wait until the index reports the swap done: only ``loaded``, all READY."""
            for _ in range(600):
                async with session.post("/v2/repository/index", headers=AUTH) as resp:
                    rows = [r for r in await resp.json() if r["name"] == "adder"]
                ready = {r["version"] for r in rows if r["state"] == "READY"}
                primaries = [r["version"] for r in rows if r["primary"]]
                if ready == loaded and len(rows) == len(loaded) and primaries == [primary]:
                    done_at.append((time.monotonic(), primary))
                    await asyncio.sleep(0.2)  # traffic on the new version before the next edit
                    return
                await asyncio.sleep(0.02)
            raise AssertionError(f"swap to {primary} not reported done: {rows}")

        async def refused(problem: str) -> None:
            serving = registry.get("adder")
            for _ in range(600):
                async with session.post("/v2/repository/index", headers=AUTH) as resp:
                    rows = [r for r in await resp.json() if r["name"] == "adder"]
                if any(problem in r["reason"] for r in rows):
                    assert registry.get("adder") is serving  # nothing changed
                    await asyncio.sleep(0.2)
                    return
                await asyncio.sleep(0.02)
            raise AssertionError(f"bad edit not reported: {rows}")

        swaps = 0
        try:
            await applied("1", {"1"})
            for primary in (2, 1, 2, 1):
                edits.append(time.monotonic())
                write_atomically(config_file, only(primary))
                await applied(str(primary), {str(primary)})
                swaps += 1
            # a typo: refused, version 1 keeps serving; then fixed
            edits.append(time.monotonic())
            write_atomically(
                config_file, only(2).replace("max_queue_delay_us", "max_queue_dely_us")
            )
            await refused("unknown setting")
            edits.append(time.monotonic())
            write_atomically(config_file, only(2))
            await applied("2", {"2"})
            swaps += 1
            # a new version appears and becomes primary
            edits.append(time.monotonic())
            copy_version(repo, 3)
            edits.append(time.monotonic())
            write_atomically(config_file, only(3))
            await applied("3", {"3"})
            swaps += 1
            # a corrupt model dropped in as the latest version: refused; removed again
            edits.append(time.monotonic())
            write_atomically(config_file, f"{BATCHING}version_policy:\n  latest: 1\nprimary: 3\n")
            edits.append(time.monotonic())
            (repo / "adder" / "4").mkdir()
            (repo / "adder" / "4" / "model.onnx").write_bytes(os.urandom(2048))
            await refused("cannot load model 'adder' version 4")
            edits.append(time.monotonic())
            shutil.rmtree(repo / "adder" / "4")
            await applied("3", {"3"})
            for primary in (1, 3, 2):
                edits.append(time.monotonic())
                write_atomically(config_file, only(primary))
                await applied(str(primary), {str(primary)})
                swaps += 1
            # rollback through the API, by an edit of the file: 3 is primary again (the
            # policy still names 2, so both stay loaded)
            edits.append(time.monotonic())
            async with session.post("/v2/repository/models/adder/rollback", headers=AUTH) as resp:
                assert resp.status == 200, await resp.text()
            await applied("3", {"2", "3"})
            swaps += 1
            assert "primary: 3" in config_file.read_text()

        finally:
            stop.set()
            await asyncio.gather(*tasks)

    assert swaps >= 10
    failures = [a for a in answers if a[2] != 200]
    assert not failures, failures[:5]
    assert len(answers) > 500
    for sent, received, _, version, doc in answers:
        assert doc["outputs"][0]["data"] == [5.0] * 4
        assert timeline.primary_during(version, sent, received, slack=0.002), (
            version,
            sent,
            received,
        )
    # once a swap is reported done, no answer to a later request comes from another version
    for done, primary in done_at:
        until = min([t for t in edits if t > done], default=float("inf"))
        later = [a for a in answers if done < a[0] and a[1] < until]
        assert later and all(a[3] == primary for a in later), primary


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def threads_outside_pools() -> tuple[int, int]:
    """OS threads (onnxruntime's native pools count too) and the Python threads, leaving out
    asyncio's default executor: it grows lazily up to its fixed bound and is reused."""
    names = [t.name for t in threading.enumerate()]
    pooled = sum(name.startswith("asyncio_") for name in names)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1]) - pooled, len(names) - pooled
    raise AssertionError("no Threads")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
async def test_fifty_swaps_leak_no_sessions_threads_or_memory(repo: Path) -> None:
    """Swap the scorecard model (hundreds of graph nodes, a real session to leak) 50 times
    through the API: retired versions are freed, threads and memory return to baseline."""
    model = repo / "scorecard"
    copy = model / ".2.new"
    shutil.copytree(model / "1", copy)
    os.rename(copy, model / "2")
    config_file = model / "config.yaml"
    config_file.write_text(only(1))
    config = ServerConfig(repository=repo, port=0, admin_token=TOKEN, watch="off")
    seen: weakref.WeakSet[ServedModel] = weakref.WeakSet()
    async with (
        running(config) as srv,
        aiohttp.ClientSession(f"http://127.0.0.1:{srv.port}") as session,
    ):

        async def swap(version: int) -> None:
            write_atomically(config_file, only(version))
            async with session.post("/v2/repository/models/scorecard/load", headers=AUTH) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["versions"] == [str(version)]
            seen.add(srv.registry.get("scorecard"))

        for i in range(6):  # warm-up: allocator arenas, thread pools, caches
            await swap(2 - i % 2)
        gc.collect()
        baseline_rss, baseline_threads = rss_bytes(), threads_outside_pools()
        for i in range(50):
            await swap(1 + i % 2)
        gc.collect()
        await asyncio.sleep(0.1)
        alive = [m.label for m in seen]
        assert alive == [srv.registry.get("scorecard").label], alive

        # A joined thread can still be exiting in the kernel for a moment (more so on a busy
        # core), so wait for the count to come down; one leaked thread per swap would be +50.
        def grown() -> bool:
            return any(
                now > then
                for now, then in zip(threads_outside_pools(), baseline_threads, strict=True)
            )

        deadline = time.monotonic() + 5
        while grown() and time.monotonic() < deadline:  # noqa: ASYNC110 (kernel state, no event)
            await asyncio.sleep(0.05)
        assert not grown(), (threads_outside_pools(), baseline_threads)
        growth = rss_bytes() - baseline_rss
        assert growth < 40 << 20, f"RSS grew {growth / 2**20:.1f} MiB over 50 swaps"
