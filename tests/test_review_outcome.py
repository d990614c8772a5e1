"""Reading predictions out of outputs, confidence measures and comparisons (no server)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastserve.protocol import ModelSignature, TensorSpec
from fastserve.review.outcome import NotInterpretable, Reading, agreement_interval, compare
from fastserve.review.service import PredictionLog, tensor_doc


def signature(*outputs: tuple[str, str, tuple[int, ...]]) -> ModelSignature:
    return ModelSignature(
        inputs=(TensorSpec("x", "FP32", (-1, 3)),),
        outputs=tuple(TensorSpec(n, d, s) for n, d, s in outputs),
    )


CLASSIFIER = signature(("label", "INT64", (-1,)), ("probabilities", "FP32", (-1, 3)))


def test_outputs_are_read_as_a_classifier_or_a_regressor() -> None:
    assert Reading.of(CLASSIFIER) == Reading("classifier", 1, 0)
    assert Reading.of(signature(("y", "FP32", (-1, 1)))) == Reading("regressor", 0)
    with pytest.raises(NotInterpretable, match="set task"):
        Reading.of(signature(("a", "FP32", (-1, 1)), ("b", "FP32", (-1, 1))))
    with pytest.raises(NotInterpretable, match="a classifier needs"):
        Reading.of(signature(("y", "FP32", (-1, 1))), "classifier")


def test_confidence_measures_rank_sure_rows_above_unsure_ones() -> None:
    p = np.array([[0.7, 0.2, 0.1]], dtype=np.float32)
    prediction = Reading.of(CLASSIFIER).predict([np.array([0]), p])
    assert prediction.as_list() == [0]
    assert prediction.confidence("max_probability") == pytest.approx(0.7)
    assert prediction.confidence("margin") == pytest.approx(0.5)
    entropy = -sum(v * math.log(v) for v in (0.7, 0.2, 0.1))
    assert prediction.confidence("entropy") == pytest.approx(1 - entropy / math.log(3), rel=1e-5)
    uniform = Reading.of(CLASSIFIER).predict([np.array([0]), np.full((1, 3), 1 / 3, np.float32)])
    assert uniform.confidence("entropy") == pytest.approx(0.0, abs=1e-6)
    # a request of several rows is as sure as its least sure row
    two = np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25]], dtype=np.float32)
    assert Reading.of(CLASSIFIER).predict([np.array([0, 0]), two]).confidence(
        "max_probability"
    ) == pytest.approx(0.4)


def test_comparisons_and_the_agreement_interval() -> None:
    reading = Reading.of(CLASSIFIER)
    a = reading.predict([np.array([0]), np.array([[0.6, 0.3, 0.1]], np.float32)])
    b = reading.predict([np.array([1]), np.array([[0.3, 0.6, 0.1]], np.float32)])
    assert compare(a, a).agree is True
    result = compare(a, b)
    assert result.agree is False and result.probability_gap == pytest.approx(0.3)
    low, high = agreement_interval(95, 100)
    assert low < 0.95 < high < 1.0
    assert agreement_interval(0, 0) == (0.0, 1.0)


def test_the_prediction_log_reads_many_requests_at_once_and_stays_bounded() -> None:
    log = PredictionLog(limit=3)
    classifier = Reading.of(CLASSIFIER)
    regressor = Reading.of(signature(("y", "FP32", (-1, 1))))
    two_rows = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], np.float32)
    log.add("m", "a", "primary", "1", classifier, [np.array([1, 0]), two_rows], None, 1.0)
    one_row = np.array([[0.1, 0.2, 0.7]], np.float32)
    log.add("m", "b", "shadow", "2", classifier, [np.array([2]), one_row], 0.7, 2.0)
    log.add("r", "c", "primary", "1", regressor, [np.array([[1.5]], np.float32)], None, 3.0)
    log.add("r", "d", "primary", "1", regressor, [np.array([[2.5]], np.float32)], None, 3.0)
    assert log.dropped == 1
    rows = log.drain(2) + log.drain(2)  # the oldest first, at most 2 a call
    assert [(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows] == [
        ("m", "a", "primary", "1", "[1,0]", None),
        ("m", "b", "shadow", "2", "[2]", 0.7),
        ("r", "c", "primary", "1", "[1.5]", None),
    ]
    assert log.drain(2) == [] and log.drain() == []


def test_the_prediction_log_gives_each_request_its_own_rows_whatever_their_count() -> None:
    """Requests of one model with 1, 2 and 0 rows, interleaved: each row's prediction goes to
    the request it came from, and each is counted once for its role and version."""
    log = PredictionLog(limit=100)
    classifier = Reading.of(CLASSIFIER)
    rows = {
        "one": np.array([[0.1, 0.2, 0.7]], np.float32),
        "two": np.array([[0.6, 0.3, 0.1], [0.1, 0.8, 0.1]], np.float32),
        "none": np.zeros((0, 3), np.float32),
    }
    # as many rows as requests in all, as if each had one
    order = ["two", "one", "none", "two", "none", "one"]
    for n, name in enumerate(order):
        outputs = [rows[name].argmax(1), rows[name]]
        log.add("m", f"{name}{n}", "primary", "1", classifier, outputs, None, 1.0)
    texts = {row[1]: row[4] for row in log.drain()}
    expected = {"one": "[2]", "two": "[0,1]", "none": "[]"}
    assert texts == {f"{name}{n}": expected[name] for n, name in enumerate(order)}
    assert log.recorded == {("m", "primary", "1"): len(order)}


def test_review_items_show_float32_values_as_their_shortest_decimal() -> None:
    doc = tensor_doc(np.array([[14.99, 0.1]], np.float32))
    assert doc == {"datatype": "float32", "shape": [1, 2], "data": [[14.99, 0.1]]}
    assert tensor_doc(np.array([3, 4]))["data"] == [3, 4]


def test_accuracy_windows_coverage_delay_and_regression_errors() -> None:
    import json

    from fastserve.review.service import accuracy_windows

    now = 1_000_000.0
    rows = []
    # 1,200 labelled requests of a classifier, newest first: the newest 1,000 all right, the
    # 200 before them all wrong; only the first 10 were labelled within the hour
    for i in range(1200):
        labelled_at = now - (i * 10 if i < 10 else 4000 + i)
        right = i < 1000
        rows.append(
            ("primary", "1", "[1]", "[1]" if right else "[0]", labelled_at, labelled_at - 30)
        )
    entry = accuracy_windows(rows, {("primary", "1"): 2400}, now)["primary:1"]
    assert entry["labelled"] == 1200 and entry["value"] == pytest.approx(1000 / 1200)
    assert entry["windows"]["last_1000"] == {"labelled": 1000, "rows": 1000, "metric": "accuracy",
                                             "value": 1.0}  # fmt: skip
    assert entry["windows"]["1h"]["labelled"] == 10
    assert entry["coverage"] == 0.5 and entry["label_delay_p50_s"] == pytest.approx(30)

    regression = [("primary", "2", json.dumps([p]), json.dumps([y]), now, now - 5)
                  for p, y in ((1.0, 0.0), (3.0, 0.0))]  # fmt: skip
    entry = accuracy_windows(regression, {}, now)["primary:2"]
    assert entry["metric"] == "mean_absolute_error" and entry["value"] == pytest.approx(2.0)
    assert entry["root_mean_squared_error"] == pytest.approx((5.0) ** 0.5)
    assert entry["coverage"] is None  # no count of recorded predictions given
