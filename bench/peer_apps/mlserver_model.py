"""MLServer peer: a custom MLModel running the ONNX model with onnxruntime.

MLServer has no ONNX runtime of its own. bench/peers.py writes a ``model-settings.json``
whose ``implementation`` is ``mlserver_model.OnnxRuntimeModel``, whose
``parameters.uri`` is the .onnx file, and whose ``max_batch_size``/``max_batch_time`` turn
MLServer's adaptive batching on; then it runs ``mlserver start`` with this folder on
PYTHONPATH.
"""

from __future__ import annotations

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput
from mlserver.utils import get_model_uri
from onnx_session import OnnxModel

DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}


class OnnxRuntimeModel(MLModel):
    """One onnxruntime session (1 thread, CPU); one call per (adaptive) batch."""

    async def load(self) -> bool:
        self._model = OnnxModel(await get_model_uri(self.settings))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        rows = NumpyCodec.decode_input(payload.inputs[0])
        outputs = self._model.run(rows)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[
                # The model's own shapes (MLServer's NumpyCodec would make the label [n, 1]).
                ResponseOutput(
                    name=name,
                    shape=list(value.shape),
                    datatype=DATATYPES[value.dtype],
                    data=value.ravel().tolist(),
                )
                for name, value in outputs.items()
            ],
        )
