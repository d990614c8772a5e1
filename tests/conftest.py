"""Fixtures: demo repository -> server config -> real server on a free port -> HTTP client."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from fastserve.config import ServerConfig
from fastserve.demo import build_demo_repository
from fastserve.server import Server
from models import add_adder


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_repository(tmp_path_factory.mktemp("demo") / "repo")


@pytest.fixture
def repo(demo_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the demo repository, plus the test model ``adder``, to edit freely."""
    copy = Path(shutil.copytree(demo_repo, tmp_path / "repo"))
    add_adder(copy)
    return copy


def write_config(repo: Path, model: str, text: str) -> None:
    (repo / model / "config.yaml").write_text(text)


def write_atomically(path: Path, text: str) -> None:
    """Write-then-rename, as an operator's editor or deploy script should."""
    staging = path.with_name(f".{path.name}.new")
    staging.write_text(text)
    os.replace(staging, path)


@pytest.fixture
def server_config(repo: Path) -> ServerConfig:
    return ServerConfig(repository=repo, port=0, max_body_bytes=1 << 20, drain_timeout_s=5)


@contextlib.asynccontextmanager
async def running(config: ServerConfig) -> AsyncIterator[Server]:
    srv = Server(config)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def server(server_config: ServerConfig) -> AsyncIterator[Server]:
    async with running(server_config) as srv:
        yield srv


@pytest.fixture
async def client(server: Server) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        base_url=f"http://127.0.0.1:{server.port}", auto_decompress=False
    ) as session:
        yield session


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``fastserve serve`` in a child process, as a user runs it."""

    def __init__(self, repo: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.log = repo.parent / f"server-{self.port}.log"
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fastserve",
                "serve",
                str(repo),
                "--port",
                str(self.port),
                *extra,
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"http://{self.url}/v2/health/ready", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"server not ready in {timeout_s} s:\n{self.log.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return int(self.proc.returncode)


@pytest.fixture
def server_process(repo: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(repo)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None and os.environ.get("FASTSERVE_REQUIRE_PROMTOOL") != "1",
    reason="promtool is not installed (apt-get install prometheus)",
)
"""Tests that run Prometheus's promtool: skipped without it, unless CI requires it."""


def promtool(
    *args: str, stdin: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], input=stdin, capture_output=True, text=True, timeout=120,
        check=False, cwd=cwd,
    )  # fmt: skip
