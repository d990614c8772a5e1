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

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fastserve.errors import InvalidRequest
from fastserve.protocol import (
    DATATYPE_TO_NUMPY,
    InferenceRequest,
    InputTensor,
    ModelSignature,
    TensorSpec,
)
from fastserve.schema import InputSchema

__all__ = [
    "clip",
    "feature_columns",
    "name_list",
    "pack_features",
    "quoted",
    "shape_text",
    "validate_inputs",
    "validate_outputs",
]

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
    target = schema.input_name
    if any(tensor.name == target for tensor in request.inputs):
        return request
    features = schema.compiled.feature_names
    columns, others, rows = feature_columns(request, features)
    if not columns:
        return request  # neither the tensor nor a feature: validate_inputs names what is missing
    missing = [name for name in features if name not in columns]
    if missing:
        raise InvalidRequest(
            f"input {quoted(target)} is given by feature name, but {len(missing)} of its "
            f"{len(features)} features are missing: {name_list(missing)}"
        )
    for name, tensor in columns.items():
        if tensor.data.dtype.kind not in _NUMERIC_KINDS:
            raise InvalidRequest(
                f"feature {quoted(name)}: datatype {clip(tensor.datatype)} is not numeric"
            )
    spec = signature.inputs[schema.input_index]
    dtype = DATATYPE_TO_NUMPY[spec.datatype]
    sources = [columns[name].data.reshape(rows) for name in features]
    # one pass into the [rows, features] layout, converting as it goes (numpy casts each
    # column as pandas would)
    with np.errstate(over="ignore"):
        packed = np.stack(sources, axis=1, dtype=dtype, casting="unsafe")
    # as the codecs do: a value too large for the tensor's datatype is refused, not made inf
    if dtype.kind == "f" and _overflowed(sources, packed):
        raise InvalidRequest(
            f"input {quoted(target)}: a feature's value does not fit {spec.datatype}"
        )
    tensor = InputTensor(target, spec.datatype, packed.shape, packed)
    return InferenceRequest([*others, tensor], request.id, request.outputs, request.parameters)


def _overflowed(sources: list[npt.NDArray[Any]], packed: npt.NDArray[Any]) -> bool:
    """Did converting ``sources`` into ``packed`` (a float type) make a value infinite?
    Looked for only when a source can overflow it: a wider float, or integers into FP16."""
    itemsize = packed.dtype.itemsize
    if not any(
        (a.dtype.kind == "f" and a.dtype.itemsize > itemsize)
        or (a.dtype.kind in "iu" and itemsize == 2)
        for a in sources
    ):
        return False
    infinite = np.isinf(packed)
    if not infinite.any():
        return False
    return int(infinite.sum()) != sum(
        int(np.isinf(a).sum()) for a in sources if a.dtype.kind == "f"
    )


def feature_columns(
    request: InferenceRequest, features: Sequence[str]
) -> tuple[dict[str, InputTensor], list[InputTensor], int]:
    """The inputs of ``request`` that are ``features`` (by name), the other inputs, and the
    rows of the features (0 when none is sent). Each feature must be a column, ``[rows]``
    or ``[rows, 1]``, sent once, all with the same rows."""
    wanted = set(features)
    columns: dict[str, InputTensor] = {}
    others = []
    for tensor in request.inputs:
        if tensor.name not in wanted:
            others.append(tensor)
        elif tensor.name in columns:
            raise InvalidRequest(f"feature {quoted(tensor.name)} appears twice")
        else:
            columns[tensor.name] = tensor
    rows = -1
    first = ""
    for name in features:  # in their order: a mismatch names the first feature sent
        if name not in columns:
            continue
        shape = columns[name].shape
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise InvalidRequest(
                f"feature {quoted(name)}: shape {shape_text(shape)} is not a column "
                "([rows] or [rows, 1])"
            )
        if rows < 0:
            rows, first = shape[0], name
        elif shape[0] != rows:
            raise InvalidRequest(
                f"feature {quoted(name)} has {shape[0]} rows but feature {quoted(first)} has {rows}"
            )
    return columns, others, max(rows, 0)


