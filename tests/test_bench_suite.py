"""The benchmark suite's parts (bench/suite.py, bench/heavy_model.py) do what its figures
assume: the heavy model answers as the demo model does, every request body it sends gets a
correct answer from a real fastserve, and the server-CPU accounting reads /proc right.

    pytest tests/test_bench_suite.py
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from conftest import ServerProcess
from fastserve.config import ServerConfig
from fastserve.demo import example_rows
from fastserve.server import Server
from models import predict, reference

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import framing_cost  # noqa: E402  (bench/ is not a package)
import heavy_model  # noqa: E402
import heavy_overlap  # noqa: E402
import request_cost  # noqa: E402
import serving  # noqa: E402
import suite  # noqa: E402
import workers as workers_bench  # noqa: E402

pytestmark = pytest.mark.timeout(90)


def _session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_the_heavy_model_answers_as_the_demo_model_does(demo_repo: Path, tmp_path: Path) -> None:
    model_file = heavy_model.write_repository(tmp_path)
    assert (tmp_path / "heavy" / "config.yaml").read_text() == heavy_model.CONFIG
    assert "execution: event_loop" in heavy_model.CONFIG
    heavy, demo = _session(model_file), _session(demo_repo / "breast_cancer" / "1" / "model.onnx")
    signature = [(t.name, t.type) for t in heavy.get_inputs()]
    assert signature == [(t.name, t.type) for t in demo.get_inputs()]
    assert [(t.name, t.type) for t in heavy.get_outputs()] == [
        (t.name, t.type) for t in demo.get_outputs()
    ]
    rows = example_rows("breast_cancer", 5)
    out = reference(model_file, rows)
    assert out["label"].dtype == np.int64 and out["label"].shape == (5,)
    assert out["probabilities"].dtype == np.float32 and out["probabilities"].shape == (5, 2)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    assert (out["label"] == out["probabilities"].argmax(axis=1)).all()
    assert heavy_model.build_model().SerializeToString() == model_file.read_bytes()  # seeded


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    from fastserve.demo import build_demo_repository

    root = tmp_path_factory.mktemp("suite")
    demo = build_demo_repository(root / "demo")
    repo = root / "repo"
    shutil.copytree(demo / "breast_cancer", repo / "breast_cancer")
    heavy_model.write_repository(repo)
    server = ServerProcess(repo)
    try:
        server.wait_ready()
        yield server, repo
    finally:
        server.stop()


def _post(url: str, request: suite.Request) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    path, body, headers = request
    req = urllib.request.Request(f"http://{url}{path}", data=body, headers=headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw, kind = resp.read(), resp.headers.get("Content-Type", "")
        split = resp.headers.get(suite.HEADER_LENGTH)
    dtypes = {"INT64": "<i8", "FP32": "<f4"}
    if kind.startswith("application/msgpack"):
        doc = msgpack.unpackb(raw)
        arrays = {
            o["name"]: np.frombuffer(o["data"], dtypes[o["datatype"]]) for o in doc["outputs"]
        }
        return doc, arrays
    head = raw if split is None else raw[: int(split)]
    doc = json.loads(head)
    arrays, offset = {}, int(split or 0)
    for o in doc["outputs"]:
        size = o.get("parameters", {}).get("binary_data_size")
        if size is None:
            arrays[o["name"]] = np.asarray(o["data"], dtypes[o["datatype"]])
        else:
            arrays[o["name"]] = np.frombuffer(raw[offset : offset + size], dtypes[o["datatype"]])
            offset += size
    assert offset == (len(raw) if split else 0)  # every binary output, nothing after
    return doc, arrays


@pytest.mark.parametrize("encoding", suite.ENCODINGS)
@pytest.mark.parametrize("n", [1, 64])
def test_every_body_the_suite_sends_is_answered_correctly(
    served: tuple[ServerProcess, Path], encoding: str, n: int
) -> None:
    server, repo = served
    rows = example_rows("breast_cancer", n)
    expected = predict(repo, "breast_cancer", rows)
    doc, outputs = _post(server.url, suite.v2_request("breast_cancer", rows, encoding))
    assert doc["model_name"] == "breast_cancer"
    assert outputs["label"].tolist() == expected["label"].tolist()
    np.testing.assert_allclose(
        outputs["probabilities"].reshape(n, 2), expected["probabilities"], rtol=1e-5
    )
    if encoding == "binary":  # binary in, binary out
        assert all("binary_data_size" in o["parameters"] for o in doc["outputs"])


def test_the_workers_bench_measures_a_group_once_every_worker_serves(tmp_path: Path) -> None:
    """bench/workers.py's ``Group`` returns only when each worker has loaded both models, so
    no run measures a group whose second worker is still loading."""
    if shutil.which("taskset") is None:
        pytest.skip("taskset (util-linux) is not installed")
    repo, _, _ = suite.prepare(tmp_path)
    group = workers_bench.Group(repo, "0", 2, tmp_path / "state.db")
    try:
        with urllib.request.urlopen(f"{group.url}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        for worker in ("0", "1"):
            for model in (suite.SMALL, suite.HEAVY):
                assert (
                    f'fastserve_model_versions{{model="{model}",state="READY",worker="{worker}"}}'
                    " 1.0" in text
                )
        for model in (suite.SMALL, suite.HEAVY):
            rows = example_rows(suite.SMALL, 2)
            doc, _ = _post(group.url.removeprefix("http://"), suite.v2_request(model, rows, "json"))
            assert doc["model_name"] == model
    finally:
        group.stop()
    assert group.proc.returncode == 0


def test_the_heavy_model_is_served_with_the_same_bodies(served: tuple[ServerProcess, Path]) -> None:
    server, repo = served
    rows = example_rows("breast_cancer", 3)
    _, outputs = _post(server.url, suite.v2_request("heavy", rows, "json"))
    assert outputs["label"].tolist() == predict(repo, "heavy", rows)["label"].tolist()


def test_the_benchmarks_read_what_a_server_has_yet_to_write_and_dropped(
    served: tuple[ServerProcess, Path],
) -> None:
    server, _ = served
    url = f"http://{server.url}"
    _post(server.url, suite.v2_request("breast_cancer", example_rows("breast_cancer", 1), "json"))
    observed = suite.serving.observed_records(url)
    assert observed is not None and observed[0] in (0, 1) and observed[1] == 0
    assert suite.records_dropped(url) == 0
    assert suite.serving.settle(url) is not None
    assert suite.serving.observed_records(url) == (0, 0)  # written: nothing waits
    nobody = "http://127.0.0.1:9"  # nothing listens there
    assert suite.records_dropped(nobody) is None
    assert suite.serving.settle(nobody) is None


def test_wrk_sends_the_binary_extension_header(
    served: tuple[ServerProcess, Path], tmp_path: Path
) -> None:
    """bench/wrk_post.lua's EXTRA_HEADERS: without Inference-Header-Content-Length every
    binary request would be a 415."""
    if not shutil.which("wrk"):
        pytest.skip("wrk is not installed")
    server, _ = served
    path, body, headers = suite.v2_request(
        "breast_cancer", example_rows("breast_cancer", 2), "binary"
    )
    file = tmp_path / "body"
    file.write_bytes(body)
    result = suite.wrk_run(f"http://{server.url}{path}", file, headers, 1, 1)
    assert result["requests"] > 0
    assert result["non_2xx"] == 0 and result["socket_errors"] == 0


def test_the_baselines_get_json_only() -> None:
    rows = example_rows("breast_cancer", 1)
    assert suite.json_only("m", rows, "msgpack") is None
    assert suite.json_only("m", rows, "json") == suite.v2_request("m", rows, "json")


BURNER = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", '''
import sys, time
while time.process_time() < 0.6:
    pass
print("burnt", flush=True)
time.sleep(60)
'''], stdout=subprocess.PIPE, text=True)
print(child.pid, child.stdout.readline().strip(), flush=True)
child.wait()
"""


