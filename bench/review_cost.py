"""What recording every prediction (for feedback and accuracy) costs the request path, for
both ways of running batches, in one run.

    python bench/review_cost.py [--model scorecard|breast_cancer] [--connections 64]
                                [--duration 5] [--repeats 2]

Each of the four servers (execution event_loop / threads x review.record_predictions
true / false) runs the "batching" config of bench/serving.py, pinned to CPU 0 with wrk on
CPU 1; the figure is the median of --repeats closed-loop runs after a warm-up. "settled" is
how long the server then took to write what it had recorded (one flush, <= 50 ms, when its
store kept up); "dropped", what it could not record.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import serving  # bench/serving.py: server start, wrk, demo body


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=serving.TABULAR_MODELS, default="scorecard")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from fastserve.demo import build_demo_repository, example_rows

    work = Path(tempfile.mkdtemp(prefix="fastserve-review-cost-"))
    rates: dict[tuple[str, bool], float] = {}
    try:
        demo = build_demo_repository(work / "demo")
        body = work / "body.json"
        serving.write_body(body, example_rows(args.model, 1))
        print(f"model {args.model}, {args.connections} connections, batching config")
        print(
            "| execution | record_predictions | req/s | p99 ms | settled s | dropped |\n"
            "|---|---|---:|---:|---:|---:|"
        )
        for execution in ("event_loop", "threads"):
            for record in (True, False):
                repo = work / f"{execution}-{record}"
                repo.mkdir()
                shutil.copytree(demo / args.model, repo / args.model)
                settings = f"execution: {execution}\nreview:\n  record_predictions: {record}\n"
                (repo / args.model / "config.yaml").write_text(
                    serving.CONFIGS["batching"]
                    + settings.replace("True", "true").replace("False", "false")
                )
                server = serving.Served(repo)
                try:
                    url = f"{server.url}/v2/models/{args.model}/infer"
                    result = serving.closed_loop(
                        url, body, args.connections, args.duration, args.repeats
                    )
                    # a store that fell behind left work for later: it is shown, and drops
                    settled = serving.settle(server.url) or 0.0
                    dropped = (serving.observed_records(server.url) or (0, 0))[1]
                finally:
                    server.stop()
                rates[execution, record] = result["rps"]
                print(
                    f"| {execution} | {str(record).lower()} | {result['rps']:,.0f} | "
                    f"{result['p99_ms']:.2f} | {settled:.2f} | {dropped:,} |",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for execution in ("event_loop", "threads"):
        ratio = rates[execution, True] / rates[execution, False]
        print(f"{execution}: recording / not recording = {ratio:.2f}x")


if __name__ == "__main__":
    main()
