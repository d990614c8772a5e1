"""fastserve: an inference server for ONNX models speaking the Open Inference Protocol."""

from fastserve.config import BatchingConfig, ModelConfig, ServerConfig
from fastserve.errors import FastServeError

__version__ = "0.1.0"

__all__ = ["BatchingConfig", "FastServeError", "ModelConfig", "ServerConfig", "__version__"]
