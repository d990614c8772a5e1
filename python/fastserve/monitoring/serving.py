"""The serving metrics, read from the loaded model versions when Prometheus scrapes.

The request path already keeps what Triton's statistics route reports (counts, durations,
batches by size, the core's release reasons) plus one ``LatencyHistogram`` per stage and
the value schema's pass and fail counts, as plain ints on the event loop. This collector
turns them into Prometheus families at scrape time, so the request path pays no
prometheus-client call and nothing is counted twice.

Series exist only for loaded versions (their names come from the repository, never from a
request). A version that is unloaded takes its series with it, and one loaded again starts
from zero: Prometheus's ``rate`` treats that as a counter reset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from fastserve.stats import RELEASE_REASONS, STAGES

if TYPE_CHECKING:
    from fastserve.http.busypoll import BusyPoll
    from fastserve.model import ServedModel

OUTCOMES: Final = ("success", "rejected", "timeout", "invalid", "error")
BATCH_SIZE_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServingCollector(Collector):
    """``fastserve_requests_total``, stage latencies, value checks, batch sizes, queue depth,
    in flight."""

    def __init__(
        self, models: Callable[[], list[ServedModel]], server_inflight: Callable[[], int]
    ) -> None:
        self._models = models
        self._server_inflight = server_inflight

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        requests = CounterMetricFamily(
            "fastserve_requests",
            "Inference requests that reached a model version, by outcome: success, rejected "
            "(queue full, stopping, not ready), timeout (deadline passed in the queue), "
            "invalid (4xx), error (5xx).",
            labels=[*labels, "outcome"],
        )
        rows = CounterMetricFamily(
            "fastserve_inferred_rows", "Rows answered (a request's first dimension).", labels=labels
        )
        batches = CounterMetricFamily(
            "fastserve_batches",
            "Batches run, by why the core released them: full, preferred (a preferred size "
            "was reached), delay (the oldest request waited max_queue_delay), drain.",
            labels=[*labels, "reason"],
        )
        latency = HistogramMetricFamily(
            "fastserve_request_duration_seconds",
            "Inference requests from their head arriving to their answer built, every outcome.",
            labels=labels,
        )
        stages = HistogramMetricFamily(
            "fastserve_request_stage_duration_seconds",
            "Successful requests' time by stage: decode (body to tensors), preprocess (the "
            "model's declared pipeline, when it has one), validation "
            "(signature and value schema), queue (waiting for a batch), compute (the batch "
            "the request was in), encode (the answer).",
            labels=[*labels, "stage"],
        )
        batch_rows = HistogramMetricFamily(
            "fastserve_batch_size_rows", "Rows in each batch run.", labels=labels
        )
        depth = GaugeMetricFamily(
            "fastserve_queue_depth", "Requests waiting in the version's queue.", labels=labels
        )
        capacity = GaugeMetricFamily(
            "fastserve_queue_capacity",
            "The version's max_queue_size: queued requests beyond it get 503 at once.",
            labels=labels,
        )
        validated = CounterMetricFamily(
            "fastserve_validated_requests",
            "Requests whose values were checked against the version's schema, by result "
            "(pass, fail; a failure in warn mode is served but counts as fail).",
            labels=[*labels, "result"],
        )
        inflight = GaugeMetricFamily(
            "fastserve_model_inflight_requests",
            "Requests holding the version: between choosing it and being answered.",
            labels=labels,
        )
        for model in self._models():
            key = [model.name, model.version]
            stats = model.request_stats
            counts = {"success": stats.success, **stats.outcomes}
            for outcome in OUTCOMES:
                requests.add_metric([*key, outcome], counts.get(outcome, 0))
            rows.add_metric(key, stats.rows)
            core = model.batcher.core_stats()
            for reason in RELEASE_REASONS:
                batches.add_metric([*key, reason], core[f"batches_{reason}"])
            for stage, histogram in zip(STAGES, stats.stages, strict=True):
                if stage == "preprocess" and model.preprocess is None:
                    continue  # no pipeline: no series of zeros
                target, extra = (latency, []) if stage == "request" else (stages, [stage])
                target.add_metric(
                    [*key, *extra], histogram.cumulative(), sum_value=histogram.sum_ns / 1e9
                )
            if model.schema is not None and model.config.validation != "off":
                passed, failed = stats.validated
                validated.add_metric([*key, "pass"], passed)
                validated.add_metric([*key, "fail"], failed)
            batch_rows.add_metric(key, *_size_buckets(model.batcher.batch_sizes.snapshot()))
            depth.add_metric(key, model.batcher.queue_depth)
            capacity.add_metric(key, model.config.batching.max_queue_size)
            inflight.add_metric(key, model.inflight)
        yield from _drift_families(self._models())
        server = GaugeMetricFamily(
            "fastserve_inflight_requests", "Inference requests in flight in the server."
        )
        server.add_metric([], self._server_inflight())
        yield from (
            requests, rows, batches, latency, stages, validated, batch_rows, depth, capacity,
            inflight, server,
        )  # fmt: skip


class RecordingCollector(Collector):
    """The review store's observed records: waiting to be written, and dropped."""

    def __init__(self, waiting: Callable[[], int], dropped: Callable[[], int]) -> None:
        self._waiting = waiting
        self._dropped = dropped

    def collect(self) -> Iterator[Metric]:
        waiting = GaugeMetricFamily(
            "fastserve_observed_records_waiting",
            "Predictions, shadow comparisons and review items noted for the review store "
            "and not yet written (written every 50 ms).",
        )
        waiting.add_metric([], self._waiting())
        dropped = CounterMetricFamily(
            "fastserve_observed_records_dropped",
            "Observed records not written because the store's buffer was full (the store "
            "fell 100,000 records behind): their feedback cannot be matched.",
        )
        dropped.add_metric([], self._dropped())
        yield from (waiting, dropped)


