"""The batcher through the fastserve._core binding: batch formation, deadlines, bounds,
zero-copy lifetimes, the notify and ready fds, both ways of running batches, and a
10,000-request concurrency check."""

from __future__ import annotations

import asyncio
import gc
import os
import select
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from fastserve import _core
from fastserve.batching import Execution, ModelBatcher
from fastserve.config import BatchingConfig
from fastserve.errors import ServerStopping

LONG_DELAY_US = 10_000_000  # 10 s: only full / preferred / drain release within a test


def make_batcher(max_batch_size: int = 4, **kwargs: object) -> _core.Batcher:
    kwargs.setdefault("max_queue_delay_us", LONG_DELAY_US)
    return _core.Batcher(_core.BatchPolicy(max_batch_size=max_batch_size, **kwargs))


def row(value: float, rows: int = 1, cols: int = 3, dtype: object = np.float32) -> np.ndarray:
    return np.full((rows, cols), value, dtype=dtype)


def poll_for(b: _core.Batcher, n: int, timeout_s: float = 5.0) -> list[_core.Completion]:
    done: list[_core.Completion] = []
    until = time.monotonic() + timeout_s
    while len(done) < n and time.monotonic() < until:
        done.extend(b.poll(50))
    return done


def readable(fd: int) -> bool:
    r, _, _ = select.select([fd], [], [], 0)
    return bool(r)


def run_worker(b: _core.Batcher, fn: Callable[[_core.Batch], None]) -> threading.Thread:
    def loop() -> None:
        while (batch := b.next_batch()) is not None:
            fn(batch)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


# --- module surface ---------------------------------------------------------------------------


def test_cuda_queries_are_consistent() -> None:
    built, available, count = _core.cuda_built(), _core.cuda_available(), _core.cuda_device_count()
    assert isinstance(built, bool) and isinstance(available, bool) and isinstance(count, int)
    assert available == (built and count > 0)
    if not built:
        assert count == 0


def test_exception_hierarchy() -> None:
    assert issubclass(_core.BatcherError, RuntimeError)
    assert issubclass(_core.QueueFull, _core.BatcherError)
    assert issubclass(_core.Stopped, _core.BatcherError)


def test_policy_fields_and_validation() -> None:
    p = _core.BatchPolicy(
        max_batch_size=8,
        preferred_batch_sizes=[4, 8],
        max_queue_delay_us=500,
        max_queue_size=16,
        default_timeout_us=1000,
        priority_levels=2,
    )
    assert p.max_batch_size == 8
    assert p.preferred_batch_sizes == [4, 8]
    assert p.max_queue_delay_us == 500
    assert p.max_queue_size == 16
    assert p.default_timeout_us == 1000
    assert p.priority_levels == 2
    d = _core.BatchPolicy(max_batch_size=2)
    assert (d.preferred_batch_sizes, d.max_queue_delay_us, d.max_queue_size) == ([], 0, 1024)
    assert (d.default_timeout_us, d.priority_levels) == (0, 1)
    for bad in (
        {"max_batch_size": 0},
        {"max_batch_size": 4, "preferred_batch_sizes": [5]},
        {"max_batch_size": 4, "preferred_batch_sizes": [0]},
        {"max_batch_size": 4, "max_queue_delay_us": -1},
        {"max_batch_size": 4, "max_queue_size": 0},
        {"max_batch_size": 4, "default_timeout_us": -1},
        {"max_batch_size": 4, "priority_levels": 0},
    ):
        with pytest.raises(ValueError):
            _core.BatchPolicy(**bad)
    with pytest.raises(TypeError):
        _core.BatchPolicy(4)  # keyword-only


# --- batch formation --------------------------------------------------------------------------


