"""What the native batcher costs per request, in-process (no HTTP): the asyncio round trip
submit -> batch -> worker -> complete -> event loop, with a model that does nothing, at
several concurrencies. Compare with the per-request cost of the HTTP path (bench/serving.py).

    python bench/core_overhead.py [--requests 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np
import numpy.typing as npt

from fastserve.batching import ModelBatcher
from fastserve.config import BatchingConfig


def identity(inputs: list[npt.NDArray[np.float32]]) -> list[npt.NDArray[np.float32]]:
    return inputs


async def round_trips(concurrency: int, requests: int, delay_us: int) -> tuple[float, float]:
    config = BatchingConfig(max_batch_size=64, max_queue_delay_us=delay_us, max_queue_size=4096)
    batcher = ModelBatcher("bench", config, [identity])
    batcher.start(asyncio.get_running_loop())
    row = np.ones((1, 30), np.float32)

    async def client(n: int) -> None:
        for _ in range(n):
            await batcher.infer([row])

    per_client = requests // concurrency
    await asyncio.gather(*(client(min(per_client, 200)) for _ in range(concurrency)))  # warm-up
    started = time.perf_counter()
    await asyncio.gather(*(client(per_client) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await batcher.stop()
    core = batcher.core_stats()
    return elapsed / (per_client * concurrency) * 1e6, core["rows"] / max(core["batches"], 1)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=50_000)
    args = parser.parse_args()
    print(
        "| concurrency | max queue delay | µs per request (wall, one process) | mean batch rows |"
    )
    print("|---:|---:|---:|---:|")
    for concurrency in (1, 8, 64):
        delay = 0 if concurrency == 1 else 200
        requests = args.requests // 10 if concurrency == 1 else args.requests
        us, rows = await round_trips(concurrency, requests, delay)
        print(f"| {concurrency} | {delay} µs | {us:.2f} | {rows:.1f} |")


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
