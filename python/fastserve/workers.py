"""Several server processes on one port: ``fastserve serve --workers N``.

One process answers HTTP on one core: its event loop parses, validates, batches and
encodes every request. A machine with more cores serves more with more processes, each a
whole server (its repository watcher, batchers, sessions and review-store connection),
each listening on the port with SO_REUSEPORT: the kernel spreads new connections among
the workers that listen, by a hash of the connection's addresses.

The supervisor (this module's ``Supervisor``, the process the user started) holds the
port, forks the workers, restarts one that dies, and on SIGTERM or SIGINT has every worker
drain and waits for them. It imports no model code and starts no thread, so forking it is
safe. A worker listens only once its models are loaded: a restarted worker takes no
connection it could not serve, its siblings carry the traffic meanwhile.

What is per process, and how the group still answers as one server:

* ``/metrics``: the worker that answers a scrape asks its siblings for theirs over their
  control sockets (Unix sockets in a private folder, serving the same routes) and
  returns every series with a ``worker`` label, and ``fastserve_worker_up`` per worker.
  ``sum without (worker)`` gives the server's totals; the shipped dashboard and alert
  rules already aggregate with ``sum by``.
* Triton's statistics routes: the same way, each model version's counts and durations
  added up over the workers.
* The repository API: ``load``, ``unload``, ``promote`` and ``rollback`` act in the worker
  that got the request (a promotion's gate and record happen once), which then has each
  sibling ``load`` the model's folder (``unload`` for an unload): every worker serves the
  same versions when the answer comes back, and the answer says how each worker fared.
  Edits of the repository reach every worker through its own watcher.
* The drift route and the review queue's ``max_pending`` count are each worker's own;
  alerts to a webhook are evaluated by worker 0 on its share of traffic, and worker 0
  alone prunes old records. The review store is one SQLite file that every worker writes
  (WAL, one writer at a time; a flush that finds it locked keeps its records).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastserve.config import ServerConfig
from fastserve.http.listener import bind_sockets

if TYPE_CHECKING:
    from aiohttp import web
    from prometheus_client.metrics_core import Metric

log = logging.getLogger("fastserve.workers")

MAX_WORKERS = 64
RESTART_DELAY_S = 1.0
"""A worker that died is started again after this long (not at once: one that dies as it
starts would otherwise be forked in a tight loop)."""
SIBLING_TIMEOUT_S = 5.0
"""How long a scrape waits for a sibling's metrics (a busy or restarting worker is left
out, and ``fastserve_worker_up`` says so)."""
SIBLING_LOAD_TIMEOUT_S = 300.0
"""How long the repository API waits for a sibling to apply a model's folder (a load can
take as long as the model's sessions take to build)."""
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)


@dataclass(frozen=True)
class Worker:
    """What a worker process knows of its group."""

    index: int
    count: int
    run_dir: Path
    """The group's private folder (mode 0700): the workers' control sockets."""
    supervisor: int
    """The supervisor's pid: a worker whose parent is no longer it stops."""
    ready_fd: int

    def control_path(self, index: int | None = None) -> Path:
        """The Unix socket on which worker ``index`` (default: this one) serves its routes
        to its siblings."""
        return self.run_dir / f"worker-{self.index if index is None else index}.sock"

    @property
    def siblings(self) -> list[int]:
        return [i for i in range(self.count) if i != self.index]

    def started(self) -> None:
        """Tell the supervisor that this worker serves (its models loaded, listening)."""
        os.write(self.ready_fd, bytes([self.index]))

    def orphaned(self) -> bool:
        return os.getppid() != self.supervisor


def from_sibling(request: web.BaseRequest) -> bool:
    """Whether ``request`` came over a control socket, from another worker of the group
    (only the group's user can open them): such a request is answered by this worker alone."""
    transport = request.transport
    return transport is not None and isinstance(transport.get_extra_info("sockname"), str)


async def ask_siblings(
    worker: Worker,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    timeout_s: float = SIBLING_TIMEOUT_S,
) -> dict[int, tuple[int, bytes] | str]:
    """Send one request to every sibling at once; per sibling, its (status, body), or why
    there is none (it is restarting, or it timed out)."""
    import aiohttp

    async def ask(index: int) -> tuple[int, bytes]:
        connector = aiohttp.UnixConnector(path=str(worker.control_path(index)))
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.request(method, f"http://worker-{index}{path}", headers=headers) as answer,
        ):
            return answer.status, await answer.read()

    siblings = worker.siblings
    answers = await asyncio.gather(*(ask(i) for i in siblings), return_exceptions=True)
    results: dict[int, tuple[int, bytes] | str] = {}
    for index, answer in zip(siblings, answers, strict=True):
        if isinstance(answer, BaseException):
            if not isinstance(answer, (OSError, asyncio.TimeoutError, aiohttp.ClientError)):
                raise answer
            results[index] = f"no answer: {answer.__class__.__name__} {answer}".strip()
        else:
            results[index] = answer
    return results


