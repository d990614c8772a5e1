"""Worker processes (``fastserve serve --workers N``): what a second process on a second core
buys, for the small model (the HTTP path is the cost) and the heavy one (batching and
compute are), in one run.

    python bench/workers.py [--duration 4] [--rounds 3] [--connections 64] [--models small heavy]

Setups, each serving the suite's repository (bench/suite.py ``prepare``: the demo model as
``fastserve serve`` serves it, and the heavy MLP), one row a request, JSON, closed loop
(wrk, one thread, on CPU 1):

- ``1 worker``: ``--workers 1`` (one process), pinned to CPU 0, as in the suite;
- ``2 workers``: ``--workers 2`` pinned to CPUs 0 and 1.

This machine has two cores, so the second worker shares CPU 1 with wrk: the figures are
what a second core buys when the load generator takes part of it, a lower bound of
scaling on a machine where the workers have cores of their own. Every round runs each
setup once, in turn, the other paused (SIGSTOP), after a warm-up run; each figure is the
median of the rounds. Server CPU a request counts the supervisor and every worker
(``suite.tree_cpu_seconds``). ``stolen %``: of the run's time, the most either CPU had
stolen by the hypervisor (``/proc/stat``); on this VM it reaches 50 % in busy hours, and a
run with much stolen time measures the neighbours as much as the server.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import serving  # bench/serving.py: pinning, ports, readiness
import suite  # bench/suite.py: the repository, request bodies, wrk, CPU of a process tree

SETUPS = {"1 worker": ("0", 1), "2 workers": ("0,1", 2)}
MODELS = {"small": suite.SMALL, "heavy": suite.HEAVY}


class Group:
    """``fastserve serve REPO --workers N --state-db STATE_DB`` pinned to ``cpus``."""

    def __init__(self, repo: Path, cpus: str, workers: int, state_db: Path) -> None:
        self.port = serving.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.proc = subprocess.Popen(
            ["taskset", "-c", cpus, sys.executable, "-m", "fastserve", "--log-level", "WARNING",
             "serve", str(repo), "--port", str(self.port), "--workers", str(workers),
             "--state-db", str(state_db)],
        )  # fmt: skip
        if not self._all_ready(60.0):
            self.stop()
            raise RuntimeError(f"{workers} worker(s) did not all become ready")

    def _all_ready(self, timeout_s: float) -> bool:
        """Every worker has loaded both models (from ``/metrics``: one READY version of
        each model per worker; with one worker, its unlabelled series)."""
        deadline = time.monotonic() + timeout_s
        pattern = re.compile(r'^fastserve_model_versions\{[^}]*state="READY"[^}]*\} 1\.0$', re.M)
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as answer:
                    ready = pattern.findall(answer.read().decode())
                if len(ready) >= 2 * self.workers:
                    return True
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def run_once(group: Group, path: str, body: Path, headers: dict[str, str],
             connections: int, duration: float) -> dict[str, Any]:  # fmt: skip
    url = f"{group.url}{path}"
    before = suite.tree_cpu_seconds(group.proc.pid)
    stolen = serving.steal_ticks()
    start = time.perf_counter()
    result = suite.wrk_run(url, body, headers, connections, duration)
    wall = time.perf_counter() - start
    cpu = suite.tree_cpu_seconds(group.proc.pid) - before
    result["steal_pct"] = serving.stolen_pct(stolen, wall)
    result["cpu_us_per_req"] = cpu / max(1, result["requests"]) * 1e6
    result["server_cpu_pct"] = 100.0 * cpu / wall
    if result["non_2xx"] or result["socket_errors"]:
        raise RuntimeError(f"{group.workers} worker(s): failed requests: {result}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = parser.parse_args()

    from fastserve.demo import example_rows

    work = Path(tempfile.mkdtemp(prefix="fastserve-workers-bench-"))
    repo, _, _ = suite.prepare(work)
    groups: dict[str, Group] = {}
    try:
        for name, (cpus, count) in SETUPS.items():
            # a state file each: a paused group must not hold the other's write lock
            groups[name] = Group(repo, cpus, count, work / f"state-{count}.db")
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for label in args.models:
            model = MODELS[label]
            path, data, headers = suite.v2_request(model, example_rows(suite.SMALL, 1), "json")
            body = work / f"{label}.body"
            body.write_bytes(data)
            for rnd in range(args.rounds + 1):  # round 0: warm-up, thrown away
                for name, group in groups.items():
                    others = [g.proc.pid for n, g in groups.items() if n != name]
                    with suite.paused(others):
                        duration = 1.0 if rnd == 0 else args.duration
                        result = run_once(group, path, body, headers, args.connections, duration)
                    if rnd:
                        results.setdefault((label, name), []).append(result)
                        print(f"{label:5} round {rnd} {name:9}: {result['rps']:8.0f} req/s, "
                              f"{result['steal_pct']:3.0f} % stolen", flush=True)  # fmt: skip
        print()
        print(f"| {args.connections} connections, 1 row, JSON | req/s | vs 1 worker (paired) "
              "| p50 ms | p99 ms | server CPU µs/req | server CPU % | stolen % |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for label in args.models:
            base_runs = results[(label, "1 worker")]
            base = statistics.median(r["rps"] for r in base_runs)
            for name in SETUPS:
                runs = results[(label, name)]

                def med(key: str, runs: list[dict[str, Any]] = runs) -> float:
                    return statistics.median(r[key] for r in runs)

                # each round's ratio, to the same round of one worker: the VM's speed
                # drifts between rounds, less within one
                paired = statistics.median(
                    r["rps"] / b["rps"] for r, b in zip(runs, base_runs, strict=True)
                )
                print(f"| {label}, {name} | {med('rps'):,.0f} | {med('rps') / base:.2f}x "
                      f"({paired:.2f}x) | {med('p50_ms'):.2f} | {med('p99_ms'):.2f} | "
                      f"{med('cpu_us_per_req'):.0f} | {med('server_cpu_pct'):.0f} | "
                      f"{med('steal_pct'):.0f} |")  # fmt: skip
    finally:
        for group in groups.values():
            group.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