@contextmanager
def parent_and_child(script: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A Python process running ``script``, which starts a child and prints its pid first
    on its first line; yields the process and that line, then kills both."""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = ""
    try:
        line = proc.stdout.readline()
        yield proc, line
    finally:
        if line.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_server_cpu_counts_the_process_tree() -> None:
    """A parent that burns nothing and a child that burns 0.6 s of CPU: the tree is counted."""
    with parent_and_child(BURNER) as (proc, first_line):
        pid, word = first_line.split()
        child = int(pid)
        assert word == "burnt"
        tree = suite.tree_cpu_seconds(proc.pid)
        alone = suite.tree_cpu_seconds(child)
        parent = suite._ticks(proc.pid) / suite.CLOCK_TICKS
        assert 0.5 <= alone <= 3.0  # 0.6 s of loop, plus the interpreter's start
        assert parent < 0.5  # it only waits
        assert tree == pytest.approx(parent + alone, abs=0.05)
    assert suite.tree_cpu_seconds(proc.pid) == 0.0  # gone: nothing to read, no error


def test_thread_cpu_tells_each_thread_apart() -> None:
    """bench/ab.py --threads: the main thread is ``loop``; a thread that burns CPU is charged
    what it burns, under its own name and id, and counted as put on a CPU."""
    stop = threading.Event()

    def burn() -> None:
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=burn)
    spinner.start()
    try:
        assert spinner.native_id is not None
        name = Path(f"/proc/self/task/{spinner.native_id}/comm").read_text().strip()
        key = f"{name} ({spinner.native_id})"
        first = serving.thread_cpu(os.getpid())
        assert "loop" in first and key in first
        deadline = time.monotonic() + 20
        while serving.thread_cpu(os.getpid())[key][0] - first[key][0] < 0.2:
            assert time.monotonic() < deadline, "the spinning thread was charged nothing"
            time.sleep(0.05)
        assert serving.thread_cpu(os.getpid())[key][1] > first[key][1]
    finally:
        stop.set()
        spinner.join()


SPINNER = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
print(child.pid, flush=True)
child.wait()
"""


def test_paused_stops_a_whole_process_tree_and_continues_it() -> None:
    """What the suite does to the servers it is not measuring: a spinning child of the
    paused process burns nothing while paused and spins again after."""
    with parent_and_child(SPINNER) as (proc, first_line):
        child = int(first_line)
        assert sorted(suite.process_tree(proc.pid)) == sorted([proc.pid, child])
        with suite.paused([proc.pid]):
            before = suite.tree_cpu_seconds(proc.pid)
            time.sleep(0.5)
            assert suite.tree_cpu_seconds(proc.pid) - before < 0.05  # stopped: no tick gained
        after = suite.tree_cpu_seconds(proc.pid)
        deadline = 100
        while suite.tree_cpu_seconds(proc.pid) - after < 0.1 and deadline:  # spins again
            time.sleep(0.05)
            deadline -= 1
        assert deadline, "the paused tree did not continue"


def test_a_run_the_hypervisor_robbed_is_run_again_a_bounded_number_of_times() -> None:
    def runs(*steals: float) -> Any:
        made = iter([{"steal_pct": steal, "try": i} for i, steal in enumerate(steals)])
        return lambda: next(made)

    assert suite.unrobbed(runs(2.0), "c") == {"steal_pct": 2.0, "try": 0, "robbed_runs": 0}
    kept = suite.unrobbed(runs(55.0, 40.0, 3.0, 1.0), "c")
    assert (kept["try"], kept["robbed_runs"]) == (2, 2)
    kept = suite.unrobbed(runs(55.0, 40.0, 30.0, 1.0), "c")  # every try robbed: the last
    assert (kept["try"], kept["robbed_runs"], kept["steal_pct"]) == (2, 2, 30.0)
    assert suite.unrobbed(runs(55.0, 1.0), "c", retries=0)["try"] == 0


def test_cpu_lists_read_as_taskset_writes_them() -> None:
    assert serving.cpu_list("0") == [0]
    assert serving.cpu_list("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert serving.cpu_list("2,0-2") == [2, 0, 1]
    for bad in ("", "a", "3-1", "-1", "1,,2"):
        with pytest.raises(ValueError):
            serving.cpu_list(bad)


def test_wrk_gets_a_thread_per_client_cpu_and_no_more_than_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(serving, "CLIENT_CPU", "1")
    assert suite.wrk_threads(64) == 1
    monkeypatch.setattr(serving, "CLIENT_CPU", "8-15")
    assert (suite.wrk_threads(64), suite.wrk_threads(3), suite.wrk_threads(1)) == (8, 3, 1)


@pytest.mark.parametrize("cpus", ["0", "0-1"])
def test_the_model_ceiling_runs_on_every_server_cpu(
    demo_repo: Path, monkeypatch: pytest.MonkeyPatch, cpus: str
) -> None:
    # one CPU: in this process; several: one process each, at once, their rates added
    monkeypatch.setattr(serving, "SERVER_CPU", cpus)
    model_file = demo_repo / "breast_cancer" / "1" / "model.onnx"
    before = os.sched_getaffinity(0)
    rates = suite.model_ceiling(model_file, [8, 1, 8], 0.05, 2)
    assert sorted(rates) == [1, 8] and all(rate > 0 for rate in rates.values())
    assert os.sched_getaffinity(0) == before


def test_stolen_time_is_read_per_cpu_and_reported_for_the_most_robbed() -> None:
    ticks = serving.steal_ticks()
    assert len(ticks) == os.cpu_count() and all(t >= 0 for t in ticks)
    assert 0.0 <= serving.stolen_pct(ticks, 10.0) < 100.0
    # as if CPU 0 had had half a second stolen in the last second: 50 % at least
    earlier = [ticks[0] - os.sysconf("SC_CLK_TCK") // 2, *ticks[1:]]
    assert serving.stolen_pct(earlier, 1.0) >= 50.0


def test_cases_past_a_bound_are_named_with_their_load_and_value() -> None:
    results = {
        "cases": [
            {"server": "a", "group": "headline", "connections": 64,
             "median": {"steal_pct": 42.4, "settle_s": 0.1}},
            {"server": "b", "group": "open", "offered_rps": 3000,
             "median": {"steal_pct": 10.0, "settle_s": 0.31}},
            {"server": "c", "group": "heavy", "connections": 1, "median": {}},
        ]
    }  # fmt: skip
    assert suite._past(results, "steal_pct", suite.STEAL_FLAG_PCT, "{:.0f} %") == [
        "a headline 64 (42 %)"
    ]
    assert suite._past(results, "settle_s", suite.SETTLE_FLAG_S, "{:.2f} s") == [
        "b open 3000 (0.31 s)"
    ]


def test_targets_pair_each_round_with_the_same_round_of_the_reference() -> None:
    # a slow first round for both sides still pairs as 2x; a reference round that alone was
    # slow shows in its own pair, and the median of the pairs stays put
    ours = {"runs": [{"rps": 100.0}, {"rps": 400.0}, {"rps": 420.0}]}
    ref = {"runs": [{"rps": 50.0}, {"rps": 200.0}, {"rps": 210.0}]}
    assert suite.paired(ours, ref, "rps") == "; paired rounds 2.00x (2.00, 2.00, 2.00)"
    ref["runs"][0]["rps"] = 25.0
    assert suite.paired(ours, ref, "rps") == "; paired rounds 2.00x (4.00, 2.00, 2.00)"
    assert suite.paired({"runs": []}, ref, "rps") == ""


def test_the_heavy_verdicts_read_the_one_row_and_the_many_row_case_apart() -> None:
    def case(rows: int, rps: float) -> dict[str, Any]:
        return {"group": "heavy", "server": suite.FASTSERVE, "model": suite.HEAVY,
                "rows": rows, "connections": 64, "median": {"rps": rps}}  # fmt: skip

    results = {  # the many-row case first: the one-row verdict must not take it
        "cases": [case(suite.HEAVY_ROWS, 1_000.0), case(1, 5_000.0)],
        "ceiling_rows_per_s": {suite.HEAVY: {"45": 19_000.0, "64": 20_000.0}},
        "formed_batch_rows": {suite.HEAVY: 45},
    }
    verdicts = {v["name"].split(":")[0]: v for v in suite.targets(results)}
    one = verdicts["heavy, 64 conn"]
    assert one["text"].startswith("0.25x (5,000 rows/s vs 20,000 at batch 64)")
    assert "at the formed batch (45 rows): 0.26x" in one["text"] and one["met"] is False
    many = verdicts[f"heavy, 64 conn, {suite.HEAVY_ROWS}-row requests"]
    assert many["text"].startswith("0.80x (16,000 rows/s vs 20,000 at batch 64)")
    assert many["met"] is None


@pytest.fixture
async def cost_server(demo_repo: Path, tmp_path: Path) -> AsyncIterator[Server]:
    """A real server in-process, serving what bench/request_cost.py measures."""
    from fastserve.config import ServerConfig

    repo = request_cost.served_repository(demo_repo, tmp_path / "repo")
    server = Server(ServerConfig(repository=repo, port=0, watch="off"))
    await server.start()
    yield server
    await server.stop()


@pytest.mark.parametrize(("clients", "idle_us"), [(1, 0), (8, 0), (1, 2000)])
async def test_the_in_process_cost_bench_runs_and_records_every_request(
    cost_server: Server, clients: int, idle_us: int
) -> None:
    # bench/request_cost.py's figures are per request sent, the store's writes included:
    # every request is answered and every prediction is written when its run returns
    server = cost_server
    body = request_cost.single_row_body()
    started = time.monotonic()
    cpu = await request_cost.run_clients(server, body, clients, 37, idle_us)
    # --idle-us: the thread slept after each request (a sleep never ends early)
    assert time.monotonic() - started >= 37 * idle_us / 1e6
    model = server.registry.get(request_cost.SMALL)
    assert model.request_stats.success == 37 and model.request_stats.fail == 0
    assert server.review is not None and server.review.observed_waiting() == 0
    rows = await server.review.store.query("SELECT count(*) FROM predictions")
    assert rows == [(37,)]
    assert cpu > 0
    # the clients' requests share batches as over HTTP: rounds of ``clients`` requests
    batches = model.batcher.core_stats()["batches"]
    assert batches == 37 if clients == 1 else batches <= 37 // clients + 2


async def test_the_framing_bench_answers_every_request_through_the_fast_path(
    cost_server: Server,
) -> None:
    # bench/framing_cost.py's in-memory connections are served as sockets are: every
    # request answered 200 and counted by the model, and a failed answer fails the run
    fast = cost_server.state.fast
    assert fast is not None
    body = request_cost.single_row_body()
    request = framing_cost.request_bytes(body)
    assert await framing_cost.Run(request, 41).cpu_us(fast, 4) > 0
    model = cost_server.registry.get(request_cost.SMALL)
    assert model.request_stats.success == 41 and model.request_stats.fail == 0
    assert await framing_cost.Run(request, 9).cpu_us(framing_cost.baselines.LlhttpCeiling, 2)
    wrong = framing_cost.request_bytes(body.replace(b'"FP32"', b'"INT8"'))
    with pytest.raises(RuntimeError, match="5 of 5 requests were not answered 200"):
        await framing_cost.Run(wrong, 5).cpu_us(fast, 2)


@pytest.mark.parametrize("execution", heavy_overlap.EXECUTIONS)
async def test_the_overlap_bench_serves_the_heavy_model_with_each_execution(
    tmp_path: Path, execution: str
) -> None:
    # bench/heavy_overlap.py compares the two ways of running batches on the same model:
    # each repository must run its batches the way it is named for, and answer every request
    repo = heavy_overlap.repository(tmp_path, execution)
    server = Server(ServerConfig(repository=repo, port=0, watch="off", state_db=repo / "s.db"))
    await server.start()
    try:
        model = server.registry.get(heavy_model.MODEL_NAME)
        assert model.batcher.execution == execution
        body = request_cost.single_row_body()
        await request_cost.run_clients(server, body, 8, 40, model=heavy_model.MODEL_NAME)
        assert model.request_stats.success == 40 and model.request_stats.fail == 0
    finally:
        await server.stop()
