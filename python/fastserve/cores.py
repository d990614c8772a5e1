"""Handing the core over between the server's threads."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

yield_core: Callable[[], None] = getattr(os, "sched_yield", lambda: time.sleep(0))
"""Release the GIL, and the core to a thread that is ready to run, then go on.

Releasing the GIL alone is not enough where the server's threads share a core: a thread
woken to take it also needs the CPU, which the scheduler gives it only when this thread's
slice ends, and by then this thread has taken the GIL back. ``sched_yield`` hands the core
over (Windows has none: there a zero sleep releases the GIL)."""