async def group_metrics(worker: Worker, own: bytes) -> bytes:
    """The exposition of the whole group: every worker's series with a ``worker`` label
    (this worker's from ``own``, the siblings' asked for now)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import GaugeMetricFamily
    from prometheus_client.parser import text_string_to_metric_families

    texts = {worker.index: own}
    for index, answer in (await ask_siblings(worker, "GET", "/metrics")).items():
        if isinstance(answer, str) or answer[0] != 200:
            log.warning("worker %d: no metrics from worker %d: %s", worker.index, index, answer)
        else:
            texts[index] = answer[1]
    families: dict[str, Metric] = {}
    for index in sorted(texts):
        label = str(index)
        for family in text_string_to_metric_families(texts[index].decode("utf-8")):
            samples = [s._replace(labels={**s.labels, "worker": label}) for s in family.samples]
            merged = families.setdefault(family.name, family)
            if merged is family:
                family.samples = samples
            else:
                merged.samples.extend(samples)
    up = GaugeMetricFamily(
        "fastserve_worker_up",
        "1 for each worker process whose metrics this scrape has, 0 for one that did not "
        "answer (restarting, or busy past the scrape's wait).",
        labels=["worker"],
    )
    for index in range(worker.count):
        up.add_metric([str(index)], 1.0 if index in texts else 0.0)
    families[up.name] = up
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families.values()))
    return generate_latest(registry)


class _Families:
    """A collector of metric families already made."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


async def group_statistics(worker: Worker, own: dict[str, Any], path: str) -> dict[str, Any]:
    """Triton's statistics document (``{"model_stats": [...]}``) of the whole group: this
    worker's ``own`` and the siblings' for the same ``path``, each model version's counts
    and durations added up (per batch size too), its latest inference the latest of all.
    A sibling that does not answer, or does not serve the model now, is left out."""
    import orjson

    merged = {(m["name"], m["version"]): m for m in own["model_stats"]}
    for index, answer in (await ask_siblings(worker, "GET", path)).items():
        if isinstance(answer, str) or answer[0] != 200:
            log.warning("worker %d: no statistics from worker %d: %s", worker.index, index,
                        answer if isinstance(answer, str) else answer[0])  # fmt: skip
            continue
        for stats in orjson.loads(answer[1])["model_stats"]:
            key = (stats["name"], stats["version"])
            merged[key] = _added(merged[key], stats) if key in merged else stats
    return {"model_stats": list(merged.values())}


def _added(a: Any, b: Any, key: str = "") -> Any:
    """Two workers' statistics of one model version as one."""
    if isinstance(a, dict):
        return {k: _added(a.get(k), b.get(k), k) if k in a and k in b else a.get(k, b.get(k))
                for k in {**a, **b}}  # fmt: skip
    if key == "batch_stats":  # [{"batch_size": n, ...}]: by batch size
        sizes = {s["batch_size"]: s for s in a}
        for s in b:
            size = s["batch_size"]
            sizes[size] = _added(sizes[size], s) if size in sizes else s
        return [sizes[size] for size in sorted(sizes)]
    if key == "last_inference":
        return max(a, b)
    if isinstance(a, (int, float)) and not isinstance(a, bool) and key != "batch_size":
        return a + b
    return a  # the model's name and version, a batch's size


async def tell_siblings(
    worker: Worker, action: str, model: str, authorization: str
) -> dict[str, str]:
    """Have every sibling ``load`` or ``unload`` ``model`` (the repository API, over the
    control sockets); per worker (by index, this one included): "applied" or why not."""
    from urllib.parse import quote

    import orjson

    answers = await ask_siblings(
        worker,
        "POST",
        f"/v2/repository/models/{quote(model, safe='')}/{action}",
        headers={"Authorization": authorization},
        timeout_s=SIBLING_LOAD_TIMEOUT_S,
    )
    outcome = {str(worker.index): "applied"}
    for index, answer in sorted(answers.items()):
        if isinstance(answer, str):
            outcome[str(index)] = answer
        elif answer[0] == 200:
            outcome[str(index)] = "applied"
        else:
            try:
                reason = str(orjson.loads(answer[1]).get("error", ""))
            except (orjson.JSONDecodeError, AttributeError):
                reason = answer[1][:200].decode("utf-8", "replace")
            outcome[str(index)] = f"failed ({answer[0]}): {reason}"
    return outcome


# -- the supervisor -------------------------------------------------------------------------


@dataclass
class _Child:
    index: int
    started: bool = False
    """It told the supervisor that it serves."""