class BusyPollCollector(Collector):
    """The event loop's busy polling once idle (``fastserve.http.busypoll``)."""

    def __init__(self, poll: Callable[[], BusyPoll | None]) -> None:
        self._poll = poll

    def collect(self) -> Iterator[Metric]:
        poll = self._poll()
        if poll is None:
            return  # not listening yet
        window = GaugeMetricFamily(
            "fastserve_busy_poll_window_seconds",
            "How long the event loop now polls for the next request, once idle, before it "
            "sleeps (adapts between 0 and --busy-poll-us).",
        )
        window.add_metric([], poll.window_ns / 1e9)
        pauses = CounterMetricFamily(
            "fastserve_busy_poll_pauses",
            "Pauses between the server going idle and the next request: caught (within the "
            "window, the loop still polling), short (past it, within --busy-poll-us: the "
            "window grows), long (past --busy-poll-us: it shrinks).",
            labels=["pause"],
        )
        for kind, count in poll.pauses.items():
            pauses.add_metric([kind], count)
        yield from (window, pauses)


def _size_buckets(snapshot: list[tuple[int, int, int]]) -> tuple[list[tuple[str, int]], int]:
    """Cumulative (le, batches) over ``BATCH_SIZE_BUCKETS`` and the rows' sum, from the exact
    (rows, batches, compute ns) counts the batcher keeps."""
    out, total, row_sum, i = [], 0, 0, 0
    for bound in BATCH_SIZE_BUCKETS:
        while i < len(snapshot) and snapshot[i][0] <= bound:
            total += snapshot[i][1]
            row_sum += snapshot[i][0] * snapshot[i][1]
            i += 1
        out.append((str(bound), total))
    for rows, count, _ in snapshot[i:]:
        total += count
        row_sum += rows * count
    out.append(("+Inf", total))
    return out, row_sum


def _drift_families(models: list[ServedModel]) -> Iterator[Metric]:
    """Drift gauges of the versions with a reference profile, once their window has rows
    enough (features and methods come from the reference: bounded)."""
    features = GaugeMetricFamily(
        "fastserve_feature_drift",
        "Per feature, the last window of live inputs against the version's reference "
        "profile: method psi (continuous features; > 0.25 is drift) or jensen_shannon "
        "(discrete features, 0..1).",
        labels=["model", "version", "feature", "method"],
    )
    predictions = GaugeMetricFamily(
        "fastserve_prediction_drift",
        "The last window's predicted classes or values against the reference's.",
        labels=["model", "version", "method"],
    )
    window = GaugeMetricFamily(
        "fastserve_drift_window_rows",
        "Rows in the window the drift gauges were computed on.",
        labels=["model", "version"],
    )
    for model in models:
        monitor = model.drift
        if monitor is None:
            continue
        found = monitor.features()
        if found is None:
            continue
        key = [model.name, model.version]
        window.add_metric(key, found[0].rows if found else 0)
        for feature in found:
            features.add_metric([*key, feature.feature, feature.method], feature.value)
        predicted = monitor.predictions()
        if predicted is not None:
            predictions.add_metric([*key, predicted.method], predicted.value)
    yield from (features, predictions, window)
