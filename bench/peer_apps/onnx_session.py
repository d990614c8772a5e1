"""The model every peer app serves: one onnxruntime session, CPU only, one thread.

Imported by the apps in this folder from inside each peer's own virtual environment
(onnxruntime and numpy only; fastserve is not installed there).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class OnnxModel:
    """A session with 1 intra-op and 1 inter-op thread on the CPU execution provider."""

    def __init__(self, path: str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(
            path, sess_options=options, providers=["CPUExecutionProvider"]
        )
        (first,) = self.session.get_inputs()
        self.input_name: str = first.name
        self.input_width: int = int(first.shape[1])
        self.outputs: list[tuple[str, Any, tuple[int, ...]]] = [
            (out.name, DTYPES[out.type], tuple(int(d) for d in out.shape[1:]))
            for out in self.session.get_outputs()
        ]
        """(name, numpy dtype, shape of one row) of each output, in the model's order."""

    def run(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the model for these rows (float32 [n, width]).

        Each array is viewed as the canonical numpy dtype of its type: onnxruntime may
        hand back INT64 as ``longlong`` (kind 'q'), which some servers' checks reject.
        """
        values = self.session.run(None, {self.input_name: np.ascontiguousarray(rows, np.float32)})
        return {
            name: np.asarray(value).view(dtype)
            for (name, dtype, _), value in zip(self.outputs, values, strict=True)
        }
