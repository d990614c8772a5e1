"""Prometheus metrics of one server, on a registry of their own (not the global one).

Label values come from the repository (model folder names, version folders) and from
fixed sets (results, states), never from a request, so a client cannot create series.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from fastserve.model import ModelState

CONTENT_TYPE = CONTENT_TYPE_LATEST
SWAP_RESULTS = ("success", "failure", "unload", "removed")


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
