"""Precomputed region features sent by a client instead of an image, in one of our two no-pickle formats:

- a record of our feature store (detector.records: magic, JSON header, raw little-endian arrays), as
  `python -m detector.extract` writes them and as the feature cache stores them;
- a NumPy `.npz` with arrays `boxes` [N, 4] (pixels, x1 y1 x2 y2), `features` [N, D] and scalars `image_width`,
  `image_height` (optional `scores` [N], `class_ids` [N]). It is never given to np.load: the zip directory and
  each member's .npy header are checked against budgets first, then exactly the declared bytes are read as a
  plain numeric array (an object array is refused, never unpickled).

Everything a client can get wrong is a BadRequest("invalid_features", ...), checked in the web tier before the
job is queued; the feature width is checked against the workers' model where the web tier knows it. Validated
features travel to the worker as .npz in the job's upload hash, and the worker validates them again (both
processes use this module; it imports no torch).
"""

from __future__ import annotations

import io
import math
import zipfile
import zlib

import numpy as np

from detector.records import MAGIC, FeatureStoreError, decode_record
from detector.regions import RegionFeatures
from modelkit.regions import REGIONS_PER_IMAGE

from .errors import BadRequest

MAX_REGIONS = REGIONS_PER_IMAGE  # what the detector gives and what ViLBERT's visual rows hold besides the global one
MAX_FEATURE_DIM = 4096
MAX_SIDE = 100_000
# A region feature of a ReLU detector is O(1..100); far larger values only overflow the model's float32 maths.
MAX_FEATURE_MAGNITUDE = 1e5
# How far a region box may reach past the image edge: the detector clips boxes to its zero-padded canvas (the
# scaled image rounded up to a multiple of 32, as the reference did), which in image pixels is up to 32/scale,
# a few percent of the longer side at the default sizes. A quarter of the longer side (plus a pixel of
# rounding) keeps every real extractor's boxes and refuses absurd ones.
BOX_SLACK_FRACTION = 0.25
BOX_SLACK_PIXELS = 1.0
# .npz budgets: which members are read, how many entries the archive may list, and how many bytes one member may
# inflate to (float64 features of the widest accepted model, plus the .npy header).
NPZ_ARRAYS = ("boxes", "features", "scores", "class_ids", "image_width", "image_height")
MAX_NPZ_ENTRIES = 64
MAX_MEMBER_BYTES = MAX_REGIONS * MAX_FEATURE_DIM * 8 + 4096
# What reading a hostile zip can raise besides our own BadRequest: bad headers, bad compressed data, encrypted
# or unknown compression methods, truncation.
_UNREADABLE = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError,
               KeyError, SyntaxError)


def parse_features(data: bytes, expected_dim: int | None = None) -> RegionFeatures:
    """Decode and validate one feature file; raises BadRequest with a message saying what is wrong."""
    if data[:len(MAGIC)] == MAGIC:
        try:
            regions = decode_record(data)[1]
        except FeatureStoreError as exc:
            raise BadRequest("invalid_features", f"corrupt feature record: {exc}") from None
    elif data[:2] == b"PK":
        regions = _from_npz(data)
    else:
        raise BadRequest("invalid_features", "not a feature file: send a record written by "
                                             "detector.store.encode_record or an .npz (see docs)")
    return validate(regions, expected_dim)


