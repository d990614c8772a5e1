"""bench/batch_job.py runs: both sides score the same rows, and it prints their rates."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "batch_job.py"


def test_the_batch_benchmark_compares_the_job_with_its_ceiling() -> None:
    for fmt in ("parquet", "csv"):
        run = subprocess.run(
            [sys.executable, str(BENCH), "--rows", "5000", "--rounds", "1", "--chunk-rows",
             "2048", "--format", fmt],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert re.search(r"session.run loop \(ceiling\): +[\d,]+ rows/s", run.stdout)
        assert re.search(r"fastserve batch +: +[\d,]+ rows/s", run.stdout)
        assert re.search(r"ratio: [\d.]+x the ceiling", run.stdout)
        assert "same answers: yes" in run.stdout
