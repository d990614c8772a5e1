"""Durable records of what the models said and what people said back, in SQLite (WAL).

One connection, owned by one writer thread, does every read and write: SQLite serializes
writers anyway, and one thread keeps the event loop free of disk waits and of locking.

Two kinds of write, and a fallback:

* **Acknowledged** (feedback, reviewer labels, promotion records): the caller awaits the
  commit, made with ``synchronous=FULL``, before it answers its client. Such a record
  survives kill -9 of the server (and a power cut, as far as the disk keeps its promises).
* **Observed** (predictions, shadow comparisons, review items): noted without waiting and
  written in one transaction per flush, every ``flush_interval_s``, with
  ``synchronous=NORMAL`` (in WAL mode: durable across a crash of the process, not of the
  machine). A crash loses at most the last interval of them; nobody was told they were
  stored. The buffer is bounded: past ``max_buffered`` records, new ones are dropped and
  counted. A producer with many records of one kind (predictions) can register a source
  instead (``add_source``): the store's thread asks it for rows at each flush, so building
  them happens there, many at once, not on the request path. A flush works in pieces of
  ``PIECE`` records and gives the core away between them (see ``_give_way``), so a request
  that arrives meanwhile waits out one piece, not the flush; while the server is busy it
  gives way only after ``HOLD_S`` of work, and past ``GIVE_WAY_RECORDS`` it writes straight
  on, so that a busy server's store keeps up.
* **Owed** (``owe``): the record of a change already made (a new primary) whose own
  acknowledged write failed, the file being locked or the disk full. Every flush writes
  it, with ``synchronous=FULL``, until one succeeds; it is never dropped.

Idempotency: a prediction, a comparison and a feedback are each keyed by (model, request
id); a review item by (model, request id, reason). Writing the same one again changes
nothing, so a retried feedback never counts twice.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar

from fastserve.cores import yield_core
from fastserve.errors import StoreBusy

log = logging.getLogger("fastserve.review")

T = TypeVar("T")

SCHEMA_VERSION = 1
FLUSH_INTERVAL_S = 0.05
"""How often observed records are written, and so what a crash may lose of them. Each
flush has a cost whatever it writes (two PRAGMAs, the transaction, its WAL write): every 50 ms
rather than every 10 ms is 3.6 % more req/s at one connection (p99 0.35-0.36 against
0.36-0.43 ms) and the same at 64 (``bench/ab.py``, four rounds each)."""
PIECE = 16
"""Records a flush turns into rows, or inserts, between two ``_give_way`` calls (the GIL
held: some 3 µs a record to build and insert, ``bench/request_cost.py --store``)."""
GIVE_WAY_RECORDS = 512
"""A flush gives way between its pieces for the first this many records it builds and the
first it inserts (one connection brings ~200 a flush), then writes straight on. A busy loop
takes a whole time slice at each yield: a flush that gave way throughout fell behind at 64
connections and dropped a quarter of the records in 30 s. A flush past this is one whose
server is busy, where the queue, not the flush, makes the latency."""

HOLD_S = 0.0005
"""While the server is busy (``ReviewStore(busy=...)``: many requests in flight), a flush
gives the core away only once it has held it this long, not after every piece. Each time it
gives way it waits for the loop to hand the GIL back (~2 ms at 64 connections, where 64
give-ways made a flush of ~1,900 records last ~120 ms for ~15 ms of work), and a busy
loop's requests queue behind one another anyway. Against a give-way after every piece
(``bench/ab.py --threads``, 2026-12-07): at 64 connections 1.12x the requests a second
(5 rounds, 1.02x-1.28x) and 1.07x (4 rounds, 0.90x-1.33x), p99 lower in 8 of the 9
rounds, the store's thread run ~200 times a second instead of ~490 and its CPU a request
lower or equal in each; at 8 connections 1.06x (5 rounds, 0.97x-1.15x). A lone client is
not kept waiting that long: at one connection, holding 0.5 ms gave the same requests a
second and a higher p99 (0.77-0.96 against 0.49-0.57 ms in 3 of 5 rounds), so while the
server is quiet a flush still gives way after every piece."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    model TEXT NOT NULL,
    request_id TEXT NOT NULL,
    role TEXT NOT NULL,                -- 'primary' or 'shadow'
    version TEXT NOT NULL,
    prediction TEXT NOT NULL,          -- JSON: a class index or a value per row
    confidence REAL,                   -- the request's lowest, classifiers only
    latency_ms REAL NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (model, request_id, role)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS predictions_created ON predictions (created);

