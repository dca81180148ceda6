"""Our region-feature store: an LMDB with one record per image, and no pickle anywhere.

Record layout (value of key = image id, UTF-8):
    8 bytes  b"VLBFEAT1" magic
    4 bytes  little-endian uint32 header length n
    n bytes  JSON header: {"image_id", "image_width", "image_height", "num_boxes",
                           "arrays": {name: {"dtype", "shape", "offset", "nbytes"}}}
    …        the arrays' raw little-endian bytes (boxes float32 [N,4], features float32 [N,D],
             scores float32 [N], class_ids int64 [N]), at the offsets the header gives (from the data start)
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterator

import lmdb
import numpy as np

from .regions import RegionFeatures

MAGIC = b"VLBFEAT1"
ARRAYS = {"boxes": "<f4", "features": "<f4", "scores": "<f4", "class_ids": "<i8"}
DEFAULT_MAP_SIZE = 1 << 40  # address space only; the file grows as written


class FeatureStoreError(ValueError):
    pass


def encode_record(image_id: str, regions: RegionFeatures) -> bytes:
    arrays, chunks, offset = {}, [], 0
    for name, dtype in ARRAYS.items():
        data = np.ascontiguousarray(getattr(regions, name), dtype=dtype).tobytes()
        arrays[name] = {"dtype": dtype, "shape": list(np.shape(getattr(regions, name))), "offset": offset, "nbytes": len(data)}
        chunks.append(data)
        offset += len(data)
    header = json.dumps({"image_id": image_id, "image_width": int(regions.image_width),
                         "image_height": int(regions.image_height), "num_boxes": int(regions.num_boxes),
                         "arrays": arrays}).encode("utf-8")
    return MAGIC + struct.pack("<I", len(header)) + header + b"".join(chunks)


def decode_record(value: bytes) -> tuple[str, RegionFeatures]:
    if value[:8] != MAGIC:
        raise FeatureStoreError("not a feature record of this format (bad magic)")
    (length,) = struct.unpack("<I", value[8:12])
    try:
        header = json.loads(value[12:12 + length].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FeatureStoreError(f"corrupt record header ({exc})") from exc
    data = memoryview(value)[12 + length:]
    fields = {}
    for name, dtype in ARRAYS.items():
        spec = header["arrays"][name]
        if spec["dtype"] != dtype or spec["offset"] + spec["nbytes"] > len(data):
            raise FeatureStoreError(f"corrupt record: array {name}")
        raw = np.frombuffer(data[spec["offset"]:spec["offset"] + spec["nbytes"]], dtype=dtype)
        fields[name] = raw.reshape(spec["shape"]).astype(dtype[1:], copy=True)
    regions = RegionFeatures(num_boxes=header["num_boxes"], image_width=header["image_width"],
                             image_height=header["image_height"], **fields)
    return header["image_id"], regions


class FeatureStore:
    """Read/write access to a store directory. Use as a context manager."""

    def __init__(self, path: str | os.PathLike, readonly: bool = True, map_size: int = DEFAULT_MAP_SIZE):
        self.path = Path(path)
        if readonly and not (self.path / "data.mdb").is_file():
            raise FileNotFoundError(f"no feature store at {self.path}")
        self.env = lmdb.open(str(self.path), readonly=readonly, lock=not readonly, map_size=map_size,
                             subdir=True, readahead=False, meminit=False)

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.env.close()

    def __contains__(self, image_id: str) -> bool:
        with self.env.begin() as txn:
            return txn.get(image_id.encode("utf-8")) is not None

    def __len__(self) -> int:
        return self.env.stat()["entries"]

    def put(self, image_id: str, regions: RegionFeatures) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(image_id.encode("utf-8"), encode_record(image_id, regions))

    def get(self, image_id: str) -> RegionFeatures:
        with self.env.begin() as txn:
            value = txn.get(image_id.encode("utf-8"))
        if value is None:
            raise KeyError(image_id)
        return decode_record(bytes(value))[1]

    def keys(self) -> Iterator[str]:
        with self.env.begin() as txn:
            for key in txn.cursor().iternext(keys=True, values=False):
                yield bytes(key).decode("utf-8")
