"""Prometheus metrics of one server, on a registry of their own (not the global one).

Label values come from the repository (model folder names, version folders) and from
fixed sets (results, states), never from a request, so a client cannot create series.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from fastserve.model import ModelState

CONTENT_TYPE = CONTENT_TYPE_LATEST
SWAP_RESULTS = ("success", "failure", "unload", "removed")
SHADOW_RESULTS = ("agree", "disagree", "error")
# Latency buckets (seconds) for the shadow comparison: 100 µs to 10 s.
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # fmt: skip


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.swaps = Counter(
            "fastserve_model_swaps",
            "Changes of what serves a model, by result: success (applied), failure (not "
            "applied, the model serves as before), unload, removed (folder deleted).",
            ["model", "result"],
            registry=self.registry,
        )
        self.versions = Gauge(
            "fastserve_model_versions",
            "Versions of a model by state (READY, LOADING, UNLOADING, UNAVAILABLE).",
            ["model", "state"],
            registry=self.registry,
        )
        self.change_failed = Gauge(
            "fastserve_model_last_change_failed",
            "1 while the model's latest edit (or load) could not be applied, else 0.",
            ["model"],
            registry=self.registry,
        )

        self.shadow_requests = Counter(
            "fastserve_shadow_requests",
            "Mirrored requests by result: agree and disagree (top-1 of every row, classifiers; "
            "regressors count as agree), error (the shadow failed or timed out).",
            ["model", "result"],
            registry=self.registry,
        )
        self.shadow_dropped_total = Counter(
            "fastserve_shadow_dropped",
            "Requests not mirrored because the shadow's pending bound was reached.",
            ["model"],
            registry=self.registry,
        )
        self.shadow_latency = Histogram(
            "fastserve_shadow_latency_seconds",
            "Latency of mirrored requests, by side (primary: the request's server time; "
            "shadow: the mirrored call).",
            ["model", "side"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.review_items = Counter(
            "fastserve_review_items",
            "Predictions queued for human review, by reason (low_confidence, disagreement).",
            ["model", "reason"],
            registry=self.registry,
        )
        self.review_dropped_total = Counter(
            "fastserve_review_items_dropped",
            "Predictions not queued for review because the model's queue was full "
            "(review.max_pending unlabelled items).",
            ["model"],
            registry=self.registry,
        )
        self.feedback_total = Counter(
            "fastserve_feedback",
            "Ground-truth labels recorded, by outcome (recorded: new, updated: changed).",
            ["model", "outcome"],
            registry=self.registry,
        )

        self.accuracy = Gauge(
            "fastserve_model_accuracy",
            "From feedback: the share of labelled rows a version got right (classifiers) or "
            "its mean absolute error and root mean squared error (regressors); role primary: "
            "the answers clients got, shadow: the mirrored ones; window all (every label "
            "kept), last_1000 (the last 1,000 labelled requests) or 1h (labels of the last "
            "hour).",
            ["model", "version", "role", "metric", "window"],
            registry=self.registry,
        )
        self.validation_failures = Counter(
            "fastserve_validation_failures",
            "Requests whose values failed a check of the version's schema, by feature and "
            "check (both from the schema file, so the series are bounded).",
            ["model", "version", "feature", "check"],
            registry=self.registry,
        )
        self.coverage = Gauge(
            "fastserve_label_coverage",
            "Labelled requests over recorded predictions since the server started (primary).",
            ["model", "version", "role"],
            registry=self.registry,
        )
        self.label_delay_seconds = Histogram(
            "fastserve_label_delay_seconds",
            "Time from a prediction to its first feedback label.",
            ["model"],
            buckets=(1, 10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 3 * 86400, 7 * 86400),
            registry=self.registry,
        )
        self.labelled = Gauge(
            "fastserve_model_labelled_requests",
            "Requests with feedback, per version and role (what the accuracy is computed on).",
            ["model", "version", "role"],
            registry=self.registry,
        )

    def validation_failed(self, model: str, version: str, feature: str, check: str) -> None:
        self.validation_failures.labels(model, version, feature, check).inc()

    def model_accuracy(self, model: str, entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            version, role = str(entry["version"]), str(entry["role"])
            windows = {"all": entry, **entry.get("windows", {})}
            for window, figures in windows.items():
                if figures.get("value") is None:
                    continue
                metric = str(figures.get("metric", entry["metric"]))
                self.accuracy.labels(model, version, role, metric, window).set(figures["value"])
                rmse = figures.get("root_mean_squared_error")
                if rmse is not None:
                    self.accuracy.labels(
                        model, version, role, "root_mean_squared_error", window
                    ).set(rmse)
            self.labelled.labels(model, version, role).set(float(entry["labelled"]))

    def label_delay(self, model: str, seconds: float) -> None:
        self.label_delay_seconds.labels(model).observe(seconds)

    def shadow_compared(
        self, model: str, result: str, primary_ms: float, shadow_ms: float | None
    ) -> None:
        self.shadow_requests.labels(model, result).inc()
        self.shadow_latency.labels(model, "primary").observe(primary_ms / 1000.0)
        if shadow_ms is not None:
            self.shadow_latency.labels(model, "shadow").observe(shadow_ms / 1000.0)

    def shadow_dropped(self, model: str) -> None:
        self.shadow_dropped_total.labels(model).inc()

    def review_queued(self, model: str, reason: str) -> None:
        self.review_items.labels(model, reason).inc()

    def review_dropped(self, model: str) -> None:
        self.review_dropped_total.labels(model).inc()

    def feedback(self, model: str, outcome: str) -> None:
        self.feedback_total.labels(model, outcome).inc()

    def swap(self, model: str, result: str) -> None:
        self.swaps.labels(model, result).inc()

    def model_states(self, model: str, counts: Mapping[ModelState, int], *, failed: bool) -> None:
        for state, count in counts.items():
            self.versions.labels(model, state.value).set(count)
        self.change_failed.labels(model).set(1 if failed else 0)

    def forget(self, model: str) -> None:
        """The model left the repository: drop its gauges (counters keep their history)."""
        for state in ModelState:
            with contextlib.suppress(KeyError):
                self.versions.remove(model, state.value)
        with contextlib.suppress(KeyError):
            self.change_failed.remove(model)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
