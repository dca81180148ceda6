"""Collection limits under real concurrency (issue 14): many adds at once, each from its own Redis connection (as
many gunicorn processes would send them), against a real server and a small limit. The admission is one Lua
script (service.collections.ADMIT), so the counts never pass the limits and every add refused gets its 409; with
the check-then-act code it replaced (read the counts, then write), a burst like this one was admitted whole."""

from __future__ import annotations

import io
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from redis import Redis

from service.collections import CollectionStore, collection_count
from service.settings import Settings
from service.web.collections import Conflict, collection_info, submit_add

BURST = 24  # adds sent at once; far more than the limits below, so a racy admission would show


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((12, 16, 3)) * 255).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture()
def settings(redis_url) -> Settings:
    connection = Redis.from_url(redis_url)
    for key in connection.scan_iter(match="vilbert:coll*"):
        connection.delete(key)
    return Settings(redis_url=redis_url, queue_name=f"q-{uuid.uuid4().hex[:8]}")


def burst(settings: Settings, adds: list[tuple[str, list[bytes]]]) -> list[tuple[str, int, str] | None]:
    """Send every (collection, images) add at the same moment, each on its own connection; per add None
    (admitted) or the refusal's (code, status, message)."""
    start = threading.Barrier(len(adds))

    def add(entry: tuple[str, list[bytes]]) -> tuple[str, int, str] | None:
        connection = Redis.from_url(settings.redis_url)
        connection.ping()  # connected before the barrier, so the adds really start together
        start.wait(timeout=60)
        try:
            submit_add(connection, settings, *entry)
        except Conflict as exc:
            return exc.code, exc.status, exc.message
        finally:
            connection.close()
        return None

    with ThreadPoolExecutor(len(adds)) as pool:
        return list(pool.map(add, adds))


@pytest.mark.parametrize("per_add", [1, 2])
def test_a_burst_of_adds_never_passes_max_collection_images(settings, per_add):
    limit = 5
    settings = replace(settings, max_collection_images=limit, max_collection_upload_images=per_add)
    name = f"c-{uuid.uuid4().hex[:10]}"
    adds = [(name, [png(1000 * per_add + per_add * i + j) for j in range(per_add)]) for i in range(BURST)]
    outcomes = burst(settings, adds)
    admitted = [o for o in outcomes if o is None]
    refused = [o for o in outcomes if o is not None]
    assert len(admitted) == limit // per_add  # as many as fit, and no more
    for code, status, message in refused:
        assert (code, status) == ("collection_full", 409)
        assert message in {f"collection {name} would hold {held + per_add} images, the limit is {limit}"
                           for held in range(limit - per_add + 1, limit + 1)}, message
    store = CollectionStore(Redis.from_url(settings.redis_url), name)
    assert len(store.pending()) == len(admitted) * per_add <= limit
    assert collection_info(store.connection, name)["pending"] == len(admitted) * per_add


def test_a_burst_of_new_collections_never_passes_max_collections(settings):
    connection = Redis.from_url(settings.redis_url)
    before = collection_count(connection)
    settings = replace(settings, max_collections=before + 3)
    names = [f"n-{uuid.uuid4().hex[:10]}" for _ in range(BURST)]
    outcomes = burst(settings, [(name, [png(i)]) for i, name in enumerate(names)])
    admitted = [name for name, outcome in zip(names, outcomes) if outcome is None]
    assert len(admitted) == 3 and collection_count(connection) == before + 3
    for outcome in outcomes:
        assert outcome is None or outcome == ("too_many_collections", 409, f"there are {before + 3} collections, the "
                                                                           "limit; delete one first")
    for name in set(names) - set(admitted):  # a refused add leaves nothing behind
        assert CollectionStore(connection, name).pending() == {} and not CollectionStore(connection, name).registered()
    # an existing collection still takes images at the limit of collections
    submit_add(connection, settings, admitted[0], [png(999)])
