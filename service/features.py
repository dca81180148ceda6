"""Precomputed region features sent by a client instead of an image, in one of our two no-pickle formats:

- a record of our feature store (detector.records: magic, JSON header, raw little-endian arrays), as
  `python -m detector.extract` writes them and as the feature cache stores them;
- a NumPy `.npz` with arrays `boxes` [N, 4] (pixels, x1 y1 x2 y2), `features` [N, D] and scalars `image_width`,
  `image_height` (optional `scores` [N], `class_ids` [N]). It is read with `allow_pickle=False`, so an object
  array is refused, never unpickled.

Everything a client can get wrong is a BadRequest("invalid_features", ...), checked in the web tier before the
job is queued; the feature width is checked against the workers' model where the web tier knows it. Validated
features travel to the worker as .npz in the job's upload hash, and the worker validates them again (both
processes use this module; it imports no torch).
"""

from __future__ import annotations

import io
import zipfile

import numpy as np

from detector.records import MAGIC, FeatureStoreError, decode_record
from detector.regions import RegionFeatures
from modelkit.regions import REGIONS_PER_IMAGE

from .errors import BadRequest

MAX_REGIONS = REGIONS_PER_IMAGE  # what the detector gives and what ViLBERT's visual rows hold besides the global one
MAX_FEATURE_DIM = 4096
MAX_SIDE = 100_000


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
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files if name in
                      ("boxes", "features", "scores", "class_ids", "image_width", "image_height")}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise BadRequest("invalid_features", f"unreadable .npz (object arrays are refused): {exc}") from None
    missing = [n for n in ("boxes", "features", "image_width", "image_height") if n not in arrays]
    if missing:
        raise BadRequest("invalid_features", f"the .npz lacks {', '.join(missing)}")
    count = len(np.atleast_1d(arrays["boxes"])) if np.ndim(arrays["boxes"]) else 0
    try:
        width, height = int(np.asarray(arrays["image_width"]).item()), int(np.asarray(arrays["image_height"]).item())
    except (ValueError, TypeError):
        raise BadRequest("invalid_features", "image_width and image_height must be scalars") from None
    return RegionFeatures(
        boxes=np.asarray(arrays["boxes"]), features=np.asarray(arrays["features"]),
        scores=np.asarray(arrays.get("scores", np.zeros(count, np.float32))),
        class_ids=np.asarray(arrays.get("class_ids", np.zeros(count, np.int64))),
        num_boxes=count, image_width=width, image_height=height,
    )


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
