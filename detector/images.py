"""Decoding images from what clients send, safely. Imports no torch (the web tier validates uploads with it).

Choices that differ from the 2019 extraction script, on purpose:
- EXIF orientation is applied (a phone photo is seen upright, as the user sees it). The reference ignored it and
  so saw such photos rotated; for images without an orientation tag both agree.
- Grayscale, palette, RGBA/LA, CMYK and 16-bit images are converted to 8-bit RGB (transparency composited on
  black, 16-bit scaled to 8 bits). The reference repeated palette indices as gray values, crashed on RGBA and
  CMYK, and fed 16-bit values unscaled.
- Decompression bombs and images over a pixel limit are refused before any pixel is decoded.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "MPO")


class ImageDecodeError(ValueError):
    """The input is not an image we accept. `code` is a stable machine-readable reason."""

    def __init__(self, code: str, message: str):
        self.code = code
        self.message = message
        super().__init__(message)


def _open(source: Any) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageDecodeError("empty_image", "the image is empty (0 bytes)")
        return Image.open(io.BytesIO(bytes(source)))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageDecodeError("image_not_found", f"no image file at {path}")
        return Image.open(path)
    if hasattr(source, "read"):
        return Image.open(source)
    raise ImageDecodeError("invalid_image", f"unsupported image input of type {type(source).__name__}")


def _to_rgb8(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max(initial=0) > 255 else 255.0
        gray = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        gray = np.clip(np.asarray(image, dtype=np.float64), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def load_image(source: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any of: path, bytes, file object, PIL image, or an HxW / HxWx3 / HxWx4 array -> HxWx3 uint8 RGB array."""
    if isinstance(source, np.ndarray):
        return _array_to_rgb8(source, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _open(source)
            if not isinstance(source, Image.Image) and image.format not in ALLOWED_FORMATS:
                raise ImageDecodeError("unsupported_format", f"image format {image.format} is not accepted")
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    "image_too_large", f"image has {width}x{height} pixels, more than the limit of {max_pixels}"
                )
            image = ImageOps.exif_transpose(image)
            return _to_rgb8(image)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("image_too_large", f"image refused as a decompression bomb ({exc})") from exc
    except UnidentifiedImageError:  # PIL's message names its file object (a heap address): say what we accept
        raise ImageDecodeError("invalid_image", "cannot decode the image: not an image in an accepted format "
                               f"({', '.join(ALLOWED_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError("invalid_image", f"cannot decode the image ({exc})") from exc


def _array_to_rgb8(array: np.ndarray, max_pixels: int) -> np.ndarray:
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageDecodeError("invalid_image", f"expected an HxW, HxWx3 or HxWx4 array, got shape {array.shape}")
    if array.shape[0] * array.shape[1] > max_pixels:
        raise ImageDecodeError("image_too_large", f"image has {array.shape[1]}x{array.shape[0]} pixels, over the limit")
    array = array[:, :, :3]
    if array.dtype == np.uint16:
        array = np.round(array.astype(np.float64) * (255.0 / 65535.0))
    return np.ascontiguousarray(np.clip(array, 0, 255).astype(np.uint8))
