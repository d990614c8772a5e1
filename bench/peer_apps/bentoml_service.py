"""BentoML peer: a ``@bentoml.service`` with one batchable API running the ONNX model with
onnxruntime (BentoML's adaptive batching), served by ``bentoml serve`` with one worker.

    PEER_MODEL_FILE=model.onnx PEER_MAX_BATCH_SIZE=64 \\
        bentoml serve bentoml_service:Classifier --port PORT --working-dir bench/peer_apps

BentoML is not V2: ``POST /predict`` takes ``{"rows": [[...30 floats...], ...]}`` and
answers one object per row, ``[{"label": 1, "probabilities": [p0, p1]}, ...]``.
``max_latency_ms`` stays at BentoML's default: it is a deadline after which a queued
request is answered 503, not a wait; BentoML has no max-wait setting, its batch window
adapts to the processing times it measures. Access logging is off. Started by
bench/peers.py.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import bentoml
import numpy as np
from bentoml.validators import DType
from onnx_session import OnnxModel

MAX_BATCH_SIZE = int(os.environ.get("PEER_MAX_BATCH_SIZE", "64"))


@bentoml.service(workers=1, logging={"access": {"enabled": False}})
class Classifier:
    def __init__(self) -> None:
        self.model = OnnxModel(os.environ["PEER_MODEL_FILE"])

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE)
    def predict(self, rows: Annotated[np.ndarray, DType("float32")]) -> list[dict[str, Any]]:
        outputs = self.model.run(rows)
        columns = {name: value.tolist() for name, value in outputs.items()}
        return [{name: values[i] for name, values in columns.items()} for i in range(len(rows))]
