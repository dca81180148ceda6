"""Our region-feature store: an LMDB with one record per image, and no pickle anywhere.

Records are encoded by detector.records (the one codec, also read by the web tier and the feature cache).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import lmdb

from .records import MAGIC, FeatureStoreError, decode_record, encode_record
from .regions import RegionFeatures

__all__ = ["MAGIC", "FeatureStore", "FeatureStoreError", "decode_record", "encode_record"]

DEFAULT_MAP_SIZE = 1 << 40  # address space only; the file grows as written


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