def name_list(names: Sequence[str]) -> str:
    """The first few of ``names``, quoted, and how many more."""
    shown = ", ".join(quoted(n) for n in names[:_NAMED_SHOWN])
    more = f" and {len(names) - _NAMED_SHOWN} more" if len(names) > _NAMED_SHOWN else ""
    return shown + more


def validate_inputs(
    request: InferenceRequest,
    signature: ModelSignature,
    *,
    max_batch_size: int,
    raw: tuple[str, str] | None = None,
) -> list[npt.NDArray[Any]]:
    """The request's input arrays in the signature's input order, ready for the batcher.

    Every model input is required. The first dimension of every input is the batch
    dimension: it must be 1..max_batch_size and the same for all inputs. ``raw``: (input,
    datatype) that input may also come as, already checked by its pipeline and transformed
    by the batcher (raw UINT8 images), so only its rows are checked here.
    Raises InvalidRequest naming the input at fault.
    """
    given: dict[str, InputTensor] = {}
    for tensor in request.inputs:
        if tensor.name in given:
            raise InvalidRequest(f"input {quoted(tensor.name)} appears twice")
        given[tensor.name] = tensor
    if len(given) != len(signature.inputs) or any(
        spec.name not in given for spec in signature.inputs
    ):
        known = {spec.name for spec in signature.inputs}
        for name in given:
            if name not in known:
                raise InvalidRequest(f"unknown input {quoted(name)}")
        for spec in signature.inputs:
            if spec.name not in given:
                raise InvalidRequest(f"required input {quoted(spec.name)} is missing")

    arrays: list[npt.NDArray[Any]] = []
    batch: int | None = None
    first = ""  # the input that set the batch size
    for model_spec in signature.inputs:
        tensor = given[model_spec.name]
        spec = model_spec
        if raw is not None and raw == (spec.name, tensor.datatype):  # any shape: rows checked
            spec = TensorSpec(spec.name, tensor.datatype, (-1,) * len(tensor.shape))
        if tensor.datatype != spec.datatype:
            raise InvalidRequest(
                f"input {quoted(spec.name)}: datatype {clip(tensor.datatype)} does not match "
                f"the model's {spec.datatype}"
            )
        shape = tensor.shape
        if tensor.data.shape != shape:
            raise InvalidRequest(
                f"input {quoted(spec.name)}: data does not have the declared shape"
            )
        if len(shape) != len(spec.shape):
            raise InvalidRequest(
                f"input {quoted(spec.name)}: rank {len(shape)} does not match the model's "
                f"{len(spec.shape)} (shape {shape_text(spec.shape)})"
            )
        for axis, (dim, expected) in enumerate(zip(shape, spec.shape, strict=True)):
            if expected >= 0 and dim != expected:
                raise InvalidRequest(
                    f"input {quoted(spec.name)}: dimension {axis} is {dim}, the model needs "
                    f"{expected} (shape {shape_text(spec.shape)})"
                )
        if shape:
            rows = shape[0]
            if not 1 <= rows <= max_batch_size:
                raise InvalidRequest(
                    f"input {quoted(spec.name)}: batch size {rows} is outside 1..{max_batch_size}"
                )
            if batch is None:
                batch, first = rows, spec.name
            elif rows != batch:
                raise InvalidRequest(
                    f"input {quoted(spec.name)} has batch size {rows} but input "
                    f"{quoted(first)} has {batch}"
                )
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
            raise InvalidRequest(f"unknown output {quoted(wanted.name)}")
        if wanted.name in names:
            raise InvalidRequest(f"output {quoted(wanted.name)} is requested twice")
        names.append(wanted.name)
    return names


def _native(array: npt.NDArray[Any], datatype: str) -> npt.NDArray[Any]:
    """``array`` itself when the batcher can take it as is, else a fitting copy."""
    dtype = DATATYPE_TO_NUMPY[datatype]
    flags = array.flags
    if array.dtype == dtype and flags.c_contiguous and flags.aligned:
        return array
    return np.require(array, dtype=dtype, requirements=["C", "A"])


def clip(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quoted(name: str) -> str:
    return repr(clip(name))


def shape_text(shape: tuple[int, ...]) -> str:
    return clip(str(list(shape)))
