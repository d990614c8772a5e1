"""Start, drain and stop one fastserve process."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal

from aiohttp import web

from fastserve import repository
from fastserve.config import ServerConfig
from fastserve.http.app import ServerState, create_server
from fastserve.http.fastpath import FastPath
from fastserve.http.listener import Listener
from fastserve.monitoring.alerter import Alerter
from fastserve.monitoring.serving import (
    BusyPollCollector,
    RecordingCollector,
    ServingCollector,
)
from fastserve.registry import Registry
from fastserve.review.service import Review
from fastserve.review.store import ReviewStore
from fastserve.workers import Worker

_GC_YOUNG_THRESHOLD = 50_000
"""Allocations between scans of the youngest generation once serving (default 700)."""
BUSY_INFLIGHT = 8
"""Requests in flight from which the review store's flushes count the server as busy and
hold the core longer between give-ways (``fastserve.review.store.HOLD_S``)."""
log = logging.getLogger("fastserve.server")


class Server:
    """The HTTP server and the models it serves.

    ``start()`` listens first (live, not ready), loads the repository, reports ready, then
    watches the repository and applies edits. ``stop()`` drains: readiness goes down and new
    inference is refused, in-flight requests finish (up to ``drain_timeout_s``), then
    connections close and the batchers empty.

    As one of several workers (``worker``, see ``fastserve.workers``) it listens only once
    its models are loaded, with SO_REUSEPORT, and serves its siblings on a control socket.
    """

    def __init__(self, config: ServerConfig, worker: Worker | None = None) -> None:
        self.config = config
        self.worker = worker
        self.registry = Registry(
            config.repository,
            retire_timeout_s=config.retire_timeout_s,
            monitoring=config.monitoring,
        )
        self.state = ServerState(config, self.registry, worker=worker)
        self.registry.metrics.registry.register(
            ServingCollector(self.registry.models, lambda: self.state.inflight)
        )
        self.review = Review(
            ReviewStore(
                config.state_path,
                retention_days=config.retention_days,
                prune=worker is None or worker.index == 0,
                busy=lambda: self.state.inflight >= BUSY_INFLIGHT,
            ),
            self.registry.metrics,
        )
        self.registry.metrics.registry.register(
            RecordingCollector(self.review.observed_waiting, self.review.observed_dropped)
        )
        self._runner: web.ServerRunner | None = None
        self._fast: FastPath | None = None
        self.registry.metrics.registry.register(
            BusyPollCollector(lambda: self._fast.poll if self._fast is not None else None)
        )
        self._listener: Listener | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stop_watching = asyncio.Event()
        self._alerter: Alerter | None = None
        self.port: int | None = None

    async def start(self) -> None:
        config = self.config
        runner = web.ServerRunner(
            create_server(
                self.state,
                access_log=None,
                auto_decompress=False,  # we inflate ourselves, bounded by max_body_bytes
                # aiohttp arms this timer when a connection opens and after each response,
                # and closes the connection if no complete request head has arrived when it
                # fires: idle keep-alive and slow heads alike
                keepalive_timeout=config.idle_timeout_s,
                # after answering a request whose body never finished (408, 413), read and
                # drop what the client still sends for at most this long, then close
                lingering_time=1.0,
            ),
            shutdown_timeout=config.drain_timeout_s,
        )
        await self.review.open()  # an unusable state file stops start-up, loudly
        self.state.review = self.review
        await runner.setup()
        self._runner = runner
        # Connections open on the fast path; it hands what it does not serve to aiohttp.
        assert runner.server is not None
        self._fast = FastPath(self.state, runner.server)
        self.state.fast = self._fast
        self._fast.start()
        if self.worker is None:
            self._listen()
            log.info("listening on http://%s:%d (live; loading models)", config.host, self.port)
        else:
            control = self.worker.control_path()
            with contextlib.suppress(FileNotFoundError):
                control.unlink()  # left by this worker's predecessor
            await web.UnixSite(runner, str(control)).start()
        if config.watch != "off":
            # Watch before loading: an edit made while the models load is not missed (the
            # polling watcher only sees changes after its first scan). Applies of one model
            # are serialized, so an edit seen during start-up is applied after its load.
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
            await asyncio.sleep(0)
        await self.registry.load_all()
        # What start-up built (models, sessions, modules) lives as long as the process: keep
        # it out of the collector's generations so collections on the request path stay
        # short (measured: p99 at 64 connections 24 ms -> 8 ms).
        gc.collect()
        gc.freeze()
        # A request leaves no reference cycles behind (measured: 0 objects collected over
        # 50,000 requests), yet with the default threshold of 700 allocations the youngest
        # generation was scanned every few requests, 0.6 ms a time at 64 connections, with the
        # requests in flight in it. Scan it 70x less often: what refcounting frees never
        # reaches a scan, and a cycle an error path leaves is still collected.
        gc.set_threshold(_GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        self.state.started = True
        if self.worker is not None:
            self._listen()
            log.info("listening on http://%s:%d", config.host, self.port)
            self.worker.started()
        ready = "ready" if self.state.ready else "NOT ready: a model failed to load"
        log.info(
            "serving %d model(s) from %s: %s", len(self.registry.models()), config.repository, ready
        )
        if self.state.admin_token is None:
            log.info("admin API disabled (no admin token configured)")
        if config.alert_webhook and (self.worker is None or self.worker.index == 0):
            self._alerter = Alerter(
                config.alert_webhook, self.registry.models, config.alert_interval_s
            )
            self._alerter.start()
            log.info("alerts go to the webhook every %.0f s", config.alert_interval_s)

    def _listen(self) -> None:
        assert self._fast is not None
        config = self.config
        self._listener = Listener(
            self._fast, config.host, config.port, backlog=1024, reuse_port=self.worker is not None
        )
        self.port = int(self._listener.sockets[0].getsockname()[1])

    def _resync(self) -> None:
        if not self.state.draining:
            self.registry.resync()

    async def _watch(self) -> None:
        config = self.config
        log.info("watching %s for changes (%s)", config.repository, config.watch)
        if config.watch == "poll":
            # The polling watcher takes its first snapshot a poll later, in its own thread,
            # and says nothing when it has: an edit made before that snapshot is in it, so
            # the watcher never reports it. Apply everything again after it surely ran; on
            # a loaded machine the thread starts late, so twice more, later (unchanged
            # models cost a config parse).
            delay = 2 * config.poll_interval_s + 0.1
            loop = asyncio.get_running_loop()
            for factor in (1, 4, 16):
                loop.call_later(factor * delay, self._resync)
        try:
            async for names in repository.watch(
                config.repository,
                "poll" if config.watch == "poll" else "events",
                debounce_ms=config.watch_debounce_ms,
                poll_interval_s=config.poll_interval_s,
                stop=self._stop_watching,
            ):
                log.debug("repository change in %s", sorted(names))
                self.registry.changed(names)
        except Exception:
            log.exception("the repository watcher stopped; edits are no longer applied")

    async def stop(self) -> None:
        state = self.state
        if state.draining:
            return
        state.begin_drain()
        self._stop_watching.set()
        log.info("draining: readiness down, %d request(s) in flight", state.inflight)
        try:
            await asyncio.wait_for(state.drained.wait(), self.config.drain_timeout_s)
        except asyncio.TimeoutError:
            log.warning("drain timeout: %d request(s) still in flight", state.inflight)
        if self._listener is not None:
            self._listener.close()  # no new connections
        if self._fast is not None:
            self._fast.close()
        if self._runner is not None:
            await self._runner.cleanup()  # and the connections aiohttp was handed
        if self._watcher is not None:
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self._alerter is not None:
            await self._alerter.stop()
        await self.registry.stop_all()
        await self.review.close()
        if self.worker is not None:
            with contextlib.suppress(FileNotFoundError):
                self.worker.control_path().unlink()
            if self.worker.orphaned():  # no supervisor to remove the group's folder
                with contextlib.suppress(OSError):  # (not the last worker out)
                    self.worker.run_dir.rmdir()
        log.info("stopped")

    async def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then drain and return."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
            if self.worker is None:
                await stop.wait()
            else:
                while not stop.is_set():
                    # a worker outlives no supervisor (killed with SIGKILL, say)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), 1.0)
                    if self.worker.orphaned():
                        log.warning("the supervisor is gone: stopping")
                        break
        finally:
            await self.stop()
