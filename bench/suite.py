"""Issue 8's benchmark suite: fastserve against its reference lines and other servers, in one
run, with a table, a targets block, JSON and a plot.

    python bench/suite.py [--quick] [--out DIR] [--duration S] [--repeats N] [--skip-peers]
                          [--groups headline encodings heavy open]
                          [--server-cpus 0] [--client-cpus 1] [--workers 1]

Writes DIR/suite.json and DIR/suite.png (default DIR: bench/results/) and prints a markdown
table and the targets block (each target: the ratio, the bound, met or MISSED).

What runs (the default; about 22 minutes with four peers installed, 15 without):

- headline: the small model (demo ``breast_cancer``, ~5 µs a call), one row, JSON, closed
  loop at 1, 8, 32, 64 and 128 connections, against every server: fastserve (also lean, and
  with busy polling off, ``--busy-poll-us 0``), the HTTP-stack ceiling, the llhttp one, the
  plain one-at-a-time aiohttp+onnxruntime server, the same with a pure-Python batcher
  (bench/baselines.py), and each peer bench/peers.py can start (MLServer, PyTriton,
  KServe, BentoML; a peer that cannot run is listed with its reason).
- encodings: fastserve alone, small model, 64 connections: JSON, binary tensors (both ways)
  and msgpack bodies of 1, 16 and 64 rows (64 x 30 = 1,920 floats).
- heavy: the compute-heavy MLP (bench/heavy_model.py, hundreds of µs a row at batch 1),
  one row, JSON, at 1 and 64 connections: fastserve, plain and pure-Python batcher, and
  fastserve at 64 connections with 16-row requests (``HEAVY_ROWS``); then the model
  ceiling, onnxruntime ``session.run`` in-process on the server core, at batch 1, 8, 16,
  32, 64 and at the batch size fastserve formed at 64 connections with one-row requests
  (its ``/v2/models/heavy/stats``); the same ceiling for the small model.
- open: open loop with Poisson arrivals at 0.25, 0.5, 0.75, 0.9, 1.1 and 1.3 x fastserve's
  closed-loop throughput at 64 connections (so past the knee, where queueing shows), for
  fastserve and the plain server, small model, one row, JSON: offered vs achieved rate and
  latency measured from each request's scheduled send time.

``--quick`` (about 5 minutes with four peers, 3 without) runs 1 and 64 connections, 1- and
64-row bodies, the heavy model at 1 and 64, three open-loop rates (0.5, 0.9, 1.2 x), 2 s
runs, 2 rounds.

How it measures: every server runs pinned to CPU 0 (``serving.SERVER_CPU``) and the load to
CPU 1: wrk (one thread, bench/wrk_post.lua) for the closed loop, and for the open loop the
uvloop client in this file (``python bench/suite.py _openloop ...``: raw asyncio protocols,
one request in flight per connection, up to 512 connections, a backlog past that), since
bench/openloop.py's aiohttp client tops out near 3-4k requests/s on one core, below what
the servers answer. Every case of a group first runs once, thrown away (warm-up); then
``--repeats`` rounds run every case of the group once, in turn, as ``serving.alternate``
does, so drift on the machine hits all cases alike; each figure is the median of the
rounds. Server CPU per request is utime + stime of the server process and its descendants
(``/proc/PID/stat``, children from ``/proc/PID/task/*/children``) over the run, divided by
the responses it completed. The other servers are stopped (SIGSTOP) meanwhile, so that
their idle housekeeping stays off CPU 0 (all but PyTriton, which aborts when continued);
their CPU over each run is recorded too (``idle_others_cpu_pct``), and so is the time the
hypervisor stole from the busiest CPU (``steal_pct``, from ``/proc/stat``; a case past
``STEAL_FLAG_PCT`` is flagged under the table). Compare ratios within one run: absolute
figures move with the machine.

On a machine with more cores, ``--server-cpus 0-7 --client-cpus 8-15 --workers 8`` gives
the servers eight CPUs (every server, peers included, is pinned to the list), wrk a thread
on each client CPU, fastserve eight worker processes, and measures the model ceiling in
eight processes at once, one a server CPU, their rates added. The peers run as
``bench/peers.py`` starts them (one process each, as configured there).

fastserve serves the demo models as ``fastserve serve`` does by default (the demo's value
schema, prediction recording and monitoring on) with ``serving.CONFIGS["batching"]`` and
``execution: event_loop``; the baselines and peers batch at most 64 rows and wait at most
200 µs, as fastserve does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

import heavy_model  # bench/heavy_model.py: the compute-heavy MLP and its repository folder
import serving  # bench/serving.py: pinning, fastserve servers, the model ceiling

HERE = Path(__file__).resolve().parent
SMALL = "breast_cancer"
HEAVY = heavy_model.MODEL_NAME
ENCODINGS = ("json", "binary", "msgpack")
CONTENT_TYPES = {
    "json": "application/json",
    "binary": "application/octet-stream",
    "msgpack": "application/msgpack",
}
HEADER_LENGTH = "Inference-Header-Content-Length"
FASTSERVE = "fastserve"
SETTLE_FLAG_S = 0.25
"""A run after which fastserve took longer than this to write what it had recorded (one
flush is ≤ 50 ms) deferred work: its req/s flatters it, so the table says so."""
FASTSERVE_LEAN = "fastserve, lean (no prediction recording, no monitoring)"
FASTSERVE_NO_POLL = "fastserve, no busy polling (--busy-poll-us 0)"
HTTP_CEILING = "HTTP-stack ceiling"
LLHTTP_CEILING = "HTTP-stack ceiling, llhttp (fastserve's fast path)"
PLAIN = "plain, one at a time"
PYBATCH = "pure-Python batcher"
MAX_BATCH = 64
WORKERS = 1
"""fastserve's worker processes (``--workers``; one per server CPU on a machine with the
cores)."""
STEAL_FLAG_PCT = 10.0
"""A run during which the hypervisor stole more of a CPU's time is run again (``unrobbed``);
a case whose median run still had more is flagged."""
STEAL_RETRIES = 2
HEAVY_ROWS = 16
"""Rows a request in the heavy group's second fastserve case at 64 connections: the one-row
case shows what the HTTP path costs beside the model; this one, the same model when each
request brings enough compute to hide that cost behind it."""
CEILING_BATCHES = [1, 8, 16, 32, 64]
METRICS = ("rps", "p50_ms", "p90_ms", "p99_ms", "cpu_us_per_req", "server_cpu_pct")

Request = tuple[str, bytes, dict[str, str]]
"""What every server's builder returns: (path, body, headers), Content-Type included."""


@dataclass(frozen=True)
class Matrix:
    concurrency: list[int]
    encoding_rows: list[int]
    heavy_concurrency: list[int]
    open_fractions: list[float]
    duration: float
    repeats: int
    warmup: float
    ceiling_seconds: float


DEFAULT = Matrix(
    concurrency=[1, 8, 32, 64, 128],
    encoding_rows=[1, 16, 64],
    heavy_concurrency=[1, 64],
    open_fractions=[0.25, 0.5, 0.75, 0.9, 1.1, 1.3],
    duration=5.0,
    repeats=3,
    warmup=2.0,
    ceiling_seconds=1.0,
)
QUICK = Matrix(
    concurrency=[1, 64],
    encoding_rows=[1, 64],
    heavy_concurrency=[1, 64],
    open_fractions=[0.5, 0.9, 1.2],
    duration=2.0,
    repeats=2,
    warmup=1.0,
    ceiling_seconds=0.4,
)
GROUPS = ("headline", "encodings", "heavy", "open")


