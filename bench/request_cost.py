"""What fastserve's own request path costs, in-process, with no HTTP and no load generator:

    taskset -c 0 python bench/request_cost.py [--clients 1 64] [--requests 20000]
    taskset -c 0 python bench/request_cost.py --clients 64 --profile   # cProfile, by tottime
    taskset -c 0 python bench/request_cost.py --clients 1 --idle-us 200  # the core idles

A real server (the demo ``breast_cancer`` with bench/suite.py's batching config, as the
suite serves it: value schema, prediction recording, monitoring) is started on uvloop on
127.0.0.1, and ``--clients`` tasks each send ``answer_inference`` the same single-row JSON
body, one after another, as that many connections would through the fast path. The server
believes that many connections are open, so the batcher sees what it would see under a
closed loop of that many clients. Printed: CPU µs per request (process time, every
thread, the review store's flushes included: the run ends once the store has written what
was recorded) and requests/s, for each configuration:

- ``shipped``: as the suite's fastserve line;
- ``no recording``: ``review.record_predictions: false``;
- ``lean``: no recording and ``--no-monitoring`` (bench/suite.py's lean server);

configurations alternate for ``--rounds`` rounds, each figure the median. ``--idle-us``:
each client blocks the thread that long after each request, so the core idles between
requests as it does between a lone client's requests over HTTP; the next request's CPU
then shows what waking costs it (on this VM 250-290 µs a request at one client with 200
µs, against 85-117 back to back). What an HTTP server adds on top (llhttp, the fast
path's framing, the socket writes) is not here: that is what bench/suite.py's ceiling
lines show.

    taskset -c 0 python bench/request_cost.py --store [--records 1000]

The review store alone: µs a record of one flush of ``--records`` single-row predictions
(rows built from the noted outputs, then inserted, in one transaction), the median of 15
flushes.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import uvloop

import serving  # bench/serving.py

SMALL = "breast_cancer"
SETTINGS = serving.CONFIGS["batching"] + "execution: event_loop\n"
"""The model's config.yaml: as bench/suite.py serves it."""


def served_repository(demo: Path, repo: Path, extra: str = "") -> Path:
    """``repo``: the demo's ``SMALL`` model alone, configured as bench/suite.py serves it
    (``extra``: more of its config.yaml)."""
    repo.mkdir()
    shutil.copytree(demo / SMALL, repo / SMALL)
    (repo / SMALL / "config.yaml").write_text(SETTINGS + extra)
    return repo


def single_row_body() -> bytes:
    """The single-row JSON request bench/suite.py's headline sends."""
    from fastserve.demo import example_rows

    row = example_rows(SMALL, 1)
    return orjson.dumps(
        {"inputs": [{"name": "input", "shape": list(row.shape), "datatype": "FP32",
                     "data": row.ravel().tolist()}]}
    )  # fmt: skip


async def run_clients(
    server: Any,
    body: bytes,
    clients: int,
    requests: int,
    idle_us: int = 0,
    *,
    model: str = SMALL,
) -> float:
    """Send ``requests`` requests to ``model`` from ``clients`` concurrent tasks; the CPU s
    they took, the store's writing of what they recorded included. ``idle_us``: after each
    request the thread sleeps this long, so the core idles between requests as it does
    between a lone client's requests over HTTP (what that costs the next request is in its
    CPU)."""
    from fastserve.http.app import answer_inference

    state = server.state
    state.open_connections = lambda: clients  # type: ignore[method-assign]
    headers = {"content-type": "application/json", "content-length": str(len(body))}
    left = requests

    async def given() -> bytes:
        return body

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await answer_inference(state, model, None, headers, given)
            if idle_us:
                # blocking is the point: the core idles
                time.sleep(idle_us / 1e6)  # noqa: ASYNC251
            # The answer's round trip: over HTTP a client's next request arrives after the
            # other answers of its batch are out. Without this, the first client resumed
            # after a batch sees every other client still counted as batching, runs alone
            # (``release_when_idle``) and, never suspending, sends all that is left by
            # itself: batches of one request.
            await asyncio.sleep(0)

    started = time.process_time()
    await asyncio.gather(*(client() for _ in range(clients)))
    await server.review.store.flush()  # what the run recorded, written
    return time.process_time() - started


