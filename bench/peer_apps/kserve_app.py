"""KServe peer: a ``kserve.Model`` whose predict runs the ONNX model with onnxruntime, served
by KServe's Python model server (uvicorn, one worker, gRPC off) over V2 REST.

    python kserve_app.py MODEL_FILE --model-name NAME --http-port PORT

KServe's Python server has no in-process batcher: each request is one onnxruntime call.
Per-request log lines are off: the latency line (``enable_latency_logging``), the two
``kserve.trace`` lines its timing middleware writes and uvicorn's access line.
Started by bench/peers.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import kserve
from kserve import InferOutput, InferRequest, InferResponse
from onnx_session import OnnxModel

DATATYPES = {"float32": "FP32", "int64": "INT64"}


class OnnxRuntimeModel(kserve.Model):
    def __init__(self, name: str, model_file: str) -> None:
        super().__init__(name)
        self.model_file = model_file
        self.model: OnnxModel | None = None

    def load(self) -> bool:
        self.model = OnnxModel(self.model_file)
        self.ready = True
        return self.ready

    def predict(
        self, payload: InferRequest, headers: dict[str, str] | None = None
    ) -> InferResponse:
        assert self.model is not None
        outputs = self.model.run(payload.inputs[0].as_numpy())
        infer_outputs = []
        for name, value in outputs.items():
            output = InferOutput(
                name=name, shape=list(value.shape), datatype=DATATYPES[value.dtype.name]
            )
            # JSON data unless the request asked for binary outputs (kserve then encodes
            # the outputs it was asked for as raw bytes).
            output.set_data_from_numpy(value, binary_data=False)
            infer_outputs.append(output)
        return InferResponse(
            response_id=payload.id or "",
            model_name=self.name,
            infer_outputs=infer_outputs,
            requested_outputs=payload.request_outputs,
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_file")
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--http-port", type=int, required=True)
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # kserve parses sys.argv itself at import; keep its defaults

    model = OnnxRuntimeModel(args.model_name, args.model_file)
    model.load()
    server: Any = kserve.ModelServer(
        http_port=args.http_port,
        workers=1,
        enable_grpc=False,
        enable_latency_logging=False,
    )
    # after ModelServer(), which configures logging: no log lines per request
    for name in ("kserve.trace", "uvicorn.access"):
        logging.getLogger(name).setLevel(logging.WARNING)
    server.start([model])


if __name__ == "__main__":
    main()
