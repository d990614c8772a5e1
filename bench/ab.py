"""Same-session A/B of the request path: the Python package at a git revision against the
working tree, servers alternating, so both sides see the same machine state.

    python bench/ab.py [--base HEAD] [--rounds 3] [--connections 64] [--duration 4]
                       [--model breast_cancer|scorecard] [--config batching|"no batching"]

req/s counts the time a server takes after the run to write the predictions it recorded
(a store that falls behind does not look faster for it); records it dropped are printed.
Both sides run on the installed native core (``fastserve._core``), so this compares Python
changes; rebuild and compare separately when the C++ changes. On this kind of machine the
noise between separate sessions is about ±5 %: decide on the ratio from one run of this
script, never on figures from two.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import fastserve._core
import serving  # bench/serving.py: server start, wrk, demo body

ROOT = Path(__file__).resolve().parent.parent

# Runs the fastserve CLI from the tree given first, whatever fastserve is installed (an
# editable install puts its own finder ahead of sys.path, so drop it).
LAUNCHER = """
import sys
tree = sys.argv.pop(1)
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
sys.path.insert(0, tree)
import fastserve.cli
assert fastserve.cli.__file__.startswith(tree), fastserve.cli.__file__
sys.exit(fastserve.cli.main(sys.argv[1:]))
"""


def package_tree(dest: Path, revision: str | None) -> Path:
    """A folder holding ``fastserve/`` at ``revision`` (None: the working tree) + the core."""
    dest.mkdir(parents=True)
    if revision is None:
        shutil.copytree(ROOT / "python" / "fastserve", dest / "fastserve")
    else:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", revision, "python/fastserve"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(
            ["tar", "-x", "-C", str(dest), "--strip-components=1"], input=archive, check=True
        )
    shutil.copy(fastserve._core.__file__, dest / "fastserve")
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="HEAD", help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--config", choices=sorted(serving.CONFIGS), default="batching")
    parser.add_argument("--model", choices=serving.TABULAR_MODELS, default="breast_cancer")
    args = parser.parse_args()

    from fastserve.demo import build_demo_repository, example_rows

    work = Path(tempfile.mkdtemp(prefix="fastserve-ab-"))
    try:
        demo = build_demo_repository(work / "demo")
        repo = work / "repo"
        repo.mkdir()
        shutil.copytree(demo / args.model, repo / args.model)
        (repo / args.model / "config.yaml").write_text(serving.CONFIGS[args.config])
        body = work / "body.json"
        serving.write_body(body, example_rows(args.model, 1))
        sides = {
            f"base ({args.base})": package_tree(work / "base", args.base),
            "head (working tree)": package_tree(work / "head", None),
        }
        rates: dict[str, list[float]] = {side: [] for side in sides}
        for round_ in range(args.rounds):
            for side, tree in sides.items():
                server = serving.Served(repo, [sys.executable, "-c", LAUNCHER, str(tree)])
                try:
                    url = f"{server.url}/v2/models/{args.model}/infer"
                    serving.wrk(url, body, args.connections, 1)  # warm-up
                    before = serving.observed_records(server.url) or (0, 0)
                    result = serving.wrk(url, body, args.connections, args.duration)
                    # what the server left to write counts as part of the run
                    settled = serving.settle(server.url) or 0.0
                    dropped = (serving.observed_records(server.url) or (0, 0))[1] - before[1]
                finally:
                    server.stop()
                rps = result["rps"] * args.duration / (args.duration + settled)
                rates[side].append(rps)
                note = f"  {dropped:,} records dropped" if dropped else ""
                print(
                    f"round {round_ + 1} {side:24s} {rps:9,.0f} req/s  p99 {result['p99_ms']:.2f}"
                    f" ms  settled in {settled:.2f} s{note}",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base, head = (statistics.mean(r) for r in rates.values())
    ratios = [h / b for b, h in zip(*rates.values(), strict=True)]
    print(f"\nhead / base: {head / base:.3f} (per round: {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
