"""service/worker/cache.py, the region-feature cache, against a real private Redis: keys, the bookkeeping of the
put script (index, sizes, total) through replacement, expiry and least-recently-used eviction by entries and by
bytes, hits refreshing an entry, undecodable entries, an unreachable Redis, and `extract_cached` over a real
(tiny, random-weight) detector built in memory. Fast, so that the mutation check (bench/mutation.py) runs it per
mutant; the cache inside the running service is tests/test_service_scale.py."""

from __future__ import annotations

import hashlib
import logging
import re
import time
from typing import Callable

import numpy as np
import pytest
import torch
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from detector.extractor import RegionFeatureExtractor
from detector.model import RegionDetector
from detector.records import encode_record
from detector.regions import RegionFeatures
from detector.tiny import tiny_detector_config
from service.localstack import free_port
from service.worker.cache import (BYTES_KEY, INDEX_KEY, SIZES_KEY, CacheStats, FeatureCache, detector_key,
                                  extract_cached)


@pytest.fixture
def connection(redis_url) -> Redis:
    """A clean cache namespace: the bookkeeping keys are shared by every detector, so each test starts empty."""
    connection = Redis.from_url(redis_url)
    for key in connection.scan_iter(match="vilbert:feat:*"):
        connection.delete(key)
    return connection


@pytest.fixture(scope="module")
def extractor() -> RegionFeatureExtractor:
    torch.manual_seed(0)
    return RegionFeatureExtractor(RegionDetector(tiny_detector_config()), min_size=32, max_size=48, num_regions=4,
                                  identity="tiny-test")


def regions(count: int = 2, seed: int = 0) -> RegionFeatures:
    rng = np.random.default_rng(seed)
    return RegionFeatures(boxes=rng.random((count, 4), np.float32), features=rng.random((count, 8), np.float32),
                          scores=rng.random(count, np.float32), class_ids=np.arange(1, count + 1, dtype=np.int64),
                          num_boxes=count, image_width=10, image_height=7)


def size_of(value: RegionFeatures) -> int:
    return len(encode_record("", value))


def same(a: RegionFeatures | None, b: RegionFeatures) -> bool:
    return a is not None and a.num_boxes == b.num_boxes and np.array_equal(a.features, b.features) and \
        np.array_equal(a.boxes, b.boxes) and (a.image_width, a.image_height) == (b.image_width, b.image_height)


def recording(events: list) -> Callable[[str, int], None]:
    return lambda kind, count: events.append((kind, count))


def unreachable() -> Redis:
    """A client of a port nothing listens on, that fails at once (no retries)."""
    return Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1, socket_timeout=1,
                 retry=Retry(NoBackoff(), 0))


# ---------------------------------------------------------------------------------------------------- keys


def test_an_entry_is_keyed_by_detector_and_the_sha256_of_the_bytes(connection):
    cache = FeatureCache(connection, "det1")
    assert cache.key(b"abc") == "vilbert:feat:det1:" + hashlib.sha256(b"abc").hexdigest()
    assert FeatureCache(connection, "det2").key(b"abc") != cache.key(b"abc")
    assert (INDEX_KEY, SIZES_KEY, BYTES_KEY) == ("vilbert:feat:index", "vilbert:feat:sizes", "vilbert:feat:bytes")


def test_the_detector_key_is_a_hash_of_the_extractors_identity(extractor):
    assert detector_key(extractor) == hashlib.sha256(b"tiny-test").hexdigest()[:16]


def test_the_defaults_are_the_documented_bounds(connection):
    cache = FeatureCache(connection, "d")
    assert (cache.ttl, cache.max_entries, cache.max_bytes) == (86400, 2000, 1 << 30)
    assert cache.stats == CacheStats(0, 0, 0, 0, 0)
    assert cache.size() == (0, 0) and not connection.exists(BYTES_KEY)
    cache.put(b"a", regions())
    assert cache.get_many([b"a", b"b"])[0] is not None and cache.stats == CacheStats(1, 1, 1, 0, 0)  # no hook: fine


# ------------------------------------------------------------------------------------------------- put, get


