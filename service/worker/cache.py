"""Region-feature cache in Redis: a second question about the same image skips the detector.

Key: `vilbert:feat:<detector key>:<sha256 of the image bytes>`. The detector key hashes the extractor's
`identity` (config file + weights fingerprint + min/max size + region count) and its precision, so a changed
detector config, checkpoint, size or precision never reads features of another detector. The same picture
re-encoded (other bytes) is a miss: we key on the bytes the client sent, not on pixels.

Value: our feature-record format (`detector.records.encode_record`: JSON header + raw little-endian arrays), never
pickle. A record that does not decode is deleted and counted a miss.

Bound (why not a separate Redis with `maxmemory`): the cache shares the job Redis, and an allkeys-lru policy
there could evict queued jobs and uploads. So the cache bounds itself:
  - every entry has a TTL (FEATURE_CACHE_TTL), refreshed on each hit;
  - `vilbert:feat:index` is a sorted set of entry keys scored by last use, `vilbert:feat:sizes` a hash of their
    sizes and `vilbert:feat:bytes` their total; each put runs one Lua script (atomic, so several workers can
    share it) that drops index entries older than the TTL, then the least recently used ones until there are
    at most FEATURE_CACHE_MAX_ENTRIES entries and FEATURE_CACHE_MAX_BYTES bytes.
A full-size entry is ~0.8 MB (100 x 2048 float32 features + boxes), so the defaults (2000 entries, 1 GiB) hold
about 1300 images. The script touches keys it reads from the index, which is fine on one Redis (not Cluster).

A cache that is unreachable never fails a job: Redis errors are logged and count as misses.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from redis import Redis
from redis.exceptions import RedisError

from detector.extractor import RegionFeatureExtractor, RegionFeatures
from detector.records import FeatureStoreError, decode_record, encode_record

from ..contract import FEATURE_CACHE_PREFIX

log = logging.getLogger(__name__)

PREFIX = FEATURE_CACHE_PREFIX
INDEX_KEY = PREFIX + "index"
SIZES_KEY = PREFIX + "sizes"
BYTES_KEY = PREFIX + "bytes"

# KEYS: entry, index, sizes, total. ARGV: value, ttl, now, max entries, max bytes. Returns the number evicted.
_PUT_SCRIPT = """
local function drop(key)
  local size = redis.call('HGET', KEYS[3], key)
  if size then
    redis.call('DECRBY', KEYS[4], size)
    redis.call('HDEL', KEYS[3], key)
  end
  redis.call('ZREM', KEYS[2], key)
  redis.call('DEL', key)
end
local old = redis.call('HGET', KEYS[3], KEYS[1])
if old then redis.call('DECRBY', KEYS[4], old) end
local size = string.len(ARGV[1])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], KEYS[1])
redis.call('HSET', KEYS[3], KEYS[1], size)
redis.call('INCRBY', KEYS[4], size)
local evicted = 0
for _, key in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', tonumber(ARGV[3]) - tonumber(ARGV[2]))) do
  drop(key)
end
while redis.call('ZCARD', KEYS[2]) > tonumber(ARGV[4]) or tonumber(redis.call('GET', KEYS[4]) or '0') > tonumber(ARGV[5]) do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 then break end
  drop(oldest[1])
  evicted = evicted + 1
