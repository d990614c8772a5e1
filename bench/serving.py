"""First-cut serving benchmark: fastserve with and without batching against the
in-process onnxruntime ceiling, on a demo tabular model (30 features, single-row JSON).

    python bench/serving.py [--model breast_cancer|scorecard] [--duration 5] [--repeats 3]
                            [--rate 2000] [--execution event_loop threads]

breast_cancer costs onnxruntime ~5 µs a call, so the HTTP path is nearly all of a
request's cost; scorecard (same input, binned features) costs ~190 µs a call at any batch
size up to 64, so there batching has something to amortize.

Each of --execution (what runs the batches: the event loop inline, or worker threads) is
measured with and without batching, all in one run.

The server runs pinned to CPU 0 and the load generator (wrk for the closed loop, an
asyncio open-loop client) to CPU 1, so they do not share a core. Each closed-loop figure
is the median of --repeats runs after a warm-up run that is thrown away. Compare ratios
within one run; absolute numbers move with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SERVER_CPU = "0"
CLIENT_CPU = "1"
TABULAR_MODELS = ("breast_cancer", "scorecard")

BATCHING_DELAY_US = 200
CONFIGS = {
    "batching": (
        "batching:\n  max_batch_size: 64\n"
        f"  max_queue_delay_us: {BATCHING_DELAY_US}\n  max_queue_size: 4096\n"
        "  release_when_idle: true\n"
        "onnxruntime:\n  intra_op_threads: 1\n  execution_provider: cpu\n"
    ),
    "no batching": (
        "batching:\n  max_batch_size: 1\n  max_queue_delay_us: 0\n  max_queue_size: 4096\n"
        "onnxruntime:\n  intra_op_threads: 1\n  execution_provider: cpu\n"
    ),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_list(text: str) -> list[int]:
    """The CPUs of a ``taskset -c`` list ("0", "0-3", "0-3,8,10-11"), in order; ValueError
    for anything else."""
    cpus: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        low, high = int(first), int(last) if dash else int(first)
        if low < 0 or high < low:
            raise ValueError(f"not a CPU list: {text!r}")
        cpus += [cpu for cpu in range(low, high + 1) if cpu not in cpus]
    return cpus


def pinned(cpu: str) -> list[str]:
    return (
        ["taskset", "-c", cpu]
        if shutil.which("taskset") and os.cpu_count() and os.cpu_count() > 1
        else []
    )  # type: ignore[operator]


class Served:
    """``fastserve serve REPO`` pinned to the server CPU; ``launcher`` replaces ``-m fastserve``."""

    def __init__(
        self, repo: Path, launcher: list[str] | None = None, extra: list[str] | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = launcher or [sys.executable, "-m", "fastserve"]
        self.proc = subprocess.Popen(
            [
                *pinned(SERVER_CPU),
                *command,
                "--log-level",
                "WARNING",
                "serve",
                str(repo),
                "--port",
                str(self.port),
                *(extra or []),
            ],
        )
        if not wait_ready(self.url):
            self.stop()
            raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def thread_cpu(pid: int) -> dict[str, tuple[float, int]]:
    """Each live thread of process ``pid``: (CPU seconds, times it was put on a CPU), from
    ``/proc/PID/task/*/schedstat`` (nanoseconds, unlike ``stat``'s clock ticks). Keyed by
    ``loop`` for the main thread, else by the thread's name and id."""
    threads: dict[str, tuple[float, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            ran_ns, _, slices = (task / "schedstat").read_text().split()
            name = (task / "comm").read_text().strip()
        except (OSError, ValueError):
            continue  # it ended meanwhile
        key = "loop" if task.name == str(pid) else f"{name} ({task.name})"
        threads[key] = (int(ran_ns) / 1e9, int(slices))
    return threads


def steal_ticks() -> list[int]:
    """Clock ticks each CPU has had stolen so far (``/proc/stat``'s eighth field: the
    hypervisor ran something else while this VM wanted the CPU); [] where there is none."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return []
    return [int(line.split()[8]) for line in lines if re.match(r"cpu\d+ ", line)]


def stolen_pct(before: list[int], wall_s: float) -> float:
    """Of ``wall_s`` since ``before`` (``steal_ticks()``), the share the most-robbed CPU
    had stolen, in %."""
    stolen = [after - was for after, was in zip(steal_ticks(), before, strict=False)]
    ticks = os.sysconf("SC_CLK_TCK")
    return 100.0 * max(stolen, default=0) / ticks / max(wall_s, 1e-9)


def wait_ready(url: str, timeout_s: float = 60.0) -> bool:
    """Whether ``url``'s ``/v2/health/ready`` answered within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def observed_records(url: str) -> tuple[int, int] | None:
    """(waiting, dropped) of a fastserve server at ``url``, from ``/metrics``: predictions
    and other observed records noted and not yet written, and those dropped because its
    store fell behind. None: not read (not fastserve, or not answering)."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    found = [
        re.search(rf"^fastserve_observed_records_{name} (\S+)$", text, re.M)
        for name in ("waiting", "dropped_total")
    ]
    if found[0] is None or found[1] is None:
        return None
    return int(float(found[0].group(1))), int(float(found[1].group(1)))


def settle(url: str, timeout_s: float = 60.0) -> float | None:
    """Seconds until the fastserve server at ``url`` has written every observed record it
    holds: the work a run left for later, which a fair figure counts (one flush, ≤ 50 ms,
    when the store kept up). None: not read."""
    start = time.perf_counter()
    while (observed := observed_records(url)) is not None:
        if observed[0] == 0 or time.perf_counter() - start > timeout_s:
            return time.perf_counter() - start
        time.sleep(0.005)
    return None


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(f"cannot read wrk latency {text!r}")
    return float(match.group(1)) * _UNIT[match.group(2)]


def wrk(url: str, body: Path, connections: int, duration: float) -> dict[str, float]:
    env = {**os.environ, "BODY_FILE": str(body), "CONTENT_TYPE": "application/json"}
    out = subprocess.run(
        [
            *pinned(CLIENT_CPU),
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--latency",
            "-s",
            str(HERE / "wrk_post.lua"),
            url,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    pct = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)", out, re.M))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps,
        "p50_ms": _ms(pct["50"]),
        "p90_ms": _ms(pct["90"]),
        "p99_ms": _ms(pct["99"]),
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(1) if errors else "",  # type: ignore[dict-item]
    }


def closed_loop(
    url: str, body: Path, connections: int, duration: float, repeats: int
) -> dict[str, float]:
    wrk(url, body, connections, min(duration, 2.0))  # warm-up, thrown away
    runs = [wrk(url, body, connections, duration) for _ in range(repeats)]
    best = {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50_ms", "p90_ms", "p99_ms")}
    best["non_2xx"] = sum(r["non_2xx"] for r in runs)
    return best


def alternate(
    cases: dict[str, tuple[str, Path]], connections: int, duration: float, repeats: int
) -> dict[str, dict[str, float]]:
    """Median rps/p50/p99 of each case (name -> (url, body)) over ``repeats`` rounds that run
    every case once, in turn, so that drift on a shared machine hits them alike."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    for url, body in cases.values():  # warm-up, thrown away
        wrk(url, body, connections, 2)
    for _ in range(repeats):
        for name, (url, body) in cases.items():
            result = wrk(url, body, connections, duration)
            if result["non_2xx"] or result["socket_errors"]:
                raise SystemExit(f"{name}: failed requests: {result}")
            runs[name].append(result)
    return {
        name: {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50_ms", "p99_ms")}
        for name, rs in runs.items()
    }


def print_ratios(
    median: dict[str, dict[str, float]], base: str, others: dict[str, str], connections: int
) -> None:
    """Throughput and p50 of each of ``others`` (label -> case) against case ``base``."""
    off = median[base]
    for label, name in others.items():
        ratio = median[name]["rps"] / off["rps"]
        print(
            f"{connections} conn: throughput {label} = {ratio:.3f}x ({(1 - ratio) * 100:+.1f} % "
            f"cost), p50 {median[name]['p50_ms'] - off['p50_ms']:+.3f} ms",
            flush=True,
        )


def open_loop(url: str, body: Path, rate: float, duration: float) -> dict[str, float]:
    out = subprocess.run(
        [
            *pinned(CLIENT_CPU),
            sys.executable,
            str(HERE / "openloop.py"),
            url,
            str(body),
            "--rate",
            str(rate),
            "--duration",
            str(duration),
            "--poisson",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def ceiling(
    model_file: Path, rows: np.ndarray, batch_sizes: list[int], seconds: float
) -> dict[int, float]:
    """Rows/s of onnxruntime session.run in-process, one thread, at each batch size."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    result = {}
    for size in batch_sizes:
        batch = np.ascontiguousarray(np.resize(rows, (size, rows.shape[1])).astype(np.float32))
        for _ in range(50):
            session.run(None, {name: batch})
        n = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            session.run(None, {name: batch})
            n += 1
        result[size] = n * size / (time.perf_counter() - start)
    return result


def write_body(path: Path, rows: np.ndarray) -> None:
    """The single-row JSON request every closed-loop run sends."""
    doc = {
        "inputs": [
            {"name": "input", "shape": [1, 30], "datatype": "FP32", "data": rows.ravel().tolist()}
        ]
    }
    path.write_text(json.dumps(doc))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per closed-loop run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--rate", type=float, default=2000.0, help="open-loop offered rate (req/s)")
    parser.add_argument("--model", choices=TABULAR_MODELS, default="breast_cancer")
    parser.add_argument(
        "--execution",
        choices=["event_loop", "threads"],
        nargs="+",
        default=["event_loop", "threads"],
        help="what runs the batches (each is measured)",
    )
    parser.add_argument("--out", type=Path, help="JSON results (default results/serving-MODEL)")
    args = parser.parse_args()
    model = args.model
    out = args.out or HERE / "results" / f"serving-{model}.json"
    if not shutil.which("wrk"):
        sys.exit("wrk is needed for the closed loop: apt-get install wrk")

    from fastserve.demo import build_demo_repository, example_rows

    work = Path(tempfile.mkdtemp(prefix="fastserve-bench-"))
    demo = build_demo_repository(work / "demo")
    rows = example_rows(model, 1)
    body = work / "body.json"
    write_body(body, rows)
    results: dict[str, object] = {
        "model": model,
        "request": "1 row, JSON",
        "closed": {},
        "open": {},
    }
    runs = [
        (f"{batching}, {execution.replace('_', ' ')}", f"{config}execution: {execution}\n")
        for execution in args.execution
        for batching, config in CONFIGS.items()
    ]
    for label, config in runs:
        repo = work / label.replace(" ", "_").replace(",", "")
        repo.mkdir()
        shutil.copytree(demo / model, repo / model)
        (repo / model / "config.yaml").write_text(config)
        server = Served(repo)
        try:
            url = f"{server.url}/v2/models/{model}/infer"
            closed = {
                c: closed_loop(url, body, c, args.duration, args.repeats) for c in args.concurrency
            }
            results["closed"][label] = closed  # type: ignore[index]
            results["open"][label] = open_loop(url, body, args.rate, args.duration)  # type: ignore[index]
        finally:
            server.stop()
    results["ceiling_rows_per_s"] = ceiling(
        demo / model / "1" / "model.onnx", rows, [1, 8, 32, 64], 1.0
    )
    shutil.rmtree(work, ignore_errors=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(render(results, args.rate))


def render(results: dict, rate: float) -> str:  # type: ignore[type-arg]
    lines = [
        f"model {results['model']}, {results['request']}; "
        f"server on CPU {SERVER_CPU}, load on CPU {CLIENT_CPU}",
        "",
        "| server | load | req/s | p50 ms | p90 ms | p99 ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, closed in results["closed"].items():
        for c, r in closed.items():
            lines.append(
                f"| fastserve, {label} | closed, {c} conn | {r['rps']:,.0f} | {r['p50_ms']:.2f} | "
                f"{r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['non_2xx']} |"
            )
        o = results["open"][label]
        lines.append(
            f"| fastserve, {label} | open, {rate:,.0f}/s Poisson | {o['achieved_rps']:,.0f} | "
            f"{o['p50_ms']:.2f} | {o['p90_ms']:.2f} | {o['p99_ms']:.2f} | {o['errors']} |"
        )
    for size, rps in results["ceiling_rows_per_s"].items():
        lines.append(
            f"| onnxruntime session.run in-process | batch {size} | {rps:,.0f} rows/s | | | | |"
        )
    closed = results["closed"]
    executions = dict.fromkeys(label.split(", ")[1] for label in closed)
    for execution in executions:
        with_batching = closed.get(f"batching, {execution}", {})
        without = closed.get(f"no batching, {execution}", {})
        lines += ["", f"{execution}:"]
        if with_batching and without:
            top = max(with_batching)
            ratio = with_batching[top]["rps"] / without[top]["rps"]
            lines.append(
                f"  target 1: batching / no batching at {top} connections = {ratio:.2f}x "
                "(target >= 2x)"
            )
        if 1 in with_batching:
            model_ms = 1000.0 / results["ceiling_rows_per_s"][1]
            delay_ms = BATCHING_DELAY_US / 1000.0
            p99 = with_batching[1]["p99_ms"]
            bound = delay_ms + model_ms + 1.0
            verdict = "met" if p99 <= bound else "MISSED"
            lines.append(
                f"  target 2: p99 at 1 connection = {p99:.2f} ms; max queue delay "
                f"{delay_ms:.2f} ms + model {model_ms:.3f} ms + 1 ms = {bound:.2f} ms -> {verdict}"
            )
    if len(executions) == 2:
        first, second = executions
        for batching in CONFIGS:
            a, b = closed[f"{batching}, {first}"], closed[f"{batching}, {second}"]
            top = max(a)
            lines.append(
                f"{batching}: {first} / {second} at {top} connections = "
                f"{a[top]['rps'] / b[top]['rps']:.2f}x"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