def test_a_stored_entry_comes_back_with_its_bookkeeping(connection):
    events: list = []
    cache = FeatureCache(connection, "d", ttl=120, on_event=recording(events))
    value = regions(3)
    cache.put(b"image", value)
    key = cache.key(b"image")
    assert connection.get(key) == encode_record("", value) and 0 < connection.ttl(key) <= 120
    assert connection.zrange(INDEX_KEY, 0, -1) == [key.encode()]
    assert abs(connection.zscore(INDEX_KEY, key) - time.time()) < 60
    assert connection.hget(SIZES_KEY, key) == str(size_of(value)).encode()
    assert cache.size() == (1, size_of(value))
    assert events == [("store", 1)] and cache.stats == CacheStats(stores=1)
    found = cache.get_many([b"image", b"other", b"image"])
    assert same(found[0], value) and found[1] is None and same(found[2], value)
    assert found[0].features.dtype == np.float32
    assert events == [("store", 1), ("hit", 2), ("miss", 1)]
    assert cache.stats == CacheStats(hits=2, misses=1, stores=1)


def test_replacing_an_entry_counts_its_bytes_once(connection):
    cache = FeatureCache(connection, "d")
    cache.put(b"image", regions(2))
    cache.put(b"image", regions(5, seed=1))
    assert cache.size() == (1, size_of(regions(5)))
    assert same(cache.get_many([b"image"])[0], regions(5, seed=1))


def test_a_hit_renews_the_entrys_ttl_and_last_use_but_a_miss_indexes_nothing(connection):
    cache = FeatureCache(connection, "d", ttl=100)
    cache.put(b"image", regions())
    key = cache.key(b"image")
    connection.expire(key, 5)
    connection.zadd(INDEX_KEY, {key: 1000.0})
    cache.get_many([b"image"])
    assert connection.ttl(key) > 5 and connection.zscore(INDEX_KEY, key) > time.time() - 60
    # An entry that is not in the index (written by hand, or its index entry evicted) is read but not re-indexed.
    stray = cache.key(b"stray")
    connection.set(stray, encode_record("", regions()))
    assert cache.get_many([b"stray"])[0] is not None
    assert connection.zscore(INDEX_KEY, stray) is None and connection.ttl(stray) > 0


def test_an_undecodable_entry_is_dropped_and_counted_a_miss(connection, caplog):
    cache = FeatureCache(connection, "d")
    cache.put(b"good", regions())
    connection.set(cache.key(b"bad"), b"not a feature record")
    with caplog.at_level(logging.WARNING, logger="service.worker.cache"):
        found = cache.get_many([b"bad", b"good"])
    assert found[0] is None and found[1] is not None
    assert not connection.exists(cache.key(b"bad")) and connection.exists(cache.key(b"good"))
    assert cache.stats == CacheStats(hits=1, misses=1, stores=1)
    assert caplog.messages == [f"dropping undecodable cache entry {cache.key(b'bad')}: not a feature record of this "
                               "format (bad magic)"]


def test_asking_for_nothing_asks_redis_nothing(connection):
    events: list = []
    cache = FeatureCache(unreachable(), "d", on_event=recording(events))
    assert cache.get_many([]) == [] and events == [] and cache.stats == CacheStats()


# ------------------------------------------------------------------------------------------------- bounds


def test_the_least_recently_used_entries_go_first_at_the_entry_limit(connection):
    events: list = []
    cache = FeatureCache(connection, "d", max_entries=3, on_event=recording(events))
    for i in range(3):
        cache.put(b"image %d" % i, regions(seed=i))
    cache.get_many([b"image 0"])  # now the most recently used
    cache.put(b"image 3", regions(seed=3))
    found = cache.get_many([b"image %d" % i for i in range(4)])
    assert [value is not None for value in found] == [True, False, True, True]
    assert not connection.hexists(SIZES_KEY, cache.key(b"image 1"))
    assert cache.size() == (3, 3 * size_of(regions()))
    assert ("eviction", 1) in events and cache.stats.evictions == 1


def test_entries_are_evicted_until_the_bytes_fit_and_exactly_at_the_limit_stay(connection):
    one = size_of(regions())
    cache = FeatureCache(connection, "d", max_bytes=2 * one)
    cache.put(b"a", regions())
    cache.put(b"b", regions())
    assert cache.size() == (2, 2 * one) and cache.stats.evictions == 0  # exactly at the limit
    cache.put(b"c", regions(4))  # larger: both older entries must go
    assert cache.size() == (1, size_of(regions(4))) and cache.stats.evictions == 2
    assert cache.get_many([b"a", b"b"]) == [None, None]


def test_an_entry_larger_than_the_byte_limit_evicts_itself(connection):
    cache = FeatureCache(connection, "d", max_bytes=10)
    cache.put(b"huge", regions())
    assert cache.size() == (0, 0) and cache.stats.evictions == 1
    assert not connection.exists(cache.key(b"huge")) and connection.hlen(SIZES_KEY) == 0


