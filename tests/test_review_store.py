"""The review store on its own (real SQLite files), and its durability under kill -9 of a
real server process."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

import fastserve.review.store
from conftest import ServerProcess
from fastserve.config import ServerConfig
from fastserve.demo import example_rows
from fastserve.errors import StoreBusy
from fastserve.monitoring.metrics import Metrics
from fastserve.monitoring.serving import RecordingCollector
from fastserve.review.outcome import Reading
from fastserve.review.service import PredictionLog, Review
from fastserve.review.store import GIVE_WAY_RECORDS, PIECE, ReviewStore, UnknownRequest
from fastserve.server import Server
from models import tabular_body

MODEL = "breast_cancer"


def note(store: ReviewStore, request_id: str, label: int, confidence: float | None = None) -> None:
    """An observed prediction of model "m" version 1, as the request path notes one."""
    row = ("m", request_id, "primary", "1", f"[{label}]", confidence, 1.0, time.time())
    store.note("predictions", row)


async def test_observed_records_are_written_once_and_feedback_is_idempotent(
    tmp_path: Path,
) -> None:
    store = ReviewStore(tmp_path / "s.db", flush_interval_s=60)
    await store.open()
    try:
        for _ in range(3):  # the same request noted again (a retry) stays one record
            note(store, "a", 1, 0.7)
        with pytest.raises(UnknownRequest):
            await store.add_feedback("m", "b", [1], "client")
        first = await store.add_feedback("m", "a", [1], "client")  # flushes "a" first
        again = await store.add_feedback("m", "a", [1], "client")
        changed = await store.add_feedback("m", "a", [0], "reviewer:ann")
        assert (first.outcome, again.outcome, changed.outcome) == (
            "recorded",
            "unchanged",
            "updated",
        )
        assert first.version == "1"
        assert await store.query("SELECT count(*) FROM predictions") == [(1,)]
        assert await store.query("SELECT label, source FROM feedback") == [("[0]", "reviewer:ann")]
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def store_with_log(
    path: Path, busy: bool = False
) -> AsyncIterator[tuple[ReviewStore, PredictionLog]]:
    """An open store (flushed only when asked) whose predictions come from a PredictionLog;
    ``busy``: what it is told of the server's load."""
    log = PredictionLog(limit=100_000)
    store = ReviewStore(path, flush_interval_s=60, busy=lambda: busy)
    store.add_source("predictions", log.drain)
    await store.open()
    try:
        yield store, log
    finally:
        await store.close()


def log_prediction(log: PredictionLog, request_id: str, label: int) -> None:
    scores = np.array([[0.9, 0.1]] if label == 0 else [[0.2, 0.8]], np.float32)
    reading = Reading("classifier", 1, 0)
    log.add("m", request_id, "primary", "1", reading, [np.array([label]), scores], None, 1.0)


async def test_a_flush_writes_everything_a_source_and_the_buffer_hold_piece_by_piece(
    tmp_path: Path,
) -> None:
    async with store_with_log(tmp_path / "s.db") as (store, log):
        n = 5 * PIECE + 3
        for i in range(n):
            log_prediction(log, f"r{i}", i % 2)
            note(store, f"n{i}", i % 3)
        await store.flush()
        assert await store.query("SELECT count(*) FROM predictions") == [(2 * n,)]
        rows = dict(await store.query("SELECT request_id, prediction FROM predictions"))
        assert rows == {f"r{i}": f"[{i % 2}]" for i in range(n)} | {
            f"n{i}": f"[{i % 3}]" for i in range(n)
        }


