"""The CUDA image pipeline against the CPU kernel. Runs where a CUDA device is visible (the
GPU machines); elsewhere the device tests skip, and only the refusal is checked."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastserve import _core
from reference_preprocess import draw_image_case

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
needs_gpu = pytest.mark.skipif(not _core.cuda_available(), reason="no CUDA device visible")


def test_without_a_device_it_says_why() -> None:
    if _core.cuda_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(RuntimeError, match=r"no CUDA|not available"):
        _core.CudaImagePipeline(8, 8, *IMAGENET)


@needs_gpu
@settings(max_examples=100, deadline=None)
@given(st.data())
def test_the_cuda_kernel_equals_the_cpu_kernel(data: st.DataObject) -> None:
    case = draw_image_case(data.draw, max_count=4, max_side=60, max_out=40)
    dtype = data.draw(st.sampled_from(["float32", "float16"]))
    cpu = _core.preprocess_images(*case.args(), dtype)
    gpu = _core.CudaImagePipeline(*case.args()[1:], dtype)
    got = gpu.run_to_host(case.images)
    assert got.dtype == cpu.dtype and got.shape == cpu.shape
    # the same taps and roundings (no fused multiply-add): equal but for the last bit
    tolerance = 1e-6 if dtype == "float32" else 2**-10
    np.testing.assert_allclose(got.astype(np.float32), cpu.astype(np.float32), rtol=tolerance,
                               atol=tolerance)  # fmt: skip


@needs_gpu
def test_the_device_batch_is_reused_and_big_batches_fit() -> None:
    gpu = _core.CudaImagePipeline(224, 224, *IMAGENET)
    rng = np.random.default_rng(3)
    big = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(16)]
    first = gpu.run(big)
    assert first != 0
    small = big[:2]
    assert gpu.run(small) == first  # the buffer is kept, not reallocated
    np.testing.assert_allclose(
        gpu.run_to_host(small), _core.preprocess_images(small, 224, 224, *IMAGENET), atol=1e-6
    )