def test_hold_forms_exactly_three_full_batches() -> None:
    b = make_batcher(4)
    b.hold(12)
    ids = [b.submit([row(i)]) for i in range(12)]
    assert ids == list(range(1, 13))
    assert b.queue_depth == 12
    for k in range(3):
        batch = b.next_batch()
        assert batch is not None
        assert (batch.rows, batch.reason) == (4, "full")
        assert batch.request_ids == ids[4 * k : 4 * k + 4]
        assert batch.request_rows == [1, 1, 1, 1]
        assert len(batch.queue_wait_ns) == 4 and all(w >= 0 for w in batch.queue_wait_ns)
        (x,) = batch.inputs
        assert x.shape == (4, 3) and x.dtype == np.float32
        np.testing.assert_array_equal(x[:, 0], np.arange(4 * k, 4 * k + 4, dtype=np.float32))
        batch.complete([x])
    assert b.queue_depth == 0
    s = b.stats()
    assert (s["batches"], s["batches_full"], s["rows"], s["submitted"]) == (3, 3, 12, 12)
    assert len(b.poll()) == 12


def test_preferred_sizes_release_largest_prefix() -> None:
    b = make_batcher(8, preferred_batch_sizes=[2, 3])
    b.hold(7)
    for i in range(7):
        b.submit([row(i)])
    for _ in range(2):
        batch = b.next_batch()
        assert (batch.rows, batch.reason) == (3, "preferred")
        batch.fail("not run")
    b.stop()
    last = b.next_batch()
    assert (last.rows, last.reason) == (1, "drain")
    last.fail("not run")
    assert b.stats()["batches_preferred"] == 2


def test_delay_releases_no_earlier_than_the_delay() -> None:
    delay_us = 50_000
    b = make_batcher(8, max_queue_delay_us=delay_us)
    got: list[_core.Batch] = []
    worker = threading.Thread(target=lambda: got.append(b.next_batch()))
    worker.start()
    start = time.monotonic()
    b.submit([row(0)])
    b.submit([row(1, rows=2)])
    worker.join(5)
    elapsed = time.monotonic() - start
    (batch,) = got
    assert (batch.rows, batch.reason) == (3, "delay")
    assert elapsed >= delay_us / 1e6
    assert batch.queue_wait_ns[0] >= delay_us * 1000
    assert elapsed < 2.0


def test_every_release_reason_reaches_python_by_name() -> None:
    # (the names are interned once, one per reason: an idle batch once read past the table)
    b = make_batcher(4)
    b.submit([row(0)])
    b.submit([row(1)], release_queued=True)  # nothing more can join: released at once
    idle = b.try_next_batch()
    assert idle is not None and (idle.rows, idle.reason) == (2, "idle")
    idle.fail("not run")
    for value in range(4):
        b.submit([row(value)])
    full = b.try_next_batch()
    assert full is not None and full.reason == "full"
    full.fail("not run")
    b.submit([row(4)])
    b.stop()
    drained = b.try_next_batch()
    assert drained is not None and drained.reason == "drain"
    drained.fail("not run")
    s = b.stats()
    assert (s["batches_idle"], s["batches_full"], s["batches_drain"]) == (1, 1, 1)


def test_expired_request_times_out_and_is_never_batched() -> None:
    b = make_batcher(4)
    doomed = b.submit([row(0)], timeout_us=20_000)
    kept = b.submit([row(1)])
    (c,) = poll_for(b, 1, timeout_s=2.0)  # no worker: the batcher's timer expires it
    assert (c.id, c.status, c.batch_id, c.batch_rows, c.outputs) == (doomed, "timeout", 0, 0, [])
    assert c.error
    assert c.queue_ns >= 20_000_000
    b.stop()
    batch = b.next_batch()
    assert batch.request_ids == [kept]
    assert b.next_batch() is None
    batch.fail("not run")
    assert b.stats()["timed_out"] == 1


def test_default_timeout_and_expiry_while_held() -> None:
    b = make_batcher(4, default_timeout_us=10_000)
    b.hold(100)
    doomed = b.submit([row(0)])
    b.submit([row(1)], timeout_us=0)  # no deadline
    (c,) = poll_for(b, 1, timeout_s=2.0)
    assert (c.id, c.status) == (doomed, "timeout")
    assert b.queue_depth == 1


def test_queue_full_rejects_beyond_the_bound() -> None:
    b = make_batcher(4, max_queue_size=8)
    b.hold(100)
    full = 0
    for i in range(10):
        try:
            b.submit([row(i)])
        except _core.QueueFull:
            full += 1
    assert full == 2
    assert b.queue_depth == 8
    assert b.stats()["rejected_full"] == 2


