"""What monitoring costs the request path: stage timing, drift sketches, metrics, in one run.

    python bench/monitoring_cost.py [--model breast_cancer|scorecard] [--duration 4]
                                    [--repeats 7] [--connections 64 1]

Three servers serve the demo model (its schema.yaml and reference.json, the "batching"
config of bench/serving.py): one as shipped (monitoring on: every request's stages timed
into histograms, its inputs and answer counted into the drift sketches), two with
``--no-monitoring`` (the second is the control that shows this VM's noise). The monitored
server is scraped every --scrape-interval seconds (15, Prometheus's usual; 0: never), as
Prometheus would. Servers on CPU 0, wrk on CPU 1, runs alternating, medians.

Target (issue 6): monitoring costs at most 5 % throughput at 64 connections.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import serving  # bench/serving.py: server start, wrk, demo body


class Scraper:
    """GET /metrics every ``interval`` seconds until stopped (what Prometheus adds)."""

    def __init__(self, url: str, interval: float) -> None:
        self.url, self.interval, self.scrapes = url, interval, 0
        self.seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            started = time.perf_counter()
            with urllib.request.urlopen(self.url, timeout=5) as resp:
                resp.read()
            self.seconds.append(time.perf_counter() - started)
            self.scrapes += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=serving.TABULAR_MODELS, default="breast_cancer")
    parser.add_argument("--connections", type=int, nargs="+", default=[64, 1])
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--scrape-interval", type=float, default=15.0)
    args = parser.parse_args()

    from fastserve.demo import build_demo_repository, example_rows

    work = Path(tempfile.mkdtemp(prefix="fastserve-monitoring-cost-"))
    servers: dict[str, serving.Served] = {}
    scraper = None
    try:
        demo = build_demo_repository(work / "demo")
        body = work / "body.json"
        serving.write_body(body, example_rows(args.model, 1))
        for name, extra in (
            ("on", []),
            ("off", ["--no-monitoring"]),
            ("control", ["--no-monitoring"]),
        ):
            repo = work / name
            repo.mkdir()
            shutil.copytree(demo / args.model, repo / args.model)
            (repo / args.model / "config.yaml").write_text(serving.CONFIGS["batching"])
            servers[name] = serving.Served(repo, extra=extra)
        if args.scrape_interval > 0:
            scraper = Scraper(f"{servers['on'].url}/metrics", args.scrape_interval)
        cases = {
            name: (f"{server.url}/v2/models/{args.model}/infer", body)
            for name, server in servers.items()
        }
        print(
            f"model {args.model} (schema + reference: validation and drift), batching config, "
            f"median of {args.repeats} alternating {args.duration:.0f} s runs"
        )
        print("| monitoring | connections | req/s | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|")
        for connections in args.connections:
            median = serving.alternate(cases, connections, args.duration, args.repeats)
            for name, m in median.items():
                print(
                    f"| {name} | {connections} | {m['rps']:,.0f} | {m['p50_ms']:.3f} | "
                    f"{m['p99_ms']:.2f} |",
                    flush=True,
                )
            serving.print_ratios(
                median, "off", {"on/off": "on", "control/off": "control"}, connections
            )
        if scraper is not None and scraper.seconds:
            took = sorted(scraper.seconds)
            print(
                f"scrapes of the monitored server: {scraper.scrapes}, each "
                f"{took[len(took) // 2] * 1000:.1f} ms (median), {took[-1] * 1000:.1f} ms (max)"
            )
    finally:
        if scraper is not None:
            scraper.stop()
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
