"""The listening sockets, accepted from by the event loop: every waiting connection at each
wake-up, not one.

uvloop (libuv underneath) accepts one connection a turn of its loop. A turn takes as long
as answering what every open connection sent meanwhile: ~15 ms for 64 connections when each
request runs its model on the loop (``max_batch_size: 1``, ``execution: event_loop``). When
64 clients connected at once to such a busy server, the last waited ~0.5 s to be accepted
with its request sent, and a load test that began as another ended had a p99 of 240 ms
against 17 ms (strace: one ``accept4`` a turn, never ``EAGAIN``). asyncio's own loop takes up
to a backlog's worth a turn; this does the same on any loop that watches file descriptors.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

log = logging.getLogger("fastserve.http")

ACCEPT_AT_ONCE = 256
"""Connections accepted a turn of the loop at most: a flood of them is taken in pieces,
with the connections already open served in between."""
RETRY_AFTER_S = 1.0
"""Out of file descriptors (or kernel memory): accept again after this long. Meanwhile
clients wait in the kernel's backlog instead of the loop spinning on a socket that stays
readable."""
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class Listener:
    """Bound, listening sockets on ``host``:``port`` (every address ``host`` resolves to,
    like ``loop.create_server``), their connections served by ``factory()`` protocols."""

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        host: str | None,
        port: int,
        *,
        backlog: int = 1024,
        reuse_port: bool = False,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._factory = factory
        self.sockets = bind_sockets(host, port, backlog=backlog, reuse_port=reuse_port)
        self._starting: set[asyncio.Task[object]] = set()
        self._closed = False
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_AT_ONCE):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    continue  # that client gave up before it was accepted (ECONNABORTED, ...)
                log.error("cannot accept connections (%s): again in %.1f s", exc, RETRY_AFTER_S)
                self._loop.remove_reader(sock.fileno())
                self._loop.call_later(RETRY_AFTER_S, self._resume, sock)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._loop.connect_accepted_socket(self._factory, conn))
            self._starting.add(task)
            task.add_done_callback(self._started)

    def _started(self, task: asyncio.Task[object]) -> None:
        self._starting.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.debug("a connection closed as it opened: %s", exc)

    def _resume(self, sock: socket.socket) -> None:
        if not self._closed:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop accepting; the connections already open are not touched."""
        if self._closed:
            return
        self._closed = True
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()


def bind_sockets(
    host: str | None, port: int, *, backlog: int | None = 1024, reuse_port: bool = False
) -> list[socket.socket]:
    """A listening socket per address of ``host`` (None or "": every interface).

    ``reuse_port``: with SO_REUSEPORT, so that several processes (``fastserve.workers``)
    each listen on the port and the kernel spreads new connections among them.
    ``backlog=None``: bound, not listening; such a socket holds the port (port 0: picks it)
    and is given no connections."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, resolved in dict.fromkeys(infos):
            # port 0: the port the first address got, for every address
            address = (resolved[0], port, *resolved[2:]) if port else resolved
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # an IPv6 socket beside an IPv4 one on the same port would clash otherwise
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(
                    exc.errno, f"cannot listen on {address[:2]}: {exc.strerror}"
                ) from None
            if backlog is not None:
                sock.listen(backlog)
            sock.setblocking(False)
            port = sock.getsockname()[1]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
