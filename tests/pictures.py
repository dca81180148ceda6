"""Real photographs for the live tests: scikit-image's sample pictures (astronaut, coffee, ...) as JPEG bytes."""

from __future__ import annotations

import io

import pytest
from PIL import Image

skimage_data = pytest.importorskip("skimage.data")


def sample_jpeg(name: str, size: int = 192) -> bytes:
    """The scikit-image sample picture `name`, at most `size` pixels on its long side, as an RGB JPEG."""
    image = Image.fromarray(getattr(skimage_data, name)())
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()