@dataclass
class Supervisor:
    """Forks ``count`` workers that each run ``serve(config, worker)`` and keeps them
    running until SIGTERM or SIGINT."""

    config: ServerConfig
    count: int
    serve: Callable[[ServerConfig, Worker], None]
    children: dict[int, _Child] = field(default_factory=dict)
    """By pid."""
    _restarts: dict[int, float] = field(default_factory=dict)
    """Worker index -> when to fork it again."""
    # made by run():
    _run_dir: Path = field(init=False)
    _holders: list[socket.socket] = field(init=False)
    _selector: selectors.BaseSelector = field(init=False)
    _ready_r: int = field(init=False)
    _ready_w: int = field(init=False)
    """The workers write their index here once they serve."""
    _wake_r: int = field(init=False)
    _wake_w: int = field(init=False)
    """The signals the supervisor gets are written here (``signal.set_wakeup_fd``)."""

    def run(self) -> int:
        """Serve until told to stop; the exit status: 0, or 1 when a worker failed as it
        started (its log says why) and the group was stopped."""
        config = self.config
        # The port, held by a socket that never listens (so it is given no connection): a
        # restarted worker binds it again, and port 0 is resolved once for every worker.
        holders = bind_sockets(config.host, config.port, backlog=None, reuse_port=True)
        self.config = config = config.model_copy(update={"port": holders[0].getsockname()[1]})
        self._run_dir = Path(tempfile.mkdtemp(prefix="fastserve-workers-"))
        self._ready_r, self._ready_w = os.pipe()
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._ready_r, self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._holders = holders
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._ready_r, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        previous = {sig: signal.signal(sig, _note_signal) for sig in _SIGNALS}
        old_wakeup = signal.set_wakeup_fd(self._wake_w)
        status = 0
        try:
            log.info(
                "%d workers on http://%s:%d (SO_REUSEPORT), control sockets in %s",
                self.count, config.host, config.port, self._run_dir,
            )  # fmt: skip
            for index in range(self.count):
                self._fork(index)
            status = self._supervise()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._selector.close()
            for fd in (self._ready_r, self._ready_w, self._wake_r, self._wake_w):
                os.close(fd)
            for sock in holders:
                sock.close()
            shutil.rmtree(self._run_dir, ignore_errors=True)
        return status

    def _fork(self, index: int) -> None:
        worker = Worker(index, self.count, self._run_dir, os.getpid(), self._ready_w)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                self._become_worker(index)
                self.serve(self.config, worker)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = _Child(index)
        log.info("worker %d: pid %d", index, pid)

    def _become_worker(self, index: int) -> None:
        """Leave the supervisor's signal handling and descriptors behind (in the child)."""
        signal.set_wakeup_fd(-1)
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        self._selector.close()
        for fd in (self._ready_r, self._wake_r, self._wake_w):
            os.close(fd)
        for sock in self._holders:
            sock.close()
        for handler in logging.getLogger().handlers:
            handler.setFormatter(
                logging.Formatter(
                    f"%(asctime)s %(levelname)s [worker {index}] %(name)s: %(message)s"
                )
            )

    def _supervise(self) -> int:
        stopping = False
        status = 0
        while self.children or (self._restarts and not stopping):
            timeout = None
            if self._restarts and not stopping:
                timeout = max(0.0, min(self._restarts.values()) - time.monotonic())
            for key, _ in self._selector.select(timeout):
                if key.fd == self._ready_r:
                    self._note_started()
                    continue
                with contextlib.suppress(BlockingIOError):
                    received = os.read(self._wake_r, 256)
                    if not {signal.SIGTERM, signal.SIGINT} & set(received):
                        continue
                    if not stopping:
                        stopping = True
                        log.info("stopping: every worker drains (again: stop them at once)")
                        self._signal_all(signal.SIGTERM)
                    else:
                        log.warning("stopping at once: workers killed")
                        self._signal_all(signal.SIGKILL)
            for pid, code in self._reap():
                child = self.children.pop(pid)
                if stopping:
                    continue
                if not child.started:
                    log.error(
                        "worker %d exited while starting (%s): stopping the others",
                        child.index, code,
                    )  # fmt: skip
                    stopping, status = True, 1
                    self._signal_all(signal.SIGTERM)
                    continue
                log.error("worker %d died (%s): starting it again", child.index, code)
                self._restarts[child.index] = time.monotonic() + RESTART_DELAY_S
            if not stopping:
                now = time.monotonic()
                for index, when in list(self._restarts.items()):
                    if when <= now:
                        del self._restarts[index]
                        self._fork(index)
        log.info("all workers stopped")
        return status

    def _note_started(self) -> None:
        with contextlib.suppress(BlockingIOError):
            for index in os.read(self._ready_r, 256):
                for child in self.children.values():
                    if child.index == index:
                        child.started = True
                        log.info("worker %d: serving", index)

    def _reap(self) -> list[tuple[int, str]]:
        """The workers that exited: (pid, how)."""
        reaped = []
        while self.children:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in self.children:
                code = os.waitstatus_to_exitcode(wait_status)
                how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
                reaped.append((pid, how))
        return reaped

    def _signal_all(self, sig: signal.Signals) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def _note_signal(signum: int, frame: object) -> None:
    """The handler of the supervisor's signals: the wake-up descriptor carries them."""
