"""Preprocessing declared in a model's config, run by the native core before validation.

An image pipeline (``preprocessing.image`` in ``config.yaml``) lets clients send raw UINT8
pixels, ``[N, height, width, channels]`` of any size, for a model that takes normalized
FP32 ``[N, C, H, W]`` (or ``[N, H, W, C]``). ``_core.preprocess_images`` does the resize,
normalization and layout in one pass per output row, across threads, with the GIL
released. The pipeline is checked against the model's input when the version loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fastserve import _core
from fastserve.config import ImagePipeline
from fastserve.errors import InvalidRequest
from fastserve.protocol import InferenceRequest, InputTensor, ModelSignature

__all__ = ["ImagePreprocessor", "PipelineMismatch"]


class PipelineMismatch(ValueError):
    """The declared pipeline cannot produce the model's input (a load error)."""


@dataclass(frozen=True)
class ImagePreprocessor:
    input: str
    height: int
    width: int
    channels: int
    layout: str  # chw | hwc
    mean: tuple[float, ...]
    std: tuple[float, ...]
    aspect: str

    @classmethod
    def for_model(cls, pipeline: ImagePipeline, signature: ModelSignature) -> ImagePreprocessor:
        spec = signature.input(pipeline.input)
        if spec is None:
            names = ", ".join(s.name for s in signature.inputs)
            raise PipelineMismatch(f"the model has no input '{pipeline.input}' (it has {names})")
        channels = len(pipeline.mean)
        shape = spec.shape
        if spec.datatype != "FP32" or len(shape) != 4:
            raise PipelineMismatch(
                f"input '{spec.name}' is {spec.datatype} {list(shape)}: an image pipeline "
                "feeds a 4-D FP32 input"
            )
        if shape[1] == channels and shape[2] > 0 and shape[3] > 0:
            return cls(spec.name, shape[2], shape[3], channels, "chw", pipeline.mean,
                       pipeline.std, pipeline.aspect)  # fmt: skip
        if shape[3] == channels and shape[1] > 0 and shape[2] > 0:
            return cls(spec.name, shape[1], shape[2], channels, "hwc", pipeline.mean,
                       pipeline.std, pipeline.aspect)  # fmt: skip
        raise PipelineMismatch(
            f"input '{spec.name}' is {spec.datatype} {list(shape)}: it needs {channels} "
            "channel(s) (one per mean) and a fixed height and width, as [N, C, H, W] or "
            "[N, H, W, C]"
        )

    def apply(self, request: InferenceRequest) -> InferenceRequest:
        """``request`` with a UINT8 image input turned into the model's FP32 tensor."""
        found = [
            i
            for i, t in enumerate(request.inputs)
            if t.name == self.input and t.datatype == "UINT8"
        ]
        if not found:
            return request  # the model's own tensor (or nothing): validation decides
        index = found[0]
        tensor = request.inputs[index]
        pixels = tensor.data
        rank = pixels.ndim
        if not (rank == 4 and pixels.shape[3] == self.channels) and not (
            rank == 3 and self.channels == 1
        ):
            raise InvalidRequest(
                f"input '{self.input}': UINT8 images must be [N, height, width, "
                f"{self.channels}]" + (" or [N, height, width]" if self.channels == 1 else "")
            )
        if pixels.shape[0] == 0 or pixels.shape[1] == 0 or pixels.shape[2] == 0:
            raise InvalidRequest(f"input '{self.input}': an image has no pixels")
        images: list[Any] = list(pixels if rank == 4 else pixels[..., np.newaxis])
        out = _core.preprocess_images(
            images, self.height, self.width, list(self.mean), list(self.std), self.aspect,
            self.layout,
        )  # fmt: skip
        inputs = list(request.inputs)
        inputs[index] = InputTensor(self.input, "FP32", tuple(out.shape), out, tensor.parameters)
        return InferenceRequest(inputs, request.id, request.outputs, request.parameters)
