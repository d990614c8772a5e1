"""What a model's outputs say, in a form two versions can be compared on and a label checked
against: a class index (with the class probabilities) or a value, per row.

A **classifier** has a float output of shape ``[rows, classes]`` (probabilities, as
skl2onnx and most exporters write them) and maybe an integer label output; its prediction
is the index of the highest probability. A **regressor** has one float output; its
prediction is that output's values. ``task: auto`` in the model config picks by the
signature, ``classifier`` and ``regressor`` insist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy.stats import binomtest

from fastserve.protocol import ModelSignature

Task = Literal["classifier", "regressor"]
ConfidenceMeasure = Literal["max_probability", "margin", "entropy"]

_FLOAT_TYPES = ("FP16", "FP32", "FP64")
_INT_TYPES = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")


class NotInterpretable(ValueError):
    """The signature fits neither a classifier nor a regressor (or not the task asked for)."""


@dataclass(frozen=True, slots=True)
class Reading:
    """Where in a model's outputs its prediction is: output indexes in signature order."""

    task: Task
    scores: int  # classifier: the probabilities; regressor: the values
    labels: int | None = None  # classifier: an integer label output, if any

    @classmethod
    def of(cls, signature: ModelSignature, task: str = "auto") -> Reading:
        outputs = signature.outputs
        probabilities = [
            i
            for i, o in enumerate(outputs)
            if o.datatype in _FLOAT_TYPES and len(o.shape) == 2 and o.shape[1] != 1
        ]
        labels = [
            i
            for i, o in enumerate(outputs)
            if o.datatype in _INT_TYPES and (len(o.shape) == 1 or o.shape[1:] == (1,))
        ]
        floats = [i for i, o in enumerate(outputs) if o.datatype in _FLOAT_TYPES]
        if task in ("auto", "classifier") and len(probabilities) == 1:
            return cls("classifier", probabilities[0], labels[0] if len(labels) == 1 else None)
        if task == "classifier":
            raise NotInterpretable(
                "a classifier needs exactly one float output of shape [rows, classes]"
            )
        if len(floats) == 1 and not labels:
            return cls("regressor", floats[0])
        raise NotInterpretable(
            "cannot tell the prediction among the outputs "
            f"({', '.join(f'{o.name} {o.datatype}{list(o.shape)}' for o in outputs)}); "
            "set task: classifier or regressor"
        )

    def predict(self, outputs: list[npt.NDArray[Any]]) -> Prediction:
        return self.predict_scores(outputs[self.scores])

    def predict_scores(self, scores: npt.NDArray[Any]) -> Prediction:
        """The prediction from the scores output alone (probabilities, or the values)."""
        if self.task == "classifier":
            return Prediction(self.task, scores.argmax(axis=1), scores)
        return Prediction(self.task, scores.reshape(scores.shape[0], -1), None)


@dataclass(frozen=True, slots=True)
class Prediction:
    task: Task
    values: npt.NDArray[Any]
    """Classifier: the class index per row; regressor: the values, shape [rows, k]."""
    probabilities: npt.NDArray[np.floating[Any]] | None

    def as_list(self) -> list[int] | list[float]:
        """One entry per row (a regressor with several values per row gives its first)."""
        if self.task == "classifier":
            return self.values.tolist()  # type: ignore[no-any-return]
        return self.values[:, 0].astype(np.float64).tolist()  # type: ignore[no-any-return]

    def confidence(self, measure: ConfidenceMeasure) -> float | None:
        """The lowest confidence over the rows (None for a regressor).

        max_probability: the top class's probability; margin: top minus runner-up;
        entropy: 1 - H(p) / log(classes), so that for all three higher means surer."""
        p = self.probabilities
        if p is None:
            return None
        if measure == "max_probability":
            per_row = p.max(axis=1)
        elif measure == "margin":
            top2 = np.sort(p, axis=1)[:, -2:]
            per_row = top2[:, 1] - top2[:, 0]
        else:
            clipped = np.clip(p, 1e-12, 1.0)
            entropy = -(clipped * np.log(clipped)).sum(axis=1)
            per_row = 1.0 - entropy / math.log(p.shape[1])
        return float(per_row.min())


@dataclass(frozen=True, slots=True)
class Comparison:
    agree: bool | None
    probability_gap: float | None
    abs_diff: float | None
    rel_diff: float | None


def compare(primary: Prediction, shadow: Prediction) -> Comparison:
    """Classifiers: do the top-1 classes of every row agree, and the largest probability gap.
    Regressors: the largest absolute and relative difference."""
    if primary.task == "classifier" and shadow.task == "classifier":
        gap = None
        if (
            primary.probabilities is not None
            and shadow.probabilities is not None
            and primary.probabilities.shape == shadow.probabilities.shape
        ):
            difference = primary.probabilities.astype(np.float64) - shadow.probabilities
            gap = float(np.abs(difference).max())
        agree = primary.values.shape == shadow.values.shape and bool(
            (primary.values == shadow.values).all()
        )
        return Comparison(agree, gap, None, None)
    a = np.asarray(primary.values, dtype=np.float64)
    b = np.asarray(shadow.values, dtype=np.float64)
    if a.shape != b.shape:
        return Comparison(False, None, None, None)
    diff = np.abs(a - b)
    rel = diff / np.maximum(np.abs(a), 1e-12)
    return Comparison(None, None, float(diff.max()), float(rel.max()))


def agreement_interval(agreed: int, compared: int) -> tuple[float, float]:
    """95 % Wilson score interval of the agreement rate ((0, 1) before any comparison)."""
    if compared == 0:
        return 0.0, 1.0
    ci = binomtest(agreed, compared).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)
