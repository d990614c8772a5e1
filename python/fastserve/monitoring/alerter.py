"""Alerts computed in the server, POSTed to a webhook: for users without Alertmanager.

Off unless ``--alert-webhook URL`` is given. Every ``--alert-interval`` seconds the server
evaluates, per loaded version, the in-process counterparts of the shipped Prometheus rules
that need no history (configs/prometheus/alerts.yml has the full set, with ``for:``
clauses): feature and prediction drift, error and rejection rate over the interval (at
least 20 requests), and queue saturation. When an alert starts or stops it POSTs
Alertmanager's webhook payload (``version: "4"``, ``status``, ``alerts`` with labels,
annotations, ``startsAt``/``endsAt``), so receivers written for Alertmanager take it.
A delivery that fails is logged and retried at the next evaluation; it never touches the
request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Final

import aiohttp

if TYPE_CHECKING:
    from fastserve.model import ServedModel

log = logging.getLogger("fastserve.alerts")

PSI_DRIFT: Final = 0.25
JS_DRIFT: Final = 0.2
ERROR_RATE: Final = 0.01
REJECTION_RATE: Final = 0.05
QUEUE_SATURATION: Final = 0.8
MIN_REQUESTS: Final = 20
"""An interval with fewer requests says nothing about rates."""
MAX_UNSENT: Final = 1000
"""Undelivered alert changes kept for the next try; older ones are dropped."""


@dataclass
class _Firing:
    labels: dict[str, str]
    summary: str
    starts_at: str


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Alerter:
    url: str
    models: Callable[[], list[ServedModel]]
    interval_s: float = 30.0
    firing: dict[tuple[tuple[str, str], ...], _Firing] = field(default_factory=dict)
    _unsent: list[dict[str, Any]] = field(default_factory=list)
    _counts: dict[tuple[str, str], tuple[int, int, int]] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None
    _session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.evaluate()
            except Exception:  # an alerting bug must not stop alerting
                log.exception("alert evaluation failed")

    def current(self) -> dict[tuple[tuple[str, str], ...], tuple[dict[str, str], str]]:
        """Every alert that holds now: key (its labels) -> (labels, summary)."""
        found: dict[tuple[tuple[str, str], ...], tuple[dict[str, str], str]] = {}

        def hold(name: str, labels: dict[str, str], summary: str) -> None:
            full = {"alertname": name, **labels}
            found[tuple(sorted(full.items()))] = (full, summary)

        for model in self.models():
            key = {"model": model.name, "version": model.version}
            where = model.label
            if model.drift is not None:
                for feature in model.drift.features() or []:
                    limit = PSI_DRIFT if feature.method == "psi" else JS_DRIFT
                    if feature.value > limit:
                        hold(
                            "FastserveFeatureDrift",
                            {**key, "feature": feature.feature, "method": feature.method},
                            f"{where} feature '{feature.feature}' drifted "
                            f"({feature.method} {feature.value:.2f})",
                        )
                predicted = model.drift.predictions()
                limit = PSI_DRIFT if predicted and predicted.method == "psi" else JS_DRIFT
                if predicted is not None and predicted.value > limit:
                    hold(
                        "FastservePredictionDrift",
                        {**key, "method": predicted.method},
                        f"{where} predictions drifted ({predicted.method} {predicted.value:.2f})",
                    )
            stats = model.request_stats
            total = stats.success + stats.fail
            errors = stats.outcomes.get("error", 0)
            rejected = stats.outcomes.get("rejected", 0) + stats.outcomes.get("timeout", 0)
            before = self._counts.get((model.name, model.version), (total, errors, rejected))
            self._counts[model.name, model.version] = (total, errors, rejected)
            seen = total - before[0]
            if seen >= MIN_REQUESTS:
                error_rate = (errors - before[1]) / seen
                if error_rate > ERROR_RATE:
                    hold(
                        "FastserveHighErrorRate",
                        key,
                        f"{where} answered {error_rate:.1%} of requests with 5xx",
                    )
                reject_rate = (rejected - before[2]) / seen
                if reject_rate > REJECTION_RATE:
                    hold(
                        "FastserveHighRejectionRate",
                        key,
                        f"{where} rejected {reject_rate:.1%} of requests",
                    )
            capacity = model.config.batching.max_queue_size
            if model.batcher.queue_depth > QUEUE_SATURATION * capacity:
                hold("FastserveQueueSaturated", key, f"{where} queue is over 80 % full")
        return found

    async def evaluate(self) -> None:
        """Compare what holds now with what was firing; POST the changes."""
        now = _now()
        holding = self.current()
        changes = []
        for key, (labels, summary) in holding.items():
            if key not in self.firing:
                self.firing[key] = _Firing(labels, summary, now)
                changes.append(self._alert("firing", self.firing[key], "0001-01-01T00:00:00Z"))
        for key in [k for k in self.firing if k not in holding]:
            changes.append(self._alert("resolved", self.firing.pop(key), now))
        self._unsent.extend(changes)
        if len(self._unsent) > MAX_UNSENT:  # the webhook has been down a long while
            log.warning(
                "alert webhook: %d undelivered alerts dropped", len(self._unsent) - MAX_UNSENT
            )
            del self._unsent[:-MAX_UNSENT]
        if self._unsent:
            await self._deliver()

    @staticmethod
    def _alert(status: str, alert: _Firing, ends_at: str) -> dict[str, Any]:
        return {
            "status": status,
            "labels": {**alert.labels, "severity": "warning"},
            "annotations": {"summary": alert.summary},
            "startsAt": alert.starts_at,
            "endsAt": ends_at,
        }

    async def _deliver(self) -> None:
        alerts, self._unsent = self._unsent, []
        status = "firing" if any(a["status"] == "firing" for a in alerts) else "resolved"
        payload = {
            "version": "4",
            "receiver": "fastserve",
            "status": status,
            "alerts": alerts,
            "groupLabels": {},
            "commonLabels": {},
            "externalURL": "",
        }
        assert self._session is not None
        try:
            async with self._session.post(self.url, json=payload) as resp:
                if resp.status >= 300:
                    raise aiohttp.ClientResponseError(
                        resp.request_info, (), status=resp.status, message=resp.reason or ""
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("alert webhook %s: not delivered (%s); retrying next time", self.url, exc)
            self._unsent = alerts + self._unsent
