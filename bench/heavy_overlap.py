"""Whether the heavy model's compute hides fastserve's request path when the model has a
thread (and a core) of its own: in-process, no HTTP and no load generator.

    taskset -c 0 python bench/heavy_overlap.py     # one core: the suite's server
    taskset -c 0-1 python bench/heavy_overlap.py   # a second core for the model's thread

For each ``execution`` (``event_loop``: batches run on the event loop, as the suite serves
the heavy model; ``threads``: on a thread of their own, onnxruntime releasing the GIL) a
real server on the heavy model (bench/heavy_model.py, the suite's batching config) takes
``--clients`` concurrent single-row JSON requests (``request_cost.run_clients``: the fast
path's ``answer_inference``, value schema, recording and monitoring on), alternating for
``--rounds`` rounds. Printed: rows a second (median) and CPU µs a request, against the
model's ceiling on one core (``session.run`` at batch 64, one thread, on the first CPU
this process may use): issue 8's heavy target is 0.8x that ceiling.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import uvloop

import heavy_model  # bench/heavy_model.py
import request_cost  # bench/request_cost.py: run_clients
import serving  # bench/serving.py

EXECUTIONS = ("event_loop", "threads")


def repository(work: Path, execution: str) -> Path:
    """The heavy model alone, configured as the suite serves it but for ``execution``."""
    repo = work / execution
    repo.mkdir()
    heavy_model.write_repository(repo)
    config = repo / heavy_model.MODEL_NAME / "config.yaml"
    config.write_text(serving.CONFIGS["batching"] + f"execution: {execution}\n")
    return repo


async def measure(repo: Path, body: bytes, clients: int, requests: int) -> tuple[float, float]:
    """(rows a second, CPU µs a request) of one server over ``requests`` after a warm-up."""
    from fastserve.config import ServerConfig
    from fastserve.server import Server

    config = ServerConfig(repository=repo, port=0, watch="off", state_db=repo / "state.db")
    server = Server(config)
    await server.start()
    try:
        name = heavy_model.MODEL_NAME
        await request_cost.run_clients(server, body, clients, min(requests, 2_000), model=name)
        wall = time.perf_counter()
        cpu = await request_cost.run_clients(server, body, clients, requests, model=name)
        wall = time.perf_counter() - wall
    finally:
        await server.stop()
    return requests / wall, cpu / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    cpus = sorted(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="fastserve-overlap-"))
    repos = {execution: repository(work, execution) for execution in EXECUTIONS}
    body = request_cost.single_row_body()
    model_file = repos["threads"] / heavy_model.MODEL_NAME / "1" / "model.onnx"
    results: dict[str, list[tuple[float, float]]] = {execution: [] for execution in EXECUTIONS}
    ceilings: list[float] = []
    for _ in range(args.rounds):  # the ceiling too, each round: this VM drifts
        for execution, repo in repos.items():
            run = measure(repo, body, args.clients, args.requests)
            results[execution].append(uvloop.run(run))
        os.sched_setaffinity(0, {cpus[0]})
        ceilings.append(1e6 / heavy_model.per_row_us(model_file, [64], 1.0)[64])
        os.sched_setaffinity(0, set(cpus))

    ceiling = statistics.median(ceilings)
    print(f"heavy model, {args.clients} clients in-process, one-row JSON, CPUs {cpus}, "
          f"medians of {args.rounds} alternating rounds of {args.requests:,} requests; "
          f"ceiling at batch 64 on CPU {cpus[0]}: {ceiling:,.0f} rows/s\n")  # fmt: skip
    print("| execution | rows/s | x the one-core ceiling (paired) | CPU µs/request |")
    print("|---|---:|---:|---:|")
    for execution, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        paired = statistics.median(r / c for (r, _), c in zip(runs, ceilings, strict=True))
        print(f"| {execution} | {rate:,.0f} | {rate / ceiling:.2f}x ({paired:.2f}x) | {cpu:.0f} |")


if __name__ == "__main__":
    main()
