"""Decoding images from what clients send, safely. Imports no torch (the web tier validates uploads with it).

Choices that differ from the 2019 extraction script, on purpose:
- EXIF orientation is applied (a phone photo is seen upright, as the user sees it). The reference ignored it and
  so saw such photos rotated; for images without an orientation tag both agree.
- Grayscale, palette, RGBA/LA, CMYK and 16-bit images are converted to 8-bit RGB (transparency composited on
  black, 16-bit scaled to 8 bits). The reference repeated palette indices as gray values, crashed on RGBA and
  CMYK, and fed 16-bit values unscaled.
- Decompression bombs and images over a pixel limit are refused before any pixel is decoded.

What decoding costs: `probe_image` reads only an image's headers (format, size, mode, frame count, EXIF
orientation) and its end marker, and prices the decode: `ImageHeader.decode_bytes` is the peak memory `load_image`
needs for it, from bytes per pixel by mode measured on this code (PIL's decoded image, the conversion's
temporaries, the uint8 RGB result, the rotated copy). The pixel limit is a budget in those bytes: an 8-bit RGB or
grey image may have `max_pixels` pixels, a 16-bit or transparent one fewer, as its decode costs more. Only the
first frame of an animation is decoded; more than MAX_FRAMES frames are refused.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "MPO")
MAX_FRAMES = 1000
# Peak bytes per pixel that load_image holds while decoding an image of each mode (bench/image_decode_memory.py
# measures them; these are rounded up). An 8-bit RGB or grey image is the reference the pixel limit is set for.
DECODE_BYTES_PER_PIXEL = {"rgb": 10, "alpha": 20, "16bit": 12, "32bit": 30}
ROTATED_EXTRA_BYTES_PER_PIXEL = 4  # the EXIF-rotated copy of the decoded image
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


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


@dataclass(frozen=True)
class ImageHeader:
    """What an image's headers say, read without decoding a pixel. width and height are as displayed (after the
    EXIF orientation), as load_image returns the image."""

    format: str
    mode: str
    width: int
    height: int
    frames: int
    rotated: bool  # an EXIF orientation that needs a rotated copy

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def rgb_bytes(self) -> int:
        """The decoded uint8 RGB array's size: what a worker holds per image until the detector has run."""
        return self.pixels * 3

    @property
    def decode_bytes(self) -> int:
        """Peak memory of decoding this image with load_image."""
        return self.pixels * (bytes_per_pixel(self.mode) + (ROTATED_EXTRA_BYTES_PER_PIXEL if self.rotated else 0))


def bytes_per_pixel(mode: str, transparency: bool = False) -> int:
    if mode in SIXTEEN_BIT_MODES:
        return DECODE_BYTES_PER_PIXEL["16bit"]
    if mode in ("I", "F"):
        return DECODE_BYTES_PER_PIXEL["32bit"]
    if mode in ALPHA_MODES or transparency:
        return DECODE_BYTES_PER_PIXEL["alpha"]
    return DECODE_BYTES_PER_PIXEL["rgb"]


def decode_budget(max_pixels: int) -> int:
    """The decode memory an image may need: what an 8-bit RGB image of max_pixels pixels needs."""
    return max_pixels * DECODE_BYTES_PER_PIXEL["rgb"]


def _check_budget(header: ImageHeader, max_pixels: int) -> None:
    if header.pixels == 0:  # only a caller's own PIL image can be empty: no format stores one
        raise ImageDecodeError("invalid_image", f"image has {header.width}x{header.height} pixels")
    if header.pixels > max_pixels:
        raise ImageDecodeError("image_too_large", f"image has {header.width}x{header.height} pixels, more than the "
                                                  f"limit of {max_pixels}")
    if header.decode_bytes > decode_budget(max_pixels):
        raise ImageDecodeError("image_too_large", f"decoding this {header.mode} image of {header.width}x"
                               f"{header.height} pixels needs about {header.decode_bytes} bytes, more than the "
                               f"{decode_budget(max_pixels)} an 8-bit RGB image at the pixel limit needs")
    if header.frames > MAX_FRAMES:
        raise ImageDecodeError("image_too_large", f"the image has {header.frames} frames, the limit is {MAX_FRAMES}")