def _from_npz(data: bytes) -> RegionFeatures:
    """The arrays of an .npz, read member by member within budgets: the zip directory and each .npy header are
    checked (entry count, declared shape, dtype and size) before a byte of array data is inflated."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        entries = archive.infolist()
        if len(entries) > MAX_NPZ_ENTRIES:
            raise BadRequest("invalid_features", f"the .npz has {len(entries)} entries, the limit is {MAX_NPZ_ENTRIES}")
        arrays = {}
        for entry in entries:
            name = entry.filename.removesuffix(".npy")
            if entry.filename.endswith(".npy") and name in NPZ_ARRAYS:  # anything else is never read
                arrays[name] = _read_member(archive, entry, name)
    except BadRequest:
        raise
    except _UNREADABLE as exc:
        raise BadRequest("invalid_features", f"unreadable .npz: {type(exc).__name__}: {exc}") from None
    missing = [n for n in ("boxes", "features", "image_width", "image_height") if n not in arrays]
    if missing:
        raise BadRequest("invalid_features", f"the .npz lacks {', '.join(missing)}")
    count = len(arrays["boxes"]) if arrays["boxes"].ndim else 0
    return RegionFeatures(
        boxes=arrays["boxes"], features=arrays["features"],
        scores=arrays.get("scores", np.zeros(count, np.float32)),
        class_ids=arrays.get("class_ids", np.zeros(count, np.int64)),
        num_boxes=count, image_width=_side(arrays["image_width"], "image_width"),
        image_height=_side(arrays["image_height"], "image_height"),
    )


def _read_member(archive: zipfile.ZipFile, entry: zipfile.ZipInfo, name: str) -> np.ndarray:
    """One .npy member: its header checked against the budget first, then exactly the bytes it declares."""
    if entry.file_size > MAX_MEMBER_BYTES:
        raise BadRequest("invalid_features", f"{name} inflates to {entry.file_size} bytes, the limit is "
                                             f"{MAX_MEMBER_BYTES}")
    with archive.open(entry) as stream:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise BadRequest("invalid_features", f"{name}: .npy format version {version} is not accepted")
        if dtype.hasobject or dtype.kind not in "fiu" or dtype.itemsize > 8:
            raise BadRequest("invalid_features", f"{name} must be a plain numeric array, got dtype {dtype.str}")
        if len(shape) > 2:
            raise BadRequest("invalid_features", f"{name} must have at most 2 dimensions, got shape {list(shape)}")
        size = math.prod(shape) * dtype.itemsize
        if size > MAX_MEMBER_BYTES:
            raise BadRequest("invalid_features", f"{name} declares shape {list(shape)} ({size} bytes), the limit "
                                                 f"is {MAX_MEMBER_BYTES} bytes")
        raw = stream.read(size)
    if len(raw) != size:
        raise BadRequest("invalid_features", f"{name} is truncated: {len(raw)} of {size} bytes")
    return np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran_order else "C")


def _side(value: np.ndarray, name: str) -> int:
    """An image side given as a scalar array: a finite whole number in range (inf and 1e300 are refused here,
    before int() could overflow)."""
    if value.size != 1:
        raise BadRequest("invalid_features", f"{name} must be a scalar")
    number = value.item()
    if not (isinstance(number, int) or (math.isfinite(number) and float(number).is_integer())):
        raise BadRequest("invalid_features", f"{name} must be a whole number of pixels")
    if not 1 <= number <= MAX_SIDE:
        raise BadRequest("invalid_features", f"{name} {number} is out of range 1..{MAX_SIDE}")
    return int(number)


def validate(regions: RegionFeatures, expected_dim: int | None = None) -> RegionFeatures:
    """Shapes, dtypes, finiteness and sizes; returns float32/int64 copies."""
    def bad(message: str) -> BadRequest:
        return BadRequest("invalid_features", message)

    for name in ("boxes", "features", "scores", "class_ids"):
        if getattr(regions, name).dtype.kind not in "fiu":
            raise bad(f"{name} must be numeric, got dtype {getattr(regions, name).dtype}")
    boxes = np.asarray(regions.boxes, np.float32)
    features = np.asarray(regions.features, np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise bad(f"boxes must have shape [N, 4], got {list(boxes.shape)}")
    if features.ndim != 2 or len(features) != len(boxes):
        raise bad(f"features must have shape [N, D] with N = {len(boxes)} boxes, got {list(features.shape)}")
    if not 1 <= len(boxes) <= MAX_REGIONS:
        raise bad(f"between 1 and {MAX_REGIONS} regions are accepted, got {len(boxes)}")
    if not 1 <= features.shape[1] <= MAX_FEATURE_DIM:
        raise bad(f"feature width {features.shape[1]} is out of range")
    if expected_dim is not None and features.shape[1] != expected_dim:
        raise BadRequest("feature_size", f"region features have {features.shape[1]} dimensions, the model expects "
                                         f"{expected_dim}")
    if not (np.isfinite(boxes).all() and np.isfinite(features).all()):
        raise bad("boxes and features must be finite")
    width, height = int(regions.image_width), int(regions.image_height)
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise bad(f"image size {width}x{height} is out of range")
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise bad("boxes must have x2 >= x1 and y2 >= y1")
    slack = BOX_SLACK_PIXELS + BOX_SLACK_FRACTION * max(width, height)
    if ((boxes < -BOX_SLACK_PIXELS).any() or (boxes[:, [0, 2]] > width + slack).any()
            or (boxes[:, [1, 3]] > height + slack).any()):
        raise bad(f"boxes must lie inside the {width}x{height} image (give or take {slack:g} pixels of padding)")
    if np.abs(features).max() > MAX_FEATURE_MAGNITUDE:
        raise bad(f"feature values must lie within +-{MAX_FEATURE_MAGNITUDE:g}")
    scores = np.asarray(regions.scores, np.float32).reshape(-1)
    class_ids = np.asarray(regions.class_ids, np.int64).reshape(-1)
    if len(scores) != len(boxes) or len(class_ids) != len(boxes):
        raise bad("scores and class_ids, when given, need one value per box")
    return RegionFeatures(boxes=boxes, features=features, scores=scores, class_ids=class_ids,
                          num_boxes=len(boxes), image_width=width, image_height=height)


def to_npz(regions: RegionFeatures) -> bytes:
    """The .npz form of a feature file: what the web tier stores for the worker (and a client may send)."""
    buffer = io.BytesIO()
    np.savez(buffer, boxes=regions.boxes, features=regions.features, scores=regions.scores,
             class_ids=regions.class_ids, image_width=regions.image_width, image_height=regions.image_height)
    return buffer.getvalue()
