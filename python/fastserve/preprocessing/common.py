"""What the pipelines share."""

from __future__ import annotations

__all__ = ["PipelineMismatch", "short_reason"]


class PipelineMismatch(ValueError):
    """The declared pipeline cannot produce the model's input (a load error)."""


def short_reason(exc: BaseException, limit: int = 120) -> str:
    """``": <message>"`` of ``exc``, bounded, or nothing when it has none."""
    text = str(exc).strip()
    if not text:
        return ""
    return f": {text if len(text) <= limit else text[: limit - 3] + '...'}"
