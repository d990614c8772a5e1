"""Shadow mirroring, the review queue, feedback and accuracy: what happens to an answer
after the client has it.

The infer route calls ``Review.observe`` once the primary has answered. It costs the
request little (reading the prediction, an optional confidence, one buffered record) and
never waits: mirroring to the shadow runs as its own task, bounded by the shadow's
``max_pending``, and its outcome is recorded when it comes.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import random
import sqlite3
import threading
import time
import weakref
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from fastserve.config import ModelConfig
from fastserve.errors import FastServeError, InvalidRequest, RecordNotFound, Unavailable
from fastserve.review.outcome import (
    NotInterpretable,
    Prediction,
    Reading,
    agreement_interval,
    compare,
)
from fastserve.review.store import ReviewStore, UnknownRequest

if TYPE_CHECKING:
    from fastserve.model import ServedModel
    from fastserve.monitoring.metrics import Metrics

log = logging.getLogger("fastserve.review")

LOW_CONFIDENCE = "low_confidence"
DISAGREEMENT = "disagreement"


class FeedbackRefused(InvalidRequest):
    """A feedback body that cannot be recorded (bad label, unknown request id)."""


@dataclass
class _Mirror:
    """Counters of one model's shadow traffic (the comparisons themselves are in the store)."""

    pending: int = 0
    dropped: int = 0
    errors: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def start(self, mirrored: Coroutine[Any, Any, None]) -> None:
        """Run one mirrored request as its own task (``pending`` until it ends)."""
        self.pending += 1
        task = asyncio.get_running_loop().create_task(mirrored)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class PredictionLog:
    """Predictions noted on the request path as (outputs, how to read them) and turned into
    rows on the store's thread, many at a time: the outputs of every noted request read the
    same way are stacked and read in one numpy call. Bounded; drops are counted."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.dropped = 0
        self.recorded: collections.Counter[tuple[str, str, str]] = collections.Counter()
        """Predictions written since the server started, by (model, role, version)."""
        self._items: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()

    def add(
        self,
        model: str,
        request_id: str,
        role: str,
        version: str,
        reading: Reading,
        outputs: list[npt.NDArray[Any]],
        confidence: float | None,
        latency_ms: float,
    ) -> None:
        item = (model, request_id, role, version, reading, outputs, confidence, latency_ms)
        with self._lock:
            if len(self._items) >= self.limit:
                self.dropped += 1
                return
            self._items.append((*item, time.time()))

    def waiting(self) -> int:
        """Records noted and not yet drained."""
        return len(self._items)

    def drain(self, limit: int | None = None) -> list[tuple[Any, ...]]:
        """Rows for the predictions table: the oldest ``limit`` records noted and not yet
        drained (None: all of them)."""
        with self._lock:
            if limit is None or len(self._items) <= limit:
                items, self._items = self._items, []
            else:
                items = self._items[:limit]
                del self._items[:limit]
        # Group the records that read the same way (the reading, the scores' shape: rows
        # included, so that a group of one-row records needs no slicing) and count them by
        # (model, role, version) in the same pass. Readings are few and long-lived: they are
        # told apart by identity, not by hashing their fields.
        groups: dict[tuple[str, str, str, int, tuple[int, ...]], list[int]] = {}
        for i, item in enumerate(items):
            reading = item[4]
            key = (item[0], item[2], item[3], id(reading), item[5][reading.scores].shape)
            members = groups.get(key)
            if members is None:
                groups[key] = [i]
            else:
                members.append(i)
        texts: list[str] = [""] * len(items)
        for key, members in groups.items():
            self.recorded[key[:3]] += len(members)
            reading = items[members[0]][4]
            scores = [items[i][5][reading.scores] for i in members]
            values = reading.predict_scores(np.concatenate(scores)).as_list()
            classifier = reading.task == "classifier"
            if len(values) == len(members):  # one row each, the common case
                for i, value in zip(members, values, strict=True):
                    # class indexes are ints: their JSON is cheap to write by hand
                    texts[i] = f"[{value}]" if classifier else json.dumps([value])
                continue
            start = 0
            for i, part in zip(members, scores, strict=True):
                end = start + len(part)
                chunk = values[start:end]
                texts[i] = f"[{','.join(map(str, chunk))}]" if classifier else json.dumps(chunk)
                start = end
        return [
            (model, request_id, role, version, texts[i], confidence, latency_ms, created)
            for i, (model, request_id, role, version, _, _, confidence, latency_ms, created) in (
                enumerate(items)
            )
        ]


def tensor_doc(array: npt.NDArray[Any]) -> dict[str, Any]:
    """A tensor as JSON for a reviewer. Floats narrower than 64 bits are written as their
    shortest decimal (14.99, not the 14.989999771118164 a float64 conversion shows)."""
    if array.dtype in (np.float16, np.float32):
        data = np.array([float(str(v)) for v in array.ravel()]).reshape(array.shape).tolist()
    else:
        data = array.tolist()
    return {"datatype": str(array.dtype), "shape": list(array.shape), "data": data}


class Review:
    """Per-server: the store, and per model the shadow mirror's counters."""

    def __init__(self, store: ReviewStore, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics
        self.predictions = PredictionLog(store.max_buffered)
        store.add_source("predictions", self.predictions.drain)
        self._mirrors: dict[str, _Mirror] = {}
        # per loaded version, forgotten with it (a weak key: no id() that could be reused)
        self._readings: weakref.WeakKeyDictionary[ServedModel, Reading | None] = (
            weakref.WeakKeyDictionary()
        )
        self._random = random.Random()
        self._metrics_refreshed = 0.0
        self._labelled: collections.Counter[tuple[str, str]] = collections.Counter()
        """Predictions labelled since the server started, by (model, version)."""
        self._pending_items: dict[str, int] = {}
        """Unlabelled review items per model, queued or stored (bounded by max_pending)."""

    def observed_waiting(self) -> int:
        """Observed records (predictions, comparisons, review items) not yet written."""
        return self.store.waiting() + self.predictions.waiting()

    def observed_dropped(self) -> int:
        """Observed records dropped since the server started: the buffer was full."""
        return self.store.dropped + self.predictions.dropped

    async def open(self) -> None:
        await self.store.open()
        await self._count_pending()

    async def _count_pending(self) -> None:
        rows = await self.store.query(
            "SELECT model, count(*) FROM review_items WHERE status = 'pending' GROUP BY model"
        )
        self._pending_items = {str(model): int(n) for model, n in rows}

    async def close(self) -> None:
        """Let running mirrors finish (they are bounded by their timeout), then close."""
        tasks = [t for m in self._mirrors.values() for t in m.tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        await self.store.close()

    # -- the hot path --------------------------------------------------------------------

    def reading(self, model: ServedModel) -> Reading | None:
        """How to read ``model``'s outputs (None: it is neither classifier nor regressor)."""
        try:
            return self._readings[model]  # (one weak-key lookup a request)
        except KeyError:
            pass
        reading: Reading | None = None
        try:
            reading = Reading.of(model.signature, model.config.task)
        except NotInterpretable as exc:
            log.warning("model %s: predictions are not recorded: %s", model.label, exc)
        self._readings[model] = reading
        return reading

    def observe(
        self,
        config: ModelConfig,
        model: ServedModel,
        shadow: ServedModel | None,
        request_id: str,
        arrays: list[npt.NDArray[Any]],
        outputs: list[npt.NDArray[Any]],
        latency_ms: float,
    ) -> dict[str, Any]:
        """Record the primary's answer, flag it for review, maybe mirror it; returns the
        response parameters to add (the review flag)."""
        review = config.review
        threshold = review.confidence_threshold
        settings = config.shadow
        mirrored = (
            shadow is not None
            and settings is not None
            and (settings.sample_rate >= 1.0 or self._random.random() < settings.sample_rate)
        )
        if not (review.record_predictions or mirrored or threshold is not None):
            return {}
        reading = self.reading(model)
        if reading is None:
            return {}
        # The common case costs the request one buffered tuple: the prediction is read out
        # of the outputs on the store's thread. It is read here only when needed now.
        prediction = reading.predict(outputs) if threshold is not None or mirrored else None
        confidence = None
        if prediction is not None and threshold is not None:
            confidence = prediction.confidence(review.confidence_measure)
        if review.record_predictions or mirrored:
            self.predictions.add(
                model.name,
                request_id,
                "primary",
                model.version,
                reading,
                outputs,
                confidence,
                latency_ms,
            )
        parameters: dict[str, Any] = {}
        if threshold is not None and confidence is not None and confidence < threshold:
            parameters["review"] = LOW_CONFIDENCE
            parameters["confidence"] = round(confidence, 6)
            self._queue_item(
                model.name,
                request_id,
                LOW_CONFIDENCE,
                model.version,
                None,
                arrays,
                model,
                outputs,
                None,
                confidence,
                review.max_pending,
            )
        if mirrored:
            assert shadow is not None and settings is not None and prediction is not None
            mirror = self._mirrors.setdefault(model.name, _Mirror())
            if mirror.pending >= settings.max_pending:
                mirror.dropped += 1
                self.metrics.shadow_dropped(model.name)
            else:
                mirror.start(
                    self._mirror(
                        mirror, config, model, shadow, request_id, arrays, outputs, prediction,
                        latency_ms,
                    )
                )  # fmt: skip
        return parameters

    async def _mirror(
        self,
        mirror: _Mirror,
        config: ModelConfig,
        model: ServedModel,
        shadow: ServedModel,
        request_id: str,
        arrays: list[npt.NDArray[Any]],
        outputs: list[npt.NDArray[Any]],
        prediction: Prediction,
        primary_ms: float,
    ) -> None:
        assert config.shadow is not None
        name = model.name
        shadow.inflight += 1  # keeps the shadow from being unloaded under this request
        started = time.perf_counter_ns()
        shadow_ms: float | None = None
        error: str | None = None
        shadow_outputs: list[npt.NDArray[Any]] = []
        try:
            completion = await asyncio.wait_for(
                shadow.batcher.infer(arrays), config.shadow.timeout_ms / 1000.0
            )
            shadow_outputs = completion.outputs
            shadow_ms = (time.perf_counter_ns() - started) / 1e6
        except TimeoutError:
            error = f"no answer within {config.shadow.timeout_ms} ms"
        except FastServeError as exc:
            error = str(exc)
        except Exception as exc:  # a shadow must never hurt the primary's path
            error = f"{exc.__class__.__name__}: {exc}"
        finally:
            shadow.inflight -= 1
            mirror.pending -= 1
        shadow_reading = self.reading(shadow)
        if error is None and shadow_reading is None:
            error = "the shadow's outputs cannot be read as a prediction"
        if error is not None:
            mirror.errors += 1
            self.metrics.shadow_compared(name, "error", primary_ms, None)
            self.store.note(
                "comparisons",
                (name, request_id, model.version, shadow.version, None, None, None, None,
                 primary_ms, None, error[:500], time.time()),
            )  # fmt: skip
            return
        assert shadow_reading is not None and shadow_ms is not None
        shadow_prediction = shadow_reading.predict(shadow_outputs)
        result = compare(prediction, shadow_prediction)
        verdict = "agree" if result.agree is not False else "disagree"
        self.metrics.shadow_compared(name, verdict, primary_ms, shadow_ms)
        self.store.note(
            "comparisons",
            (name, request_id, model.version, shadow.version,
             None if result.agree is None else int(result.agree), result.probability_gap,
             result.abs_diff, result.rel_diff, primary_ms, shadow_ms, None, time.time()),
        )  # fmt: skip
        self.predictions.add(
            name,
            request_id,
            "shadow",
            shadow.version,
            shadow_reading,
            shadow_outputs,
            shadow_prediction.confidence(config.review.confidence_measure),
            shadow_ms,
        )
        sample = config.review.disagreement_sample_rate
        if result.agree is False and (sample >= 1.0 or self._random.random() < sample):
            self._queue_item(
                name,
                request_id,
                DISAGREEMENT,
                model.version,
                shadow.version,
                arrays,
                model,
                outputs,
                shadow_outputs,
                prediction.confidence(config.review.confidence_measure),
                config.review.max_pending,
            )

    def _queue_item(
        self,
        name: str,
        request_id: str,
        reason: str,
        version: str,
        shadow_version: str | None,
        arrays: list[npt.NDArray[Any]],
        model: ServedModel,
        outputs: list[npt.NDArray[Any]],
        shadow_outputs: list[npt.NDArray[Any]] | None,
        confidence: float | None,
        limit: int,
    ) -> None:
        if self._pending_items.get(name, 0) >= limit:
            self.metrics.review_dropped(name)
            return
        self._pending_items[name] = self._pending_items.get(name, 0) + 1
        signature = model.signature

        def tensors(specs: Any, values: list[npt.NDArray[Any]]) -> str:
            return json.dumps(
                {s.name: tensor_doc(np.asarray(v)) for s, v in zip(specs, values, strict=True)}
            )

        self.store.note(
            "review_items",
            (
                name,
                request_id,
                reason,
                version,
                shadow_version,
                tensors(model.accepts.inputs, arrays),
                tensors(signature.outputs, outputs),
                None if shadow_outputs is None else tensors(signature.outputs, shadow_outputs),
                confidence,
                time.time(),
            ),
        )
        self.metrics.review_queued(name, reason)

    # -- feedback and accuracy -----------------------------------------------------------

    async def feedback(
        self,
        model: ServedModel,
        config: ModelConfig,
        request_id: Any,
        label: Any,
        source: str = "client",
    ) -> dict[str, Any]:
        """Record ``label`` (a class index or value, or one per row) for a request id."""
        if type(request_id) is not str or not 0 < len(request_id) <= 256:
            raise FeedbackRefused("'id' must be the request id, a string of 1..256 characters")
        reading = self.reading(model)
        if reading is None:
            raise FeedbackRefused(f"model '{model.name}' records no predictions to label")
        if not config.review.record_predictions:
            raise FeedbackRefused(
                f"model '{model.name}' records no predictions (review.record_predictions is false)"
            )
        labels = label if isinstance(label, list) else [label]
        if not labels or not all(_is_label(v, reading.task) for v in labels):
            kind = "class indexes (integers)" if reading.task == "classifier" else "numbers"
            raise FeedbackRefused(f"'label' must be one of {kind}, or a list of them per row")
        try:
            result = await self.store.add_feedback(model.name, request_id, labels, source)
        except UnknownRequest:
            raise RecordNotFound(
                f"no prediction of model '{model.name}' has id '{request_id[:80]}' "
                "(or it is past retention)"
            ) from None
        except sqlite3.Error as exc:
            log.error("review store: feedback not recorded: %s", exc)
            raise Unavailable("feedback not recorded: the review store failed") from None
        if result.outcome != "unchanged":
            self.metrics.feedback(model.name, result.outcome)
        if result.outcome == "recorded":
            self.metrics.label_delay(model.name, max(0.0, time.time() - result.predicted_at))
            self._labelled[model.name, result.version] += 1
        return {"id": request_id, "model_name": model.name, "recorded": result.outcome}

    async def accuracy(self, name: str) -> dict[str, dict[str, Any]]:
        """Per (role, version): labelled requests and accuracy (classifiers: share of rows
        right; regressors: mean absolute and root mean squared error) over every label kept,
        with ``windows`` (the last 1,000 labelled requests, the labels of the last hour),
        ``coverage`` (labelled / recorded predictions) and the median label delay."""
        return await self._accuracy(name, count_recorded=True)

    async def _accuracy(self, name: str, *, count_recorded: bool) -> dict[str, dict[str, Any]]:
        """``accuracy``, computed on the store's thread (the labels are parsed there, not on
        the event loop); without ``count_recorded`` (every scrape) the predictions are not
        counted, which scans them all, and the entries have no coverage."""

        def compute(db: sqlite3.Connection) -> dict[str, dict[str, Any]]:
            rows = db.execute(
                "SELECT p.role, p.version, p.prediction, f.label, f.created, p.created "
                "FROM feedback f "
                "JOIN predictions p ON p.model = f.model AND p.request_id = f.request_id "
                "WHERE f.model = ? ORDER BY f.created DESC",
                (name,),
            ).fetchall()
            recorded: dict[tuple[str, str], int] = {}
            if count_recorded:
                counts = db.execute(
                    "SELECT role, version, COUNT(*) FROM predictions WHERE model = ? "
                    "GROUP BY role, version",
                    (name,),
                ).fetchall()
                recorded = {(role, version): n for role, version, n in counts}
            return accuracy_windows(rows, recorded, time.time())

        return await self.store.run(compute)

    async def refresh_metrics(self, names: set[str], every_s: float = 15.0) -> None:
        """Set the accuracy gauges from the store (at most once per ``every_s``; called when
        Prometheus scrapes)."""
        now = time.monotonic()
        if now - self._metrics_refreshed < every_s:
            return
        self._metrics_refreshed = now
        for name in sorted(names):
            try:
                entries = await self._accuracy(name, count_recorded=False)
            except (sqlite3.Error, Unavailable) as exc:
                # the scrape still gets every other metric, and these gauges their last
                # values: one wait on a locked file per scrape, not one per model
                log.warning("accuracy gauges not refreshed: %s", exc)
                break
            self.metrics.model_accuracy(name, list(entries.values()))
        # coverage since the server started, from counters (no scan of the predictions)
        for (model, role, version), recorded in list(self.predictions.recorded.items()):
            if role == "primary" and recorded:
                labelled = self._labelled[model, version]
                self.metrics.coverage.labels(model, version, role).set(labelled / recorded)

    async def shadow_summary(self, name: str, config: ModelConfig, primary: str) -> dict[str, Any]:
        shadow = config.shadow
        mirror = self._mirrors.get(name, _Mirror())
        doc: dict[str, Any] = {
            "model_name": name,
            "primary_version": primary,
            "shadow_version": None if shadow is None else str(shadow.version),
            "pending": mirror.pending,
            "dropped": mirror.dropped,
        }
        if shadow is None:
            return doc
        pair = (name, primary, str(shadow.version))
        rows = await self.store.query(
            "SELECT agree, probability_gap, abs_diff, rel_diff, primary_ms, shadow_ms, "
            "shadow_error FROM comparisons WHERE model = ? AND primary_version = ? "
            "AND shadow_version = ?",
            pair,
        )
        doc.update(summarize_comparisons(rows))
        labelled = await self.store.query(
            "SELECT p.role, p.version, p.prediction, f.label FROM comparisons c "
            "JOIN predictions p ON p.model = c.model AND p.request_id = c.request_id "
            "JOIN feedback f ON f.model = c.model AND f.request_id = c.request_id "
            "WHERE c.model = ? AND c.primary_version = ? AND c.shadow_version = ? "
            "AND c.shadow_error IS NULL",
            pair,
        )
        doc["accuracy_on_compared"] = summarize_accuracy(labelled)
        return doc

    # -- promotion ------------------------------------------------------------------------

    async def gate(self, name: str, config: ModelConfig, primary: str) -> list[dict[str, Any]]:
        """Each condition of the model's promotion gate: what it requires, what the shadow
        shows, and whether it passes."""
        gate = config.promotion
        summary = await self.shadow_summary(name, config, primary)
        conditions: list[dict[str, Any]] = []

        def add(condition: str, required: str, actual: Any, passed: bool) -> None:
            conditions.append(
                {"name": condition, "required": required, "actual": actual, "passed": passed}
            )

        compared = summary.get("compared", 0)
        add("compared", f">= {gate.min_compared}", compared, compared >= gate.min_compared)
        agreement = summary.get("agreement")
        if agreement is not None:
            add("agreement", f">= {gate.min_agreement}", agreement, agreement >= gate.min_agreement)
        roles = {e["role"]: e for e in summary.get("accuracy_on_compared", {}).values()}
        labelled = min((e["labelled"] for e in roles.values()), default=0)
        if len(roles) < 2:
            labelled = 0
        add("labelled", f">= {gate.min_labelled}", labelled, labelled >= gate.min_labelled)
        if labelled:
            ours, theirs = roles["shadow"]["value"], roles["primary"]["value"]
            if roles["shadow"]["metric"] == "accuracy":
                required = f">= primary {theirs:.4f} - {gate.max_accuracy_drop}"
                passed = ours >= theirs - gate.max_accuracy_drop
            else:  # mean absolute error: lower is better
                required = f"<= primary {theirs:.4f} x (1 + {gate.max_accuracy_drop})"
                passed = ours <= theirs * (1 + gate.max_accuracy_drop)
            add(roles["shadow"]["metric"], required, ours, passed)
        latency = summary.get("latency", {})
        ours = latency.get("shadow", {}).get("p99_ms")
        theirs = latency.get("primary", {}).get("p99_ms")
        if ours is None or theirs is None:
            add("p99_latency", "measured on compared requests", None, False)
        else:
            limit = theirs * (1 + gate.max_p99_regression)
            add("p99_latency_ms", f"<= {limit:.4f} (primary {theirs} x (1 + "
                f"{gate.max_p99_regression}))", ours, ours <= limit)  # fmt: skip
        return conditions

    async def record_change(
        self,
        name: str,
        action: str,
        from_version: str | None,
        to_version: str,
        *,
        forced: bool,
        actor: str,
        reason: str,
        gate: list[dict[str, Any]] | None,
    ) -> int | None:
        """Record a promotion or rollback, already made (committed before this returns);
        its id. None: the store could not write it now (locked past its busy timeout, a full
        disk), and writes it at its next flushes instead, until one succeeds."""
        row = (name, action, from_version, to_version, int(forced), actor, reason,
               None if gate is None else json.dumps(gate), time.time())  # fmt: skip

        def insert(db: sqlite3.Connection) -> int:
            cursor = db.execute(
                "INSERT INTO promotions (model, action, from_version, to_version, forced, "
                "actor, reason, gate, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            return int(cursor.lastrowid or 0)

        try:
            return await self.store.run(insert)
        except (sqlite3.Error, Unavailable) as exc:
            # the change is made: answering an error would have the client retry it, and
            # its record must not be lost with this write
            log.error("review store: %s of '%s' to %s recorded late: %s", action, name,
                      to_version, exc)  # fmt: skip
            self.store.owe("promotions", row)
            return None

    async def changes(self, name: str, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self.store.query(
            "SELECT id, action, from_version, to_version, forced, actor, reason, gate, created "
            "FROM promotions WHERE model = ? ORDER BY id DESC LIMIT ?",
            (name, limit),
        )
        keys = ("id", "action", "from_version", "to_version", "forced", "actor", "reason")
        return [
            {
                **dict(zip(keys, row[:7], strict=True)),
                "forced": bool(row[4]),
                "gate": None if row[7] is None else json.loads(row[7]),
                "created": row[8],
            }
            for row in rows
        ]

    # -- the review queue ---------------------------------------------------------------

    async def items(
        self, model: str | None, status: str, limit: int, after: int = 0
    ) -> list[dict[str, Any]]:
        """Queue items (oldest first), without their tensors."""
        if status not in ("pending", "labelled", "all"):
            raise InvalidRequest("'status' must be pending, labelled or all")
        await self._count_pending()  # retention may have removed some
        clauses: list[str] = ["id > ?"]
        params: list[Any] = [after]
        if status != "all":
            clauses.append("status = ?")
            params.append(status)
        if model is not None:
            clauses.append("model = ?")
            params.append(model)
        rows = await self.store.query(
            f"SELECT {_ITEM_SUMMARY} FROM review_items WHERE {' AND '.join(clauses)} "
            "ORDER BY id LIMIT ?",
            (*params, limit),
        )
        return [_item_doc(row) for row in rows]

    async def item(self, item_id: int) -> dict[str, Any]:
        rows = await self.store.query(
            f"SELECT {_ITEM_SUMMARY}, inputs, primary_answer, shadow_answer "
            "FROM review_items WHERE id = ?",
            (item_id,),
        )
        if not rows:
            raise RecordNotFound(f"no review item {item_id}")
        *summary, inputs, primary_answer, shadow_answer = rows[0]
        doc = _item_doc(tuple(summary))
        doc["inputs"] = json.loads(inputs)
        doc["primary_answer"] = json.loads(primary_answer)
        doc["shadow_answer"] = None if shadow_answer is None else json.loads(shadow_answer)
        return doc

    async def label_item(
        self, item_id: int, label: Any, reviewer: Any, reading: Reading | None
    ) -> dict[str, Any]:
        """Label a queue item; the label is feedback for its request too (one transaction)."""
        if type(reviewer) is not str or not 0 < len(reviewer) <= 100:
            raise InvalidRequest("'reviewer' must be a name of 1..100 characters")
        labels = label if isinstance(label, list) else [label]
        task = None if reading is None else reading.task
        if not labels or not all(_is_label(v, task) for v in labels):
            raise InvalidRequest("'label' must be a class index or a value (or one per row)")
        text = json.dumps(labels)

        def apply(db: sqlite3.Connection) -> str:
            row = db.execute(
                "SELECT model, request_id FROM review_items WHERE id = ?", (item_id,)
            ).fetchone()
            if row is None:
                raise RecordNotFound(f"no review item {item_id}")
            now = time.time()
            db.execute(
                "UPDATE review_items SET status = 'labelled', label = ?, reviewer = ?, "
                "labelled = ? WHERE id = ?",
                (text, reviewer, now, item_id),
            )
            db.execute(
                "INSERT INTO feedback VALUES (?, ?, ?, ?, ?) ON CONFLICT (model, request_id) "
                "DO UPDATE SET label = excluded.label, source = excluded.source, "
                "created = excluded.created",
                (row[0], row[1], text, f"reviewer:{reviewer}", now),
            )
            return str(row[0])

        model = await self.store.run(apply)
        self.metrics.feedback(model, "reviewed")
        await self._count_pending()
        return await self.item(item_id)


_ITEM_SUMMARY = (
    "id, model, request_id, reason, version, shadow_version, confidence, status, label, "
    "reviewer, created, labelled"
)


def _item_doc(row: tuple[Any, ...]) -> dict[str, Any]:
    keys = [k.strip() for k in _ITEM_SUMMARY.split(",")]
    doc = dict(zip(keys, row, strict=True))
    if doc["label"] is not None:
        doc["label"] = json.loads(doc["label"])
    return doc


def _is_label(value: Any, task: str | None) -> bool:
    """A class index for a classifier, a finite number for a regressor (either: unknown)."""
    if type(value) is int:
        return value >= 0 or task == "regressor"
    return task != "classifier" and type(value) is float and math.isfinite(value)


LAST_LABELLED: Final = 1000
"""Window ``last_1000``: the latest labelled requests of each version and role."""
RECENT_S: Final = 3600.0
"""Window ``1h``: the labels received in the last hour."""


def accuracy_windows(
    rows: list[tuple[Any, ...]], recorded: dict[tuple[str, str], int], now: float
) -> dict[str, dict[str, Any]]:
    """``summarize_accuracy`` of (role, version, prediction, label, labelled at, predicted
    at) rows, newest label first, with each entry's windows, coverage and label delay."""
    summary = summarize_accuracy([r[:4] for r in rows])
    groups: dict[str, list[tuple[Any, ...]]] = {}
    for row in rows:
        groups.setdefault(f"{row[0]}:{row[1]}", []).append(row)
    for key, entry in summary.items():
        mine = groups[key]
        last = mine[:LAST_LABELLED]
        recent = [r for r in mine if r[4] >= now - RECENT_S]
        entry["windows"] = {
            name: _window_doc(summarize_accuracy([r[:4] for r in part]).get(key))
            for name, part in (("last_1000", last), ("1h", recent))
        }
        made = recorded.get((entry["role"], entry["version"]), 0)
        entry["coverage"] = entry["labelled"] / made if made else None
        entry["label_delay_p50_s"] = float(np.median([r[4] - r[5] for r in mine]))
    return summary


def _window_doc(entry: dict[str, Any] | None) -> dict[str, Any]:
    if entry is None:
        return {"labelled": 0, "rows": 0, "value": None}
    keys = ("labelled", "rows", "metric", "value", "root_mean_squared_error")
    return {k: entry[k] for k in keys if k in entry}


def summarize_accuracy(rows: list[tuple[Any, ...]]) -> dict[str, dict[str, Any]]:
    tally: dict[str, dict[str, Any]] = {}
    for role, version, prediction_text, label_text in rows:
        prediction, label = json.loads(prediction_text), json.loads(label_text)
        if len(prediction) != len(label):
            continue  # a label per row was asked for
        entry = tally.setdefault(
            f"{role}:{version}",
            {"role": role, "version": version, "labelled": 0, "rows": 0, "_sum": 0.0},
        )
        entry["labelled"] += 1
        entry["rows"] += len(label)
        if all(type(v) is int for v in prediction):
            entry["_sum"] += sum(int(p == y) for p, y in zip(prediction, label, strict=True))
            entry["metric"] = "accuracy"
        else:
            pairs = list(zip(prediction, label, strict=True))
            entry["_sum"] += sum(abs(p - y) for p, y in pairs)
            entry["_squares"] = entry.get("_squares", 0.0) + sum((p - y) ** 2 for p, y in pairs)
            entry["metric"] = "mean_absolute_error"
    for entry in tally.values():
        total = entry.pop("_sum")
        squares = entry.pop("_squares", None)
        entry["value"] = total / entry["rows"] if entry["rows"] else None
        if squares is not None and entry["rows"]:
            entry["root_mean_squared_error"] = math.sqrt(squares / entry["rows"])
    return tally


def summarize_comparisons(rows: list[tuple[Any, ...]]) -> dict[str, Any]:
    compared = [r for r in rows if r[6] is None]
    errors = len(rows) - len(compared)
    agreed = sum(1 for r in compared if r[0] == 1)
    judged = [r for r in compared if r[0] is not None]
    low, high = agreement_interval(agreed, len(judged))
    primary_ms = np.array([r[4] for r in compared], dtype=np.float64)
    shadow_ms = np.array([r[5] for r in compared], dtype=np.float64)

    def latency(values: npt.NDArray[np.float64]) -> dict[str, float | None]:
        if not len(values):
            return {"p50_ms": None, "p99_ms": None}
        return {
            "p50_ms": round(float(np.percentile(values, 50)), 4),
            "p99_ms": round(float(np.percentile(values, 99)), 4),
        }

    doc: dict[str, Any] = {
        "compared": len(compared),
        "shadow_errors": errors,
        "agreement": agreed / len(judged) if judged else None,
        "agreement_ci95": [low, high] if judged else None,
        "disagreements": len(judged) - agreed,
        "latency": {"primary": latency(primary_ms), "shadow": latency(shadow_ms)},
    }
    diffs = [r[2] for r in compared if r[2] is not None]
    if diffs:
        doc["abs_diff"] = {"mean": float(np.mean(diffs)), "max": float(np.max(diffs))}
        doc["rel_diff"] = {"mean": float(np.mean([r[3] for r in compared if r[3] is not None]))}
    gaps = [r[1] for r in compared if r[1] is not None]
    if gaps:
        doc["probability_gap"] = {"mean": float(np.mean(gaps)), "max": float(np.max(gaps))}
    return doc