@pytest.mark.parametrize("backlog", [3 * PIECE, 20 * GIVE_WAY_RECORDS])
async def test_a_flush_gives_way_between_pieces_until_it_is_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backlog: int
) -> None:
    given_way = 0
    real = fastserve.review.store._give_way

    def counted() -> None:
        nonlocal given_way
        given_way += 1
        real()

    monkeypatch.setattr(fastserve.review.store, "_give_way", counted)
    async with store_with_log(tmp_path / "s.db") as (store, log):
        for i in range(backlog):
            log_prediction(log, f"r{i}", 1)
        await store.flush()
        assert await store.query("SELECT count(*) FROM predictions") == [(backlog,)]
        # between every two pieces of building rows and of inserting them, while they are
        # few; a backlog past GIVE_WAY_RECORDS is written straight on
        pieces = -(-min(backlog, GIVE_WAY_RECORDS) // PIECE)
        assert given_way == 2 * pieces


async def test_a_flush_for_a_busy_server_gives_way_only_once_it_has_held_the_core_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Busy, a flush holds the core for ``HOLD_S`` between give-ways, not for one piece;
    quiet, it gives way after every piece (above)."""
    given_way = 0

    def counted() -> None:
        nonlocal given_way
        given_way += 1

    monkeypatch.setattr(fastserve.review.store, "_give_way", counted)
    backlog = 3 * PIECE
    for hold_s, expected in ((3600.0, 0), (0.0, 2 * 3)):  # never long enough; at once
        monkeypatch.setattr(fastserve.review.store, "HOLD_S", hold_s)
        given_way = 0
        async with store_with_log(tmp_path / f"s{hold_s}.db", busy=True) as (store, log):
            for i in range(backlog):
                log_prediction(log, f"r{i}", 1)
            await store.flush()
            assert await store.query("SELECT count(*) FROM predictions") == [(backlog,)]
        assert given_way == expected, hold_s


async def test_a_large_flush_of_every_table_is_split_into_statements_sqlite_accepts(
    tmp_path: Path,
) -> None:
    # Rows go in many to a statement; no statement may take more than 999 parameters (the
    # lowest limit of any SQLite), whatever a table's width. Duplicates are ignored.
    store = ReviewStore(tmp_path / "s.db", flush_interval_s=60)
    await store.open()
    try:
        assert store._db is not None
        if sys.version_info >= (3, 11):  # as an SQLite older than 3.32 would refuse more
            store._db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        n = 2 * GIVE_WAY_RECORDS + 7
        now = time.time()
        for i in range(n):
            note(store, f"p{i}", i % 2)
            store.note("comparisons", ("m", f"c{i}", "1", "2", 1, 0.1, None, None, 1.0, 2.0,
                                       None, now))  # fmt: skip
            store.note("review_items", ("m", f"r{i}", "low_confidence", "1", None, "{}", "{}",
                                        None, 0.5, now))  # fmt: skip
        note(store, "p0", 1)  # again: ignored
        await store.flush()
        for table in ("predictions", "comparisons", "review_items"):
            assert await store.query(f"SELECT count(*) FROM {table}") == [(n,)]
        assert await store.query("SELECT prediction FROM predictions WHERE request_id = 'p0'") == [
            ("[0]",)
        ]
        last = f"r{n - 1}"
        assert await store.query(
            "SELECT status, confidence FROM review_items WHERE request_id = ?", [last]
        ) == [("pending", 0.5)]
    finally:
        await store.close()


async def test_a_flush_that_finds_the_file_locked_keeps_its_records_for_the_next(
    tmp_path: Path,
) -> None:
    # another process (a sibling worker, say) holds the write lock past the busy timeout
    store = ReviewStore(tmp_path / "s.db", flush_interval_s=60, busy_timeout_s=0.05)
    await store.open()
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    try:
        for i in range(5):
            note(store, f"r{i}", 1)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreBusy, match="review store is busy"):
            await store.flush()
        assert store.waiting() == 5 and store.dropped == 0
        note(store, "r5", 0)
        other.execute("COMMIT")
        await store.flush()
        assert store.waiting() == 0
        rows = await store.query("SELECT request_id FROM predictions ORDER BY request_id")
        assert rows == [(f"r{i}",) for i in range(6)]
    finally:
        other.close()
        await store.close()


async def test_a_file_locked_past_the_busy_timeout_gets_503s_and_loses_no_record(
    repo: Path, tmp_path: Path
) -> None:
    """A real server whose state file another process keeps locked (a sibling worker in a
    long write, say): inference goes on, what waits on the store gets 503 with Retry-After,
    a Prometheus scrape still gets its metrics, and what was predicted meanwhile is there
    once the lock goes."""
    state = tmp_path / "state.db"
    server = Server(ServerConfig(repository=repo, port=0, drain_timeout_s=5, state_db=state))
    server.review.store.busy_timeout_s = 0.2  # (5 s in service)
    await server.start()
    rows = example_rows(MODEL, 2)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.port}") as s:

            async def infer(request_id: str, row: Any) -> None:
                body = tabular_body(row, request_id)
                async with s.post(f"/v2/models/{MODEL}/infer", json=body) as resp:
                    assert resp.status == 200, await resp.text()

            async def feedback(request_id: str) -> aiohttp.ClientResponse:
                doc = {"id": request_id, "label": 1}
                async with s.post(f"/v2/models/{MODEL}/feedback", json=doc) as resp:
                    await resp.read()
                    return resp

            await infer("before", rows[0])
            await server.review.store.flush()
            other = sqlite3.connect(state, isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")
                await infer("during", rows[1])
                refused = await feedback("before")
                assert refused.status == 503
                assert refused.headers["Retry-After"] == "1"
                error = (await refused.json())["error"]
                assert "review store is busy" in error and "state.db" in error
                async with s.get(f"/v2/models/{MODEL}/accuracy") as resp:
                    assert resp.status == 503
                    assert "review store is busy" in (await resp.json())["error"]
                async with s.get("/metrics") as resp:
                    assert resp.status == 200
                    assert "fastserve_model_versions" in await resp.text()
            finally:
                other.execute("COMMIT")
                other.close()
            for request_id in ("before", "during"):
                accepted = await feedback(request_id)
                assert accepted.status == 200
                assert (await accepted.json())["recorded"] == "recorded"
    finally:
        await server.stop()


async def test_an_owed_record_is_written_once_the_file_is_free_and_never_dropped(
    tmp_path: Path,
) -> None:
    store = ReviewStore(tmp_path / "s.db", flush_interval_s=60, max_buffered=2, busy_timeout_s=0)
    await store.open()
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        change = ("m", "promote", "1", "2", 0, "ann", "why", None, time.time())
        store.owe("promotions", change)
        for i in range(6):  # more observed records than the store keeps
            note(store, f"r{i}", 1)
        for _ in range(2):
            with pytest.raises(StoreBusy):
                await store.flush()
        assert store.dropped == 4 and store.waiting() == 3  # 2 observed kept, 1 owed
        other.execute("COMMIT")
        await store.flush()
        assert store.waiting() == 0
        rows = await store.query("SELECT model, action, to_version, actor FROM promotions")
        assert rows == [("m", "promote", "2", "ann")]
        assert await store.query("SELECT count(*) FROM predictions") == [(2,)]
    finally:
        other.close()
        await store.close()


async def test_a_store_closes_even_when_its_last_write_fails_and_logs_what_it_loses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = ReviewStore(tmp_path / "s.db", flush_interval_s=60, busy_timeout_s=0)
    await store.open()
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        note(store, "r0", 1)
        store.owe("promotions", ("m", "rollback", "2", "1", 0, "bob", "why", None, 1.0))
        await store.close()  # does not raise: the server must be able to stop
        assert "closing without writing 2 record(s)" in caplog.text
        assert "unwritten promotions record: ('m', 'rollback', '2', '1'" in caplog.text
    finally:
        other.close()


async def test_a_failed_flush_keeps_at_most_max_buffered_records(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "s.db", flush_interval_s=60, max_buffered=4, busy_timeout_s=0)
    await store.open()
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    try:
        for i in range(4):
            note(store, f"r{i}", 1)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreBusy):
            await store.flush()
        for i in range(4, 8):  # the buffer is full again, the kept rows beside it
            note(store, f"r{i}", 1)
        with pytest.raises(StoreBusy):
            await store.flush()
        # the second failure held 8 rows: the newest 4 are kept, 4 dropped and counted
        assert (store.waiting(), store.dropped) == (4, 4)
        other.execute("COMMIT")
        await store.flush()
        rows = await store.query("SELECT request_id FROM predictions ORDER BY request_id")
        assert rows == [(f"r{i}",) for i in range(4, 8)]
    finally:
        other.close()
        await store.close()


async def test_retention_deletes_old_records_but_keeps_promotions(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "s.db")
    await store.open()
    try:
        note(store, "old", 1)
        await store.flush()

        def backdate_and_record(db: sqlite3.Connection) -> None:
            db.execute("UPDATE predictions SET created = created - 30 * 86400")
            db.execute(
                "INSERT INTO promotions (model, action, to_version, forced, actor, reason, "
                "created) VALUES ('m', 'promote', '2', 0, 'ann', 'test', 0)"
            )

        await store.run(backdate_and_record)
        note(store, "new", 0)
        removed = await store.prune(time.time() - 7 * 86400)
        assert removed == 1
        assert await store.query("SELECT request_id FROM predictions") == [("new",)]
        assert await store.query("SELECT count(*) FROM promotions") == [(1,)]
    finally:
        await store.close()


async def test_a_full_buffer_drops_and_counts_instead_of_growing(tmp_path: Path) -> None:
    store = ReviewStore(tmp_path / "s.db", flush_interval_s=60, max_buffered=5)
    await store.open()
    try:
        for i in range(8):
            note(store, f"r{i}", 1)
        assert store.dropped == 3
        await store.flush()
        assert await store.query("SELECT count(*) FROM predictions") == [(5,)]
    finally:
        await store.close()


async def test_records_waiting_and_dropped_are_exposed_to_prometheus(tmp_path: Path) -> None:
    metrics = Metrics()
    review = Review(ReviewStore(tmp_path / "s.db", flush_interval_s=60, max_buffered=5), metrics)
    metrics.registry.register(RecordingCollector(review.observed_waiting, review.observed_dropped))

    def exposed() -> tuple[float | None, float | None]:
        registry = metrics.registry
        return (
            registry.get_sample_value("fastserve_observed_records_waiting"),
            registry.get_sample_value("fastserve_observed_records_dropped_total"),
        )

    await review.open()
    try:
        assert exposed() == (0, 0)
        reading = Reading("classifier", 1, 0)
        outputs = [np.array([1]), np.array([[0.2, 0.8]], np.float32)]
        for i in range(7):  # predictions: a source of the store, bounded by max_buffered too
            review.predictions.add("m", f"p{i}", "primary", "1", reading, outputs, None, 1.0)
        for i in range(6):
            note(review.store, f"n{i}", 1)
        assert exposed() == (10, 3)
        await review.store.flush()
        assert exposed() == (0, 3)
        assert await review.store.query("SELECT count(*) FROM predictions") == [(10,)]
    finally:
        await review.close()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    store = ReviewStore(path)
    with pytest.raises(sqlite3.DatabaseError, match="schema version 99"):
        await store.open()
    await store.close()


# -- kill -9 -----------------------------------------------------------------------------------


async def _round(url: str, tag: str, rows: Any, proc: ServerProcess) -> set[str]:
    """Predict, then send feedback (each id twice, as a retrying client would) while the
    server is killed at a random moment; return the ids whose feedback was acknowledged."""
    acked: set[str] = set()
    async with aiohttp.ClientSession(url) as s:
        for i, row in enumerate(rows):
            async with s.post(
                f"/v2/models/{MODEL}/infer", json=tabular_body(row, f"{tag}-{i}")
            ) as resp:
                assert resp.status == 200

        async def send(i: int) -> None:
            for _ in range(2):
                try:
                    async with s.post(
                        f"/v2/models/{MODEL}/feedback", json={"id": f"{tag}-{i}", "label": i % 2}
                    ) as resp:
                        if resp.status == 200:
                            acked.add(f"{tag}-{i}")
                except aiohttp.ClientError:
                    return  # the server is gone

        async def kill_soon() -> None:
            await asyncio.sleep(random.uniform(0.02, 0.15))
            proc.proc.kill()

        await asyncio.gather(kill_soon(), *(send(i) for i in range(len(rows))))
    proc.proc.wait(10)
    return acked


async def test_kill_9_during_feedback_writes_loses_no_acknowledged_record(repo: Path) -> None:
    state = repo.parent / "state.db"
    rows = example_rows(MODEL, 80)
    acked: set[str] = set()
    for round_ in range(3):
        proc = ServerProcess(repo, "--state-db", str(state), "--watch", "off")
        try:
            await asyncio.to_thread(proc.wait_ready)
            acked |= await _round(f"http://{proc.url}", f"k{round_}", rows, proc)
        finally:
            proc.stop()
        assert proc.proc.returncode == -9
    assert acked  # some writes were acknowledged before each kill
    with sqlite3.connect(state) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        stored = db.execute("SELECT request_id, label FROM feedback").fetchall()
    ids = [rid for rid, _ in stored]
    assert len(ids) == len(set(ids))  # no feedback counted twice
    assert acked <= set(ids)  # every acknowledged one is there
    for rid, label in stored:
        assert label == f"[{int(rid.rsplit('-', 1)[1]) % 2}]"


def _open_at(path: str, at: float, results: Any) -> None:
    """In a child process: open the store at ``path`` once the clock reaches ``at``."""
    while time.time() < at:
        pass
    try:
        store = ReviewStore(Path(path), prune=False)
        store._open()
        results.put("ok")
    except Exception as exc:
        results.put(repr(exc))


@pytest.mark.skipif(sys.platform == "win32", reason="forks processes")
def test_processes_that_open_a_new_file_together_all_open_it(tmp_path: Path) -> None:
    """Several workers open one new file at the same moment (``serve --workers``). Two that
    upgrade their locks together are refused at once by SQLite, not made to wait; before the
    store tried again, 16 of 30 such rounds of four had a worker fail to start."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for round_ in range(8):
        path = str(tmp_path / f"state-{round_}.db")
        results = context.Queue()
        at = time.time() + 0.3
        children = [context.Process(target=_open_at, args=(path, at, results)) for _ in range(4)]
        for child in children:
            child.start()
        outcomes = [results.get(timeout=30) for _ in children]
        for child in children:
            child.join(timeout=30)
        assert outcomes == ["ok"] * 4, outcomes
