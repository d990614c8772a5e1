"""fastserve against the reference servers of bench/baselines.py, in one run, on single-row
JSON requests to a demo tabular model (a first slice of issue 8's suite):

    python bench/reference_lines.py [--model breast_cancer|scorecard] [--duration 4]
                                    [--repeats 3] [--concurrency 1 64]

Every server runs pinned to CPU 0 and wrk to CPU 1; the cases alternate round by round
(``serving.alternate``) so that drift on the machine hits them alike; each figure is the
median of --repeats rounds. Prints the table and the ratios issue 8 sets targets on:
fastserve / pure-Python batching (>= 1.3x), fastserve / HTTP-stack ceiling (>= 0.8x) at the
highest concurrency, and the p50 at one connection against the plain server (<= 1.2x).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import serving  # bench/serving.py: pinned servers, wrk, the demo body

HERE = Path(__file__).resolve().parent


class Baseline:
    """``bench/baselines.py KIND MODEL`` pinned to the server CPU."""

    def __init__(self, kind: str, model: Path, *extra: str) -> None:
        self.port = serving.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [*serving.pinned(serving.SERVER_CPU), sys.executable, str(HERE / "baselines.py"),
             kind, str(model), "--port", str(self.port), *extra]
        )  # fmt: skip
        if not serving.wait_ready(self.url):
            self.stop()
            raise RuntimeError(f"baseline {kind} did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=serving.TABULAR_MODELS, default="breast_cancer")
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument(
        "--lean",
        action="store_true",
        help="also fastserve with prediction recording and monitoring off (what they cost)",
    )
    args = parser.parse_args()

    from fastserve.demo import build_demo_repository, example_rows

    work = Path(tempfile.mkdtemp(prefix="fastserve-reference-"))
    demo = build_demo_repository(work / "demo")
    model = args.model
    model_file = demo / model / "1" / "model.onnx"
    body = work / "body.json"
    serving.write_body(body, example_rows(model, 1))
    repo = work / "repo"
    repo.mkdir()
    shutil.copytree(demo / model, repo / model)
    (repo / model / "config.yaml").write_text(
        serving.CONFIGS["batching"] + "execution: event_loop\n"
    )
    delay = str(serving.BATCHING_DELAY_US)
    servers: dict[str, serving.Served | Baseline] = {}
    try:
        servers["fastserve"] = serving.Served(repo)
        if args.lean:
            lean = work / "lean"
            shutil.copytree(repo, lean)
            config = lean / model / "config.yaml"
            config.write_text(config.read_text() + "review:\n  record_predictions: false\n")
            servers["fastserve, lean"] = serving.Served(lean, extra=["--no-monitoring"])
        servers["HTTP ceiling"] = Baseline("ceiling", model_file)
        servers["plain, one at a time"] = Baseline("plain", model_file)
        servers["pure-Python batcher"] = Baseline("pybatch", model_file, "--delay-us", delay)
        cases = {name: (f"{s.url}/v2/models/{model}/infer", body) for name, s in servers.items()}
        results = {
            c: serving.alternate(cases, c, args.duration, args.repeats) for c in args.concurrency
        }
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"model {model}, 1 row, JSON; servers on CPU {serving.SERVER_CPU}, wrk on CPU "
          f"{serving.CLIENT_CPU}; medians of {args.repeats} alternating rounds")  # fmt: skip
    print("| server | connections | req/s | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|")
    for c, median in results.items():
        for name, r in median.items():
            print(f"| {name} | {c} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    top = results[max(results)]
    ours = top["fastserve"]["rps"]
    print(f"at {max(results)} connections: fastserve / pure-Python batcher = "
          f"{ours / top['pure-Python batcher']['rps']:.2f}x (target >= 1.3x); "
          f"fastserve / HTTP ceiling = {ours / top['HTTP ceiling']['rps']:.2f}x "
          "(target >= 0.8x)")  # fmt: skip
    if 1 in results:
        one = results[1]
        ratio = one["fastserve"]["p50_ms"] / one["plain, one at a time"]["p50_ms"]
        print(f"at 1 connection: p50 fastserve / plain = {ratio:.2f}x (target <= 1.2x)")


if __name__ == "__main__":
    main()
