"""Open-loop load at a fixed rate: requests are sent on schedule whether or not earlier ones
have answered, and latency is measured from the scheduled send time (no coordinated omission).

    python bench/openloop.py URL BODY_FILE --rate 2000 --duration 5 [--poisson]

Prints one JSON line: offered and achieved rate, p50/p90/p99 in ms, errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np


async def arrivals(
    rate: float, duration: float, *, poisson: bool = False, seed: int = 7
) -> AsyncIterator[float]:
    """Yield each scheduled send time (perf_counter) over ``duration`` seconds, sleeping
    until it comes: evenly spaced at ``rate``/s, or Poisson arrivals with that mean."""
    rng = random.Random(seed)
    start = time.perf_counter()
    next_at = start
    while next_at - start < duration:
        now = time.perf_counter()
        if next_at > now:
            await asyncio.sleep(next_at - now)
        yield next_at
        next_at += rng.expovariate(rate) if poisson else 1.0 / rate


async def run(
    url: str, body: bytes, content_type: str, rate: float, duration: float, poisson: bool
) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=512)
    headers = {"Content-Type": content_type}
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(scheduled: float) -> None:
            nonlocal errors
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                        return
            except aiohttp.ClientError:
                errors += 1
                return
            latencies.append(time.perf_counter() - scheduled)

        tasks = []
        start = time.perf_counter()
        async for at in arrivals(rate, duration, poisson=poisson):
            tasks.append(asyncio.create_task(one(at)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {
        "offered_rps": rate,
        "achieved_rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)),
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url")
    parser.add_argument("body_file", type=Path)
    parser.add_argument("--content-type", default="application/json")
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--poisson", action="store_true", help="exponential gaps instead of fixed")
    args = parser.parse_args()
    result = asyncio.run(
        run(
            args.url,
            args.body_file.read_bytes(),
            args.content_type,
            args.rate,
            args.duration,
            args.poisson,
        )
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
