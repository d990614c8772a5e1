"""Swap under load: open-loop traffic while the model's config.yaml is edited to switch
versions, against the same traffic with no edits.

    python bench/swap.py [--duration 10] [--swap-every 1.0] [--rate 1500] [--max-inflight 256]

The repository holds breast_cancer at versions 1 and 2 (the same model file). Phase A sends
``--rate`` single-row JSON requests per second for ``--duration`` seconds with no edits.
Phase B sends the same load and, every ``--swap-every`` seconds, rewrites config.yaml
atomically (temp file in the same folder, then rename), alternating between
``version_policy: {specific: [2]}, primary: 2`` and ``{specific: [1]}, primary: 1``, so
every edit loads a new session and unloads the old one. The load keeps running
``--grace`` seconds past the last edit so it can be checked too.

Reported: requests sent, failures (non-200 or exceptions), p50/p99 per phase; per swap, the
time from the edit (the start of its write) to the first answer from the new version (the
first answer sent after the edit that carries it); and two consistency counts, both of
which should be 0:

- strict: answers sent after the first new-version answer came back, and before the next
  edit, that carry another version (an atomic switch cannot produce one);
- grace: the same, counting only answers sent more than ``--grace`` seconds after the
  first new-version answer was sent. With ``--swap-every`` at or below ``--grace`` this
  window is empty except after the last edit; the table says how many answers it checked.

The server runs pinned to CPU 0 with ``--watch events``; the load generator (this process)
runs on CPU 1. Latency is measured from each request's scheduled send time (no coordinated
omission). Compare the phases within one run; absolute numbers move with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from openloop import arrivals  # noqa: E402
from serving import CLIENT_CPU, SERVER_CPU, Served  # noqa: E402

MODEL = "breast_cancer"
BATCHING = (
    "batching:\n  max_batch_size: 64\n  max_queue_delay_us: 200\n  max_queue_size: 4096\n"
    "onnxruntime:\n  intra_op_threads: 1\n  execution_provider: cpu\n"
)
WARMUP_S = 1.0
REQUEST_TIMEOUT_S = 10.0
# Served has no hook for serve options; this launcher runs the fastserve CLI with the
# arguments Served gives it and appends the watch mode the benchmark depends on.
LAUNCHER = [
    sys.executable,
    "-c",
    "import sys; from fastserve.cli import main; "
    "sys.exit(main(sys.argv[1:] + ['--watch', 'events', '--watch-debounce-ms', '100']))",
]


def model_config(version: int) -> str:
    return f"version_policy:\n  specific: [{version}]\nprimary: {version}\n{BATCHING}"


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temp file next to ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclass
class Answer:
    scheduled: float
    sent: float
    done: float
    status: int  # 0: exception
    version: str | None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.version is not None

    @property
    def latency_ms(self) -> float:
        return (self.done - self.scheduled) * 1000


@dataclass
class Edit:
    at: float  # just before the write began: no answer can reflect the edit earlier
    written: float  # just after the rename returned
    version: str


async def load(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    rate: float,
    duration: float,
    max_inflight: int,
) -> list[Answer]:
    """Open-loop load at ``rate`` for ``duration`` seconds, at most ``max_inflight``
    requests outstanding (a send waits for a slot; its latency still counts from its
    scheduled time)."""
    answers: list[Answer] = []
    slots = asyncio.Semaphore(max_inflight)
    headers = {"Content-Type": "application/json"}
    # This client's own garbage collections, over the tasks and answers of a run, stalled it
    # ~200 ms (the slowest request sent 150-190 ms after its time): the p99 was the client's.
    # A run is bounded, so collect once before it and not during it.
    gc.collect()
    gc.disable()

    async def one(scheduled: float) -> None:
        sent = time.perf_counter()
        status, version, error = 0, None, ""
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                payload = await resp.read()
                status = resp.status
                if status == 200:
                    version = str(json.loads(payload)["model_version"])
                else:
                    error = payload[:200].decode(errors="replace")
        except Exception as exc:  # every failure is recorded, none ends the run
            error = f"{type(exc).__name__}: {exc}"
        finally:
            slots.release()
        answers.append(Answer(scheduled, sent, time.perf_counter(), status, version, error))

    tasks = []
    try:
        async for at in arrivals(rate, duration):
            await slots.acquire()
            tasks.append(asyncio.create_task(one(at)))
        await asyncio.gather(*tasks)
    finally:
        gc.enable()
    return answers


async def swapper(config: Path, every: float, duration: float, edits: list[Edit]) -> None:
    """Edit ``config`` every ``every`` seconds while under ``duration``, alternating 2 and 1."""
    start = time.perf_counter()
    version = 1
    k = 1
    while k * every < duration:
        await asyncio.sleep(max(0.0, start + k * every - time.perf_counter()))
        version = 2 if version == 1 else 1
        before = time.perf_counter()
        write_atomically(config, model_config(version))
        edits.append(Edit(before, time.perf_counter(), str(version)))
        k += 1


def summarize(answers: list[Answer]) -> dict[str, object]:
    ok = [a.latency_ms for a in answers if a.ok]
    lat = np.array(ok) if ok else np.array([float("nan")])
    failures = [a for a in answers if not a.ok]
    return {
        "sent": len(answers),
        "failures": len(failures),
        "failure_examples": sorted({f"{a.status} {a.error}" for a in failures})[:5],
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "max_ms": float(np.max(lat)),
        "versions": {v: sum(a.version == v for a in answers) for v in ("1", "2")},
    }


def check_swaps(answers: list[Answer], edits: list[Edit], grace: float) -> list[dict[str, object]]:
    by_sent = sorted((a for a in answers if a.ok), key=lambda a: a.sent)
    origin = min((a.scheduled for a in answers), default=0.0)
    swaps = []
    for i, edit in enumerate(edits):
        end = edits[i + 1].at if i + 1 < len(edits) else float("inf")
        window = [a for a in by_sent if edit.at < a.sent < end]
        first = next((a for a in window if a.version == edit.version), None)
        swap: dict[str, object] = {
            "to": edit.version,
            "edit_at_s": edit.at - origin,  # from the start of phase B
            "write_ms": (edit.written - edit.at) * 1000,
        }
        if first is None:
            swap.update(seen=False, answers_after_edit=len(window))
            swaps.append(swap)
            continue
        strict = [a for a in window if a.sent > first.done]
        graced = [a for a in window if a.sent > first.sent + grace]
        swap.update(
            seen=True,
            edit_to_first_answer_ms=(first.done - edit.at) * 1000,
            edit_to_first_send_ms=(first.sent - edit.at) * 1000,
            old_after_edit=sum(a.version != edit.version and a.sent < first.sent for a in window),
            strict_checked=len(strict),
            strict_other_version=sum(a.version != edit.version for a in strict),
            grace_checked=len(graced),
            grace_other_version=sum(a.version != edit.version for a in graced),
        )
        swaps.append(swap)
    return swaps


def repository_index(url: str, token: str) -> list[dict[str, object]]:
    request = urllib.request.Request(
        f"{url}/v2/repository/index",
        data=b"{}",
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


async def scenario(url: str, args: argparse.Namespace, config: Path) -> dict[str, object]:
    from fastserve.demo import example_rows

    row = example_rows(MODEL, 1)
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 30],
                    "datatype": "FP32",
                    "data": row.ravel().tolist(),
                }
            ]
        }
    ).encode()
    infer = f"{url}/v2/models/{MODEL}/infer"
    connector = aiohttp.TCPConnector(limit=args.max_inflight)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await load(session, infer, body, args.rate, WARMUP_S, args.max_inflight)
        phase_a = await load(session, infer, body, args.rate, args.duration, args.max_inflight)
        edits: list[Edit] = []
        swaps = asyncio.create_task(swapper(config, args.swap_every, args.duration, edits))
        phase_b = await load(session, infer, body, args.rate, args.duration, args.max_inflight)
        await swaps
        # after the last edit: load for --grace more seconds so it is checked too
        tail = edits[-1].at + args.grace + 0.5 - time.perf_counter() if edits else 0.0
        if tail > 0:
            phase_b += await load(session, infer, body, args.rate, tail, args.max_inflight)
    return {
        "phase_b_tail_s": max(0.0, tail),
        "phase_a": summarize(phase_a),
        "phase_b": summarize(phase_b),
        "swaps": check_swaps(phase_b, edits, args.grace),
        "final_version": edits[-1].version if edits else "1",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--swap-every", type=float, default=1.0, help="seconds between edits")
    parser.add_argument("--rate", type=float, default=1500.0, help="offered rate (req/s)")
    parser.add_argument("--max-inflight", type=int, default=256, help="outstanding requests cap")
    parser.add_argument(
        "--grace", type=float, default=1.0, help="seconds after a switch before old is an error"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "swap.json")
    args = parser.parse_args()

    from fastserve.demo import build_demo_repository

    work = Path(tempfile.mkdtemp(prefix="fastserve-swap-"))
    server = None
    try:
        demo = build_demo_repository(work / "demo")
        repo = work / "repo"
        folder = repo / MODEL
        folder.mkdir(parents=True)
        for version in ("1", "2"):
            (folder / version).mkdir()
            shutil.copy2(demo / MODEL / "1" / "model.onnx", folder / version / "model.onnx")
        config = folder / "config.yaml"
        write_atomically(config, model_config(1))

        token = secrets.token_hex(16)
        os.environ["FASTSERVE_ADMIN_TOKEN"] = token  # the server inherits it
        server = Served(repo, launcher=LAUNCHER)
        if (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(0, {int(CLIENT_CPU)})
        before = repository_index(server.url, token)
        results = asyncio.run(scenario(server.url, args, config))
        # give the last unload a moment, then see what stayed loaded
        deadline = time.monotonic() + 5
        while True:
            try:
                after = repository_index(server.url, token)
            except OSError as exc:  # reported, so the results are still written
                after = [{"version": "?", "state": f"index unreachable: {exc}"}]
                break
            ready = sorted(str(e["version"]) for e in after if e.get("state") == "READY")
            if ready == [results["final_version"]] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    results.update(
        settings=vars(args) | {"out": str(args.out)},
        index_before=before,
        index_after=after,
        server_exit_code=server.proc.returncode,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(render(results))


def _median_max(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values):.0f} / {max(values):.0f}"


def render(results: dict) -> str:  # type: ignore[type-arg]
    s = results["settings"]
    lines = [
        f"{MODEL}, 1 row JSON, open loop {s['rate']:,.0f}/s, max {s['max_inflight']} in flight; "
        f"server on CPU {SERVER_CPU}, load on CPU {CLIENT_CPU}",
        "",
        "| phase | requests sent | failures | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    tail = results["phase_b_tail_s"]
    b_label = f"B, swap every {s['swap_every']}s (+{tail:.1f}s after the last)"
    for key, label in (("phase_a", "A, no swaps"), ("phase_b", b_label)):
        p = results[key]
        lines.append(
            f"| {label} | {p['sent']:,} | {p['failures']} | {p['p50_ms']:.2f} | "
            f"{p['p99_ms']:.2f} | {p['max_ms']:.2f} |"
        )
    swaps = results["swaps"]
    seen = [w for w in swaps if w["seen"]]
    lines += [
        "",
        "| swaps made | new version seen | edit to first new answer ms, median / max | "
        "strict: other version (checked) | after grace: other version (checked) |",
        "|---:|---:|---:|---:|---:|",
        f"| {len(swaps)} | {len(seen)} | "
        f"{_median_max([w['edit_to_first_answer_ms'] for w in seen])} | "
        f"{sum(w['strict_other_version'] for w in seen)} "
        f"({sum(w['strict_checked'] for w in seen):,}) | "
        f"{sum(w['grace_other_version'] for w in seen)} "
        f"({sum(w['grace_checked'] for w in seen):,}) |",
    ]
    writes = [w["write_ms"] for w in swaps]
    if writes:
        lines.append(f"config writes (temp file + rename) took up to {max(writes):.2f} ms")
    for key in ("phase_a", "phase_b"):
        for example in results[key]["failure_examples"]:
            lines.append(f"failure in {key}: {example}")
    final = sorted(
        f"v{e['version']} {e['state']}{' primary' if e.get('primary') else ''}"
        for e in results["index_after"]
    )
    lines.append("")
    lines.append(f"repository index at the end: {', '.join(final)}")
    lines.append(f"server exit code after SIGTERM: {results['server_exit_code']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
