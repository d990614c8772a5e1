"""Preprocessing declared in a model's config (``preprocessing:`` in ``config.yaml``), run
by the native core before a request is validated and queued:

- ``image``: raw UINT8 pixels or JPEG/PNG files -> the model's normalized FP32/FP16 image
  tensor (:mod:`fastserve.preprocessing.image`);
- ``tabular``: feature columns by name -> the model's 2-D float input, scaled, filled and
  one-hot encoded (:mod:`fastserve.preprocessing.tabular`);
- ``sequence``: variable-length rows -> padded batches and their attention mask, made by
  the native batcher while it gathers (:mod:`fastserve.preprocessing.sequence`).

Each pipeline is checked against the model's signature when the version loads; a mismatch
is a load error with the reason (``PipelineMismatch``).
"""

from fastserve.preprocessing.common import PipelineMismatch
from fastserve.preprocessing.image import ImagePreprocessor
from fastserve.preprocessing.sequence import SequencePreprocessor
from fastserve.preprocessing.tabular import TabularPreprocessor

__all__ = ["ImagePreprocessor", "PipelineMismatch", "SequencePreprocessor", "TabularPreprocessor"]
