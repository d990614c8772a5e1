"""Data drift: live inputs (and answers) against a version's reference profile.

A version folder's ``reference.json`` (``fastserve profile``) gives, per feature, bins and
the training data's share in each. The request path counts live values into the same bins
in the native core (``_core.DriftSketch``: a binary search per value), once per batch, not
per request, over windows of ``drift.window_rows`` rows. At scrape time, or on the API,
the last complete window (the current one until the first is complete, once it has
``drift.min_rows`` rows) is compared with the reference:

- continuous features: PSI, the population stability index, over the reference's decile
  bins (Σ (live - ref) · ln(live / ref), shares floored at 1e-4 as Evidently does); the
  usual reading is < 0.1 stable, 0.1 to 0.25 moderate, > 0.25 drifted;
- discrete features: the Jensen-Shannon distance (base 2, 0..1, scipy) between the value
  shares, with the values the reference never had as one more bin;
- predictions, when the reference has them: the same, on the predicted class (classifiers)
  or value (regressors).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from fastserve import _core
from fastserve.profiling import FeatureReference, ReferenceProfile
from fastserve.review.outcome import NotInterpretable, Reading
from fastserve.schema import InputSchema, feature_input

if TYPE_CHECKING:
    from fastserve.config import ModelConfig
    from fastserve.protocol import ModelSignature

__all__ = ["DriftMonitor", "FeatureDrift", "distance", "load_drift_monitor"]

log = logging.getLogger("fastserve.drift")

_FLOOR: Final = 1e-4
"""Shares below this count as this much in PSI (an empty bin would make it infinite)."""


@dataclass(frozen=True, slots=True)
class FeatureDrift:
    feature: str
    kind: str  # continuous | discrete
    method: str  # psi | jensen_shannon
    value: float
    rows: int
    nulls: int

    def as_doc(self) -> dict[str, Any]:
        return {
            "feature": self.feature,
            "kind": self.kind,
            "method": self.method,
            "value": round(self.value, 6),
            "rows": self.rows,
            "nulls": self.nulls,
        }


def _reference_shares(feature: FeatureReference) -> npt.NDArray[np.float64]:
    """The reference's share per sketch bin (discrete: one more bin, never seen: 0)."""
    shares = np.asarray(feature.fractions, dtype=np.float64)
    return np.append(shares, 0.0) if feature.kind == "discrete" else shares


def distance(feature: FeatureReference, counts: list[int]) -> tuple[str, float]:
    """(method, value) of live ``counts`` (one per sketch bin) against the reference."""
    expected = _reference_shares(feature)
    live = np.asarray(counts, dtype=np.float64)
    live = live / live.sum()
    if feature.kind == "discrete":
        from scipy.spatial.distance import jensenshannon

        return "jensen_shannon", float(jensenshannon(expected, live, base=2))
    e, a = np.maximum(expected, _FLOOR), np.maximum(live, _FLOOR)
    return "psi", float(np.sum((a - e) * np.log(a / e)))


class DriftMonitor:
    """One version's sketches: its input features (the tensor's columns, in the reference's
    order) and, when the reference has them, its predictions."""

    def __init__(
        self,
        reference: ReferenceProfile,
        input_index: int,
        *,
        window_rows: int,
        min_rows: int,
        reading: Reading | None = None,
    ) -> None:
        self.reference = reference
        self.input_index = input_index
        self.min_rows = min_rows
        self._reading = reading if reference.predictions is not None else None
        self._inputs = _core.DriftSketch(
            [(list(f.edges), f.kind == "discrete") for f in reference.features], window_rows
        )
        self._predictions = (
            None
            if reference.predictions is None or self._reading is None
            else _core.DriftSketch(
                [(list(reference.predictions.edges), reference.predictions.kind == "discrete")],
                window_rows,
            )
        )

    @property
    def tracks_predictions(self) -> bool:
        return self._predictions is not None

    def observe_batch(
        self, inputs: list[npt.NDArray[Any]], outputs: list[npt.NDArray[Any]]
    ) -> None:
        """A batch's inputs (in signature order) and outputs: one sketch update each for
        however many requests the batch holds (the batcher calls this)."""
        self._inputs.update(inputs[self.input_index])
        self.observe_outputs(outputs)

    def observe_outputs(self, outputs: list[npt.NDArray[Any]]) -> None:
        """Count the predicted classes (classifiers) or values (regressors) of one answer."""
        if self._predictions is None or self._reading is None:
            return
        scores = outputs[self._reading.scores]
        if self._reading.task == "classifier":
            predicted = scores.argmax(axis=1).astype(np.float64)
        else:
            predicted = np.ascontiguousarray(scores.reshape(-1), dtype=np.float64)
        self._predictions.update(predicted.reshape(-1, 1))

    def features(self) -> list[FeatureDrift] | None:
        """Drift of every feature, or None while the window has fewer than min_rows rows."""
        return _compare(self._inputs, self.reference.features, self.min_rows)

    def predictions(self) -> FeatureDrift | None:
        if self._predictions is None or self.reference.predictions is None:
            return None
        found = _compare(self._predictions, (self.reference.predictions,), self.min_rows)
        return None if found is None else found[0]

    def report(self) -> dict[str, Any]:
        """The drift API's document."""
        features = self.features()
        predictions = self.predictions()
        rows, _, _ = self._inputs.snapshot()
        return {
            "window_rows": self._inputs.window_rows,
            "rows": rows,
            "min_rows": self.min_rows,
            "total_rows": self._inputs.total_rows,
            "reference": {"source": self.reference.source, "rows": self.reference.rows},
            "features": None if features is None else [f.as_doc() for f in features],
            "predictions": None if predictions is None else predictions.as_doc(),
        }


def load_drift_monitor(
    path: Path, signature: ModelSignature, schema: InputSchema | None, config: ModelConfig
) -> DriftMonitor:
    """The monitor of a version's ``reference.json``: its features are the columns of the
    input the schema checks (and must be the schema's, in order), or without a schema of
    the one 2-D float input that wide."""
    reference = ReferenceProfile.model_validate_json(path.read_text(encoding="utf-8"))
    names = [f.name for f in reference.features]
    if schema is not None:
        if tuple(names) != schema.compiled.feature_names:
            raise ValueError("its features are not schema.yaml's columns, in order")
        index = schema.input_index
    else:
        index = feature_input(signature, len(names))
    reading = None
    if reference.predictions is not None:
        try:
            reading = Reading.of(signature, config.task)
        except NotInterpretable as exc:
            log.warning("%s: prediction drift is not measured: %s", path, exc)
    drift = config.drift
    return DriftMonitor(
        reference, index, window_rows=drift.window_rows, min_rows=drift.min_rows, reading=reading
    )


def _compare(
    sketch: Any, references: tuple[FeatureReference, ...] | list[FeatureReference], min_rows: int
) -> list[FeatureDrift] | None:
    rows, counts, nulls = sketch.snapshot()
    if rows < min_rows:
        return None
    found = []
    for feature, bins, missing in zip(references, counts, nulls, strict=True):
        if sum(bins) == 0:  # every value null: nothing to compare
            method = "jensen_shannon" if feature.kind == "discrete" else "psi"
            found.append(FeatureDrift(feature.name, feature.kind, method, math.nan, rows, missing))
            continue
        method, value = distance(feature, bins)
        found.append(FeatureDrift(feature.name, feature.kind, method, value, rows, missing))
    return found
