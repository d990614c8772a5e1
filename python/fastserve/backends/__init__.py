"""Inference backends: one session type per runtime, all with the same small face.

A backend session is created by ``load`` (which raises ``ModelLoadError``), exposes the
model's ``signature`` and the execution ``provider`` that serves it, runs a whole batch
with ``run`` and warms itself up with ``warmup``. Only onnxruntime exists today.
"""

from fastserve.backends.onnxruntime import OnnxRuntimeSession

__all__ = ["OnnxRuntimeSession"]