def test_index_entries_older_than_the_ttl_are_dropped_at_the_next_put_without_counting_evictions(connection):
    cache = FeatureCache(connection, "d", ttl=100)
    cache.put(b"old", regions())
    cache.put(b"recent", regions())
    old = cache.key(b"old")
    connection.zadd(INDEX_KEY, {old: time.time() - 101})  # last used longer ago than the TTL
    connection.zadd(INDEX_KEY, {cache.key(b"recent"): time.time() - 90})
    cache.put(b"new", regions())
    assert not connection.exists(old) and not connection.hexists(SIZES_KEY, old)
    assert cache.size() == (2, 2 * size_of(regions())) and cache.stats.evictions == 0
    assert cache.get_many([b"recent", b"new"])[0] is not None


def test_a_missing_size_entry_does_not_break_the_total(connection):
    # An index entry without a size (bookkeeping written by an older version, or by hand) is dropped cleanly.
    cache = FeatureCache(connection, "d", max_entries=1)
    connection.zadd(INDEX_KEY, {"vilbert:feat:d:orphan": 1.0})
    cache.put(b"image", regions())
    assert cache.size() == (1, size_of(regions()))


# ----------------------------------------------------------------------------------------- Redis is gone


def test_an_unreachable_cache_counts_errors_and_misses_and_never_raises(caplog):
    events: list = []
    cache = FeatureCache(unreachable(), "d", on_event=recording(events))
    with caplog.at_level(logging.WARNING, logger="service.worker.cache"):
        assert cache.get_many([b"a", b"b"]) == [None, None]
        cache.put(b"a", regions())
    assert events == [("error", 1), ("miss", 2), ("error", 1)]
    assert cache.stats == CacheStats(misses=2, errors=2)
    port = cache.connection.connection_pool.connection_kwargs["port"]
    refused = rf"feature cache unavailable \(Error \d+ connecting to 127\.0\.0\.1:{port}\. Connection refused\.\)"
    assert len(caplog.messages) == 2
    assert re.fullmatch(refused + ": treating as misses", caplog.messages[0])
    assert re.fullmatch(refused + ": not stored", caplog.messages[1])


# ------------------------------------------------------------------------------------------ extract_cached


def pictures(count: int) -> list[np.ndarray]:
    return [(np.random.default_rng(seed).random((24, 32, 3)) * 255).astype(np.uint8) for seed in range(count)]


@pytest.fixture
def counted(extractor, monkeypatch) -> list[int]:
    """The extractor's real `extract`, with the number of images of each call recorded."""
    calls: list[int] = []
    real = extractor.extract

    def extract(images):
        calls.append(len(images))
        return real(images)

    monkeypatch.setattr(extractor, "extract", extract)
    return calls


def test_without_a_cache_each_distinct_upload_goes_through_the_detector_once(extractor, counted):
    rgb = pictures(3)
    raw = [b"zero", b"one", b"zero", rgb[2]]  # two questions about one upload; an in-process array
    features, hits = extract_cached(extractor, None, raw, [rgb[0], rgb[1], rgb[0], rgb[2]])
    assert counted == [3] and hits == [False] * 4
    assert features[0] is features[2]
    direct = extractor.extract([rgb[0], rgb[1], rgb[2]])
    for got, want in zip((features[0], features[1], features[3]), direct):
        assert np.array_equal(got.features, want.features) and np.array_equal(got.boxes, want.boxes)


def test_with_a_cache_the_second_batch_skips_the_detector(connection, extractor, counted):
    cache = FeatureCache(connection, detector_key(extractor))
    rgb = pictures(2)
    first, hits = extract_cached(extractor, cache, [b"zero", b"one", b"zero"], [rgb[0], rgb[1], rgb[0]])
    assert counted == [2] and hits == [False, False, False] and cache.size()[0] == 2 and cache.stats.stores == 2
    again, hits = extract_cached(extractor, cache, [b"one", b"zero"], [rgb[1], rgb[0]])
    assert counted == [2] and hits == [True, True]
    assert np.array_equal(again[0].features, first[1].features) and np.array_equal(again[1].boxes, first[0].boxes)
    mixed, hits = extract_cached(extractor, cache, [b"one", rgb[0], b"new"], [rgb[1], rgb[0], rgb[0]])
    assert counted == [2, 2] and hits == [True, False, False]  # an array is never cached
    assert cache.size()[0] == 3 and np.array_equal(mixed[1].features, mixed[2].features)
    assert extract_cached(extractor, cache, [], []) == ([], []) and counted == [2, 2]
