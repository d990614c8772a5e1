"""The ``fastserve`` command's own behaviour: demo building, bad arguments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)


def fastserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastserve", *args],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )


def test_demo_builds_the_repository_and_prints_its_path(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = fastserve("demo", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == out
    for model in ("breast_cancer", "digits"):
        assert (out / model / "config.yaml").is_file()
        assert (out / model / "1" / "model.onnx").stat().st_size > 0


def test_serve_refuses_a_missing_repository(tmp_path: Path) -> None:
    result = fastserve("serve", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "is not a folder" in result.stderr


def test_serve_refuses_bad_options(tmp_path: Path) -> None:
    result = fastserve("serve", str(tmp_path), "--port", "70000")
    assert result.returncode == 2
    assert "invalid option" in result.stderr
    result = fastserve("serve", str(tmp_path), "--port", "eighty")
    assert result.returncode == 2
    assert "invalid int value" in result.stderr


def test_version() -> None:
    result = fastserve("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("fastserve ")