end
return evicted
"""


def detector_key(extractor: RegionFeatureExtractor) -> str:
    """Which detector made a set of features: its identity (config, weights fingerprint, sizes, precision)."""
    return hashlib.sha256(extractor.identity.encode()).hexdigest()[:16]


_STATS = {"hit": "hits", "miss": "misses", "store": "stores", "eviction": "evictions", "error": "errors"}


def _ignore(kind: str, count: int) -> None:
    """The default metrics hook: no metrics."""


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0
    errors: int = 0


class FeatureCache:
    def __init__(self, connection: Redis, detector: str, ttl: int = 86400, max_entries: int = 2000,
                 max_bytes: int = 1 << 30, on_event: Callable[[str, int], None] | None = None):
        self.connection = connection
        self.detector = detector
        self.ttl, self.max_entries, self.max_bytes = ttl, max_entries, max_bytes
        self._put = connection.register_script(_PUT_SCRIPT)
        self.stats = CacheStats()
        # Metrics hook: on_event(kind, count) with kind in hit, miss, store, eviction, error.
        self.on_event: Callable[[str, int], None] = on_event or _ignore

    def key(self, image: bytes) -> str:
        return f"{PREFIX}{self.detector}:{hashlib.sha256(image).hexdigest()}"

    def _count(self, kind: str, count: int = 1) -> None:
        if count:
            name = _STATS[kind]
            setattr(self.stats, name, getattr(self.stats, name) + count)
            self.on_event(kind, count)

    def get_many(self, images: Sequence[bytes]) -> list[RegionFeatures | None]:
        """Cached features per image (None = miss); a hit's TTL and last-use time are refreshed."""
        if not images:
            return []
        keys = [self.key(image) for image in images]
        try:
            values = self.connection.mget(keys)
            found: list[RegionFeatures | None] = []
            now = time.time()
            with self.connection.pipeline(transaction=False) as pipe:
                for key, value in zip(keys, values):
                    regions = None
                    if value is not None:
                        try:
                            regions = decode_record(value)[1]
                        except (FeatureStoreError, KeyError, ValueError) as exc:
                            log.warning("dropping undecodable cache entry %s: %s", key, exc)
                            pipe.delete(key)
                    if regions is not None:
                        pipe.zadd(INDEX_KEY, {key: now}, xx=True)
                        pipe.expire(key, self.ttl)
                    found.append(regions)
                pipe.execute()
        except RedisError as exc:
            log.warning("feature cache unavailable (%s): treating as misses", exc)
            self._count("error")
            found = [None] * len(images)
        hits = sum(r is not None for r in found)
        self._count("hit", hits)
        self._count("miss", len(found) - hits)
        return found

    def put(self, image: bytes, regions: RegionFeatures) -> None:
        try:
            evicted = self._put(keys=[self.key(image), INDEX_KEY, SIZES_KEY, BYTES_KEY],
                                args=[encode_record("", regions), self.ttl, time.time(), self.max_entries,
                                      self.max_bytes])
        except RedisError as exc:
            log.warning("feature cache unavailable (%s): not stored", exc)
            self._count("error")
            return
        self._count("store")
        self._count("eviction", int(evicted))

    def size(self) -> tuple[int, int]:
        """(entries, bytes) as tracked by the index."""
        return int(self.connection.zcard(INDEX_KEY)), int(self.connection.get(BYTES_KEY) or 0)


def extract_cached(extractor: RegionFeatureExtractor, cache: FeatureCache | None, raw: Sequence[bytes | np.ndarray],
                   rgb: Sequence[np.ndarray]) -> tuple[list[RegionFeatures], list[bool]]:
    """Region features for each image, from the cache where possible: one detector call over the misses only.
    raw: what the client sent (bytes are cached; in-process arrays are not); rgb: the decoded images.
    Returns (features per image, hit per image)."""
    cacheable = [isinstance(image, (bytes, bytearray)) for image in raw]
    cached: list[RegionFeatures | None] = [None] * len(raw)
    if cache is not None:
        keys = [i for i, ok in enumerate(cacheable) if ok]
        for i, regions in zip(keys, cache.get_many([bytes(raw[i]) for i in keys])):
            cached[i] = regions
    misses = [i for i, regions in enumerate(cached) if regions is None]
    # The same bytes twice in one batch (two questions about one upload) go through the detector once.
    first: dict[bytes | int, int] = {}
    for i in misses:
        first.setdefault(bytes(raw[i]) if cacheable[i] else i, i)
    unique = list(first.values())
    fresh = dict(zip(unique, extractor.extract([rgb[i] for i in unique]))) if unique else {}
    for i in unique:
        if cache is not None and cacheable[i]:
            cache.put(bytes(raw[i]), fresh[i])
    for i in misses:
        cached[i] = fresh[first[bytes(raw[i]) if cacheable[i] else i]]
    missed = set(misses)
    return cached, [i not in missed for i in range(len(raw))]  # type: ignore[return-value]
