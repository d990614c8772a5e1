"""The native image preprocessing kernel against its numpy reference (property-based:
odd sizes, 1x1 images, both aspect policies and layouts) and against OpenCV's bilinear
resize; bad input is refused with a clear error."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastserve import _core
from reference_preprocess import draw_image_case, preprocess

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
TOLERANCE = 1e-4
"""float32 arithmetic in the kernel against float64 in the reference, after normalizing
(one pixel level is 1 / (255 * std) ~ 0.017 here)."""


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_the_kernel_equals_the_numpy_reference(data: st.DataObject) -> None:
    case = draw_image_case(data.draw)
    got = _core.preprocess_images(*case.args())
    c, h, w = case.channels, case.out_h, case.out_w
    planes = (c, h, w) if case.layout == "chw" else (h, w, c)
    assert got.shape == (len(case.images), *planes) and got.dtype == np.float32
    for image, out in zip(case.images, got, strict=True):
        expected = preprocess(image, h, w, case.mean, case.std, case.aspect, case.layout)
        np.testing.assert_allclose(out, expected, rtol=0, atol=TOLERANCE)
    # FP16 output: the FP32 values rounded to nearest even (numpy's conversion), exactly
    half = _core.preprocess_images(*case.args(), "float16")
    assert half.dtype == np.float16 and np.array_equal(half, got.astype(np.float16))


@pytest.mark.parametrize(("source", "size"), [((480, 640), (224, 224)), ((7, 5), (16, 16)),
                                              ((100, 37), (64, 48))])  # fmt: skip
def test_resize_agrees_with_opencv(source: tuple[int, int], size: tuple[int, int]) -> None:
    """OpenCV's uint8 INTER_LINEAR works in 11-bit fixed point: within one pixel level."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (*source, 3), dtype=np.uint8)
    ours = _core.preprocess_images([image], *size, [0.0] * 3, [1.0] * 3, layout="hwc")[0] * 255
    theirs = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    assert np.abs(ours - theirs.astype(np.float32)).max() <= 1.0


def test_shorter_side_crops_the_center() -> None:
    """A 4x8 image whose middle columns are white: shorter side to 4, crop 4x4 -> all white."""
    image = np.zeros((4, 8, 1), np.uint8)
    image[:, 2:6] = 255
    out = _core.preprocess_images([image], 4, 4, [0.0], [1.0], "shorter_side")[0, 0]
    assert np.array_equal(out, np.ones((4, 4), np.float32))
    same = _core.preprocess_images([image], 4, 8, [0.0], [1.0])[0, 0]  # no resize: identity
    assert np.array_equal(same * 255, image[:, :, 0].astype(np.float32))


def test_images_need_not_be_contiguous_nor_one_size() -> None:
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    images = [wide[:, ::2], wide[5:9, 3:4]]  # strided columns; a 4x1 sliver
    got = _core.preprocess_images(images, 6, 6, *IMAGENET)
    for image, out in zip(images, got, strict=True):
        np.testing.assert_allclose(out, preprocess(image, 6, 6, *IMAGENET), atol=TOLERANCE)


@pytest.mark.parametrize(
    ("images", "kwargs", "message"),
    [
        ([np.zeros((4, 4, 3), np.float32)], {}, "uint8"),
        ([np.zeros((4, 4, 1), np.uint8)], {}, "one mean and std per channel"),
        ([np.zeros((0, 4, 3), np.uint8)], {}, "no pixels"),
        ([np.zeros((4, 4, 3), np.uint8)], {"std": [1.0, 0.0, 1.0]}, "std must be positive"),
        ([np.zeros((4, 4, 3), np.uint8)], {"out_h": 0}, "output size"),
        ([np.zeros((4, 4, 3), np.uint8)], {"aspect": "fill"}, "aspect"),
        ([np.zeros((4, 4, 3), np.uint8)], {"layout": "nchw"}, "layout"),
        ([np.zeros((4, 4, 3), np.uint8)], {"dtype": "bfloat16"}, "float32 or float16"),
    ],
)
def test_bad_input_is_refused(images: list[np.ndarray], kwargs: dict, message: str) -> None:
    args = {"out_h": 8, "out_w": 8, "mean": IMAGENET[0], "std": IMAGENET[1], **kwargs}
    with pytest.raises(ValueError, match=message):
        _core.preprocess_images(images, **args)
