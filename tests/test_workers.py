"""``fastserve serve --workers N``: several server processes on one port that answer as one
server (``fastserve.workers``), run as a user runs them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ServerProcess

pytestmark = pytest.mark.timeout(180)

TOKEN = "workers-test-token"
ADDER = "/v2/models/adder/infer"


def _call(server: ServerProcess, path: str, body: Any = None, *, admin: bool = False) -> Any:
    """One request on a connection of its own (so the kernel picks a worker for each);
    (status, document)."""
    headers = {"Content-Type": "application/json"}
    if admin:
        headers["Authorization"] = f"Bearer {TOKEN}"
    data = None if body is None else orjson.dumps(body)
    request = urllib.request.Request(f"http://{server.url}{path}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            raw = answer.read()
            status = answer.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, orjson.loads(raw)
    except orjson.JSONDecodeError:
        return status, raw.decode()


def _add(server: ServerProcess, x: float) -> tuple[int, Any]:
    inputs = [
        {"name": name, "shape": [1, 4], "datatype": "FP32", "data": [x, x, x, x]} for name in "ab"
    ]
    status, doc = _call(server, ADDER, {"inputs": inputs})
    return status, doc


def _successes_by_worker(server: ServerProcess) -> Counter[str]:
    status, text = _call(server, "/metrics")
    assert status == 200
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "fastserve_requests_total"
                and labels.get("model") == "adder"
                and labels.get("outcome") == "success"
            ):
                counts[labels["worker"]] += int(sample.value)
            if sample.name == "fastserve_worker_up":
                assert sample.value == 1.0, f"worker {labels['worker']} did not answer"
    return counts


def _workers_of(server: ServerProcess) -> list[int]:
    pid = server.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sorted(int(child) for child in children)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has: whoever adopted it
    may not reap it at once)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _serving(server: ServerProcess) -> int:
    """Workers started so far (each start, restarts included, is logged once)."""
    return len(re.findall(r"fastserve.workers: worker \d+: serving\n", server.log.read_text()))


def _wait_for(condition: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_workers_share_the_port_and_answer_as_one_server(repo: Path) -> None:
    server = ServerProcess(repo, "--workers", "2", env={"FASTSERVE_ADMIN_TOKEN": TOKEN})
    try:
        server.wait_ready()  # (one worker is ready)
        _wait_for(lambda: _serving(server) == 2)
        # every worker serves: the kernel spreads connections by their addresses
        for i in range(40):
            status, doc = _add(server, i)
            assert status == 200, doc
            assert doc["outputs"][0]["data"] == [2.0 * i] * 4
        by_worker = _successes_by_worker(server)
        assert sum(by_worker.values()) == 40
        assert set(by_worker) == {"0", "1"} and min(by_worker.values()) > 0, by_worker
        # Triton's statistics too: the group's, whichever worker answers
        for path in ("/v2/models/adder/stats", "/v2/models/stats"):
            status, doc = _call(server, path)
            assert status == 200, doc
            (adder,) = [m for m in doc["model_stats"] if m["name"] == "adder"]
            assert adder["inference_count"] == 40
            assert adder["inference_stats"]["success"]["count"] == 40
            batches = sum(b["compute_infer"]["count"] for b in adder["batch_stats"])
            assert batches == adder["execution_count"]
            sizes = [b["batch_size"] for b in adder["batch_stats"]]
            assert sizes == sorted(set(sizes))
        status, doc = _call(server, "/v2/models/nope/stats")
        assert status == 404

        # the repository API acts in every worker before it answers
        status, doc = _call(server, "/v2/repository/models/adder/unload", {}, admin=True)
        assert status == 200, doc
        assert doc["workers"] == {"0": "applied", "1": "applied"}
        for i in range(10):
            status, doc = _add(server, i)
            assert status == 503 and "unloaded" in doc["error"], doc
        status, doc = _call(server, "/v2/repository/models/adder/load", {}, admin=True)
        assert status == 200 and doc["workers"] == {"0": "applied", "1": "applied"}, doc
        assert all(_add(server, i)[0] == 200 for i in range(10))
        # the command line's view of the same
        cli = subprocess.run(
            [sys.executable, "-m", "fastserve", "models", "--url", f"http://{server.url}",
             "unload", "adder"],
            env={**os.environ, "FASTSERVE_ADMIN_TOKEN": TOKEN}, capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
        assert (cli.returncode, cli.stdout, cli.stderr) == (0, "adder: unloaded\n", "")
        assert _add(server, 1)[0] == 503 and _add(server, 2)[0] == 503
        status, doc = _call(server, "/v2/repository/models/adder/load", {}, admin=True)
        assert status == 200 and doc["workers"] == {"0": "applied", "1": "applied"}, doc
        # an unknown model is refused where the request landed, before a sibling is asked
        status, doc = _call(server, "/v2/repository/models/nope/load", {}, admin=True)
        assert status == 404 and "nope" in doc["error"]

        # a worker that dies is replaced; the other serves meanwhile
        workers = _workers_of(server)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        # Connections the kernel gave it before it was gone die with it, as with any crash:
        # ask once the supervisor has reaped it. (Its pid shows as a zombie earlier, while
        # its other threads, which hold its sockets, are still exiting.)
        _wait_for(lambda: workers[0] not in _workers_of(server))
        # until it is back (a second, then its start), the repository API says it is behind
        status, doc = _call(server, "/v2/repository/models/adder/load", {}, admin=True)
        assert status == 200
        outcomes = sorted(doc["workers"].values())
        assert outcomes[0] == "applied" and outcomes[1].startswith("no answer"), doc
        for i in range(20):
            status, doc = _add(server, i)
            assert status == 200, doc
        _wait_for(lambda: len(_workers_of(server)) == 2 and _workers_of(server) != workers)
        _wait_for(lambda: _serving(server) == 3)
        by_worker = _successes_by_worker(server)  # the new worker answers scrapes too
        assert set(by_worker) == {"0", "1"}

        run_dir = re.search(r"control sockets in (\S+)", server.log.read_text())
        assert run_dir is not None and Path(run_dir[1]).is_dir()
        assert server.stop() == 0
        assert not Path(run_dir[1]).exists()
        log = server.log.read_text()
        assert "died (signal SIGKILL): starting it again" in log
        assert log.count("fastserve.server: stopped") == 2
    finally:
        server.stop()


def test_workers_stop_when_their_supervisor_is_killed(repo: Path) -> None:
    server = ServerProcess(repo, "--workers", "2")
    try:
        server.wait_ready()
        _wait_for(lambda: _serving(server) == 2)
        workers = _workers_of(server)
        run_dir = re.search(r"control sockets in (\S+)", server.log.read_text())
        assert run_dir is not None
        server.proc.kill()  # SIGKILL: the supervisor cannot tell them
        _wait_for(lambda: not any(_running(pid) for pid in workers), 30)
        assert server.log.read_text().count("the supervisor is gone: stopping") == 2
        assert not Path(run_dir[1]).exists()
    finally:
        server.stop()


def test_a_worker_that_cannot_start_stops_the_group(repo: Path, tmp_path: Path) -> None:
    # the review store's file is a folder: no worker can open it
    unusable = tmp_path / "state.db"
    unusable.mkdir()
    server = ServerProcess(repo, "--workers", "2", "--state-db", str(unusable))
    try:
        assert server.proc.wait(timeout=60) == 1
    finally:
        server.stop()
    log = server.log.read_text()
    assert "exited while starting" in log and "stopping the others" in log, log


@pytest.mark.parametrize("count", ["0", "65"])
def test_a_worker_count_out_of_range_is_refused(repo: Path, count: str) -> None:
    server = ServerProcess(repo, "--workers", count)
    try:
        assert server.proc.wait(timeout=30) == 2
    finally:
        server.stop()
    assert "--workers must be 1..64" in server.log.read_text()
