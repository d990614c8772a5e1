"""Polling for a moment when the server goes idle, before the event loop sleeps.

Once the last request in flight is answered the loop has nothing to do until a client's
next request arrives. Blocking in ``epoll_wait`` then puts the thread to sleep and, on an idle
core, the CPU too: on a virtual machine the vCPU halts and leaves to the hypervisor. The
next request pays for the way back, twice: the wake-up itself, and a request path that
runs from cold caches (on this project's 2-core VM, where the guest's own halt-polling is
off, a request that follows 200 µs of sleep costs 250-290 µs of CPU in-process against
85-117 µs back to back: ``bench/request_cost.py --clients 1 --idle-us 200``). Keeping
the loop turning (``epoll_wait`` with a zero timeout) for a short window after that answer
catches a request that follows quickly on a core that is still running: what Linux's
``SO_BUSY_POLL`` and its guest ``haltpoll`` idle driver do below the process, done here
where it also keeps the request path's caches warm.

While requests are in flight the loop is not idle for long and nothing spins: a busy
server's batches are formed as before. Spinning costs CPU, so the window adapts to the
traffic as ``haltpoll`` does: a request that arrives after the window closed but within
``max`` doubles the window (from 50 µs), a pause longer than ``max`` halves it (to zero
below 50 µs). Requests that follow each other closely keep it open; traffic that trickles
in with long pauses closes it, and an idle server never spins.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from fastserve.cores import yield_core

GROW_START_NS = 50_000
"""The window a closed one reopens at, and below which a halved one closes (haltpoll's
``guest_halt_poll_grow_start``)."""


class BusyPoll:
    """Keeps ``loop`` polling, not sleeping, for up to a window once the server is idle.

    ``idle()`` is called when an answer is written and no other request is in flight,
    ``arrived()`` when bytes of a request arrive; ``max_us`` 0 turns it off.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_us: int,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.loop = loop
        self.clock = clock
        self.max_ns = max_us * 1000
        self.window_ns = min(GROW_START_NS, self.max_ns)
        self.pauses = {"caught": 0, "short": 0, "long": 0}
        """Pauses between the server going idle and the next request: within the window
        (``caught``), past it but within ``max`` (``short``: the window grows), past ``max``
        (``long``: it shrinks)."""
        self.spinning = False
        self._until = 0
        self._idle_since = 0
        """When the server went idle, while no request has arrived since."""

    def idle(self) -> None:
        if not self.max_ns:
            return
        now = self._idle_since = self.clock()
        if self.window_ns:
            self._until = now + self.window_ns
            if not self.spinning:
                self.spinning = True
                self.loop.call_soon(self._spin)

    def arrived(self) -> None:
        """A request (or part of one) arrived: fit the window to the pause it ended."""
        if not self._idle_since:
            return
        pause = self.clock() - self._idle_since
        self._idle_since = 0
        if pause <= self.window_ns:
            self.pauses["caught"] += 1
        elif pause <= self.max_ns:
            self.pauses["short"] += 1
            self.window_ns = min(self.max_ns, max(GROW_START_NS, 2 * self.window_ns))
        else:
            self.pauses["long"] += 1
            self.window_ns //= 2
            if self.window_ns < GROW_START_NS:
                self.window_ns = 0

    def stop(self) -> None:
        """Stop spinning now (the server is closing)."""
        self._until = 0
        self._idle_since = 0

    def _spin(self) -> None:
        # A callback ready to run makes the loop poll with a zero timeout; rescheduling this
        # one keeps it from blocking until the window closes.
        if self.clock() < self._until:
            # the GIL and the core to any other thread that is ready (the review store's
            # writer): without it a writer waiting for the GIL got it only when its switch
            # interval (5 ms) forced a hand-over
            yield_core()
            self.loop.call_soon(self._spin)
        else:
            self.spinning = False
