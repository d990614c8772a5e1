"""numpy reference of the native image preprocessing (``_core.preprocess_images``): the
same bilinear resize with half-pixel centers (OpenCV's INTER_LINEAR), aspect policy,
normalization and layout, written for clarity, not speed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def taps(
    out: int, src: int, offset: float, extent: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos = (np.arange(out) + 0.5) * (extent / out) - 0.5 + offset
    pos = np.maximum(pos, 0.0)
    lo = np.floor(pos).astype(np.int64)
    frac = pos - lo
    edge = lo >= src - 1
    lo[edge], frac[edge] = src - 1, 0.0
    return lo, np.minimum(lo + 1, src - 1), frac


def preprocess(
    image: np.ndarray,
    out_h: int,
    out_w: int,
    mean: Sequence[float],
    std: Sequence[float],
    aspect: str = "stretch",
    layout: str = "chw",
) -> np.ndarray:
    pixels = image.reshape(image.shape[0], image.shape[1], -1).astype(np.float64)
    h, w = pixels.shape[:2]
    y0, x0, hh, ww = 0.0, 0.0, float(h), float(w)
    if aspect == "shorter_side":
        scale = max(out_h / h, out_w / w)
        hh, ww = out_h / scale, out_w / scale
        y0, x0 = (h - hh) / 2, (w - ww) / 2
    ylo, yhi, wy = taps(out_h, h, y0, hh)
    xlo, xhi, wx = taps(out_w, w, x0, ww)
    wx = wx[None, :, None]
    top = pixels[ylo][:, xlo] + (pixels[ylo][:, xhi] - pixels[ylo][:, xlo]) * wx
    bottom = pixels[yhi][:, xlo] + (pixels[yhi][:, xhi] - pixels[yhi][:, xlo]) * wx
    value = top + (bottom - top) * wy[:, None, None]
    normalized = (value / 255.0 - np.asarray(mean)) / np.asarray(std)
    out = normalized.transpose(2, 0, 1) if layout == "chw" else normalized
    return np.ascontiguousarray(out, dtype=np.float32)


@dataclass(frozen=True)
class ImageCase:
    """Arguments of one preprocess_images call, drawn by hypothesis."""

    images: list[np.ndarray]
    out_h: int
    out_w: int
    mean: list[float]
    std: list[float]
    aspect: str
    layout: str

    @property
    def channels(self) -> int:
        return len(self.mean)

    def args(self) -> tuple[Any, ...]:
        return (self.images, self.out_h, self.out_w, self.mean, self.std, self.aspect,
                self.layout)  # fmt: skip


def draw_image_case(
    draw: Any, max_count: int = 3, max_side: int = 40, max_out: int = 30
) -> ImageCase:
    """Random images (odd sizes, 1x1, 1/3/4 channels, none at all) and pipeline settings;
    ``draw`` is hypothesis's ``data.draw``."""
    from hypothesis import strategies as st

    channels = draw(st.sampled_from([1, 3, 4]))
    count = draw(st.integers(0, max_count))
    side = st.integers(1, max_side)
    shapes = [(draw(side), draw(side)) for _ in range(count)]
    out_h, out_w = draw(st.integers(1, max_out)), draw(st.integers(1, max_out))
    aspect = draw(st.sampled_from(["stretch", "shorter_side"]))
    layout = draw(st.sampled_from(["chw", "hwc"]))
    mean = draw(st.lists(st.floats(0, 1), min_size=channels, max_size=channels))
    std = draw(st.lists(st.floats(0.05, 2), min_size=channels, max_size=channels))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    images = [rng.integers(0, 256, (h, w, channels), dtype=np.uint8) for h, w in shapes]
    return ImageCase(images, out_h, out_w, mean, std, aspect, layout)
