"""Checking decoded requests against a model's signature."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest

from fastserve.errors import InvalidRequest
from fastserve.http.codecs import decode_request
from fastserve.protocol import (
    InferenceRequest,
    InputTensor,
    ModelSignature,
    RequestedOutput,
    TensorSpec,
)
from fastserve.validation import validate_inputs, validate_outputs

SIGNATURE = ModelSignature(
    inputs=(
        TensorSpec("features", "FP32", (-1, 4)),
        TensorSpec("mask", "BOOL", (-1, 4)),
        TensorSpec("tokens", "BYTES", (-1, -1)),
    ),
    outputs=(TensorSpec("probs", "FP32", (-1, 2)), TensorSpec("label", "INT64", (-1,))),
)
MAX_BATCH = 8


def item(name: str, array: np.ndarray, datatype: str | None = None) -> InputTensor:
    datatype = datatype or {"f": "FP32", "b": "BOOL", "O": "BYTES"}[array.dtype.kind]
    return InputTensor(name, datatype, tuple(array.shape), array)


def good_inputs(rows: int = 2) -> list[InputTensor]:
    return [
        item("features", np.ones((rows, 4), np.float32)),
        item("mask", np.zeros((rows, 4), np.bool_)),
        item("tokens", np.array([[b"a", b"b", b"c"]] * rows, dtype=object)),
    ]


def request_of(inputs: list[InputTensor], **extra: Any) -> InferenceRequest:
    return InferenceRequest(inputs=inputs, **extra)


def invalid(call: Callable[[], object], *words: str) -> str:
    with pytest.raises(InvalidRequest) as info:
        call()
    message = str(info.value)
    assert 0 < len(message) <= 200, message
    for word in words:
        assert word in message, message
    return message


def check(inputs: list[InputTensor], max_batch_size: int = MAX_BATCH) -> list[np.ndarray]:
    return validate_inputs(request_of(inputs), SIGNATURE, max_batch_size=max_batch_size)


def test_arrays_come_in_signature_order_without_copies() -> None:
    inputs = good_inputs()
    arrays = check(list(reversed(inputs)))
    assert [a.dtype for a in arrays] == [np.float32, np.bool_, np.object_]
    for array, given in zip(arrays, inputs, strict=True):
        assert array is given.data  # already fit for the batcher: passed as is


@pytest.mark.parametrize("rows", [1, MAX_BATCH])
def test_batch_bounds_are_inclusive(rows: int) -> None:
    assert check(good_inputs(rows))[0].shape == (rows, 4)


def test_unaligned_and_non_contiguous_arrays_are_copied() -> None:
    raw = b"\x00" + np.arange(8, dtype="<f4").tobytes()
    unaligned = np.frombuffer(raw, dtype="<f4", offset=1).reshape(2, 4)
    assert not unaligned.flags.aligned
    strided = np.zeros((2, 8), np.bool_)[:, ::2]
    inputs = [
        item("features", unaligned),
        item("mask", strided),
        item("tokens", np.asfortranarray(np.array([[b"a", b"b"], [b"c", b"d"]], dtype=object))),
    ]
    arrays = check(inputs)
    for array in arrays:
        assert array.flags.c_contiguous
        assert array.flags.aligned
    assert arrays[0].tolist() == unaligned.tolist()
    assert arrays[2].tolist() == [[b"a", b"b"], [b"c", b"d"]]


def test_non_native_byte_order_is_converted() -> None:
    swapped = np.ones((2, 4), dtype=np.dtype(np.float32).newbyteorder())
    inputs = good_inputs()
    inputs[0] = item("features", swapped, "FP32")
    (features, _, _) = check(inputs)
    assert features.dtype == np.dtype(np.float32)
    assert features.dtype.isnative
    assert features.tolist() == [[1.0] * 4] * 2


def test_unknown_input() -> None:
    inputs = [*good_inputs(), item("extra", np.ones((2, 4), np.float32))]
    invalid(lambda: check(inputs), "unknown input", "'extra'")
    inputs = good_inputs()
    inputs[0] = item("featurez", np.ones((2, 4), np.float32))
    invalid(lambda: check(inputs), "unknown input", "'featurez'")


@pytest.mark.parametrize("missing", ["features", "mask", "tokens"])
def test_required_input_missing(missing: str) -> None:
    inputs = [i for i in good_inputs() if i.name != missing]
    invalid(lambda: check(inputs), "missing", repr(missing))


def test_duplicate_input() -> None:
    inputs = [*good_inputs(), good_inputs()[1]]
    invalid(lambda: check(inputs), "'mask'", "twice")


@pytest.mark.parametrize(
    ("name", "array", "datatype"),
    [
        ("features", np.ones((2, 4), np.float64), "FP64"),
        ("features", np.ones((2, 4), np.int32), "INT32"),
        ("mask", np.ones((2, 4), np.uint8), "UINT8"),
        ("tokens", np.ones((2, 3), np.float32), "FP32"),
    ],
)
def test_datatype_mismatch(name: str, array: np.ndarray, datatype: str) -> None:
    inputs = [i for i in good_inputs() if i.name != name]
    inputs.append(item(name, array, datatype))
    invalid(lambda: check(inputs), repr(name), datatype, "does not match")


@pytest.mark.parametrize("shape", [(8,), (2, 4, 1), (1, 2, 4), ()])
def test_wrong_rank(shape: tuple[int, ...]) -> None:
    inputs = good_inputs()
    inputs[0] = item("features", np.ones(shape, np.float32))
    invalid(lambda: check(inputs), "'features'", "rank")


@pytest.mark.parametrize("cols", [3, 5, 0])
def test_fixed_dimension_mismatch(cols: int) -> None:
    inputs = good_inputs()
    inputs[1] = item("mask", np.zeros((2, cols), np.bool_))
    invalid(lambda: check(inputs), "'mask'", "dimension 1", f"is {cols}")


def test_dynamic_dimensions_take_any_size() -> None:
    inputs = good_inputs()
    inputs[2] = item("tokens", np.array([[b"x"] * 7] * 2, dtype=object))
    assert check(inputs)[2].shape == (2, 7)
    inputs[2] = item("tokens", np.empty((2, 0), dtype=object))
    assert check(inputs)[2].shape == (2, 0)


@pytest.mark.parametrize("rows", [0, MAX_BATCH + 1, 1000])
def test_batch_size_out_of_bounds(rows: int) -> None:
    invalid(lambda: check(good_inputs(rows)), "batch size", str(rows), f"1..{MAX_BATCH}")


def test_max_batch_size_one() -> None:
    assert check(good_inputs(1), max_batch_size=1)
    invalid(lambda: check(good_inputs(2), max_batch_size=1), "batch size 2")


def test_inputs_with_different_batch_sizes() -> None:
    inputs = good_inputs(2)
    inputs[2] = item("tokens", np.array([[b"a"]] * 3, dtype=object))
    invalid(lambda: check(inputs), "'tokens'", "batch size 3", "'features' has 2")


def test_data_that_does_not_have_the_declared_shape() -> None:
    inputs = good_inputs()
    inputs[0] = InputTensor("features", "FP32", (2, 4), np.ones((4, 2), np.float32))
    invalid(lambda: check(inputs), "'features'", "shape")


def test_scalar_inputs_have_no_batch_dimension() -> None:
    signature = ModelSignature(inputs=(TensorSpec("t", "FP64", ()),), outputs=())
    request = request_of([item("t", np.array(0.5), "FP64")])
    (array,) = validate_inputs(request, signature, max_batch_size=1)
    assert array.shape == ()


def test_long_names_are_clipped_in_messages() -> None:
    inputs = [*good_inputs(), item("n" * 100_000, np.ones((2, 4), np.float32))]
    message = invalid(lambda: check(inputs), "unknown input")
    assert len(message) < 120


def test_validate_outputs() -> None:
    assert validate_outputs(request_of(good_inputs()), SIGNATURE) is None
    wanted = [RequestedOutput("label"), RequestedOutput("probs", binary=True)]
    assert validate_outputs(request_of(good_inputs(), outputs=wanted), SIGNATURE) == [
        "label",
        "probs",
    ]
    unknown = [RequestedOutput("probs"), RequestedOutput("logits")]
    invalid(
        lambda: validate_outputs(request_of(good_inputs(), outputs=unknown), SIGNATURE),
        "unknown output",
        "'logits'",
    )
    twice = [RequestedOutput("probs"), RequestedOutput("probs")]
    invalid(
        lambda: validate_outputs(request_of(good_inputs(), outputs=twice), SIGNATURE),
        "'probs'",
        "twice",
    )


@pytest.mark.parametrize("fmt", ["json", "binary"])
def test_decoded_requests_validate(fmt: str) -> None:
    features = np.arange(8, dtype="<f4").reshape(2, 4)
    doc: dict[str, Any] = {
        "inputs": [
            {"name": "tokens", "shape": [2, 1], "datatype": "BYTES", "data": [["a"], ["b"]]},
            {"name": "mask", "shape": [2, 4], "datatype": "BOOL", "data": [True] * 8},
        ]
    }
    if fmt == "json":
        doc["inputs"].append(
            {"name": "features", "shape": [2, 4], "datatype": "FP32", "data": features.tolist()}
        )
        body, length = orjson.dumps(doc), None
    else:
        doc["inputs"].append(
            {
                "name": "features",
                "shape": [2, 4],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 32},
            }
        )
        header = orjson.dumps(doc)
        header += b" " * ((1 - len(header)) % 4)  # JSON may end in spaces: floats unaligned
        body, length = header + features.tobytes(), str(len(header))
    request = decode_request(body, None, length, max_elements=1024)
    if fmt == "binary":
        assert not request.inputs[2].data.flags.aligned
    arrays = validate_inputs(request, SIGNATURE, max_batch_size=MAX_BATCH)
    assert arrays[0].tolist() == features.tolist()
    assert arrays[0].dtype == np.float32
    assert arrays[0].flags.c_contiguous and arrays[0].flags.aligned
    assert arrays[1].all()
    assert arrays[2].tolist() == [[b"a"], [b"b"]]
