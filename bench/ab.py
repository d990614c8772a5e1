"""Same-session A/B of the request path: the Python package at a git revision against the
working tree, servers alternating, so both sides see the same machine state.

    python bench/ab.py [--base HEAD] [--rounds 3] [--connections 64] [--duration 4]
                       [--model breast_cancer|scorecard] [--config batching|"no batching"]

req/s counts the time a server takes after the run to write the predictions it recorded
(a store that falls behind does not look faster for it); records it dropped are printed.
Both sides run on the installed native core (``fastserve._core``), so this compares Python
changes; ``--build-cores`` builds each side's own core from its C++ sources instead (about
two minutes, needs the ``bench`` extra's pybind11), so that a C++ change is compared too.
``--threads`` prints, for each busy thread of the server, its CPU a request and how often
it was put on a CPU. On this kind of machine the noise between separate sessions is about
±5 %: decide on the ratio from one run of this script, never on figures from two.
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


def sources(dest: Path, revision: str | None, *paths: str) -> Path:
    """``paths`` of the repository at ``revision`` (None: the working tree) under ``dest``."""
    dest.mkdir(parents=True)
    if revision is None:
        for path in paths:
            copy = shutil.copytree if (ROOT / path).is_dir() else shutil.copy
            copy(ROOT / path, dest / path)
        return dest
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, *paths], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def build_core(work: Path, revision: str | None) -> Path:
    """The ``_core`` extension built from the C++ sources at ``revision``, CUDA off."""
    src = sources(work / "src", revision, "CMakeLists.txt", "cpp")
    build = work / "build"
    configure = ["-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"]
    options = ["-DFASTSERVE_BUILD_PYTHON=ON", "-DFASTSERVE_CUDA=OFF"]
    for step in (
        [*configure, *options, f"-DPython_EXECUTABLE={sys.executable}"],
        ["--build", str(build), "-j2", "--target", "_core"],
    ):
        subprocess.run(["cmake", *step], check=True, stdout=subprocess.DEVNULL)
    (core,) = build.glob("cpp/_core*.so")
    return core


def package_tree(dest: Path, revision: str | None, core: Path) -> Path:
    """A folder holding ``fastserve/`` at ``revision`` (None: the working tree) + ``core``."""
    tree = sources(dest, revision, "python/fastserve") / "python"
    shutil.copy(core, tree / "fastserve")
    return tree


def _spent(
    before: dict[str, tuple[float, int]], after: dict[str, tuple[float, int]]
) -> dict[str, tuple[float, int]]:
    """What each thread spent between two ``serving.thread_cpu`` readings."""
    start = dict.fromkeys(after, (0.0, 0)) | before
    return {k: (cpu - start[k][0], n - start[k][1]) for k, (cpu, n) in after.items()}


def _print_threads(threads: dict[str, tuple[float, int]], requests: float, seconds: float) -> None:
    for name, (cpu, slices) in sorted(threads.items(), key=lambda kv: -kv[1][0]):
        if cpu * 1e6 / requests >= 0.05:  # idle threads say nothing
            print(
                f"    {name:28s} {cpu * 1e6 / requests:6.1f} µs a request"
                f"  {slices / seconds:8,.0f} runs a second"
            )


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
    parser.add_argument(
        "--threads", action="store_true", help="CPU a request and wake-ups of each busy thread"
    )
    parser.add_argument(
        "--build-cores", action="store_true", help="each side on its own core, built here"
    )
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
        cores = {args.base: Path(fastserve._core.__file__), None: Path(fastserve._core.__file__)}
        if args.build_cores:
            print("building both cores ...", flush=True)
            cores = {rev: build_core(work / f"core-{i}", rev) for i, rev in enumerate(cores)}
        sides = {
            f"base ({args.base})": package_tree(work / "base", args.base, cores[args.base]),
            "head (working tree)": package_tree(work / "head", None, cores[None]),
        }
        rates: dict[str, list[float]] = {side: [] for side in sides}
        for round_ in range(args.rounds):
            for side, tree in sides.items():
                server = serving.Served(repo, [sys.executable, "-c", LAUNCHER, str(tree)])
                try:
                    url = f"{server.url}/v2/models/{args.model}/infer"
                    serving.wrk(url, body, args.connections, 1)  # warm-up
                    before = serving.observed_records(server.url) or (0, 0)
                    threads = serving.thread_cpu(server.proc.pid)
                    result = serving.wrk(url, body, args.connections, args.duration)
                    # what the server left to write counts as part of the run
                    settled = serving.settle(server.url) or 0.0
                    threads = _spent(threads, serving.thread_cpu(server.proc.pid))
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
                if args.threads:
                    _print_threads(threads, result["rps"] * args.duration, args.duration)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base, head = (statistics.mean(r) for r in rates.values())
    ratios = [h / b for b, h in zip(*rates.values(), strict=True)]
    print(f"\nhead / base: {head / base:.3f} (per round: {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