# -- request bodies ------------------------------------------------------------------------


def v2_request(model: str, rows: np.ndarray, encoding: str) -> Request:
    """A V2 inference request of ``rows`` (FP32 [n, 30]) for fastserve in ``encoding``:
    JSON, Triton's binary tensor extension (binary outputs asked for too), or msgpack (raw
    little-endian bytes as ``data``)."""
    rows = np.ascontiguousarray(rows, dtype="<f4")
    shape = list(rows.shape)
    path = f"/v2/models/{model}/infer"
    if encoding == "json":
        doc = {
            "inputs": [
                {"name": "input", "shape": shape, "datatype": "FP32", "data": rows.ravel().tolist()}
            ]
        }
        return path, json.dumps(doc).encode(), {"Content-Type": CONTENT_TYPES["json"]}
    raw = rows.tobytes()
    if encoding == "binary":
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": shape,
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": len(raw)},
                    }
                ],
                "parameters": {"binary_data_output": True},
            }
        ).encode()
        headers = {"Content-Type": CONTENT_TYPES["binary"], HEADER_LENGTH: str(len(header))}
        return path, header + raw, headers
    if encoding == "msgpack":
        import msgpack

        doc_mp = {"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": raw}]}
        return path, msgpack.packb(doc_mp), {"Content-Type": CONTENT_TYPES["msgpack"]}
    raise ValueError(f"unknown encoding {encoding!r}")


def json_only(model: str, rows: np.ndarray, encoding: str) -> Request | None:
    """The baselines read V2 JSON only."""
    return v2_request(model, rows, encoding) if encoding == "json" else None


# -- server CPU ----------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _ticks(pid: int) -> int:
    """utime + stime of process ``pid`` (all its threads), in clock ticks."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces and parens
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        if current not in found:
            found.append(current)
            todo += _children(current)
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and every live descendant so far."""
    total = 0
    for current in process_tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += _ticks(current)
    return total / CLOCK_TICKS


@contextlib.contextmanager
def paused(pids: Sequence[int]) -> Iterator[None]:
    """The process trees of ``pids`` stopped (SIGSTOP) meanwhile: idle servers' timers and
    housekeeping (an idle BentoML takes ~5 % of a core) stay off the measured server's core.
    Every server here but PyTriton answers as before once continued (see PeerTarget)."""
    stopped = [p for pid in pids for p in process_tree(pid)]
    for p in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGSTOP)
    try:
        yield
    finally:
        for p in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)


# -- servers -------------------------------------------------------------------------------


class Target(Protocol):
    name: str
    url: str
    pid: int

    def serves(self, model: str) -> bool: ...

    def request(self, model: str, rows: np.ndarray, encoding: str) -> Request | None: ...

    def batch_counts(self, model: str) -> dict[int, int] | None: ...

    def settle(self) -> float:
        """Seconds until the work a run left behind is done (fastserve: the predictions it
        has yet to write); its CPU counts with the run's."""
        ...

    def stop(self) -> None: ...


class FastserveTarget:
    """``fastserve serve REPO`` (``serving.Served``, pinned to the server CPUs), with
    ``--workers WORKERS`` where the suite was given more than one."""

    def __init__(self, repo: Path, name: str = FASTSERVE, extra: list[str] | None = None) -> None:
        self.name = name
        workers = ["--workers", str(WORKERS)] if WORKERS > 1 else []
        self.server = serving.Served(repo, extra=[*(extra or []), *workers])
        self.url = self.server.url
        self.pid = self.server.proc.pid  # taskset execs the server: same pid

    def serves(self, model: str) -> bool:
        return model in (SMALL, HEAVY)

    def request(self, model: str, rows: np.ndarray, encoding: str) -> Request | None:
        return v2_request(model, rows, encoding)

    def batch_counts(self, model: str) -> dict[int, int] | None:
        """Batches run so far by size, from ``GET /v2/models/{model}/stats``."""
        try:
            with urllib.request.urlopen(f"{self.url}/v2/models/{model}/stats", timeout=5) as r:
                doc = json.loads(r.read())
        except (OSError, ValueError):
            return None
        stats = doc["model_stats"][0]["batch_stats"]
        return {int(s["batch_size"]): int(s["compute_infer"]["count"]) for s in stats}

    def records_dropped(self) -> int | None:
        return records_dropped(self.url)

    def settle(self) -> float:
        return serving.settle(self.url) or 0.0

    def stop(self) -> None:
        self.server.stop()


def records_dropped(url: str) -> int | None:
    """Predictions a fastserve server did not record because its store fell behind (None:
    not read): a run that dropped any did less work than asked."""
    observed = serving.observed_records(url)
    return None if observed is None else observed[1]


class BaselineTarget:
    """A reference server of bench/baselines.py for one model (V2 JSON only)."""

    def __init__(self, name: str, kind: str, model: str, model_file: Path, *extra: str) -> None:
        from reference_lines import Baseline

        self.name = name
        self.model = model
        self.baseline = Baseline(kind, model_file, *extra)
        self.url = self.baseline.url
        self.pid = self.baseline.proc.pid
        self.any_model = kind.startswith("ceiling")  # it answers every model alike

    def serves(self, model: str) -> bool:
        return model == self.model or self.any_model

    def request(self, model: str, rows: np.ndarray, encoding: str) -> Request | None:
        return json_only(model, rows, encoding) if self.serves(model) else None

    def batch_counts(self, model: str) -> dict[int, int] | None:
        return None

    def settle(self) -> float:
        return 0.0

    def stop(self) -> None:
        self.baseline.stop()


class PeerTarget:
    """Another server, started by bench/peers.py for the small model."""

    def __init__(self, peer: Any, model: str) -> None:
        self.peer = peer
        self.name = str(peer.name)
        self.url = str(peer.url)
        self.pid = int(peer.pid)
        self.model = model
        # Triton's python backend waits on shared-memory locks with deadlines; after a pause
        # they have passed and it aborts (boost::interprocess::lock_exception)
        self.pausable = peer.peer != "pytriton"

    def serves(self, model: str) -> bool:
        return model == self.model

    def request(self, model: str, rows: np.ndarray, encoding: str) -> Request | None:
        if not self.serves(model):
            return None
        built = self.peer.request(rows, encoding)
        return None if built is None else (str(built[0]), bytes(built[1]), dict(built[2]))

    def batch_counts(self, model: str) -> dict[int, int] | None:
        return None

    def settle(self) -> float:
        return 0.0

    def stop(self) -> None:
        self.peer.stop()


def start_peers(model_file: Path, skip: bool, started: list[Target]) -> dict[str, str]:
    """Start every peer bench/peers.py can start, appending each to ``started`` as it comes
    up (so that whoever stops ``started`` stops them); returns ``name: reason`` for those it
    cannot start."""
    if skip:
        return {"peers": "skipped (--skip-peers)"}
    try:
        import peers  # type: ignore[import-not-found,unused-ignore]
    except Exception as exc:  # not written yet, or broken: the suite runs without peers
        return {"peers": f"bench/peers.py cannot be imported: {type(exc).__name__}: {exc}"}
    try:
        status = dict(peers.status())
    except Exception as exc:
        return {"peers": f"peers.status() failed: {type(exc).__name__}: {exc}"}
    reasons: dict[str, str] = {}
    for name in peers.PEERS:
        reason = status.get(name, "not in peers.status()")
        if reason is not None:
            reasons[name] = str(reason)
            continue
        print(f"starting peer {name} ...", flush=True)
        try:
            peer = peers.start(
                name,
                model_file,
                model_name=SMALL,
                cpu=serving.SERVER_CPU,
                max_batch_size=MAX_BATCH,
                max_delay_us=serving.BATCHING_DELAY_US,
            )
        except Exception as exc:
            reasons[name] = f"did not start: {type(exc).__name__}: {exc}"[:300]
            continue
        started.append(PeerTarget(peer, SMALL))
    return reasons


