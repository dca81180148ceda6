"""Candidate boxes (pointing tasks) must lie inside their image: checked by the web tier when it knows the image's
size, and again by the worker, which decodes the image itself."""

from __future__ import annotations

import math
from typing import Sequence

from .errors import BadRequest


def check_boxes(boxes: Sequence[Sequence[float]], width: int, height: int) -> None:
    """Boxes must be finite, non-empty and inside the image (the detector pools features from these pixels)."""
    for index, (x1, y1, x2, y2) in enumerate(boxes):
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            raise BadRequest("invalid_boxes", f"box {index} has a non-finite coordinate")
        if not (x2 > x1 and y2 > y1):
            raise BadRequest("invalid_boxes", f"box {index} must have x2 > x1 and y2 > y1")
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise BadRequest("invalid_boxes", f"box {index} {[x1, y1, x2, y2]} lies outside the {width}x{height} image")
