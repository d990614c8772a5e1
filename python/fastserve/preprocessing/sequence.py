"""Sequence pipelines: variable-length rows in, padded batches out.

Requests whose sequence inputs differ in length (dimension 1) share a batch: the native
batcher (``_core.RaggedSpec``) pads every row to the batch's longest, or to a fixed length,
with the declared pad value, truncates past ``max_length``, and writes the attention mask
as one more input, all while it gathers the batch. So clients send only their tokens; the
model gets ``[batch, length]`` inputs and its mask.

What this module does is the bookkeeping: which inputs a request may send (the model's,
less the mask, with a free length), the spec the core pads by, and the order in which the
batch's tensors (the request's inputs, then the mask) reach the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastserve import _core
from fastserve.config import SequencePipeline
from fastserve.preprocessing.common import PipelineMismatch
from fastserve.protocol import DATATYPE_TO_NUMPY, ModelSignature, TensorSpec

__all__ = ["SequencePreprocessor"]

_MASK_TYPES = frozenset({"BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "FP16", "FP32",
                         "FP64"})  # fmt: skip


@dataclass(frozen=True)
class SequencePreprocessor:
    accepts: ModelSignature
    """What a request may send: the model's inputs less the mask, sequence lengths free."""
    ragged: _core.RaggedSpec
    order: tuple[int, ...]
    """For each model input, its position among the batch's tensors."""

    @classmethod
    def for_model(
        cls, pipeline: SequencePipeline, signature: ModelSignature
    ) -> SequencePreprocessor:
        names = [spec.name for spec in signature.inputs]
        for name in (*pipeline.inputs, *([pipeline.mask] if pipeline.mask else [])):
            if name not in names:
                raise PipelineMismatch(
                    f"the model has no input '{name}' (it has {', '.join(names)})"
                )
        length = pipeline.length
        fixed = {}
        for name in pipeline.inputs:
            spec = signature.input(name)
            assert spec is not None
            if len(spec.shape) < 2:
                raise PipelineMismatch(
                    f"input '{name}' is {spec.datatype} {list(spec.shape)}: a sequence input "
                    "is [batch, length, ...]"
                )
            if spec.datatype == "BYTES":
                raise PipelineMismatch(f"input '{name}' is BYTES: sequences are numbers")
            pad = pipeline.pad_of(name)
            if not _fits(spec.datatype, pad):
                raise PipelineMismatch(f"input '{name}' is {spec.datatype}: pad {pad} is not one")
            if spec.shape[1] >= 0:
                fixed[name] = spec.shape[1]
        mask_spec = signature.input(pipeline.mask) if pipeline.mask else None
        if mask_spec is not None:
            if len(mask_spec.shape) != 2 or mask_spec.datatype not in _MASK_TYPES:
                raise PipelineMismatch(
                    f"mask '{mask_spec.name}' is {mask_spec.datatype} {list(mask_spec.shape)}: "
                    "a mask is a 2-D number or BOOL input [batch, length]"
                )
            if mask_spec.shape[1] >= 0:
                fixed[mask_spec.name] = mask_spec.shape[1]
        lengths = set(fixed.values())
        if length is None and len(lengths) == 1:
            length = lengths.pop()  # the model's own fixed length
        elif lengths and lengths != {length}:
            shown = ", ".join(f"{n}: {v}" for n, v in fixed.items())
            raise PipelineMismatch(
                f"the model's fixed lengths ({shown}) do not match the pipeline's length "
                f"({length if length is not None else 'the batch longest row'})"
            )
        accepted = [
            TensorSpec(s.name, s.datatype, (s.shape[0], -1, *s.shape[2:]))
            if s.name in pipeline.inputs
            else s
            for s in signature.inputs
            if s.name != pipeline.mask
        ]
        position = {s.name: i for i, s in enumerate(accepted)}
        order = tuple(position.get(name, len(accepted)) for name in names)  # mask: last
        ragged = _core.RaggedSpec(
            inputs=[position[name] for name in pipeline.inputs],
            pad_values=[pipeline.pad_of(name) for name in pipeline.inputs],
            fixed_length=length or 0,
            max_length=pipeline.max_length or 0,
            mask_dtype=DATATYPE_TO_NUMPY[mask_spec.datatype] if mask_spec is not None else None,
        )
        return cls(ModelSignature(tuple(accepted), signature.outputs), ragged, order)


def _fits(datatype: str, value: float) -> bool:
    dtype = DATATYPE_TO_NUMPY[datatype]
    if dtype.kind == "b":
        return value in (0, 1)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return float(value).is_integer() and info.min <= value <= info.max
    return True
