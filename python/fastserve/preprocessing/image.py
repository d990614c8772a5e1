"""Image pipelines: raw or encoded images in, the model's float tensor out.

An image pipeline (``preprocessing.image`` in ``config.yaml``) lets clients send what they
have for a model that takes normalized FP32 or FP16 ``[N, C, H, W]`` (or ``[N, H, W, C]``):

- raw UINT8 pixels, ``[N, height, width, channels]`` of any size;
- encoded images, BYTES ``[N]`` holding one JPEG or PNG file each, any sizes, decoded by
  Pillow into RGB (``L`` for one channel, ``LA`` two, ``RGBA`` four) in a worker thread,
  not on the event loop. Pixels are taken as stored: EXIF orientation is not applied, as
  ``PIL.Image.open(...).convert("RGB")`` does not. JSON cannot carry raw bytes, so there
  the input says ``"parameters": {"content_type": "base64"}`` (MLServer's convention) and
  each element is the file in base64.

The native kernel does the resize, normalization, layout and cast in one pass per output
row, across threads, with the GIL released: for raw pixels inside the batcher, which writes
each image straight into its slot of the batch buffer as it gathers the batch
(``_core.ImageTransform``); for decoded files per request, in the decoding thread
(``_core.preprocess_images``). The pipeline is checked against the model's input when the
version loads.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image

from fastserve import _core
from fastserve.config import ImagePipeline
from fastserve.errors import InvalidRequest
from fastserve.preprocessing.common import PipelineMismatch, short_reason
from fastserve.protocol import InferenceRequest, InputTensor, ModelSignature

__all__ = ["ImagePreprocessor"]

_DTYPES: Final = {"FP32": "float32", "FP16": "float16"}
_MODES: Final = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_FORMATS: Final = ("JPEG", "PNG")


@dataclass(frozen=True)
class ImagePreprocessor:
    input: str
    height: int
    width: int
    channels: int
    layout: str  # chw | hwc
    datatype: str  # FP32 | FP16, the model input's
    mean: tuple[float, ...]
    std: tuple[float, ...]
    aspect: str
    max_decoded_pixels: int

    @classmethod
    def for_model(cls, pipeline: ImagePipeline, signature: ModelSignature) -> ImagePreprocessor:
        spec = signature.input(pipeline.input)
        if spec is None:
            names = ", ".join(s.name for s in signature.inputs)
            raise PipelineMismatch(f"the model has no input '{pipeline.input}' (it has {names})")
        channels = len(pipeline.mean)
        shape = spec.shape
        if spec.datatype not in _DTYPES or len(shape) != 4:
            raise PipelineMismatch(
                f"input '{spec.name}' is {spec.datatype} {list(shape)}: an image pipeline "
                "feeds a 4-D FP32 or FP16 input"
            )
        if shape[1] == channels and shape[2] > 0 and shape[3] > 0:
            layout, height, width = "chw", shape[2], shape[3]
        elif shape[3] == channels and shape[1] > 0 and shape[2] > 0:
            layout, height, width = "hwc", shape[1], shape[2]
        else:
            raise PipelineMismatch(
                f"input '{spec.name}' is {spec.datatype} {list(shape)}: it needs {channels} "
                "channel(s) (one per mean) and a fixed height and width, as [N, C, H, W] or "
                "[N, H, W, C]"
            )
        return cls(spec.name, height, width, channels, layout, spec.datatype, pipeline.mean,
                   pipeline.std, pipeline.aspect, pipeline.max_decoded_pixels)  # fmt: skip

    def transform(self) -> _core.ImageTransform:
        """The pipeline as the batcher runs it on raw UINT8 requests: each image is written
        into its slot of the batch buffer while the batch is gathered."""
        return _core.ImageTransform(
            self.height, self.width, list(self.mean), list(self.std), self.aspect,
            self.layout, _DTYPES[self.datatype],
        )  # fmt: skip

    async def apply(self, request: InferenceRequest) -> InferenceRequest:
        """``request`` with its encoded images decoded and turned into the model's tensor
        (in a worker thread). Raw UINT8 images are only checked: the batcher transforms them
        as it gathers the batch (``transform``). ``request`` itself when nothing changed."""
        index = next(
            (
                i
                for i, t in enumerate(request.inputs)
                if t.name == self.input and t.datatype in ("UINT8", "BYTES")
            ),
            None,
        )
        if index is None:
            return request
        tensor = request.inputs[index]
        loop = asyncio.get_running_loop()
        if tensor.datatype == "BYTES":
            files = self._files(tensor)
            out = await loop.run_in_executor(None, lambda: self.run(self.decode(files)))
        else:
            self._pixels(tensor.data)  # checked here; the batcher transforms it (transform())
            return request
        inputs = list(request.inputs)
        inputs[index] = InputTensor(
            self.input, self.datatype, tuple(out.shape), out, tensor.parameters
        )
        return InferenceRequest(inputs, request.id, request.outputs, request.parameters)

    def run(self, images: list[npt.NDArray[np.uint8]]) -> npt.NDArray[Any]:
        """The model's tensor from HWC uint8 images (any sizes)."""
        return _core.preprocess_images(
            images, self.height, self.width, list(self.mean), list(self.std), self.aspect,
            self.layout, _DTYPES[self.datatype],
        )  # fmt: skip

    def decode(self, files: list[bytes]) -> list[npt.NDArray[np.uint8]]:
        """HWC uint8 arrays of JPEG or PNG files, in this pipeline's channels. The sizes are
        read from the headers, and bounded, before any pixel is decoded."""
        opened = []
        pixels = 0
        for i, data in enumerate(files):
            try:
                image = Image.open(io.BytesIO(data), formats=_FORMATS)
            except Exception:  # Pillow's errors for bad files vary by format
                raise InvalidRequest(
                    f"input '{self.input}': image {i} is not a JPEG or PNG file"
                ) from None
            pixels += image.width * image.height
            if pixels > self.max_decoded_pixels:
                raise InvalidRequest(
                    f"input '{self.input}': the images decode to more than "
                    f"{self.max_decoded_pixels:,} pixels (max_decoded_pixels)"
                )
            opened.append(image)
        mode = _MODES[self.channels]
        arrays = []
        for i, image in enumerate(opened):
            try:
                with image:
                    arrays.append(np.asarray(image.convert(mode)))
            except MemoryError:
                raise
            except Exception as exc:
                raise InvalidRequest(
                    f"input '{self.input}': image {i} ({image.format}) could not be decoded"
                    f"{short_reason(exc)}"
                ) from None
        return [a if a.ndim == 3 else a[..., np.newaxis] for a in arrays]

    def _files(self, tensor: InputTensor) -> list[bytes]:
        shape = tensor.data.shape
        if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] == 0:
            raise InvalidRequest(
                f"input '{self.input}': encoded images must be BYTES [N] (or [N, 1]), one "
                f"file per element; got shape {list(shape)}"
            )
        files: list[bytes] = list(tensor.data.ravel())
        if tensor.parameters.get("content_type") != "base64":
            return files
        try:
            return [base64.b64decode(f, validate=True) for f in files]
        except binascii.Error as exc:
            raise InvalidRequest(f"input '{self.input}': invalid base64 ({exc})") from None

    def _pixels(self, pixels: npt.NDArray[Any]) -> list[npt.NDArray[np.uint8]]:
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
        return list(pixels if rank == 4 else pixels[..., np.newaxis])
