"""Precomputed region features sent by a client instead of an image, in one of our two no-pickle formats:

- a record of our feature store (`detector.store.encode_record`: magic, JSON header, raw little-endian arrays),
  as `python -m detector.extract` writes them and as the feature cache stores them;
- a NumPy `.npz` with arrays `boxes` [N, 4] (pixels, x1 y1 x2 y2), `features` [N, D] and scalars `image_width`,
  `image_height` (optional `scores` [N], `class_ids` [N]). It is read with `allow_pickle=False`, so an object
  array is refused, never unpickled.

Everything a client can get wrong is a BadRequest("invalid_features", ...), checked in the web tier before the
job is queued; the feature width is checked against the workers' model where the web tier knows it. Validated
features travel to the worker as .npz in the job's upload hash, and the worker validates them again.

Torch-free on purpose: the web tier never imports torch (detector.store does, through detector.extractor), so
the record format is read here with NumPy alone; `Regions` has the fields of detector.RegionFeatures.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np


from vilbert.tasks import TaskRegistry

from .errors import BadRequest
from .inputs import ImageInfo, JobRequest, check_request, parse_text, parse_tasks, parse_top_k
from .settings import Settings

RECORD_MAGIC = b"VLBFEAT1"  # detector.store.MAGIC
RECORD_ARRAYS = {"boxes": "<f4", "features": "<f4", "scores": "<f4", "class_ids": "<i8"}  # detector.store.ARRAYS
MAX_REGIONS = 100  # what the detector gives and what ViLBERT's visual rows hold besides the global one
MAX_FEATURE_DIM = 4096
MAX_SIDE = 100_000


@dataclass
class Regions:
    """Region features of one image (the fields of detector.RegionFeatures, which the predictor reads)."""

    boxes: np.ndarray
    features: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    num_boxes: int
    image_width: int
    image_height: int


def parse_features(data: bytes, expected_dim: int | None = None) -> Regions:
    """Decode and validate one feature file; raises BadRequest with a message saying what is wrong."""
    if data[:len(RECORD_MAGIC)] == RECORD_MAGIC:
        try:
            regions = _from_record(data)
        except (KeyError, TypeError, ValueError, UnicodeDecodeError, struct.error) as exc:
            raise BadRequest("invalid_features", f"corrupt feature record: {exc}") from None
    elif data[:2] == b"PK":
        regions = _from_npz(data)
    else:
        raise BadRequest("invalid_features", "not a feature file: send a record written by "
                                             "detector.store.encode_record or an .npz (see docs)")
    return validate(regions, expected_dim)


def _from_record(data: bytes) -> Regions:
    """A feature-store record: magic, u32 header length, JSON header, raw arrays at the header's offsets."""
    (length,) = struct.unpack("<I", data[8:12])
    header = json.loads(data[12:12 + length].decode("utf-8"))
    body = memoryview(data)[12 + length:]
    arrays = {}
    for name, dtype in RECORD_ARRAYS.items():
        spec = header["arrays"][name]
        start, size = int(spec["offset"]), int(spec["nbytes"])
        if spec["dtype"] != dtype or start < 0 or start + size > len(body):
            raise ValueError(f"array {name} lies outside the record")
        arrays[name] = np.frombuffer(body[start:start + size], dtype=dtype).reshape([int(n) for n in spec["shape"]])
    return Regions(num_boxes=int(header["num_boxes"]), image_width=int(header["image_width"]),
                   image_height=int(header["image_height"]), **arrays)


def _from_npz(data: bytes) -> Regions:
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
    return Regions(
        boxes=np.asarray(arrays["boxes"]), features=np.asarray(arrays["features"]),
        scores=np.asarray(arrays.get("scores", np.zeros(count, np.float32))),
        class_ids=np.asarray(arrays.get("class_ids", np.zeros(count, np.int64))),
        num_boxes=count, image_width=width, image_height=height,
    )


def validate(regions: Regions, expected_dim: int | None = None) -> Regions:
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
    return Regions(boxes=boxes, features=features, scores=scores, class_ids=class_ids,
                          num_boxes=len(boxes), image_width=width, image_height=height)


def to_npz(regions: Regions) -> bytes:
    """The .npz form of a feature file: what the web tier stores for the worker (and a client may send)."""
    buffer = io.BytesIO()
    np.savez(buffer, boxes=regions.boxes, features=regions.features, scores=regions.scores,
             class_ids=regions.class_ids, image_width=regions.image_width, image_height=regions.image_height)
    return buffer.getvalue()


@dataclass
class FeatureJobRequest(JobRequest):
    """A job whose uploads are feature records (re-encoded by us after validation), not images."""

    feature_count: int = 0

    def to_json(self) -> dict:
        return {**super().to_json(), "inputs": "features"}


def model_feature_dim(connection: Any) -> int | None:
    """The feature width of the ready workers' model, when they agree on one (else the worker checks)."""
    from . import jobs

    dims = {w.get("feature_dim") for w in jobs.live_workers(connection)}
    return dims.pop() if len(dims) == 1 and None not in dims else None


def parse_feature_submission(form: Mapping[str, str], files: Sequence[bytes], images: Sequence[bytes],
                             settings: Settings, registry: TaskRegistry,
                             expected_dim: int | None) -> tuple[FeatureJobRequest, list[bytes]]:
    """Validate a submission of precomputed features (form field `features`, one file per image) into a job
    request and the records to store with it."""
    if images:
        raise BadRequest("mixed_inputs", "send either images or precomputed features, not both")
    if len(files) > settings.max_images:
        raise BadRequest("too_many_images", f"{len(files)} feature files sent, the limit is {settings.max_images}")
    text = parse_text(form.get("text", form.get("text_input")), settings.max_text_chars)
    tasks = parse_tasks(form.get("tasks"), registry, len(files))
    top_k = parse_top_k(form.get("top_k"), settings.max_top_k)
    if form.get("boxes"):
        raise BadRequest("boxes_need_image", "candidate boxes need the image itself, not precomputed features")
    regions = []
    for index, data in enumerate(files):
        try:
            regions.append(parse_features(data, expected_dim))
        except BadRequest as exc:
            raise BadRequest(exc.code, f"features {index}: {exc.message}", status=exc.status) from None
    infos = [ImageInfo(width=r.image_width, height=r.image_height, bytes=len(d)) for r, d in zip(regions, files)]
    request = FeatureJobRequest(text=text, tasks=tasks, top_k=top_k, boxes=None, images=infos,
                                feature_count=len(regions))
    check_request(request, registry, len(files))
    return request, [to_npz(r) for r in regions]
