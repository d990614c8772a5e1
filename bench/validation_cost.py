"""What checking every request against the version's value schema costs, in one run.

    python bench/validation_cost.py [--model breast_cancer|scorecard] [--duration 5]
                                    [--repeats 5] [--connections 1 64]

Two servers serve the demo model with its reviewed schema.yaml (30 features, in_range
each), the "batching" config of bench/serving.py, ``validation: reject`` on one and
``off`` on the other. Both are pinned to CPU 0, wrk to CPU 1; runs alternate between
them (on, off, on, off, ...) so drift on this shared VM hits both alike, and each figure
is the median of --repeats runs after a warm-up. A third server, configured as the second
(``off``), is the control: the on/off ratio means something only where it stands out of
the off/off one. A last row sends the same row by feature name (30 inputs of shape [1],
MLServer's pandas codec) to the checking server.

Target (issue 5): at most 10 % fewer requests/s and at most 0.2 ms more p50.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import serving  # bench/serving.py: server start, wrk, demo body


def write_named_body(path: Path, row: list[float], names: list[str]) -> None:
    doc = {
        "inputs": [
            {"name": name, "shape": [1], "datatype": "FP32", "data": [value]}
            for name, value in zip(names, row, strict=True)
        ]
    }
    path.write_text(json.dumps(doc))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=serving.TABULAR_MODELS, default="breast_cancer")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    from fastserve.demo import build_demo_repository, example_rows, load_split

    work = Path(tempfile.mkdtemp(prefix="fastserve-validation-cost-"))
    servers: dict[str, serving.Served] = {}
    try:
        demo = build_demo_repository(work / "demo")
        row = example_rows(args.model, 1)
        packed, named = work / "packed.json", work / "named.json"
        serving.write_body(packed, row)
        write_named_body(named, row.ravel().tolist(), list(load_split(args.model).feature_names))
        for server, mode in (("reject", "reject"), ("off", "off"), ("control", "off")):
            repo = work / server
            repo.mkdir()
            shutil.copytree(demo / args.model, repo / args.model)
            (repo / args.model / "config.yaml").write_text(
                serving.CONFIGS["batching"] + f"validation: {mode}\n"
            )
            servers[server] = serving.Served(repo)
        url = {
            name: f"{server.url}/v2/models/{args.model}/infer" for name, server in servers.items()
        }
        cases = {
            "reject, packed": (url["reject"], packed),
            "off, packed": (url["off"], packed),
            "off (control), packed": (url["control"], packed),
            "reject, by name": (url["reject"], named),
        }
        print(f"model {args.model} (schema: 30 features), batching config, median of "
              f"{args.repeats} alternating {args.duration:.0f} s runs")  # fmt: skip
        print("| validation | body | connections | req/s | p50 ms | p99 ms |")
        print("|---|---|---:|---:|---:|---:|")
        for connections in args.connections:
            median = serving.alternate(cases, connections, args.duration, args.repeats)
            for name, m in median.items():
                mode, _, body_kind = name.partition(", ")
                print(
                    f"| {mode} | {body_kind} | {connections} | {m['rps']:,.0f} | "
                    f"{m['p50_ms']:.3f} | {m['p99_ms']:.2f} |",
                    flush=True,
                )
            serving.print_ratios(
                median,
                "off, packed",
                {"on/off": "reject, packed", "control/off": "off (control), packed"},
                connections,
            )
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