def test_higher_priority_level_is_released_first() -> None:
    b = make_batcher(2, priority_levels=3)
    b.hold(6)
    low1 = b.submit([row(0)], priority=2)
    mid1 = b.submit([row(0)], priority=1)
    low2 = b.submit([row(0)], priority=2)
    high1 = b.submit([row(0)], priority=0)
    mid2 = b.submit([row(0)], priority=1)
    high2 = b.submit([row(0)])
    order = [b.next_batch().request_ids for _ in range(3)]
    assert order == [[high1, high2], [mid1, mid2], [low1, low2]]
    with pytest.raises(ValueError):
        b.submit([row(0)], priority=3)


def test_different_shapes_are_not_mixed() -> None:
    b = make_batcher(8)
    b.hold(6)
    a1 = b.submit([row(0, cols=3)])
    c1 = b.submit([row(0, cols=4)])
    a2 = b.submit([row(0, rows=2, cols=3)])
    i1 = b.submit([row(0, cols=3, dtype=np.int32)])
    c2 = b.submit([row(0, cols=4)])
    a3 = b.submit([row(0, cols=3)])
    b.stop()
    batches = [b.next_batch() for _ in range(3)]
    assert b.next_batch() is None
    assert [x.request_ids for x in batches] == [[a1, a2, a3], [c1, c2], [i1]]
    assert [x.inputs[0].shape for x in batches] == [(4, 3), (2, 4), (1, 3)]
    assert batches[2].inputs[0].dtype == np.int32


def test_stop_drains_queued_work_and_rejects_new_work() -> None:
    b = make_batcher(8)
    for i in range(3):
        b.submit([row(i)])
    b.stop()
    with pytest.raises(_core.Stopped):
        b.submit([row(9)])
    batch = b.next_batch()
    assert (batch.rows, batch.reason) == (3, "drain")
    assert b.next_batch() is None
    batch.complete([batch.inputs[0]])
    assert [c.status for c in b.poll()] == ["ok"] * 3
    s = b.stats()
    assert (s["rejected_stopped"], s["batches_drain"], s["completed"]) == (1, 1, 3)


def test_stop_wakes_blocked_next_batch() -> None:
    b = make_batcher(8)
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(b.next_batch())) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.02)
    b.stop()
    for t in threads:
        t.join(5)
    assert results == [None, None, None]


# --- inputs, outputs, lifetimes ---------------------------------------------------------------


