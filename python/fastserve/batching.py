"""The asyncio face of the native batcher, and what runs the backend on its batches.

One ``ModelBatcher`` per served model version. Requests are submitted to ``_core.Batcher``
from the event loop without copying their tensors. A released batch is gathered into one
buffer by the core and run in one of two ways:

``threads``
    Worker threads (one per model instance) block in ``next_batch()`` with the GIL
    released, run the backend and hand the outputs back to the core, which scatters them
    per request. The core signals a pipe at most once per batch; the event loop reads it
    and resolves every finished request at once. Batches run beside the event loop, but
    each one needs the GIL handed over from the loop a few times, which costs up to the
    interpreter's switch interval (5 ms) whenever the loop is busy.
``event_loop``
    The loop runs the batches itself: when the core's ``ready_fd`` says a batch can be
    released (it filled, or the head's delay passed: ``ready_fd`` holds a timerfd aimed at
    that moment, so the kernel wakes the loop, and an eventfd for a batch that can go at
    once), the loop takes it with ``try_next_batch()`` and runs the backend inline. No
    thread waits for the GIL, and no thread switch happens between a request and its batch.

    A request that nothing can join (``last``: every client waits) and finds the queue
    empty is a batch of one as it stands: the loop runs the backend on the request's own
    arrays, with no trip through the core (no gather or scatter copy, no completion to
    poll). It is counted as an ``idle`` batch, as the core would have released it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy.typing as npt

from fastserve import _core
from fastserve.config import BatchingConfig
from fastserve.errors import InferenceFailed, Overloaded, QueueTimeout, ServerStopping
from fastserve.stats import BatchSizes

log = logging.getLogger("fastserve.batching")

Runner = Callable[[list[npt.NDArray[Any]]], list[npt.NDArray[Any]]]
"""Runs one batch: inputs in signature order -> outputs in signature order."""

Execution = Literal["threads", "event_loop"]


def make_policy(config: BatchingConfig) -> _core.BatchPolicy:
    return _core.BatchPolicy(
        max_batch_size=config.max_batch_size,
        preferred_batch_sizes=list(config.preferred_batch_sizes),
        max_queue_delay_us=config.max_queue_delay_us,
        max_queue_size=config.max_queue_size,
        default_timeout_us=config.queue_timeout_us,
        priority_levels=config.priority_levels,
    )


class ModelBatcher:
    """Queue, batch and run requests for one model version."""

    def __init__(
        self,
        label: str,
        config: BatchingConfig,
        runners: Sequence[Runner],
        execution: Execution = "threads",
        *,
        ragged: _core.RaggedSpec | None = None,
        transforms: dict[int, _core.ImageTransform] | None = None,
        input_order: Sequence[int] | None = None,
    ) -> None:
        """``ragged``: inputs the core pads per batch (a sequence pipeline); ``transforms``:
        by input index, what the core turns raw requests into while it gathers (an image
        pipeline);
        ``input_order``: for each model input, its position among a batch's tensors (the
        request's inputs, then the mask), when they differ."""
        if not runners:
            raise ValueError("a batcher needs at least one runner (model instance)")
        if execution == "event_loop" and len(runners) != 1:
            raise ValueError("the event loop runs one model instance, not several")
        self.label = label
        self.execution = execution
        self.config = config
        self.batch_sizes = BatchSizes()
        self.observer: Callable[[list[Any], list[Any]], None] | None = None
        """Called with each batch's inputs and outputs before it is answered (drift)."""
        self._core = _core.Batcher(make_policy(config), ragged, transforms or {})
        # a lone request can skip the core when the core has nothing to do to its rows (no
        # padding, no transform) and the loop runs the batches
        self._alone_ok = execution == "event_loop" and ragged is None and not transforms
        self._alone = {"submitted": 0, "batches": 0, "batches_idle": 0, "completed": 0, "failed": 0}
        """Requests run alone, without the core, as the core would count them."""
        self._order = tuple(input_order) if input_order is not None else None
        self._runners = list(runners)
        self._threads: list[threading.Thread] = []
        self._pending: dict[int, asyncio.Future[_core.Completion]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False

    # -- life cycle -------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Listen for completions on ``loop``; start the worker threads or have ``loop``
        run the batches."""
        self._loop = loop
        loop.add_reader(self._core.notify_fd, self._deliver)
        if self.execution == "event_loop":
            loop.add_reader(self._core.ready_fd, self._run_ready)
            self._run_ready()  # arms ready_fd
            return
        for i, runner in enumerate(self._runners):
            thread = threading.Thread(
                target=self._work, args=(runner,), name=f"fastserve-{self.label}-{i}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    async def stop(self) -> None:
        """Refuse new work, let the queue drain through the workers, then join them."""
        if self._stopped:
            return
        self._stopped = True
        self._core.stop()
        if self.execution == "event_loop":
            self._run_ready()  # stopped: the core releases all that is queued
        else:
            await asyncio.to_thread(self._join)
        self._deliver()  # completions of the last batches
        if self._loop is not None:
            self._loop.remove_reader(self._core.notify_fd)
            if self.execution == "event_loop":
                self._loop.remove_reader(self._core.ready_fd)

    def _join(self) -> None:
        for thread in self._threads:
            thread.join()

    def hold(self, n: int) -> None:
        """Test hook: release no batch until ``n`` requests are queued; the gate then stays
        open (0 opens it now). Deadlines still expire while held."""
        if n > 0:
            self._alone_ok = False  # every request goes through the gate from now on
        self._core.hold(n)

    @property
    def queue_depth(self) -> int:
        return self._core.queue_depth

    def core_stats(self) -> dict[str, int]:
        stats = self._core.stats()
        for key, count in self._alone.items():
            stats[key] = stats.get(key, 0) + count
        return stats

    # -- requests ---------------------------------------------------------------------------

    async def infer(
        self,
        inputs: list[npt.NDArray[Any]],
        *,
        priority: int = 0,
        timeout_us: int = -1,
        last: bool = False,
    ) -> _core.Completion | Alone:
        """Run one request through the batcher; returns its completion.

        ``inputs`` must be C-contiguous arrays in signature order; they are read in place.
        ``last``: no other request can come to join this one's batch (the caller knows
        every client is waiting): the queue is released without waiting out the delay.
        """
        loop = self._loop
        assert loop is not None, "ModelBatcher.start() was not called"
        if last and self._alone_ok and not self._stopped and self._core.queue_depth == 0:
            return self._run_alone(inputs)
        try:
            request_id = self._core.submit(inputs, priority, timeout_us, last)
        except _core.QueueFull:
            raise Overloaded(self.label) from None
        except _core.Stopped:
            raise ServerStopping(f"model '{self.label}'") from None
        future: asyncio.Future[_core.Completion] = loop.create_future()
        self._pending[request_id] = future
        if self.execution == "event_loop" and (
            last or self._core.queue_depth >= self.config.max_batch_size
        ):
            # This request made a batch that nothing more can join (it is full, or no one
            # else can send): run it now, answering this future before it is awaited, with
            # no trip through ready_fd. A batch released by its delay still waits for
            # ready_fd, so that the loop first reads what the sockets hold into it.
            self._run_ready()
        completion = await future
        status = completion.status
        if status == "ok":
            return completion
        if status == "timeout":
            raise QueueTimeout(self.label)
        raise InferenceFailed(completion.error)

    def _deliver(self) -> None:
        pending = self._pending
        for completion in self._core.poll():
            future = pending.pop(completion.id, None)
            # A cancelled waiter (client gone) still had its tensors kept alive until now.
            if future is not None and not future.done():
                future.set_result(completion)

    # -- running batches --------------------------------------------------------------------

    def _work(self, runner: Runner) -> None:
        """A worker thread: run batches until the core is stopped and empty."""
        while (batch := self._core.next_batch()) is not None:
            self._run(runner, batch)

    def _run_ready(self) -> None:
        """On the event loop: run every batch the core releases now, then answer them."""
        runner = self._runners[0]
        ran = False
        while (batch := self._core.try_next_batch()) is not None:
            self._run(runner, batch)
            ran = True
        if ran:
            self._deliver()  # now, rather than one loop iteration later via notify_fd

    def _run_alone(self, inputs: list[npt.NDArray[Any]]) -> Alone:
        """A batch of one request, run on its own arrays (see the module's docstring)."""
        rows = int(inputs[0].shape[0])
        counts = self._alone
        counts["submitted"] += 1
        counts["batches"] += 1
        counts["batches_idle"] += 1
        started = time.perf_counter_ns()
        try:
            outputs = self._runners[0](inputs)
            if self.observer is not None:
                self._observe(inputs, outputs)
        except Exception as exc:  # as a failed batch: logged, the request answered 500
            message = _short_error(exc)
            log.error("model %s: batch of %d rows failed: %s", self.label, rows, message)
            counts["failed"] += 1
            raise InferenceFailed(f"inference failed: {message}") from None
        finally:
            compute_ns = time.perf_counter_ns() - started
            self.batch_sizes.record(rows, compute_ns)
        counts["completed"] += 1
        return Alone(outputs, compute_ns)

    def _run(self, runner: Runner, batch: _core.Batch) -> None:
        rows = batch.rows
        started = time.perf_counter_ns()
        try:
            inputs = batch.inputs
            if self._order is not None:
                inputs = [inputs[k] for k in self._order]
            outputs = runner(inputs)
            if self.observer is not None:
                self._observe(inputs, outputs)
            batch.complete(outputs)
        except Exception as exc:  # the error belongs to this batch's requests alone
            message = _short_error(exc)
            log.error("model %s: batch of %d rows failed: %s", self.label, rows, message)
            batch.fail(f"inference failed: {message}")
        self.batch_sizes.record(rows, time.perf_counter_ns() - started)

    def _observe(self, inputs: list[Any], outputs: list[Any]) -> None:
        observer = self.observer
        assert observer is not None
        try:
            observer(inputs, outputs)
        except Exception:  # monitoring must not fail a batch: turn it off, loudly
            log.exception("model %s: batch observer failed; it is turned off", self.label)
            self.observer = None


class Alone:
    """The completion of a request run alone: what a ``_core.Completion`` tells of it."""

    __slots__ = ("compute_ns", "outputs")
    status = "ok"
    queue_ns = 0

    def __init__(self, outputs: list[npt.NDArray[Any]], compute_ns: int) -> None:
        self.outputs = outputs
        self.compute_ns = compute_ns


def _short_error(exc: BaseException, limit: int = 200) -> str:
    text = f"{exc.__class__.__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