# -- closed loop: wrk ----------------------------------------------------------------------


def wrk_threads(connections: int) -> int:
    """wrk's threads: one per client CPU, at most one per connection."""
    return max(1, min(len(serving.cpu_list(serving.CLIENT_CPU)), connections))


def wrk_run(
    url: str, body: Path, headers: dict[str, str], connections: int, duration: float
) -> dict[str, Any]:
    """One wrk run (1 thread, pinned to the client CPU): rate, latency percentiles, the
    responses it completed and how busy wrk itself was. ``serving.wrk`` fixes the body's
    Content-Type to JSON and reports no request count, hence this one."""
    content_type = headers.get("Content-Type", "application/json")
    extra = "\n".join(f"{k}: {v}" for k, v in headers.items() if k.lower() != "content-type")
    env = {**os.environ, "BODY_FILE": str(body), "CONTENT_TYPE": content_type}
    env["EXTRA_HEADERS"] = extra
    seconds = max(1, round(duration))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        [*serving.pinned(serving.CLIENT_CPU), "wrk", f"-t{wrk_threads(connections)}",
         f"-c{connections}",
         f"-d{seconds}s", "--timeout", "10s", "--latency", "-s", str(HERE / "wrk_post.lua"),
         url],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = done.stdout
    count = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    pct = dict(re.findall(r"^\s+(50|90|99)(?:\.0+)?%\s+(\S+)", out, re.M))
    if done.returncode or not (count and rate and len(pct) == 3):
        raise RuntimeError(f"wrk failed ({done.returncode}): {out[-500:]} {done.stderr[-500:]}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    client_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {
        "rps": float(rate.group(1)),
        "requests": int(count.group(1)),
        "p50_ms": serving._ms(pct["50"]),
        "p90_ms": serving._ms(pct["90"]),
        "p99_ms": serving._ms(pct["99"]),
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": sum(int(g) for g in sock.groups()) if sock else 0,
        "client_cpu_pct": 100.0 * client_cpu / wall,
    }


@dataclass
class Case:
    """One measured configuration: a server, a model, a body, a load."""

    group: str
    server: str
    model: str
    rows: int
    encoding: str
    connections: int = 0  # closed loop
    rate: float = 0.0  # open loop: offered requests/s
    fraction: float = 0.0  # the rate as a fraction of fastserve's closed-loop max
    runs: list[dict[str, Any]] = field(default_factory=list)
    batches: dict[int, int] = field(default_factory=dict)  # fastserve: batch size -> count

    @property
    def key(self) -> str:
        load = f"c{self.connections}" if not self.rate else f"r{self.rate:.0f}"
        return f"{self.group}|{self.server}|{self.model}|{self.rows}x{self.encoding}|{load}"

    def median(self) -> dict[str, float]:
        keys = {k for r in self.runs for k, v in r.items() if isinstance(v, int | float)}
        out = {k: statistics.median(r[k] for r in self.runs if k in r) for k in sorted(keys)}
        return {k: math.nan for k in (*METRICS, "achieved_rps")} | out

    def errors(self) -> int:
        return sum(
            int(r.get("non_2xx", 0)) + int(r.get("socket_errors", 0)) + int(r.get("errors", 0))
            for r in self.runs
        )

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "group": self.group,
            "server": self.server,
            "model": self.model,
            "rows": self.rows,
            "encoding": self.encoding,
            "median": self.median(),
            "errors": self.errors(),
            "runs": self.runs,
        }
        if self.rate:
            out |= {"offered_rps": self.rate, "fraction_of_max": self.fraction}
        else:
            out["connections"] = self.connections
        if self.batches:
            out["batches"] = {str(k): v for k, v in sorted(self.batches.items())}
            out["mean_batch_rows"] = mean_batch(self.batches)
        return out


def mean_batch(batches: dict[int, int]) -> float:
    count = sum(batches.values())
    return sum(size * n for size, n in batches.items()) / count if count else 0.0


class Bench:
    """The servers, the request bodies on disk, and the alternating rounds."""

    def __init__(self, work: Path, matrix: Matrix) -> None:
        self.work = work
        self.matrix = matrix
        self.targets: list[Target] = []
        self.bodies: dict[tuple[str, str, int, str], tuple[str, Path, dict[str, str]]] = {}

    def target(self, name: str, model: str) -> Target | None:
        for t in self.targets:
            if t.name == name and t.serves(model):
                return t
        return None

    def body(self, case: Case) -> tuple[str, Path, dict[str, str]] | None:
        """(url, body file, headers) of ``case``, built once; None if unsupported."""
        key = (case.server, case.model, case.rows, case.encoding)
        if key not in self.bodies:
            target = self.target(case.server, case.model)
            from fastserve.demo import example_rows

            rows = example_rows(SMALL, case.rows)
            built = target.request(case.model, rows, case.encoding) if target else None
            if built is None or target is None:
                return None
            path, data, headers = built
            file = self.work / "bodies" / f"{len(self.bodies)}.body"
            file.parent.mkdir(exist_ok=True)
            file.write_bytes(data)
            self.bodies[key] = (f"{target.url}{path}", file, headers)
        return self.bodies[key]

    def _one(self, case: Case, duration: float) -> dict[str, Any]:
        target = self.target(case.server, case.model)
        spec = self.body(case)
        assert target is not None and spec is not None
        url, body, headers = spec
        others = [t.pid for t in self.targets if t is not target]
        pause = [t.pid for t in self.targets if t is not target and getattr(t, "pausable", True)]
        batches_before = target.batch_counts(case.model)
        with paused(pause):
            idle_before = sum(tree_cpu_seconds(p) for p in others)
            cpu_before = tree_cpu_seconds(target.pid)
            stolen = serving.steal_ticks()
            start = time.perf_counter()
            if case.rate:
                result = open_loop_run(url, body, headers, case.rate, duration, self.matrix.warmup)
            else:
                result = wrk_run(url, body, headers, case.connections, duration)
            wall = time.perf_counter() - start
            result["steal_pct"] = serving.stolen_pct(stolen, wall)
            result["settle_s"] = target.settle()
            cpu = tree_cpu_seconds(target.pid) - cpu_before
            idle = sum(tree_cpu_seconds(p) for p in others) - idle_before
        done = max(1, int(result["requests"]))
        result["cpu_us_per_req"] = cpu / done * 1e6
        result["server_cpu_pct"] = 100.0 * cpu / wall
        result["idle_others_cpu_pct"] = 100.0 * idle / wall
        after = target.batch_counts(case.model)
        if batches_before is not None and after is not None:
            for size, n in after.items():
                grown = n - batches_before.get(size, 0)
                if grown:
                    case.batches[size] = case.batches.get(size, 0) + grown
        return result

    def rounds(self, cases: list[Case], label: str) -> list[Case]:
        """Warm up every case once (thrown away), then ``repeats`` rounds of every case in
        turn; cases no server can send are dropped."""
        cases = [c for c in cases if self.body(c) is not None]
        m = self.matrix
        print(f"[{label}] {len(cases)} cases: warm-up, then {m.repeats} rounds", flush=True)
        for case in cases:
            if not case.rate:  # (open-loop runs leave out their own first seconds)
                try:
                    self._one(case, m.warmup)
                except RuntimeError as exc:
                    print(f"[{label}] warm-up of {case.key} failed: {exc}", flush=True)
            case.batches.clear()
        for round_no in range(m.repeats):
            for case in cases:
                try:
                    result = unrobbed(functools.partial(self._one, case, m.duration), case.key)
                except RuntimeError as exc:  # a server that died or never answered
                    result = {"error": str(exc)[:300], "socket_errors": 1, "requests": 0}
                case.runs.append(result)
            print(f"[{label}] round {round_no + 1}/{m.repeats} done", flush=True)
        return cases


