"""The CUDA image pipeline against the CPU kernel. Runs where a CUDA device is visible (the
GPU machines); elsewhere the device tests skip, and only the refusal is checked."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastserve import _core

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
    channels = data.draw(st.sampled_from([1, 3, 4]))
    count = data.draw(st.integers(0, 4))
    shapes = [(data.draw(st.integers(1, 60)), data.draw(st.integers(1, 60))) for _ in range(count)]
    out_h, out_w = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 40))
    aspect = data.draw(st.sampled_from(["stretch", "shorter_side"]))
    layout = data.draw(st.sampled_from(["chw", "hwc"]))
    dtype = data.draw(st.sampled_from(["float32", "float16"]))
    mean = data.draw(st.lists(st.floats(0, 1), min_size=channels, max_size=channels))
    std = data.draw(st.lists(st.floats(0.05, 2), min_size=channels, max_size=channels))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    images = [rng.integers(0, 256, (h, w, channels), dtype=np.uint8) for h, w in shapes]
    cpu = _core.preprocess_images(images, out_h, out_w, mean, std, aspect, layout, dtype)
    gpu = _core.CudaImagePipeline(out_h, out_w, mean, std, aspect, layout, dtype)
    got = gpu.run_to_host(images)
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