CREATE TABLE IF NOT EXISTS comparisons (
    model TEXT NOT NULL,
    request_id TEXT NOT NULL,
    primary_version TEXT NOT NULL,
    shadow_version TEXT NOT NULL,
    agree INTEGER,                     -- classifiers: top-1 of every row the same
    probability_gap REAL,              -- classifiers: largest |p_primary - p_shadow|
    abs_diff REAL,                     -- regressors: largest |primary - shadow|
    rel_diff REAL,                     -- regressors: abs_diff / max(|primary|, eps)
    primary_ms REAL NOT NULL,
    shadow_ms REAL,
    shadow_error TEXT,                 -- the shadow failed or timed out: why
    created REAL NOT NULL,
    PRIMARY KEY (model, request_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS comparisons_pair ON comparisons (model, primary_version, shadow_version);
CREATE INDEX IF NOT EXISTS comparisons_created ON comparisons (created);

CREATE TABLE IF NOT EXISTS feedback (
    model TEXT NOT NULL,
    request_id TEXT NOT NULL,
    label TEXT NOT NULL,               -- JSON: a class index or a value per row
    source TEXT NOT NULL,              -- 'client' or 'reviewer:<name>'
    created REAL NOT NULL,
    PRIMARY KEY (model, request_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS feedback_created ON feedback (created);

CREATE TABLE IF NOT EXISTS review_items (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    request_id TEXT NOT NULL,
    reason TEXT NOT NULL,              -- 'low_confidence' or 'disagreement'
    version TEXT NOT NULL,
    shadow_version TEXT,
    inputs TEXT NOT NULL,              -- JSON: name -> {datatype, shape, data}
    primary_answer TEXT NOT NULL,      -- JSON: name -> {datatype, shape, data}
    shadow_answer TEXT,
    confidence REAL,
    status TEXT NOT NULL DEFAULT 'pending',
    label TEXT,
    reviewer TEXT,
    created REAL NOT NULL,
    labelled REAL,
    UNIQUE (model, request_id, reason)
);
CREATE INDEX IF NOT EXISTS review_items_queue ON review_items (status, model, id);
CREATE INDEX IF NOT EXISTS review_items_created ON review_items (created);

CREATE TABLE IF NOT EXISTS promotions (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL,
    action TEXT NOT NULL,              -- 'promote' or 'rollback'
    from_version TEXT,
    to_version TEXT NOT NULL,
    forced INTEGER NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    gate TEXT,                         -- JSON: each condition, its value and whether it passed
    created REAL NOT NULL
);
"""

# Observed records are (table, row) pairs, written with INSERT OR IGNORE, many rows a
# statement: one call into SQLite, which releases the GIL once for it, where
# ``executemany`` releases and takes it back around every row. A flush of 1,000
# predictions, rows built and inserted: 3.8-3.9 -> 3.1-3.4 µs a record (``bench/
# request_cost.py --store`` on one core, three alternating runs); at 64 connections over
# HTTP no change was measurable (``bench/ab.py``: 0.99x, six rounds that spread from 0.80x
# to 1.35x).
_COLUMNS = {  # each table's column list in its insert ("": all of them, in order)
    "predictions": "",
    "comparisons": "",
    "review_items": (
        " (model, request_id, reason, version, shadow_version, inputs, primary_answer, "
        "shadow_answer, confidence, created)"
    ),
    "promotions": (
        " (model, action, from_version, to_version, forced, actor, reason, gate, created)"
    ),
}
_MAX_VARIABLES = 999
"""Parameters one statement may have in any SQLite (999 before 3.32, 32,766 since): past
``GIVE_WAY_RECORDS`` a statement inserts as many rows as that allows."""


@functools.cache
def _insert_sql(table: str, rows: int, width: int) -> str:
    """INSERT OR IGNORE of ``rows`` rows of ``width`` values into ``table`` (cached by
    sqlite3, by its text)."""
    row = "(" + ", ".join("?" * width) + ")"
    return f"INSERT OR IGNORE INTO {table}{_COLUMNS[table]} VALUES " + ", ".join([row] * rows)


# Retention applies to everything but the promotion records, which are history.
_RETAINED = ("predictions", "comparisons", "feedback", "review_items")


class UnknownRequest(LookupError):
    """Feedback for a request id with no recorded prediction."""


@dataclass(frozen=True, slots=True)
class FeedbackResult:
    outcome: str  # 'recorded', 'unchanged' (the same label again) or 'updated'
    version: str
    predicted_at: float = 0.0
    """When the labelled prediction was made (Unix time): the label's delay is now minus it."""


class ReviewStore:
    """The SQLite file at ``path`` and the one thread that uses it."""

    def __init__(
        self,
        path: Path,
        *,
        retention_days: float = 7.0,
        flush_interval_s: float = FLUSH_INTERVAL_S,
        max_buffered: int = 100_000,
        prune: bool = True,
        busy_timeout_s: float = 5.0,
        busy: Callable[[], bool] | None = None,
    ) -> None:
        """``busy``: whether the server has many requests in flight now (read from the
        store's thread; see ``HOLD_S``). None: never."""
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        """How long a write waits for the file's lock that another process (a sibling
        worker) holds, before it fails (observed records: kept for the next flush)."""
        self.prune_every_s = 60.0 if prune else None
        """How often records past the retention are deleted (None: never; of several
        workers sharing the file, one prunes it)."""
        self.retention_s = retention_days * 86400.0
        self.flush_interval_s = flush_interval_s
        self.max_buffered = max_buffered
        self.dropped = 0
        """Observed records dropped because the buffer was full."""
        self._buffer: list[tuple[str, tuple[Any, ...]]] = []
        self._unwritten: dict[str, list[tuple[Any, ...]]] = {}
        """Rows of a flush that failed (the database locked past the busy timeout by another
        worker, a full disk): written first by the next flush (only the store's thread)."""
        self._owed: list[tuple[str, tuple[Any, ...]]] = []
        """Rows of changes already made whose own write failed (``owe``): every flush
        writes them until one succeeds, and they are never dropped (one per change)."""
        self._busy = busy or _never
        self._buffer_lock = threading.Lock()  # noted from the loop, taken by the writer
        self._sources: list[tuple[str, Callable[[int], list[tuple[Any, ...]]]]] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastserve-store")
        self._db: sqlite3.Connection | None = None
        self._flusher: asyncio.Task[None] | None = None

    # -- life cycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Create or open the database (raises OSError / sqlite3.Error) and start flushing."""
        await self._call(self._open)
        self._flusher = asyncio.get_running_loop().create_task(self._flush_periodically())
        log.info("review store: %s (retention %.1f days)", self.path, self.retention_s / 86400)

    async def close(self) -> None:
        """Write what is buffered and close the database."""
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        if self._db is not None:
            await self._call(self._close)
        self._executor.shutdown(wait=True)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # first: several workers (``fastserve.workers``) open the file at once, and the
        # next statements need its lock
        db.execute(f"PRAGMA busy_timeout={round(self.busy_timeout_s * 1000)}")
        # Where two of them upgrade their locks at once, SQLite refuses one at once instead
        # of waiting (it would deadlock): a fresh file opened by four processes together
        # failed so in 16 of 30 tries. The set-up is idempotent, so it is tried again.
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                self._set_up(db)
                break
            except sqlite3.OperationalError as exc:
                if not _locked(exc) or time.monotonic() > deadline:
                    db.close()
                    raise
                time.sleep(random.uniform(0.005, 0.05))  # (apart, so that one goes first)
            except BaseException:
                db.close()
                raise
        self._db = db

    def _set_up(self, db: sqlite3.Connection) -> None:
        """WAL, the pragmas, and the schema (created where missing)."""
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version not in (0, SCHEMA_VERSION):
            raise sqlite3.DatabaseError(
                f"{self.path}: schema version {version}, this fastserve knows {SCHEMA_VERSION}"
            )
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _close(self) -> None:
        """Write what waits, then close; a last write that fails (the file locked past the
        busy timeout, a full disk) is logged with what it loses, and the store still
        closes, so that the server stops."""
        try:
            self._flush()
        except sqlite3.Error as exc:
            log.error("review store: closing without writing %d record(s): %s",
                      self.waiting(), exc)  # fmt: skip
            for table, row in self._owed:  # changes already made: their records, in the log
                log.error("review store: unwritten %s record: %r", table, row)
        assert self._db is not None
        self._db.close()
        self._db = None

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _ask(self, fn: Callable[..., T], *args: Any) -> T:
        """``_call`` for what a client waits on: a file still locked by another connection
        after ``busy_timeout_s`` raises StoreBusy (503, retry) instead of SQLite's error."""
        try:
            return await self._call(fn, *args)
        except sqlite3.OperationalError as exc:
            if not _locked(exc):
                raise
            raise StoreBusy(
                f"the review store is busy: another process has held {self.path.name}'s "
                f"lock for over {self.busy_timeout_s:g} s; retry later"
            ) from exc

    # -- observed records (buffered) --------------------------------------------------------

    def note(self, table: str, row: tuple[Any, ...]) -> None:
        """Queue one observed record for the next flush (never blocks)."""
        with self._buffer_lock:
            if len(self._buffer) >= self.max_buffered:
                self.dropped += 1
                return
            self._buffer.append((table, row))

    def owe(self, table: str, row: tuple[Any, ...]) -> None:
        """Have the next flushes write ``row`` until one succeeds: the record of a change
        that was made although its write failed (never dropped, unlike ``note``)."""
        with self._buffer_lock:
            self._owed.append((table, row))

    def waiting(self) -> int:
        """Records noted (``note``) or owed (``owe``) and not yet written; a source counts
        its own."""
        unwritten = sum(len(rows) for rows in self._unwritten.values())
        return len(self._buffer) + len(self._owed) + unwritten

    def add_source(self, table: str, drain: Callable[[int], list[tuple[Any, ...]]]) -> None:
        """Have each flush also write the rows ``drain(limit)`` returns (called on the
        store's thread until it returns none): for a producer that turns many records into
        rows at once, at most ``limit`` records a call."""
        self._sources.append((table, drain))

    async def flush(self) -> None:
        await self._ask(self._flush)

    def _flush(self) -> None:
        with self._buffer_lock:
            items, self._buffer = self._buffer, []
        if self._db is None:
            return
        with self._buffer_lock:
            owed, self._owed = self._owed, []
        db = self._db
        rows, self._unwritten = self._unwritten, {}
        turns = _Turns(self._busy)
        drained = 0
        for table, drain in self._sources:
            # at most max_buffered rows a source a flush: records that keep arriving while
            # it drains wait for the next flush, so a flush always ends
            for _ in range(-(-self.max_buffered // PIECE)):
                produced = drain(PIECE)
                if not produced:
                    break
                rows.setdefault(table, []).extend(produced)
                drained += len(produced)
                if drained <= GIVE_WAY_RECORDS:
                    turns.piece_done()
        for table, row in items:
            rows.setdefault(table, []).append(row)
        if not rows and not owed:
            return
        written: dict[str, list[tuple[Any, ...]]] = {}
        for table, row in owed:  # first, in the order they were owed
            written.setdefault(table, []).append(row)
        for table, values in rows.items():
            written[table] = [*written.get(table, []), *values]
        if not owed:
            db.execute("PRAGMA synchronous=NORMAL")  # observed, not acknowledged: see above
        try:
            self._write(db, written, turns)
        except sqlite3.Error:
            with self._buffer_lock:
                self._owed[:0] = owed
            self._keep_unwritten(rows)
            raise
        finally:
            db.execute("PRAGMA synchronous=FULL")

    def _keep_unwritten(self, rows: dict[str, list[tuple[Any, ...]]]) -> None:
        """Keep the rows of a failed flush for the next one, the newest ``max_buffered`` of
        them (the rest are dropped and counted)."""
        room, unwritten = self.max_buffered, {}
        for table, values in rows.items():
            kept = values[-room:] if room > 0 else []
            self.dropped += len(values) - len(kept)
            room -= len(kept)
            if kept:
                unwritten[table] = kept
        self._unwritten = unwritten  # whole: the loop may be counting it (``waiting``)

    def _write(
        self, db: sqlite3.Connection, rows: dict[str, list[tuple[Any, ...]]], turns: _Turns
    ) -> None:
        """Insert ``rows`` (by table) in one transaction, giving way between pieces."""
        with _transaction(db):
            inserted = 0
            for table, values in rows.items():
                width = len(values[0])  # (every row of a table has its columns)
                start, most = 0, _MAX_VARIABLES // width
                while start < len(values):
                    size = PIECE if inserted < GIVE_WAY_RECORDS else most
                    piece = values[start : start + size]
                    sql = _insert_sql(table, len(piece), width)
                    db.execute(sql, list(chain.from_iterable(piece)))
                    start += len(piece)
                    inserted += len(piece)
                    if inserted <= GIVE_WAY_RECORDS:
                        turns.piece_done()

    async def _flush_periodically(self) -> None:
        last_prune = 0.0
        while True:
            await asyncio.sleep(self.flush_interval_s)
            try:
                await self._call(self._flush)
                every = self.prune_every_s
                if every is not None and time.monotonic() - last_prune > every:
                    last_prune = time.monotonic()
                    await self._call(self._prune, time.time() - self.retention_s)
            except sqlite3.Error as exc:  # a full disk must not stop serving
                log.error("review store: write failed: %s", exc)

    # -- retention --------------------------------------------------------------------------

    async def prune(self, older_than: float) -> int:
        """Delete retained records created before ``older_than`` (epoch seconds)."""
        return await self._ask(self._prune, older_than)

    def _prune(self, older_than: float) -> int:
        assert self._db is not None
        removed = 0
        with _transaction(self._db):
            for table in _RETAINED:
                cursor = self._db.execute(f"DELETE FROM {table} WHERE created < ?", (older_than,))
                removed += cursor.rowcount
        return removed

    # -- acknowledged records ---------------------------------------------------------------

    async def add_feedback(
        self, model: str, request_id: str, label: list[float | int], source: str
    ) -> FeedbackResult:
        """Record ground truth for a request (committed before this returns). Raises
        UnknownRequest when no prediction of ``model`` has that id."""
        return await self._ask(self._add_feedback, model, request_id, label, source)

    def _add_feedback(
        self, model: str, request_id: str, label: list[float | int], source: str
    ) -> FeedbackResult:
        self._flush()  # the prediction may still be in the buffer
        db = self._db
        assert db is not None
        text = json.dumps(label)
        with _transaction(db):
            found = db.execute(
                "SELECT version, created FROM predictions WHERE model = ? AND request_id = ? "
                "AND role = 'primary'",
                (model, request_id),
            ).fetchone()
            if found is None:
                raise UnknownRequest(request_id)
            old = db.execute(
                "SELECT label FROM feedback WHERE model = ? AND request_id = ?",
                (model, request_id),
            ).fetchone()
            if old is not None and old[0] == text:
                return FeedbackResult("unchanged", found[0], found[1])
            db.execute(
                "INSERT INTO feedback VALUES (?, ?, ?, ?, ?) ON CONFLICT (model, request_id) "
                "DO UPDATE SET label = excluded.label, source = excluded.source, "
                "created = excluded.created",
                (model, request_id, text, source, time.time()),
            )
        return FeedbackResult("recorded" if old is None else "updated", found[0], found[1])

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of one read (after a flush, so that what was noted is seen)."""
        return await self._ask(self._query, sql, tuple(params))

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        self._flush()
        assert self._db is not None
        return self._db.execute(sql, params).fetchall()

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` in one transaction on the store's thread (after a flush);
        committed before this returns."""
        return await self._ask(self._run, fn)

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        self._flush()
        assert self._db is not None
        with _transaction(self._db):
            return fn(self._db)


def _never() -> bool:
    return False


def _locked(exc: sqlite3.OperationalError) -> bool:
    """The file (or a table) was locked by another connection (SQLITE_BUSY, SQLITE_LOCKED)."""
    return "locked" in str(exc) or "busy" in str(exc)


class _Turns:
    """When one flush gives the core away: after every piece while the server is quiet,
    after ``HOLD_S`` of work while it is busy."""

    def __init__(self, busy: Callable[[], bool]) -> None:
        self._busy = busy
        self._since = time.perf_counter()

    def piece_done(self) -> None:
        if self._busy() and time.perf_counter() - self._since < HOLD_S:
            return
        _give_way()
        self._since = time.perf_counter()


def _give_way() -> None:
    """Let a thread that is ready to run (the event loop, woken by a request) have the core
    and the GIL before this thread goes on.

    Releasing the GIL is not enough where the server's threads share a core (the benchmarks
    pin the server to one): the woken loop also needs the CPU, which the scheduler gives it
    only when this thread's slice ends, and by then this thread has taken the GIL back. The
    loop then waited out most of each flush: at one connection the requests that overlapped
    one were the slowest 1 %. ``sched_yield`` hands the core over: p99 at one connection
    0.85-0.98 -> 0.42-0.46 ms, the same req/s (``bench/ab.py --connections 1``, four rounds).
    What it costs depends on the machine's state: in a slow hour of this VM (2026-12-07)
    writing straight on gave 1.12x the requests a second at one connection and the store's
    thread ran ~40 times a second instead of ~900 (``bench/ab.py --threads``, three rounds,
    1.08-1.14x each), while giving way only after 0.2 ms of work gave 0.93x in a faster one.
    """
    yield_core()


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on an exception (on an autocommit connection)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