def unrobbed(
    run: Callable[[], dict[str, Any]], label: str, retries: int = STEAL_RETRIES
) -> dict[str, Any]:
    """``run()``, run again (up to ``retries`` times) while the hypervisor stole more than
    ``STEAL_FLAG_PCT`` of a CPU during it: such a run measures the neighbours as much as
    the server, and unevenly (at 07:02 on 2026-12-07 fastserve's 64-connection rounds had
    3, 56 and 59 % stolen, PyTriton's 8, 8 and 39 %). The result keeps ``robbed_runs``,
    the runs thrown away; the last is kept, flagged, if every try was robbed."""
    for robbed in range(retries + 1):
        result = run()
        if result.get("steal_pct", 0.0) <= STEAL_FLAG_PCT or robbed == retries:
            break
        print(f"{label}: {result['steal_pct']:.0f} % of a CPU stolen, run again", flush=True)
    result["robbed_runs"] = robbed
    return result


# -- open loop -----------------------------------------------------------------------------


def open_loop_run(
    url: str, body: Path, headers: dict[str, str], rate: float, duration: float, warmup: float
) -> dict[str, Any]:
    """The open-loop client below in a process of its own, pinned to the client CPU."""
    done = subprocess.run(
        [*serving.pinned(serving.CLIENT_CPU), sys.executable, str(Path(__file__).resolve()),
         "_openloop", url, str(body), json.dumps(headers), "--rate", str(rate),
         "--duration", str(duration), "--warmup", str(warmup)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"open-loop client failed: {done.stderr[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with at most one request in flight."""

    def __init__(self, client: OpenLoopClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.need = -1  # bytes of the response in flight (head and body), once known
        self.status = 0
        self.scheduled = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)
        self.client.ready(self)

    def send(self, scheduled: float) -> None:
        assert self.transport is not None
        self.scheduled = scheduled
        self.transport.write(self.client.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.need < 0:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buffer[:end]).lower()
                self.status = int(head[9:12])
                length = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
                if length:
                    self.need = end + 4 + int(length.group(1))
                else:  # chunked: up to the last chunk
                    last = self.buffer.find(b"0\r\n\r\n", end + 4)
                    if last < 0:
                        return
                    self.need = last + 5
            if len(self.buffer) < self.need:
                return
            del self.buffer[: self.need]
            self.need = -1
            self.client.answered(self, self.status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.lost(self)


class OpenLoopClient:
    """Sends ``request`` at Poisson arrival times whether or not earlier requests have been
    answered (no coordinated omission): each goes out on an idle connection, on a new one
    (up to ``max_connections``), or waits in a backlog; latency counts from the scheduled
    time. Requests scheduled in the first ``warmup`` seconds are not counted."""

    def __init__(self, host: str, port: int, request: bytes, max_connections: int = 512) -> None:
        self.host, self.port, self.request = host, port, request
        self.max_connections = max_connections
        self.idle: deque[_Connection] = deque()
        self.backlog: deque[float] = deque()
        self.busy: set[_Connection] = set()
        self.opening = 0
        self.open = 0
        self.latencies: list[float] = []
        self.answered_at: list[float] = []
        self.errors = 0
        self.count_from = math.inf
        self.in_flight = 0
        self.arrivals_over = False
        self.drained: asyncio.Event | None = None

    def _check_drained(self) -> None:
        if self.arrivals_over and self.in_flight <= 0 and self.drained is not None:
            self.drained.set()

    def ready(self, conn: _Connection) -> None:
        self.opening -= 1
        self.open += 1
        self._free(conn)

    def _free(self, conn: _Connection) -> None:
        if self.backlog:
            self.busy.add(conn)
            conn.send(self.backlog.popleft())
        else:
            self.busy.discard(conn)
            self.idle.append(conn)

    def answered(self, conn: _Connection, status: int) -> None:
        now = time.perf_counter()
        self.in_flight -= 1
        self.answered_at.append(now)
        if conn.scheduled >= self.count_from:
            if status == 200:
                self.latencies.append(now - conn.scheduled)
            else:
                self.errors += 1
        self._free(conn)
        self._check_drained()

    def lost(self, conn: _Connection) -> None:
        self.open -= 1
        if conn in self.busy:
            self.busy.discard(conn)
            self.in_flight -= 1
            if conn.scheduled >= self.count_from:
                self.errors += 1
            self._check_drained()
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        if self.backlog and self.open + self.opening < self.max_connections:
            self._connect()

    def _connect(self) -> None:
        self.opening += 1
        loop = asyncio.get_running_loop()

        async def connect() -> None:
            try:
                await loop.create_connection(lambda: _Connection(self), self.host, self.port)
            except OSError:
                self.opening -= 1
                self.errors += 1

        loop.create_task(connect())  # noqa: RUF006 (the loop keeps it until it connects)

    def dispatch(self, scheduled: float) -> None:
        self.in_flight += 1
        if self.idle:
            conn = self.idle.pop()
            self.busy.add(conn)
            conn.send(scheduled)
            return
        self.backlog.append(scheduled)
        if self.open + self.opening < self.max_connections:
            self._connect()

    async def run(self, rate: float, duration: float, warmup: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        first = [
            loop.create_connection(lambda: _Connection(self), self.host, self.port)
            for _ in range(min(32, self.max_connections))
        ]
        self.opening += len(first)
        await asyncio.gather(*first)
        if not self.open:
            raise RuntimeError("no connection could be opened")
        self.drained = asyncio.Event()
        rng = random.Random(7)
        cpu0 = time.process_time()
        start = time.perf_counter()
        self.count_from = start + warmup
        end = self.count_from + duration
        next_at, offered, lags = start, 0, []
        while next_at < end:
            now = time.perf_counter()
            while next_at <= now and next_at < end:
                self.dispatch(next_at)
                if next_at >= self.count_from:
                    offered += 1
                    lags.append(now - next_at)
                next_at += rng.expovariate(rate)
            # libuv's timers tick in whole milliseconds: sleep on one only for the part of a
            # gap past 2 ms, and spin through the loop (reading answers) for the rest.
            gap = next_at - time.perf_counter()
            await asyncio.sleep(gap - 0.001 if gap > 0.002 else 0)
        self.arrivals_over = True
        self._check_drained()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drained.wait(), max(10.0, duration))
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu0
        lat = np.array(self.latencies) * 1000 if self.latencies else np.array([math.nan])
        within = sum(1 for t in self.answered_at if self.count_from <= t < end)
        return {
            "offered_rps": offered / duration,
            "achieved_rps": within / duration,
            "rps": within / duration,
            "p50_ms": float(np.percentile(lat, 50)),
            "p90_ms": float(np.percentile(lat, 90)),
            "p99_ms": float(np.percentile(lat, 99)),
            "errors": self.errors,
            "unfinished": max(0, self.in_flight),
            "requests": len(self.answered_at),  # all answered, warm-up included: CPU/request
            "connections": self.open,
            "send_lag_p50_ms": float(np.percentile(lags, 50)) * 1000 if lags else math.nan,
            "send_lag_p99_ms": float(np.percentile(lags, 99)) * 1000 if lags else math.nan,
            "client_cpu_pct": 100.0 * cpu / wall,
        }


def _openloop_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="suite.py _openloop")
    parser.add_argument("url")
    parser.add_argument("body", type=Path)
    parser.add_argument("headers", help="JSON object of request headers")
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--max-connections", type=int, default=512)
    args = parser.parse_args(argv)
    match = re.fullmatch(r"http://([^:/]+):(\d+)(/.*)", args.url)
    if not match:
        raise SystemExit(f"expected http://HOST:PORT/PATH, got {args.url}")
    host, port, path = match.group(1), int(match.group(2)), match.group(3)
    body = args.body.read_bytes()
    headers = {"Host": f"{host}:{port}", **json.loads(args.headers)}
    headers["Content-Length"] = str(len(body))
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = head.encode() + b"\r\n" + body
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    client = OpenLoopClient(host, port, request, args.max_connections)
    print(json.dumps(asyncio.run(client.run(args.rate, args.duration, args.warmup))))


# -- the model ceiling ---------------------------------------------------------------------


@contextlib.contextmanager
def on_cpu(cpu: int) -> Iterator[None]:
    """Run this process on CPU ``cpu`` for a while (the in-process model ceiling)."""
    before = os.sched_getaffinity(0)
    with contextlib.suppress(OSError):
        if len(before) > 1:
            os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _ceiling_on(
    cpu: int, model_file: Path, sizes: list[int], seconds: float, repeats: int
) -> list[dict[int, float]]:
    """``repeats`` rounds of ``serving.ceiling`` over ``sizes`` on CPU ``cpu``."""
    from fastserve.demo import example_rows

    rows = example_rows(SMALL, 1)
    with on_cpu(cpu):
        return [serving.ceiling(model_file, rows, sizes, seconds) for _ in range(repeats)]


def model_ceiling(
    model_file: Path, sizes: list[int], seconds: float, repeats: int
) -> dict[int, float]:
    """Rows/s of ``serving.ceiling`` at each batch size on the server CPUs: the median of
    ``repeats`` rounds over all the sizes. With several server CPUs (``--server-cpus``),
    one process a CPU runs them at once, and their rates add up: what the model gives on
    the cores the servers have."""
    cpus = serving.cpu_list(serving.SERVER_CPU)
    sizes = sorted(set(sizes))
    if len(cpus) == 1:
        rounds = _ceiling_on(cpus[0], model_file, sizes, seconds, repeats)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")  # no copy of this process's threads
        with ProcessPoolExecutor(len(cpus), mp_context=context) as pool:
            running = [
                pool.submit(_ceiling_on, cpu, model_file, sizes, seconds, repeats) for cpu in cpus
            ]
            each = [future.result() for future in running]
        rounds = [{size: sum(cpu[r][size] for cpu in each) for size in sizes}
                  for r in range(repeats)]  # fmt: skip
    return {size: statistics.median(r[size] for r in rounds) for size in rounds[0]}


# -- the run -------------------------------------------------------------------------------


def prepare(work: Path) -> tuple[Path, Path, Path]:
    """The fastserve repository (small demo model + heavy model) and both model files."""
    from fastserve.demo import build_demo_repository

    demo = build_demo_repository(work / "demo")
    repo = work / "repo"
    repo.mkdir()
    shutil.copytree(demo / SMALL, repo / SMALL)
    (repo / SMALL / "config.yaml").write_text(
        serving.CONFIGS["batching"] + "execution: event_loop\n"
    )
    heavy_file = heavy_model.write_repository(repo)
    # what the reference servers do not do either: record every prediction for feedback and
    # monitor drift (the value schema is still checked)
    lean = work / "lean"
    lean.mkdir()
    shutil.copytree(repo / SMALL, lean / SMALL)
    config = lean / SMALL / "config.yaml"
    config.write_text(config.read_text() + "review:\n  record_predictions: false\n")
    return repo, repo / SMALL / "1" / "model.onnx", heavy_file


def run_suite(args: argparse.Namespace, matrix: Matrix) -> dict[str, Any]:
    groups = set(args.groups)
    work = Path(tempfile.mkdtemp(prefix="fastserve-suite-"))
    bench = Bench(work, matrix)
    results: dict[str, Any] = {
        "meta": {
            "command": " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "server_cpu": serving.SERVER_CPU,
            "client_cpu": serving.CLIENT_CPU,
            "cpus": os.cpu_count(),
            "matrix": matrix.__dict__,
            "batching_delay_us": serving.BATCHING_DELAY_US,
        },
        "peers_not_run": {},
        "cases": [],
        "ceiling_rows_per_s": {},
    }
    start = time.monotonic()
    try:
        repo, small_file, heavy_file = prepare(work)
        delay = str(serving.BATCHING_DELAY_US)
        bench.targets.append(FastserveTarget(repo))
        if "headline" in groups:
            lean = FastserveTarget(work / "lean", FASTSERVE_LEAN, ["--no-monitoring"])
            # as shipped but sleeping as soon as it is idle: what busy polling buys, and costs
            no_poll = ["--busy-poll-us", "0", "--state-db", str(work / "no-poll-state.db")]
            bench.targets += [lean, FastserveTarget(repo, FASTSERVE_NO_POLL, no_poll)]
        bench.targets += [
            BaselineTarget(HTTP_CEILING, "ceiling", SMALL, small_file),
            BaselineTarget(LLHTTP_CEILING, "ceiling-llhttp", SMALL, small_file),
            BaselineTarget(PLAIN, "plain", SMALL, small_file),
            BaselineTarget(PYBATCH, "pybatch", SMALL, small_file, "--delay-us", delay),
        ]
        if "heavy" in groups:
            bench.targets += [
                BaselineTarget(PLAIN, "plain", HEAVY, heavy_file),
                BaselineTarget(PYBATCH, "pybatch", HEAVY, heavy_file, "--delay-us", delay),
            ]
        done: list[Case] = []
        if "headline" in groups:
            results["peers_not_run"] = start_peers(small_file, args.skip_peers, bench.targets)
            names = list(dict.fromkeys(t.name for t in bench.targets))
            cases = [
                Case("headline", name, SMALL, 1, "json", connections=c)
                for c in matrix.concurrency
                for name in names
            ]
            done += bench.rounds(cases, "headline")
            for peer in [t for t in bench.targets if isinstance(t, PeerTarget)]:
                with contextlib.suppress(Exception):  # only the headline needs them
                    peer.stop()
                bench.targets.remove(peer)
        if "encodings" in groups:
            cases = [
                Case("encodings", FASTSERVE, SMALL, rows, encoding, connections=64)
                for rows in matrix.encoding_rows
                for encoding in ENCODINGS
            ]
            done += bench.rounds(cases, "encodings")
        if "heavy" in groups:
            cases = [
                Case("heavy", name, HEAVY, 1, "json", connections=c)
                for c in matrix.heavy_concurrency
                for name in (FASTSERVE, PLAIN, PYBATCH)
            ]
            cases.append(Case("heavy", FASTSERVE, HEAVY, HEAVY_ROWS, "json", connections=64))
            done += bench.rounds(cases, "heavy")
        formed = {
            model: round(mean_batch(c.batches))
            for c in done
            if c.group in ("headline", "heavy")
            and c.server == FASTSERVE
            and c.connections == 64
            and c.rows == 1
            and c.batches
            for model in [c.model]
        }
        results["formed_batch_rows"] = formed
        print("measuring the model ceilings (in-process session.run) ...", flush=True)
        for model, file in ((SMALL, small_file), (HEAVY, heavy_file)):
            if model == HEAVY and "heavy" not in groups:
                continue
            sizes = [*CEILING_BATCHES, *([formed[model]] if formed.get(model) else [])]
            rate = model_ceiling(file, sizes, matrix.ceiling_seconds, max(1, matrix.repeats))
            results["ceiling_rows_per_s"][model] = {str(k): v for k, v in rate.items()}
        if "open" in groups:
            top = next(
                (
                    c.median()["rps"]
                    for c in done
                    if c.group == "headline" and c.server == FASTSERVE and c.connections == 64
                ),
                None,
            )
            if top is None:  # no headline in this run: measure fastserve's max first
                probe = Case("probe", FASTSERVE, SMALL, 1, "json", connections=64)
                top = bench._one(probe, matrix.duration)["rps"]
            results["open_loop_base_rps"] = top
            cases = [
                Case("open", name, SMALL, 1, "json", rate=round(f * top), fraction=f)
                for f in matrix.open_fractions
                for name in (FASTSERVE, PLAIN)
            ]
            done += bench.rounds(cases, "open")
        results["cases"] = [c.summary() for c in done]
        results["records_dropped"] = {
            t.name: t.records_dropped() for t in bench.targets if isinstance(t, FastserveTarget)
        }
    finally:
        for target in bench.targets:
            with contextlib.suppress(Exception):
                target.stop()
        shutil.rmtree(work, ignore_errors=True)
    results["meta"]["elapsed_s"] = round(time.monotonic() - start, 1)
    results["targets"] = targets(results)
    return results


# -- targets, table, plot ------------------------------------------------------------------


@dataclass
class Verdict:
    name: str
    text: str
    met: bool | None  # None: no bound (a figure for information) or not measured


def _find(results: dict[str, Any], **want: Any) -> dict[str, Any] | None:
    for case in results["cases"]:
        if all(case.get(k) == v for k, v in want.items()):
            return case  # type: ignore[no-any-return]
    return None


def paired(ours: dict[str, Any], ref: dict[str, Any], key: str) -> str:
    """``key`` of ``ours`` over ``ref`` round by round: the median of those ratios and each
    one. Rounds alternate the cases, so a round's pair saw about the same machine, where
    the medians of two cases may come from different rounds: on this kind of VM, whose
    speed drifts by up to 2x within minutes, the paired figure is the steadier one (the
    verdict stays on the ratio of the medians)."""
    ratios = [a[key] / b[key] for a, b in zip(ours["runs"], ref["runs"], strict=False)]
    if not ratios:
        return ""
    each = ", ".join(f"{r:.2f}" for r in ratios)
    return f"; paired rounds {statistics.median(ratios):.2f}x ({each})"


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 8's targets, each with its figures, from one run's results."""
    out: list[Verdict] = []
    head = {"group": "headline", "model": SMALL, "connections": 64}
    ours = _find(results, server=FASTSERVE, **head)
    if ours is None:
        out.append(Verdict("small model vs others", "headline not measured", None))
    else:
        fs = ours["median"]
        local = {
            FASTSERVE, FASTSERVE_LEAN, FASTSERVE_NO_POLL, HTTP_CEILING, LLHTTP_CEILING, PLAIN,
            PYBATCH,
        }  # fmt: skip
        others = [
            c for c in results["cases"]
            if c["group"] == "headline" and c.get("connections") == 64 and c["server"] not in local
        ]  # fmt: skip
        if others:
            best = max(others, key=lambda c: c["median"]["rps"])
            ratio = fs["rps"] / best["median"]["rps"]
            lower = fs["p99_ms"] < best["median"]["p99_ms"]
            out.append(
                Verdict(
                    "small, 1-row JSON, 64 conn: fastserve / best other server",
                    f"{ratio:.2f}x vs {best['server']} ({fs['rps']:,.0f} vs "
                    f"{best['median']['rps']:,.0f} req/s), bound >= 5x; p99 "
                    f"{fs['p99_ms']:.2f} vs {best['median']['p99_ms']:.2f} ms, bound lower"
                    + paired(ours, best, "rps"),
                    ratio >= 5 and lower,
                )
            )
        else:
            why = "; ".join(f"{k}: {v}" for k, v in results["peers_not_run"].items())
            out.append(
                Verdict(
                    "small, 1-row JSON, 64 conn: fastserve / best other server",
                    f"not measured: no other server ran ({why or 'none configured'})",
                    None,
                )
            )
        # the last has no bound in issue 8: it shows how close the fast path comes to its
        # own stack's ceiling (the aiohttp ceiling is the issue's)
        for name, bound, label in ((PYBATCH, 1.3, "pure-Python batcher"),
                                   (HTTP_CEILING, 0.8, "HTTP-stack ceiling (aiohttp)"),
                                   (LLHTTP_CEILING, None, "llhttp ceiling")):  # fmt: skip
            ref = _find(results, server=name, **head)
            if ref:
                ratio = fs["rps"] / ref["median"]["rps"]
                out.append(
                    Verdict(
                        f"small, 1-row JSON, 64 conn: fastserve / {label}",
                        f"{ratio:.2f}x ({fs['rps']:,.0f} vs {ref['median']['rps']:,.0f} "
                        f"req/s)"
                        + ("" if bound is None else f", bound >= {bound}x")
                        + paired(ours, ref, "rps"),
                        None if bound is None else ratio >= bound,
                    )
                )
    heavy = _find(results, group="heavy", server=FASTSERVE, connections=64, rows=1)
    ceiling = results["ceiling_rows_per_s"].get(HEAVY)
    if heavy and ceiling:
        best_size, best_rate = max(ceiling.items(), key=lambda kv: kv[1])
        rows_per_s = heavy["median"]["rps"] * heavy["rows"]
        ratio = rows_per_s / best_rate
        formed = results.get("formed_batch_rows", {}).get(HEAVY)
        at_formed = ""
        if formed and str(formed) in ceiling:
            at_formed = (
                f"; at the formed batch ({formed} rows): "
                f"{rows_per_s / ceiling[str(formed)]:.2f}x of {ceiling[str(formed)]:,.0f}"
            )
        out.append(
            Verdict(
                "heavy, 64 conn: fastserve / model ceiling at the best batch size",
                f"{ratio:.2f}x ({rows_per_s:,.0f} rows/s vs {best_rate:,.0f} at batch "
                f"{best_size}), bound >= 0.8x{at_formed}",
                ratio >= 0.8,
            )
        )
    else:
        out.append(Verdict("heavy model vs model ceiling", "not measured", None))
    many = _find(results, group="heavy", server=FASTSERVE, connections=64, rows=HEAVY_ROWS)
    if many and ceiling:
        best_size, best_rate = max(ceiling.items(), key=lambda kv: kv[1])
        rows_per_s = many["median"]["rps"] * HEAVY_ROWS
        out.append(
            Verdict(
                f"heavy, 64 conn, {HEAVY_ROWS}-row requests: fastserve / model ceiling "
                "(not a target: where the HTTP path hides behind compute)",
                f"{rows_per_s / best_rate:.2f}x ({rows_per_s:,.0f} rows/s vs {best_rate:,.0f} "
                f"at batch {best_size})",
                None,
            )
        )
    one = _find(results, group="headline", server=FASTSERVE, connections=1)
    plain = _find(results, group="headline", server=PLAIN, connections=1)
    if one and plain:
        ratio = one["median"]["p50_ms"] / plain["median"]["p50_ms"]
        out.append(
            Verdict(
                "small, 1-row JSON, 1 conn: p50 fastserve / plain one-at-a-time",
                f"{ratio:.2f}x ({one['median']['p50_ms']:.3f} vs "
                f"{plain['median']['p50_ms']:.3f} ms), bound <= 1.2x"
                + paired(one, plain, "p50_ms"),
                ratio <= 1.2,
            )
        )
    else:
        out.append(Verdict("concurrency 1 p50 vs plain", "not measured", None))
    big = [c for c in results["cases"] if c["group"] == "encodings" and c["rows"] * 30 >= 1000]
    rows = max((c["rows"] for c in big), default=0)
    base = _find(results, group="encodings", rows=rows, encoding="json")
    for encoding in ("binary", "msgpack"):
        other = _find(results, group="encodings", rows=rows, encoding=encoding)
        if not (base and other):
            out.append(Verdict(f"{encoding} vs JSON, 1k+ elements", "not measured", None))
            continue
        b, o = base["median"], other["median"]
        ratio = o["rps"] / b["rps"]
        out.append(
            Verdict(
                f"{encoding} vs JSON, {rows} rows x 30 = {rows * 30:,} floats, 64 conn",
                f"throughput {ratio:.2f}x ({(ratio - 1) * 100:+.0f} %: {o['rps']:,.0f} vs "
                f"{b['rps']:,.0f} req/s), p50 {o['p50_ms'] / b['p50_ms']:.2f}x, server CPU per "
                f"request {o['cpu_us_per_req'] / b['cpu_us_per_req']:.2f}x "
                f"({o['cpu_us_per_req']:.0f} vs {b['cpu_us_per_req']:.0f} µs), bound > 1x"
                + paired(other, base, "rps"),
                ratio > 1.0,
            )
        )
    return [v.__dict__ for v in out]


def _ms(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.2f}"


def _past(results: dict[str, Any], key: str, bound: float, unit: str) -> list[str]:
    """The cases whose median ``key`` is past ``bound``: server, group, load and the value
    (formatted by ``unit``)."""
    return [
        f"{c['server']} {c['group']} {c.get('connections') or c.get('offered_rps')} "
        f"({unit.format(c['median'][key])})"
        for c in results["cases"]
        if c["median"].get(key, 0) > bound
    ]


def render(results: dict[str, Any]) -> str:
    m = results["meta"]["matrix"]
    lines = [
        f"servers on CPU {serving.SERVER_CPU}, load on CPU {serving.CLIENT_CPU}; medians of "
        f"{m['repeats']} alternating rounds of {m['duration']:g} s after a warm-up; "
        f"{results['meta']['elapsed_s']:.0f} s in all",
        "",
        "| group | server | model | body | load | req/s | p50 ms | p90 ms | p99 ms "
        "| CPU µs/req | server CPU % | errors |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in results["cases"]:
        r = c["median"]
        if "offered_rps" in c:
            load = f"open {c['fraction_of_max']:.2f}x: {r.get('offered_rps', 0):,.0f}/s"
            rate = f"{r['achieved_rps']:,.0f}"
            errors = f"{c['errors']} (+{int(r.get('unfinished', 0))} unfinished)"
        else:
            load = f"closed {c['connections']} conn"
            rate = f"{r['rps']:,.0f}"
            errors = str(c["errors"])
        batch = f", batches of {c['mean_batch_rows']:.1f}" if c.get("mean_batch_rows") else ""
        lines.append(
            f"| {c['group']} | {c['server']} | {c['model']} "
            f"| {c['rows']} row{'s' if c['rows'] > 1 else ''}, {c['encoding']} "
            f"| {load}{batch} | {rate} | {_ms(r['p50_ms'])} | {_ms(r['p90_ms'])} "
            f"| {_ms(r['p99_ms'])} | {r.get('cpu_us_per_req', math.nan):.0f} "
            f"| {r.get('server_cpu_pct', math.nan):.0f} | {errors} |"
        )
    for model, ceiling in results["ceiling_rows_per_s"].items():
        for size, rate in ceiling.items():
            lines.append(
                f"| model ceiling | onnxruntime session.run in-process | {model} | batch {size} "
                f"| | {rate:,.0f} rows/s | {1e6 / rate:.1f} µs/row | | | | | |"
            )
    for name, reason in results["peers_not_run"].items():
        lines.append(f"| not run | {name} | {reason} | | | | | | | | | |")
    if results.get("open_loop_base_rps"):
        lines.append(
            "\nopen-loop rates are fractions of fastserve's closed-loop "
            f"{results['open_loop_base_rps']:,.0f} req/s at 64 connections; req/s there is the "
            "achieved rate, latency counts from each request's scheduled send time"
        )
    busy = [
        f"{c['server']} {c['group']} {c['connections']} conn "
        f"({c['median']['client_cpu_pct']:.0f} %)"
        for c in results["cases"]
        if "offered_rps" not in c and c["median"].get("client_cpu_pct", 0) > 90
    ]
    if busy:
        lines.append(f"wrk near a full core (figures may be the client's): {busy}")
    dropped = {name: n for name, n in results.get("records_dropped", {}).items() if n}
    if dropped:
        lines.append(f"predictions not recorded (the store fell behind; less work done): {dropped}")
    behind = _past(results, "settle_s", SETTLE_FLAG_S, "{:.2f} s")
    if behind:
        lines.append(f"predictions still being written after the run (its CPU counted): {behind}")
    late = [
        f"{c['server']} {c['offered_rps']:,.0f}/s ({c['median']['send_lag_p99_ms']:.1f} ms)"
        for c in results["cases"]
        if "offered_rps" in c and c["median"].get("send_lag_p99_ms", 0) > 1.0
    ]
    if late:
        lines.append(f"open-loop client sent late (p99 of its send lag > 1 ms): {late}")
    noisy = _past(results, "idle_others_cpu_pct", 5, "{:.0f} %")
    if noisy:
        lines.append(f"idle servers used > 5 % of a core during: {noisy}")
    robbed = _past(results, "steal_pct", STEAL_FLAG_PCT, "{:.0f} %")
    if robbed:
        lines.append(
            f"the hypervisor took > {STEAL_FLAG_PCT:g} % of a CPU (steal; the run measured "
            f"the neighbours too) during: {robbed}"
        )
    starved = [
        f"{c['server']} {c['group']} {c['connections']} conn "
        f"({c['median']['server_cpu_pct']:.0f} %)"
        for c in results["cases"]
        if c.get("connections", 0) >= 32 and c["median"].get("server_cpu_pct", 100) < 80
    ]
    if starved:
        lines.append(
            "server had < 80 % of its core under full load (something else on CPU "
            f"{serving.SERVER_CPU}? a server that waits instead of working?): {starved}"
        )
    lines += ["", "targets (ratios from this run):"]
    for t in results["targets"]:
        mark = {True: "met", False: "MISSED", None: "-"}[t["met"]]
        lines.append(f"  [{mark}] {t['name']}: {t['text']}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> str | None:
    """suite.png: the headline against connections (throughput, p99, CPU per request), the
    encodings against JSON, the heavy model against its ceiling, and the open loop."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no plot"
    cases = results["cases"]
    fig, axes = plt.subplots(2, 3, figsize=(18, 10))
    (tput, p99, cpu), (enc, heavy, opn) = axes
    colors: dict[str, str] = {}

    def color(server: str) -> str:
        return colors.setdefault(server, f"C{len(colors) % 10}")

    head = [c for c in cases if c["group"] == "headline"]
    conns = sorted({c["connections"] for c in head})
    for name in dict.fromkeys(c["server"] for c in head):
        mine = sorted((c for c in head if c["server"] == name), key=lambda c: c["connections"])
        xs = [c["connections"] for c in mine]
        for ax, key in ((tput, "rps"), (p99, "p99_ms"), (cpu, "cpu_us_per_req")):
            ys = [c["median"][key] for c in mine]
            ax.plot(xs, ys, marker="o", label=name, color=color(name))
    for ax, what in ((tput, "req/s"), (p99, "p99 latency, ms"), (cpu, "server CPU µs/request")):
        ax.set_xscale("log", base=2)
        if conns:
            ax.set_xticks(conns, [str(c) for c in conns])
        ax.set_xlabel("connections (closed loop)")
        ax.set_ylabel(what)
        ax.set_title(f"small model, 1 row, JSON: {what}")
        ax.grid(alpha=0.3)
    p99.set_yscale("log")
    cpu.set_yscale("log")  # a peer that idles between batches costs 1,000x the rest
    tput.legend(fontsize=8)

    encs = [c for c in cases if c["group"] == "encodings"]
    row_counts = sorted({c["rows"] for c in encs})
    width = 0.8 / len(ENCODINGS)
    for i, encoding in enumerate(ENCODINGS):
        xs, ys, labels = [], [], []
        for j, rows in enumerate(row_counts):
            base = _find(results, group="encodings", rows=rows, encoding="json")
            this = _find(results, group="encodings", rows=rows, encoding=encoding)
            if base and this:
                xs.append(j + i * width)
                ys.append(this["median"]["rps"] / base["median"]["rps"])
                labels.append(f"{this['median']['rps']:,.0f}")
        bars = enc.bar(xs, ys, width, label=encoding)
        enc.bar_label(bars, labels, fontsize=7)
    enc.axhline(1.0, color="grey", lw=0.8)
    enc.set_xticks(
        [j + width for j in range(len(row_counts))],
        [f"{r} row{'s' * (r > 1)} ({r * 30:,} floats)" for r in row_counts],
    )
    enc.set_ylabel("throughput / JSON's (labels: req/s)")
    enc.set_title("fastserve, small model, 64 conn: body encodings")
    enc.legend(fontsize=8)

    runs = [c for c in cases if c["group"] == "heavy"]
    hconns = sorted({c["connections"] for c in runs})
    servers = list(dict.fromkeys(c["server"] for c in runs))
    width = 0.8 / max(1, len(servers))
    for i, name in enumerate(servers):
        xs, ys = [], []
        for j, conn in enumerate(hconns):
            this = _find(results, group="heavy", server=name, connections=conn)
            if this:
                xs.append(j + i * width)
                ys.append(this["median"]["rps"] * this["rows"])
        heavy.bar(xs, ys, width, label=name, color=color(name))
    ceiling = results["ceiling_rows_per_s"].get(HEAVY)
    if ceiling:
        size, best = max(ceiling.items(), key=lambda kv: kv[1])
        heavy.axhline(best, color="black", ls="--", lw=1, label=f"model ceiling (batch {size})")
        heavy.axhline(ceiling.get("1", best), color="black", ls=":", lw=1, label="model at batch 1")
    heavy.set_xticks(
        [j + width * (len(servers) - 1) / 2 for j in range(len(hconns))],
        [f"{c} conn" for c in hconns],
    )
    heavy.set_ylabel("rows/s")
    heavy.set_title("heavy model (MLP), 1 row, JSON")
    heavy.legend(fontsize=8)

    opens = [c for c in cases if c["group"] == "open"]
    for name in dict.fromkeys(c["server"] for c in opens):
        mine = sorted((c for c in opens if c["server"] == name), key=lambda c: c["offered_rps"])
        xs = [c["offered_rps"] for c in mine]
        opn.plot(xs, [c["median"]["p50_ms"] for c in mine], marker="o", color=color(name),
                 label=f"{name} p50")  # fmt: skip
        opn.plot(xs, [c["median"]["p99_ms"] for c in mine], marker="s", ls="--",
                 color=color(name), label=f"{name} p99")  # fmt: skip
    if results.get("open_loop_base_rps"):
        opn.axvline(results["open_loop_base_rps"], color="grey", lw=0.8,
                    label="fastserve closed-loop max (64 conn)")  # fmt: skip
    opn.set_yscale("log")
    opn.set_xlabel("offered req/s (Poisson)")
    opn.set_ylabel("latency from scheduled send, ms")
    opn.set_title("open loop, small model, 1 row, JSON")
    opn.grid(alpha=0.3)
    if opens:
        opn.legend(fontsize=8)
    fig.suptitle(
        "fastserve benchmark suite (bench/suite.py): servers on CPU "
        f"{serving.SERVER_CPU}, load on CPU {serving.CLIENT_CPU}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # stopped like any program, the suite still continues the servers it paused and stops them
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if argv[:1] == ["_openloop"]:
        _openloop_main(argv[1:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the smaller matrix (~5 min)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output folder")
    parser.add_argument("--duration", type=float, help="seconds per measured run")
    parser.add_argument("--repeats", type=int, help="measured rounds (the median is reported)")
    parser.add_argument("--warmup", type=float, help="seconds of each case's warm-up run")
    parser.add_argument("--skip-peers", action="store_true", help="no MLServer, PyTriton, ...")
    parser.add_argument(
        "--groups", nargs="+", choices=GROUPS, default=list(GROUPS), help="a subset to run"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", help="headline connections")
    parser.add_argument(
        "--server-cpus", default=serving.SERVER_CPU, help="CPU list the servers run on (taskset "
        f"-c; default {serving.SERVER_CPU}); several: the model ceiling runs on each at once",
    )  # fmt: skip
    parser.add_argument(
        "--client-cpus", default=serving.CLIENT_CPU,
        help=f"CPU list of the load (default {serving.CLIENT_CPU}); wrk runs a thread on each",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=1,
        help="fastserve's worker processes (serve --workers; default 1)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    global WORKERS
    try:
        server_cpus = serving.cpu_list(args.server_cpus)
        client_cpus = serving.cpu_list(args.client_cpus)
    except ValueError as exc:
        parser.error(str(exc))
    if set(server_cpus) & set(client_cpus):
        parser.error(
            "--server-cpus and --client-cpus overlap: the load would steal the servers' CPU"
        )
    serving.SERVER_CPU, serving.CLIENT_CPU, WORKERS = (
        args.server_cpus,
        args.client_cpus,
        args.workers,
    )
    if not shutil.which("wrk"):
        sys.exit("wrk is needed for the closed loop: apt-get install wrk")
    matrix = QUICK if args.quick else DEFAULT
    overrides: dict[str, Any] = {
        k: v
        for k, v in (
            ("duration", args.duration),
            ("repeats", args.repeats),
            ("warmup", args.warmup),
            ("concurrency", args.concurrency),
        )
        if v is not None
    }
    matrix = Matrix(**{**matrix.__dict__, **overrides})
    results = run_suite(args, matrix)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "suite.json").write_text(json.dumps(results, indent=2))
    note = plot(results, args.out / "suite.png")
    print(render(results))
    print(
        f"\nwrote {args.out / 'suite.json'}"
        + (f"; {note}" if note else f" and {args.out / 'suite.png'}")
    )


if __name__ == "__main__":
    main()
