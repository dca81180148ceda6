"""Region features for training: the released pickled LMDBs, or our own `detector.store.FeatureStore`.

Both readers return `vilbert.predictor.ImageRegions` (pixel boxes [N, 4], features [N, D], image size), and the
model-input rows are then built with the predictor's own `region_rows`, so training sees exactly what the
service sees: a global mean-feature region 0 at [0, 0, 1, 1, 1], then the detected boxes.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

from vilbert.predictor import ImageRegions, region_rows

from .pickles import loads

RELEASED_ARRAYS = ("boxes", "features")


class FeatureFileError(ValueError):
    pass


# LMDB allows one environment per file and process: readers of the same file (train and val splits, tasks
# sharing the COCO features) share it. A DataLoader worker inherits the parent's handle through fork, which it
# must not use and which blocks a fresh open of the same path: the worker closes its copy and opens its own.
_ENVS: dict[str, tuple[int, object]] = {}


def shared_env(path: Path, opener):
    key = str(path.resolve())
    pid, env = _ENVS.get(key, (None, None))
    if pid != os.getpid():
        if env is not None:
            env.close()  # the forked copy: unmaps it in this process only
        env = opener()
        _ENVS[key] = (os.getpid(), env)
    return env


def _key(image_id: object) -> str:
    return image_id.decode("utf-8") if isinstance(image_id, bytes) else str(image_id)


class ReleasedFeatureReader:
    """The official `*_resnext152_faster_rcnn_genome.lmdb`: key = image id, value = pickle of
    {image_id, image_h, image_w, num_boxes, boxes [N,4] float32 pixels, features [N,2048] float32}.

    Like the reference reader, the stored num_boxes is ignored and the row count of `features` is used. The LMDB
    is opened lazily so that DataLoader worker processes each get their own handle."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "data.mdb").is_file():
            raise FileNotFoundError(f"region-feature LMDB not found: {self.path / 'data.mdb'}")

    def _env(self):
        return shared_env(self.path, lambda: lmdb.open(str(self.path), readonly=True, lock=False, readahead=False,
                                                       meminit=False, max_readers=256))

    def _txn_get(self, key: bytes) -> bytes | None:
        with self._env().begin(write=False) as txn:
            value = txn.get(key)
        return None if value is None else bytes(value)

    def __contains__(self, image_id: object) -> bool:
        return self._txn_get(_key(image_id).encode("utf-8")) is not None

    def __getitem__(self, image_id: object) -> ImageRegions:
        key = _key(image_id)
        value = self._txn_get(key.encode("utf-8"))
        if value is None:
            raise KeyError(f"image {key!r} is not in {self.path}")
        record = loads(value, f"{self.path}[{key}]")
        if not isinstance(record, dict) or any(name not in record for name in RELEASED_ARRAYS + ("image_w", "image_h")):
            raise FeatureFileError(f"{self.path}[{key}]: not a region-feature record (expected boxes, features, "
                                   "image_w, image_h)")
        features = np.asarray(record["features"], dtype=np.float32).reshape(len(record["features"]), -1)
        boxes = np.asarray(record["boxes"], dtype=np.float32).reshape(-1, 4)[: len(features)]
        return ImageRegions(boxes, features, int(record["image_w"]), int(record["image_h"]))



class StoreFeatureReader:
    """Our detector's feature store (`python -m detector.extract` output; no pickle)."""

    def __init__(self, path: str | os.PathLike):
        from detector.store import FeatureStore  # imports the detector package only when used

        self.path = Path(path)
        self._open = FeatureStore
        if not (self.path / "data.mdb").is_file():
            raise FileNotFoundError(f"feature store not found: {self.path / 'data.mdb'}")

    def _get_store(self):
        return shared_env(self.path, lambda: self._open(self.path, readonly=True))

    def __contains__(self, image_id: object) -> bool:
        return _key(image_id) in self._get_store()

    def __getitem__(self, image_id: object) -> ImageRegions:
        key = _key(image_id)
        try:
            regions = self._get_store().get(key)
        except KeyError:
            raise KeyError(f"image {key!r} is not in {self.path}") from None
        return ImageRegions(regions.boxes, regions.features, regions.image_width, regions.image_height)


def open_features(path: str | os.PathLike) -> ReleasedFeatureReader | StoreFeatureReader:
    """Pick the reader from the first record: our store's records start with a magic, the released are pickles."""
    path = Path(path)
    if not (path / "data.mdb").is_file():
        raise FileNotFoundError(f"region-feature LMDB not found: {path / 'data.mdb'}")
    reader = ReleasedFeatureReader(path)
    with reader._env().begin() as txn:
        first = bytes(next(iter(txn.cursor().iternext(keys=False, values=True)), b""))
    # Released records are pickles (protocol >= 2 starts with the PROTO opcode). Anything else is probed as our
    # store; importing detector.store only then keeps torchvision out of the training processes' start-up.
    if not first.startswith(pickle.PROTO):
        from detector.store import MAGIC

        if first.startswith(MAGIC):
            _ENVS.pop(str(path.resolve()))[1].close()  # the FeatureStore opens its own
            return StoreFeatureReader(path)
    return reader


@dataclass
class VisualInput:
    """One batch row's visual input, padded to the task's region count."""

    features: np.ndarray  # [R, D] float32
    spatials: np.ndarray  # [R, 5] float32
    mask: np.ndarray  # [R] int64
    boxes: np.ndarray  # [R, 4] pixel boxes (global row = whole image, padding = 0)
    num_detected: int  # rows of the detected block actually used (incl. global)


def visual_input(image: ImageRegions, max_regions: int, detected_slots: int | None = None,
                 candidates: ImageRegions | None = None) -> VisualInput:
    """Global region + detected boxes (+ candidate boxes), zero-padded to `max_regions` rows.

    With `candidates` (pointing tasks; grounding's appended ground-truth boxes) the candidate rows follow the
    detected block, which is first padded to `detected_slots` rows when given (101 for the pointing tasks, whose
    reference reads `vision_logit[:, 101:]`). Whatever does not fit in `max_regions` is cut, as the reference
    cuts. The global feature is then the count-weighted mean of both files' global rows (predictor.region_rows)."""
    num_candidates = 0 if candidates is None else len(np.asarray(candidates.boxes).reshape(-1, 4))
    slots = detected_slots or max_regions
    rows = region_rows(image, slots + num_candidates, candidates)
    count = min(len(rows.features) - num_candidates, max_regions)
    dim = rows.features.shape[1]
    features = np.zeros((max_regions, dim), np.float32)
    spatials = np.zeros((max_regions, 5), np.float32)
    boxes = np.zeros((max_regions, 4), np.float32)
    mask = np.zeros(max_regions, np.int64)
    features[:count], spatials[:count], boxes[:count] = rows.features[:count], rows.spatials[:count], rows.boxes[:count]
    mask[:count] = 1
    if num_candidates:
        start = detected_slots if detected_slots is not None else count
        n = max(0, min(num_candidates, max_regions - start))
        src = len(rows.features) - num_candidates
        features[start:start + n] = rows.features[src:src + n]
        spatials[start:start + n] = rows.spatials[src:src + n]
        boxes[start:start + n] = rows.boxes[src:src + n]
        mask[start:start + n] = 1
    return VisualInput(features, spatials, mask, boxes, count)