def test_submit_rejects_bad_arrays() -> None:
    b = make_batcher(4)
    cases: list[object] = [
        [np.zeros((4, 3), np.float32)[:, ::2]],  # not C-contiguous
        [np.zeros((1, 3), np.dtype(">f4" if sys.byteorder == "little" else "<f4"))],
        [np.array([[object()]], dtype=object)],
        [np.array(1.0, np.float32)],  # rank 0
        [np.zeros((1, 2), "U3")],
        [np.zeros((5, 3), np.float32)],  # more rows than max_batch_size
        [np.zeros((0, 3), np.float32)],  # no rows
        [np.zeros((1, 3), np.float32), np.zeros((2, 3), np.float32)],  # rows differ
        [],
        [[1.0, 2.0]],  # not an ndarray: no silent copy
        np.zeros((1, 3), np.float32),  # not a list
    ]
    for inputs in cases:
        with pytest.raises(ValueError):
            b.submit(inputs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        b.submit([row(0)], timeout_us=-2)
    assert b.queue_depth == 0
    assert b.stats()["submitted"] == 0


def test_read_only_and_tuple_inputs_are_accepted() -> None:
    b = make_batcher(4, max_queue_delay_us=0)
    ro = np.frombuffer(np.arange(3, dtype=np.float32).tobytes(), dtype=np.float32).reshape(1, 3)
    assert not ro.flags.writeable
    rid = b.submit((ro, np.array([7], np.int64)))
    batch = b.next_batch()
    assert batch.request_ids == [rid]
    np.testing.assert_array_equal(batch.inputs[0], ro)
    assert batch.inputs[1].tolist() == [7]
    batch.fail("x")


def test_inputs_stay_alive_until_poll_returns_the_completion() -> None:
    b = make_batcher(4, max_queue_delay_us=0)
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    refs = sys.getrefcount(x)
    rid = b.submit([x])
    assert sys.getrefcount(x) == refs + 1  # the binding holds the array, not a copy
    batch = b.next_batch()
    np.testing.assert_array_equal(batch.inputs[0], x)
    batch.complete([batch.inputs[0] + 1])
    del batch
    assert sys.getrefcount(x) == refs + 1  # still held: the completion was not polled yet
    (c,) = b.poll()
    assert c.id == rid
    assert sys.getrefcount(x) == refs


def test_dropped_caller_array_is_still_read_correctly() -> None:
    b = make_batcher(4, max_queue_delay_us=0)
    b.submit([np.full((1, 1000), 3.5, np.float32)])  # the caller keeps no reference
    gc.collect()
    np.full((1, 1000), -1.0, np.float32)  # reuse freed memory if it had been freed
    batch = b.next_batch()
    assert np.all(batch.inputs[0] == 3.5)
    batch.fail("x")


def test_outputs_are_zero_copy_and_outlive_batch_and_batcher() -> None:
    b = make_batcher(4)
    b.hold(2)
    b.submit([row(1, rows=3)])
    b.submit([row(2)])
    batch = b.next_batch()
    x = batch.inputs[0]
    assert x.base is not None and x.flags.c_contiguous
    y = x * 10
    labels = np.arange(4, dtype=np.int64)
    batch.complete([y, labels])
    del batch
    cs = sorted(b.poll(), key=lambda c: c.id)
    assert [c.status for c in cs] == ["ok", "ok"]
    assert [c.batch_rows for c in cs] == [4, 4]
    assert all(c.compute_ns >= 0 and c.queue_ns >= 0 for c in cs)
    del b
    gc.collect()
    out0, out1 = cs[0].outputs
    assert out0.shape == (3, 3) and out0.dtype == np.float32 and np.all(out0 == 10)
    assert out1.tolist() == [0, 1, 2]
    assert out0.base is not None and out0.flags.writeable
    assert cs[1].outputs[1].tolist() == [3]
    assert np.all(cs[1].outputs[0] == 20)
    del x  # batch input buffer may go only now


def test_complete_accepts_casts_and_noncontiguous_outputs() -> None:
    b = make_batcher(2, max_queue_delay_us=0)
    b.hold(2)
    b.submit([row(1)])
    b.submit([row(2)])
    batch = b.next_batch()
    swapped = np.arange(2, dtype=">i4" if sys.byteorder == "little" else "<i4")
    strided = np.arange(8, dtype=np.float16).reshape(2, 4)[:, ::2]
    batch.complete([swapped, strided, [[True], [False]], np.zeros((2, 1), np.complex64)])
    cs = sorted(b.poll(), key=lambda c: c.id)
    assert cs[0].outputs[0].tolist() == [0] and cs[1].outputs[0].tolist() == [1]
    assert cs[0].outputs[0].dtype == np.int32
    assert cs[1].outputs[1].tolist() == [[4.0, 6.0]] and cs[1].outputs[1].dtype == np.float16
    assert cs[1].outputs[2].dtype == np.bool_ and cs[1].outputs[2].tolist() == [[False]]
    assert cs[0].outputs[3].dtype == np.complex64


def test_complete_with_wrong_rows_raises_and_fails_the_batch() -> None:
    b = make_batcher(4, max_queue_delay_us=0)
    b.hold(2)
    b.submit([row(1)])
    b.submit([row(2)])
    batch = b.next_batch()
    with pytest.raises(ValueError, match="2 rows"):
        batch.complete([np.zeros(3, np.float32)])
    cs = b.poll()
    assert [c.status for c in cs] == ["error", "error"]
    assert all("2 rows" in c.error for c in cs)
    with pytest.raises(_core.BatcherError):
        batch.complete([np.zeros(2, np.float32)])
    batch.fail("again")  # no-op once finished
    assert b.poll() == []
    assert b.stats()["failed"] == 2


def test_object_output_fails_the_batch() -> None:
    b = make_batcher(4, max_queue_delay_us=0)
    b.submit([row(1)])
    batch = b.next_batch()
    with pytest.raises(ValueError):
        batch.complete([np.array([{"a": 1}], dtype=object)])
    (c,) = b.poll()
    assert c.status == "error"


def test_fail_reaches_every_request() -> None:
    b = make_batcher(4, max_queue_delay_us=0)
    b.hold(3)
    ids = {b.submit([row(i)]) for i in range(3)}
    batch = b.next_batch()
    batch.fail("model exploded")
    cs = b.poll()
    assert {c.id for c in cs} == ids
    assert {(c.status, c.error, c.batch_id) for c in cs} == {("error", "model exploded", batch.id)}


def test_abandoned_batch_fails_its_requests() -> None:
    b = make_batcher(4, max_queue_delay_us=0)
    b.hold(2)
    b.submit([row(1)])
    b.submit([row(2)])
    batch = b.next_batch()
    del batch
    gc.collect()
    cs = b.poll()
    assert [(c.status, c.error) for c in cs] == [("error", "batch abandoned")] * 2


# --- notify fd and poll -----------------------------------------------------------------------


def test_notify_fd_becomes_readable_and_poll_returns_completions() -> None:
    b = make_batcher(4)
    fd = b.notify_fd
    assert isinstance(fd, int) and fd >= 0
    assert not readable(fd)
    assert b.poll() == []
    b.hold(8)
    for i in range(8):
        b.submit([row(i)])
    first, second = b.next_batch(), b.next_batch()
    first.complete(first.inputs)
    r, _, _ = select.select([fd], [], [], 2.0)
    assert r == [fd]
    second.complete(second.inputs)
    assert len(os.read(fd, 64)) == 1  # one wake-up for both batches (not one per request)
    cs = b.poll()
    assert len(cs) == 8 and all(c.status == "ok" for c in cs)
    assert not readable(fd)


def test_poll_drains_the_notify_pipe() -> None:
    b = make_batcher(2)
    b.hold(2)
    b.submit([row(1)])
    b.submit([row(2)])
    batch = b.next_batch()
    batch.complete(batch.inputs)
    assert readable(b.notify_fd)
    assert len(b.poll()) == 2
    assert not readable(b.notify_fd)


def test_poll_timeout_waits_for_a_completion() -> None:
    b = make_batcher(4, max_queue_delay_us=0)
    start = time.monotonic()
    assert b.poll(30) == []
    assert time.monotonic() - start >= 0.025
    worker = run_worker(b, lambda batch: batch.complete(batch.inputs))
    rid = b.submit([row(5)])
    (c,) = b.poll(5000)  # GIL released while waiting, so the worker runs
    assert c.id == rid and c.status == "ok"
    b.stop()
    worker.join(5)


async def test_notify_fd_drives_an_asyncio_loop() -> None:
    b = make_batcher(4, max_queue_delay_us=100)
    loop = asyncio.get_running_loop()
    got: list[_core.Completion] = []
    done = asyncio.Event()
    wakeups = 0

    def on_readable() -> None:
        nonlocal wakeups
        wakeups += 1
        got.extend(b.poll())
        if len(got) == 40:
            done.set()

    loop.add_reader(b.notify_fd, on_readable)
    worker = run_worker(b, lambda batch: batch.complete([batch.inputs[0] * 2]))
    try:
        ids = [b.submit([row(i)]) for i in range(40)]
        await asyncio.wait_for(done.wait(), 5)
    finally:
        loop.remove_reader(b.notify_fd)
        b.stop()
        worker.join(5)
    assert sorted(c.id for c in got) == ids
    assert all(float(c.outputs[0][0, 0]) == 2 * (c.id - 1) for c in got)
    assert wakeups <= b.stats()["batches"]


@pytest.mark.parametrize("execution", ["event_loop", "threads"])
async def test_model_batcher_answers_each_caller_with_its_own_rows(execution: Execution) -> None:
    """Both ways of running batches, through the asyncio face: 200 concurrent callers with
    1..3 rows each; the event loop needs no thread at all."""
    config = BatchingConfig(max_batch_size=8, max_queue_delay_us=300)
    batcher = ModelBatcher("m:1", config, [lambda inputs: [inputs[0] * 2]], execution)
    threads_before = threading.active_count()
    batcher.start(asyncio.get_running_loop())
    assert threading.active_count() == threads_before + (execution == "threads")
    try:

        async def call(i: int) -> None:
            rows = 1 + i % 3
            completion = await batcher.infer([row(i, rows=rows)])
            assert completion.outputs[0].shape == (rows, 3)
            assert (completion.outputs[0] == 2 * i).all()

        await asyncio.wait_for(asyncio.gather(*(call(i) for i in range(200))), 20)
    finally:
        await batcher.stop()
    stats = batcher.core_stats()
    assert stats["completed"] == 200
    assert stats["batches"] < 200  # they shared batches


async def test_stopping_an_event_loop_batcher_runs_what_is_queued() -> None:
    config = BatchingConfig(max_batch_size=8, max_queue_delay_us=10_000_000)
    batcher = ModelBatcher("m:1", config, [lambda inputs: [inputs[0] + 1]], "event_loop")
    batcher.start(asyncio.get_running_loop())
    calls = [asyncio.ensure_future(batcher.infer([row(i)])) for i in range(3)]
    await asyncio.sleep(0.01)
    assert batcher.queue_depth == 3  # waiting for company, 10 s away
    await batcher.stop()
    done = await asyncio.gather(*calls)
    assert [float(c.outputs[0][0, 0]) for c in done] == [1.0, 2.0, 3.0]
    with pytest.raises(ServerStopping):
        await batcher.infer([row(9)])


def test_the_event_loop_runs_one_instance() -> None:
    with pytest.raises(ValueError, match="one model instance"):
        ModelBatcher("m:1", BatchingConfig(), [lambda i: i, lambda i: i], "event_loop")


# --- concurrency ------------------------------------------------------------------------------


def test_10000_concurrent_requests_delivered_once_to_the_right_id() -> None:
    n_requests, n_submitters, n_workers = 10_000, 4, 3
    b = make_batcher(32, max_queue_delay_us=200, max_queue_size=n_requests)
    expected: dict[int, np.ndarray] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work(batch: _core.Batch) -> None:
        ids = np.repeat(np.array(batch.request_ids, np.float64), batch.request_rows)
        x, tag = batch.inputs
        assert x.shape[0] == batch.rows == tag.shape[0]
        batch.complete([x * 2 + ids[:, None], tag])

    def submitter(start: int) -> None:
        try:
            for i in range(start, n_requests, n_submitters):
                rows = 1 + i % 3
                x = np.random.default_rng(i).random((rows, 4))
                tag = np.full(rows, i, np.int64)
                rid = b.submit([x, tag])
                with lock:
                    expected[rid] = x * 2 + rid
        except BaseException as e:
            errors.append(e)

    workers = [run_worker(b, work) for _ in range(n_workers)]
    submitters = [threading.Thread(target=submitter, args=(s,)) for s in range(n_submitters)]
    for t in submitters:
        t.start()
    got: dict[int, _core.Completion] = {}
    duplicates = 0
    until = time.monotonic() + 60
    while len(got) < n_requests and time.monotonic() < until:
        for c in b.poll(20):
            duplicates += c.id in got
            got[c.id] = c
    for t in submitters:
        t.join()
    b.stop()
    for t in workers:
        t.join(5)
    assert not errors
    assert duplicates == 0
    assert len(got) == n_requests
    assert set(got) == set(expected)
    for rid, c in got.items():
        assert c.status == "ok", c.error
        out, tag = c.outputs
        np.testing.assert_array_equal(out, expected[rid])
        assert tag.shape == (out.shape[0],)
    assert b.poll() == []
    s = b.stats()
    assert s["submitted"] == s["completed"] == n_requests
    assert s["failed"] == s["timed_out"] == 0
