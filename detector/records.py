"""The region-feature record: one image's regions as bytes, with no pickle. NumPy only (no torch, no lmdb), so the
web tier can read a client's record and the feature store, the worker's feature cache and the training readers
all share this one codec.

Layout:
    8 bytes  b"VLBFEAT1" magic
    4 bytes  little-endian uint32 header length n
    n bytes  JSON header: {"image_id", "image_width", "image_height", "num_boxes",
                           "arrays": {name: {"dtype", "shape", "offset", "nbytes"}}}
    …        the arrays' raw little-endian bytes (boxes float32 [N,4], features float32 [N,D],
             scores float32 [N], class_ids int64 [N]), at the offsets the header gives (from the data start)
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np

from modelkit.boundedjson import loads_bounded

from .regions import RegionFeatures

MAGIC = b"VLBFEAT1"
ARRAYS = {"boxes": "<f4", "features": "<f4", "scores": "<f4", "class_ids": "<i8"}
# Budgets for the header (records also come from clients): a real header is a few hundred bytes, four levels
# deep ({"arrays": {name: {"shape": [...]}}}).
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADER_DEPTH = 4
MAX_ARRAY_DIMS = 2


class FeatureStoreError(ValueError):
    """A value that is not a well-formed record (the message says what is wrong)."""


def encode_record(image_id: str, regions: RegionFeatures) -> bytes:
    arrays, chunks, offset = {}, [], 0
    for name, dtype in ARRAYS.items():
        data = np.ascontiguousarray(getattr(regions, name), dtype=dtype).tobytes()
        arrays[name] = {"dtype": dtype, "shape": list(np.shape(getattr(regions, name))), "offset": offset,
                        "nbytes": len(data)}
        chunks.append(data)
        offset += len(data)
    header = json.dumps({"image_id": image_id, "image_width": int(regions.image_width),
                         "image_height": int(regions.image_height), "num_boxes": int(regions.num_boxes),
                         "arrays": arrays}).encode("utf-8")
    return MAGIC + struct.pack("<I", len(header)) + header + b"".join(chunks)


def decode_record(value: bytes) -> tuple[str, RegionFeatures]:
    """(image id, regions) of a record; raises FeatureStoreError for anything malformed, since records also come
    from clients and from a shared Redis."""
    if value[:len(MAGIC)] != MAGIC:
        raise FeatureStoreError("not a feature record of this format (bad magic)")
    try:
        (length,) = struct.unpack("<I", value[8:12])
        if length > MAX_HEADER_BYTES:
            raise FeatureStoreError(f"the header claims {length} bytes, the limit is {MAX_HEADER_BYTES}")
        header = loads_bounded(value[12:12 + length], MAX_HEADER_BYTES, MAX_HEADER_DEPTH)
        data = memoryview(value)[12 + length:]
        fields = {}
        for name, dtype in ARRAYS.items():
            spec = header["arrays"][name]
            start, size = _count(spec["offset"]), _count(spec["nbytes"])
            shape = [_count(n) for n in spec["shape"]]
            if spec["dtype"] != dtype:
                raise FeatureStoreError(f"array {name} has dtype {str(spec['dtype'])[:40]}, expected {dtype}")
            if start + size > len(data):
                raise FeatureStoreError(f"array {name} lies outside the record")
            if len(shape) > MAX_ARRAY_DIMS:
                raise FeatureStoreError(f"array {name} has {len(shape)} dimensions, at most {MAX_ARRAY_DIMS}")
            if math.prod(shape) * np.dtype(dtype).itemsize != size:
                raise FeatureStoreError(f"array {name}: shape {shape} does not match its {size} bytes")
            raw = np.frombuffer(data[start:start + size], dtype=dtype)
            # astype copies: the arrays own their memory instead of pinning (and being read-only views of) the value
            fields[name] = raw.reshape(shape).astype(dtype[1:])
        regions = RegionFeatures(num_boxes=_count(header["num_boxes"]), image_width=_count(header["image_width"]),
                                 image_height=_count(header["image_height"]), **fields)
        if not isinstance(header["image_id"], str):
            raise FeatureStoreError("image_id must be a string")
        return header["image_id"], regions
    except FeatureStoreError:
        raise
    except (KeyError, TypeError, ValueError, struct.error) as exc:  # JsonBudgetError is a ValueError
        raise FeatureStoreError(str(exc)) from exc


def _count(value: object) -> int:
    """A non-negative JSON integer of the header (not a bool, float or string)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FeatureStoreError(f"expected a non-negative integer in the header, got {str(value)[:40]}")
    return value