async def measure(
    repo: Path,
    monitoring: bool,
    body: bytes,
    clients: int,
    requests: int,
    profile: bool,
    idle_us: int = 0,
) -> tuple[float, float]:
    """(CPU µs a request, requests/s) of one server over ``requests`` after a warm-up."""
    from fastserve.config import ServerConfig
    from fastserve.server import Server

    config = ServerConfig(repository=repo, port=0, watch="off", monitoring=monitoring)
    server = Server(config)
    await server.start()
    try:
        await run_clients(server, body, clients, min(requests, 2_000), idle_us)  # warm-up
        profiler = cProfile.Profile() if profile else None
        wall = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        cpu = await run_clients(server, body, clients, requests, idle_us)
        if profiler is not None:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(35)
        wall = time.perf_counter() - wall
    finally:
        await server.stop()
    return cpu / requests * 1e6, requests / wall


def store_cost(records: int) -> None:
    """Print what a flush of ``records`` noted predictions costs a record."""
    import numpy as np

    from fastserve.protocol import ModelSignature, TensorSpec
    from fastserve.review.outcome import Reading
    from fastserve.review.service import PredictionLog
    from fastserve.review.store import ReviewStore

    signature = ModelSignature(
        [TensorSpec("input", "FP32", (-1, 30))],
        [TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 2))],
    )
    reading = Reading.of(signature, "auto")
    outputs = [np.array([1]), np.array([[0.1, 0.9]], np.float32)]

    async def flushes() -> list[float]:
        work = Path(tempfile.mkdtemp(prefix="fastserve-store-"))
        store = ReviewStore(work / "state.db", flush_interval_s=3600)
        log = PredictionLog(limit=10 * records)
        store.add_source("predictions", log.drain)
        await store.open()
        seconds, n = [], 0
        try:
            for _ in range(16):  # the first one (table creation, cold caches) is dropped
                for _ in range(records):
                    log.add("m", f"0123456789ab-{n:x}", "primary", "1", reading, outputs, None, 1.0)
                    n += 1
                started = time.process_time()
                await store.flush()
                seconds.append(time.process_time() - started)
        finally:
            await store.close()
            shutil.rmtree(work, ignore_errors=True)
        return seconds[1:]

    seconds = asyncio.run(flushes())
    each = sorted(s / records * 1e6 for s in seconds)
    print(f"review store: {statistics.median(each):.2f} µs a record (flushes of {records}; "
          f"fastest {each[0]:.2f}, slowest {each[-1]:.2f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="cProfile the shipped server")
    parser.add_argument(
        "--idle-us", type=int, default=0, help="each client sleeps this long after a request"
    )
    parser.add_argument("--store", action="store_true", help="the review store's flush alone")
    parser.add_argument("--records", type=int, default=1_000)
    args = parser.parse_args()
    if args.store:
        store_cost(args.records)
        return

    from fastserve.demo import build_demo_repository

    work = Path(tempfile.mkdtemp(prefix="fastserve-cost-"))
    demo = build_demo_repository(work / "demo")
    single = served_repository(demo, work / "single")  # only the model measured is loaded
    quiet = served_repository(demo, work / "quiet", "review:\n  record_predictions: false\n")
    body = single_row_body()
    variants = {"shipped": (single, True), "no recording": (quiet, True), "lean": (quiet, False)}

    if args.profile:
        for clients in args.clients:
            print(f"## shipped, {clients} client(s)")
            uvloop.run(measure(single, True, body, clients, args.requests, True))
        shutil.rmtree(work, ignore_errors=True)
        return

    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for clients in args.clients:
            for name, (repo, monitoring) in variants.items():
                figures = uvloop.run(
                    measure(repo, monitoring, body, clients, args.requests, False, args.idle_us)
                )
                results.setdefault((name, clients), []).append(figures)
    shutil.rmtree(work, ignore_errors=True)
    print(f"| configuration | clients | CPU µs/request | requests/s |  ({args.rounds} rounds)")
    print("|---|---:|---:|---:|")
    for (name, clients), runs in sorted(results.items(), key=lambda item: item[0][1]):
        cpu = statistics.median(r[0] for r in runs)
        rate = statistics.median(r[1] for r in runs)
        print(f"| {name} | {clients} | {cpu:.1f} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