def _header(image: Image.Image) -> ImageHeader:
    width, height = image.size
    # Pillow finds a PNG's EXIF after its pixel data only by decoding them (getexif loads the image): read it only
    # when the chunk came before the pixels. Other formats keep EXIF in their headers.
    has_exif = image.format in ("JPEG", "MPO", "TIFF", "WEBP") or (image.format == "PNG" and "exif" in image.info)
    orientation = image.getexif().get(0x0112, 1) if has_exif else 1
    # A quarter turn is displayed with width and height swapped; Pillow's TIFF reader reports that size already.
    if orientation in (5, 6, 7, 8) and image.format != "TIFF":
        width, height = height, width
    transparency = image.mode == "P" and "transparency" in image.info
    mode = "RGBA" if transparency else image.mode
    return ImageHeader(format=image.format or "", mode=mode, width=width, height=height,
                       frames=int(getattr(image, "n_frames", 1)), rotated=orientation != 1)


# Where each format's data must end; an upload cut short (the commonest broken upload) is refused from its last
# bytes, without decoding. Pillow already refuses a WebP cut short when it reads its headers (its RIFF container
# states its length). Other formats are checked when the worker decodes them.
def _complete(image_format: str, data: bytes) -> bool:
    if image_format in ("JPEG", "MPO"):  # the end-of-image marker after the last start-of-scan
        return data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda") >= 0
    if image_format == "PNG":
        return b"IEND\xaeB`\x82" in data  # the end chunk with its CRC
    if image_format == "GIF":
        return data.rstrip(b"\x00").endswith(b";")
    return True


def probe_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """The headers of an encoded image, checked against the budget of max_pixels, without decoding a pixel.
    Raises ImageDecodeError (not an image we accept, over budget, or cut short)."""
    if len(data) == 0:
        raise ImageDecodeError("empty_image", "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in ALLOWED_FORMATS:
                    raise ImageDecodeError("unsupported_format", f"image format {image.format} is not accepted")
                header = _header(image)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("image_too_large", f"image refused as a decompression bomb ({exc})") from exc
    except UnidentifiedImageError:
        raise ImageDecodeError("invalid_image", "cannot decode the image: not an image in an accepted format "
                               f"({', '.join(ALLOWED_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise ImageDecodeError("invalid_image", f"cannot read the image's headers ({exc})") from exc
    _check_budget(header, max_pixels)
    if not _complete(header.format, data):
        raise ImageDecodeError("invalid_image", f"the {header.format} image is truncated (its data ends early)")
    return header


def _to_rgb8(image: Image.Image) -> np.ndarray:
    if image.mode in SIXTEEN_BIT_MODES:
        # Integer arithmetic in one uint32 buffer: round(v * 255 / 65535) exactly (no ties exist), at 4 bytes per
        # pixel instead of float64's 8.
        values = np.asarray(image)
        if values.max() > 255:
            scaled = values.astype(np.uint32)
            scaled *= 255
            scaled += 32767
            scaled //= 65535
            gray = scaled.astype(np.uint8)
        else:
            gray = values.astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "I":  # Pillow would clip these to 8 bits; scaled from 16 when they use more
        values = np.asarray(image)
        top = 65535.0 if values.max() > 255 else 255.0
        gray = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
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
            _check_budget(_header(image), max_pixels)
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
    if array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3 and array.flags.c_contiguous:
        if array.shape[0] * array.shape[1] > max_pixels:
            raise ImageDecodeError("image_too_large", f"image has {array.shape[1]}x{array.shape[0]} pixels, over "
                                                      "the limit")
        return array  # already what load_image returns (a decoded image passed on): no copy
    if array.ndim == 2:  # grey: a view with three channels, so nothing is allocated before the checks below
        array = np.broadcast_to(array[:, :, None], array.shape + (3,))
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageDecodeError("invalid_image", f"expected an HxW, HxWx3 or HxWx4 array, got shape {array.shape}")
    if array.shape[0] * array.shape[1] > max_pixels:
        raise ImageDecodeError("image_too_large", f"image has {array.shape[1]}x{array.shape[0]} pixels, over the limit")
    array = array[:, :, :3]
    if array.dtype == np.uint16:
        array = np.round(array * (255.0 / 65535.0))
    return np.ascontiguousarray(np.clip(array, 0, 255).astype(np.uint8))
