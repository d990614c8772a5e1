"""Check a decoded request against the model's signature.

The codecs have already checked the request on its own terms (shapes, element counts,
element types); this module checks it against the model: names, datatypes, ranks, fixed
dimensions and the batch dimension. Its output is what the native batcher takes: one
C-contiguous, aligned, native-endian array per model input, in the signature's order.

A model whose version has a value schema also takes its tabular input by feature name: one
V2 input per column, as MLServer's pandas codec sends a DataFrame. ``pack_features`` turns
those into the one tensor the model takes, before anything else is checked.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from fastserve.errors import InvalidRequest
from fastserve.protocol import DATATYPE_TO_NUMPY, InferenceRequest, InputTensor, ModelSignature
from fastserve.schema import InputSchema

__all__ = ["pack_features", "validate_inputs", "validate_outputs"]

_NUMERIC_KINDS = frozenset("biuf")
_NAMED_SHOWN = 5
"""Missing feature names an error lists."""


def pack_features(
    request: InferenceRequest, schema: InputSchema, signature: ModelSignature
) -> InferenceRequest:
    """``request`` with the schema's features, when it sends them as one input each, packed
    into the input tensor they are the columns of; otherwise ``request`` itself.

    Each feature input is ``[rows]`` or ``[rows, 1]`` of any numeric datatype (converted to
    the tensor's, as pandas would); every feature must be there, with the same rows.
    Inputs that are not features pass through for ``validate_inputs`` to check.
    """
    inputs = request.inputs
    target = schema.input_name
    if any(tensor.name == target for tensor in inputs):
        return request
    features = schema.compiled.feature_names
    position = {name: i for i, name in enumerate(features)}
    columns: dict[str, InputTensor] = {}
    others = []
    for tensor in inputs:
        if tensor.name not in position:
            others.append(tensor)
        elif tensor.name in columns:
            raise InvalidRequest(f"feature {_label(tensor.name)} appears twice")
        else:
            columns[tensor.name] = tensor
    if not columns:
        return request  # neither the tensor nor a feature: validate_inputs names what is missing
    missing = [name for name in features if name not in columns]
    if missing:
        shown = ", ".join(_label(n) for n in missing[:_NAMED_SHOWN])
        more = f" and {len(missing) - _NAMED_SHOWN} more" if len(missing) > _NAMED_SHOWN else ""
        raise InvalidRequest(
            f"input {_label(target)} is given by feature name, but {len(missing)} of its "
            f"{len(features)} features are missing: {shown}{more}"
        )
    spec = signature.inputs[schema.input_index]
    first = columns[features[0]]
    rows = first.shape[0] if first.shape else 0
    for name, tensor in columns.items():
        shape = tensor.shape
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise InvalidRequest(
                f"feature {_label(name)}: shape {_shape_text(shape)} is not a column "
                "([rows] or [rows, 1])"
            )
        if tensor.data.dtype.kind not in _NUMERIC_KINDS:
            raise InvalidRequest(
                f"feature {_label(name)}: datatype {_clip(tensor.datatype)} is not numeric"
            )
        if shape[0] != rows:
            raise InvalidRequest(
                f"feature {_label(name)} has {shape[0]} rows but feature "
                f"{_label(features[0])} has {rows}"
            )
    # one concatenation in feature order (numpy promotes mixed datatypes), then one
    # conversion into the [rows, features] layout
    stacked = np.concatenate([columns[name].data.ravel() for name in features])
    dtype = DATATYPE_TO_NUMPY[spec.datatype]
    with np.errstate(over="ignore"):
        packed = np.ascontiguousarray(stacked.reshape(len(features), rows).T, dtype=dtype)
    # as the codecs do: a value too large for the tensor's datatype is refused, not made inf
    if (
        packed is not stacked
        and dtype.kind == "f"
        and stacked.dtype.kind == "f"
        and np.isinf(packed).any()
        and np.count_nonzero(np.isinf(packed)) != np.count_nonzero(np.isinf(stacked))
    ):
        raise InvalidRequest(
            f"input {_label(target)}: a feature's value does not fit {spec.datatype}"
        )
    tensor = InputTensor(target, spec.datatype, packed.shape, packed)
    return InferenceRequest([*others, tensor], request.id, request.outputs, request.parameters)


def validate_inputs(
    request: InferenceRequest, signature: ModelSignature, *, max_batch_size: int
) -> list[npt.NDArray[Any]]:
    """The request's input arrays in the signature's input order, ready for the batcher.

    Every model input is required. The first dimension of every input is the batch
    dimension: it must be 1..max_batch_size and the same for all inputs.
    Raises InvalidRequest naming the input at fault.
    """
    given: dict[str, InputTensor] = {}
    for tensor in request.inputs:
        if tensor.name in given:
            raise InvalidRequest(f"input {_label(tensor.name)} appears twice")
        given[tensor.name] = tensor
    if len(given) != len(signature.inputs) or any(
        spec.name not in given for spec in signature.inputs
    ):
        known = {spec.name for spec in signature.inputs}
        for name in given:
            if name not in known:
                raise InvalidRequest(f"unknown input {_label(name)}")
        for spec in signature.inputs:
            if spec.name not in given:
                raise InvalidRequest(f"required input {_label(spec.name)} is missing")

    arrays: list[npt.NDArray[Any]] = []
    batch: int | None = None
    first = ""
    for spec in signature.inputs:
        tensor = given[spec.name]
        label = f"input {_label(spec.name)}"
        if tensor.datatype != spec.datatype:
            raise InvalidRequest(
                f"{label}: datatype {_clip(tensor.datatype)} does not match "
                f"the model's {spec.datatype}"
            )
        shape = tensor.shape
        if tensor.data.shape != shape:
            raise InvalidRequest(f"{label}: data does not have the declared shape")
        if len(shape) != len(spec.shape):
            raise InvalidRequest(
                f"{label}: rank {len(shape)} does not match the model's "
                f"{len(spec.shape)} (shape {_shape_text(spec.shape)})"
            )
        for axis, (dim, expected) in enumerate(zip(shape, spec.shape, strict=True)):
            if expected >= 0 and dim != expected:
                raise InvalidRequest(
                    f"{label}: dimension {axis} is {dim}, the model needs {expected} "
                    f"(shape {_shape_text(spec.shape)})"
                )
        if shape:
            rows = shape[0]
            if not 1 <= rows <= max_batch_size:
                raise InvalidRequest(f"{label}: batch size {rows} is outside 1..{max_batch_size}")
            if batch is None:
                batch, first = rows, label
            elif rows != batch:
                raise InvalidRequest(f"{label} has batch size {rows} but {first} has {batch}")
        arrays.append(_native(tensor.data, spec.datatype))
    return arrays


def validate_outputs(request: InferenceRequest, signature: ModelSignature) -> list[str] | None:
    """The requested output names (each a model output, none twice); None means all."""
    if request.outputs is None:
        return None
    known = {spec.name for spec in signature.outputs}
    names: list[str] = []
    for wanted in request.outputs:
        if wanted.name not in known:
            raise InvalidRequest(f"unknown output {_label(wanted.name)}")
        if wanted.name in names:
            raise InvalidRequest(f"output {_label(wanted.name)} is requested twice")
        names.append(wanted.name)
    return names


def _native(array: npt.NDArray[Any], datatype: str) -> npt.NDArray[Any]:
    """``array`` itself when the batcher can take it as is, else a fitting copy."""
    dtype = DATATYPE_TO_NUMPY[datatype]
    flags = array.flags
    if array.dtype == dtype and flags.c_contiguous and flags.aligned:
        return array
    return np.require(array, dtype=dtype, requirements=["C", "A"])


def _clip(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _label(name: str) -> str:
    return repr(_clip(name))


def _shape_text(shape: tuple[int, ...]) -> str:
    return _clip(str(list(shape)))
