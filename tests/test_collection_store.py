"""service/collections.py, the collections' data layer, against a real private Redis: the key layout of one
image's entry, reading back, the thumbnail's two refusals, removal and drop (to the last posting), the lexical
ranking held to BM25 from its definition, pending images, and the ADMIT script at each of its limits. No models and
no worker: fast, so that the mutation check (bench/mutation.py) runs it per mutant. Concurrency of ADMIT is
tests/test_collections_limits.py; indexing and search with the models, tests/test_collections.py."""

from __future__ import annotations

import hashlib
import json
import uuid

import numpy as np
import pytest
from redis import Redis

from detector.categories import name_terms
from detector.records import FeatureStoreError, encode_record
from detector.regions import RegionFeatures
from service.collections import Admission, CollectionInfo, CollectionStore, check_name, collection_count, image_id_of
from service.contract import COLLECTION_NAMES_KEY, COLLECTION_PREFIX
from service.errors import BadRequest, NotFound
from service.lexical import bm25_ranking
from test_lexical import bm25

A, B, C = "a" * 32, "b" * 32, "c" * 32
NAME_RULE = ("a collection name is 1 to 63 characters: lower-case letters, digits, '-' and '_', starting with a "
             "letter or digit")


@pytest.fixture
def connection(redis_url) -> Redis:
    return Redis.from_url(redis_url)


@pytest.fixture
def store(connection) -> CollectionStore:
    return CollectionStore(connection, f"test-{uuid.uuid4().hex[:8]}")


def regions(count: int = 2, width: int = 10, height: int = 7, seed: int = 0) -> RegionFeatures:
    rng = np.random.default_rng(seed)
    return RegionFeatures(boxes=rng.random((count, 4), np.float32), features=rng.random((count, 8), np.float32),
                          scores=rng.random(count, np.float32), class_ids=np.arange(1, count + 1, dtype=np.int64),
                          num_boxes=count, image_width=width, image_height=height)


def keys_of(store: CollectionStore) -> set[str]:
    return {key.decode() for key in store.connection.scan_iter(COLLECTION_PREFIX + store.name + ":*")}


def words(count: int) -> list[str]:
    """`count` distinct region names of one word each that name_terms keeps as they are."""
    letters = "bcdfghjklmnpqrtvwxz"
    return ["".join(letters[(i // len(letters) ** k) % len(letters)] for k in range(3)) + "o" for i in range(count)]


# --------------------------------------------------------------------------------------------- names and ids


@pytest.mark.parametrize("name", ["a", "7", "holiday-2026", "x_1", "a-", "0" * 63, "a" + "_" * 62])
def test_a_valid_name_is_kept_as_given(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "Holiday", "-a", "_a", "a/b", "../etc", "a b", "a" * 64, "é", "a\n", None, 5,
                                  b"abc"])
def test_an_invalid_name_is_refused_with_the_rule(name):
    with pytest.raises(BadRequest) as refused:
        check_name(name)
    assert (refused.value.code, refused.value.message, refused.value.status) == ("invalid_collection", NAME_RULE, 400)


def test_a_store_checks_its_name_before_it_names_a_key(connection):
    with pytest.raises(BadRequest):
        CollectionStore(connection, "../../etc")


def test_an_image_id_is_the_start_of_the_sha256_of_its_bytes():
    assert image_id_of(b"abc") == hashlib.sha256(b"abc").hexdigest()[:32]
    assert image_id_of(b"") == "e3b0c44298fc1c149afbf4c8996fb924"


# ------------------------------------------------------------------------------------------- one image's entry


def test_the_key_layout_is_the_stored_format(store):
    # Collections persist (Redis's append-only file) across upgrades, and workers of two versions share them during
    # a deploy: these names are a storage format, as the module docstring describes it.
    base = f"vilbert:coll:{store.name}"
    assert (store.regions_key, store.meta_key, store.thumbs_key, store.pending_key) == (
        base + ":regions", base + ":meta", base + ":thumbs", base + ":pending")
    assert (store.terms_key, store.vocab_key, store.length_key, store.postings_prefix) == (
        base + ":terms", base + ":vocab", base + ":length", base + ":post:")


def test_an_added_image_writes_its_record_metadata_thumbnail_and_index(store):
    record = encode_record(A, regions(3, 640, 480))
    assert store.add(A, regions(3, 640, 480), b"jpeg", 12345, ["red dogs", "dog", None, "grass"], source="s/1")
    connection = store.connection
    assert connection.hget(store.regions_key, A) == record
    assert json.loads(connection.hget(store.meta_key, A)) == {"width": 640, "height": 480, "bytes": 12345,
                                                             "stored": len(record) + 4, "source": "s/1"}
    assert connection.hget(store.thumbs_key, A) == b"jpeg"
    assert json.loads(connection.hget(store.terms_key, A)) == {"dog": 2, "grass": 1, "red": 1}
    assert connection.hget(store.terms_key, A) == b'{"dog": 2, "grass": 1, "red": 1}'  # stable text: sorted keys
    assert connection.hget(store.length_key, A) == b"4"
    for term, count in (("dog", b"2"), ("grass", b"1"), ("red", b"1")):
        assert connection.hgetall(store.postings_prefix + term) == {A.encode(): count}
    assert connection.smembers(store.vocab_key) == {b"dog", b"grass", b"red"}
    assert store.has(A) and not store.has(B)
    assert keys_of(store) == {store.regions_key, store.meta_key, store.thumbs_key, store.terms_key, store.length_key,
                              store.vocab_key, *(store.postings_prefix + t for t in ("dog", "grass", "red"))}


def test_an_image_without_thumbnail_labels_or_source_stores_only_its_record(store):
    record = encode_record(A, regions(2))
    assert store.add(A, regions(2), None, 99)
    assert json.loads(store.connection.hget(store.meta_key, A)) == {"width": 10, "height": 7, "bytes": 99,
                                                                   "stored": len(record)}
    assert not store.connection.hexists(store.thumbs_key, A)
    assert store.connection.hget(store.terms_key, A) == b"{}" and store.connection.hget(store.length_key, A) == b"0"
    assert not store.connection.exists(store.vocab_key)
    assert store.info() == CollectionInfo(store.name, 1, len(record))


def test_adding_the_same_id_again_changes_nothing(store):
    assert store.add(A, regions(2), b"first", 1, ["dog"])
    before = {key: store.connection.dump(key) for key in keys_of(store)}
    assert not store.add(A, regions(5, seed=1), b"second", 2, ["cat"], source="again")
    assert {key: store.connection.dump(key) for key in keys_of(store)} == before


def test_ids_are_sorted_and_regions_come_back_in_the_order_asked(store):
    for image_id, seed in ((C, 3), (A, 1), (B, 2)):
        store.add(image_id, regions(seed + 1, seed=seed), None, 1)
    assert store.ids() == [A, B, C]
    back = store.regions([C, A])
    for got, seed in zip(back, (3, 1)):
        want = regions(seed + 1, seed=seed)
        assert got.num_boxes == want.num_boxes and np.array_equal(got.features, want.features)
        assert np.array_equal(got.boxes, want.boxes) and got.features.dtype == np.float32
    assert store.regions([]) == []


def test_reading_an_absent_image_is_unknown_and_a_damaged_record_names_itself(store):
    store.add(A, regions(), None, 1)
    with pytest.raises(NotFound) as missing:
        store.regions([A, B])
    assert (missing.value.code, missing.value.message) == ("unknown_image", f"no image {B} in collection {store.name}")
    store.connection.hset(store.regions_key, C, b"not a record")
    with pytest.raises(FeatureStoreError) as damaged:
        store.regions([C])
    assert str(damaged.value).startswith(f"collection {store.name}, image {C}: not a feature record")


def test_a_thumbnail_is_served_only_for_a_well_formed_id_that_has_one(store):
    store.add(A, regions(), b"jpeg-a", 1)
    store.add(B, regions(), None, 1)
    assert store.thumbnail(A) == b"jpeg-a"
    with pytest.raises(NotFound) as none:
        store.thumbnail(B)
    assert (none.value.code, none.value.message) == (
        "no_thumbnail", f"image {B} of collection {store.name} has no thumbnail: it was indexed from a feature store "
                        "without its image file")
    store.connection.hset(store.thumbs_key, "../x", b"never served")  # a key only a malformed id could reach
    for image_id in (C, "../x", "", A.upper(), A + "\n"):
        with pytest.raises(NotFound) as unknown:
            store.thumbnail(image_id)
        assert (unknown.value.code, unknown.value.message) == (
            "unknown_image", f"no image {image_id!r} in collection {store.name}")


def test_removing_an_image_takes_its_whole_entry_and_only_its_own(store):
    store.add(A, regions(), b"a", 1, ["dog", "cat"])
    store.add(B, regions(), b"b", 1, ["dog"])
    assert store.remove(A) and not store.remove(A)
    connection = store.connection
    for key in (store.regions_key, store.meta_key, store.thumbs_key, store.terms_key, store.length_key):
        assert not connection.hexists(key, A) and connection.hexists(key, B)
    assert connection.hgetall(store.postings_prefix + "dog") == {B.encode(): b"1"}
    assert not connection.exists(store.postings_prefix + "cat")
    assert store.ids() == [B] and not store.remove(C)


def test_an_image_whose_add_was_cut_short_can_still_be_removed(store):
    # A worker killed between storing the record and the rest of the entry leaves the record alone.
    store.connection.hset(store.regions_key, A, encode_record(A, regions()))
    assert store.remove(A) and not store.has(A) and not store.remove(A)


def test_dropping_a_collection_leaves_no_key_behind_however_many_terms_it_has(store):
    store.connection.sadd(COLLECTION_NAMES_KEY, "another")
    store.register()
    store.add(A, regions(), b"a", 1, words(1100))  # more terms than one DEL takes (512 a command)
    store.add(B, regions(), b"b", 1, ["dog"])
    store.add_pending([C], "job-1", 60)
    assert len(keys_of(store)) > 1100
    assert store.drop() == 2
    assert keys_of(store) == set()
    assert not store.registered() and store.connection.sismember(COLLECTION_NAMES_KEY, "another")
    assert store.drop() == 0


# ------------------------------------------------------------------------------------------ the lexical stage


def test_the_lexical_ranking_is_bm25_over_the_region_names(store):
    labels = {A: ["dog", "frisbee", "grass", "grass"], B: ["dog", "dog", "man", "tennis racket"],
              C: ["man", "shirt", None], "d" * 32: ["sky", "tree", "tree", "tree", "building"], "e" * 32: None}
    for image_id, names in labels.items():
        store.add(image_id, regions(), None, 1, names)
    docs = {i: [t for n in (names or []) if n for t in name_terms(n)] for i, names in labels.items()}
    for query in ("Two dogs catching a frisbee near a man with a tennis racket", "a man", "DOG dog dog", "trees"):
        expected = bm25(name_terms(query), docs)
        ranking = store.lexical_ranking(query)
        assert [i for i, _ in ranking] == sorted(expected, key=lambda i: (-expected[i], i)), query
        assert all(abs(score - expected[i]) < 1e-9 for i, score in ranking)
    assert store.lexical_ranking("a cloud") == [] and store.lexical_ranking("!!") == [] and \
        store.lexical_ranking("") == []


def test_an_image_with_a_posting_but_no_length_ranks_as_an_empty_document(store):
    # An add cut short by a crash, or a hand edit: a missing length must not stop the search.
    store.add(A, regions(), None, 1, ["dog", "cat", "cat"])
    store.add(B, regions(), None, 1, ["dog"])
    store.connection.hdel(store.length_key, A)
    assert store.lexical_ranking("a dog") == bm25_ranking([{A: 1, B: 1}], {A: 0, B: 1}, 2, 1)


def test_an_empty_collection_ranks_nothing(store):
    assert store.lexical_ranking("dog") == []
    store.connection.hset(store.postings_prefix + "dog", A, 1)  # a stray posting with no image stored
    assert store.lexical_ranking("dog") == []


# ------------------------------------------------------------------------------------ names and pending images


def test_a_collection_is_counted_once_registered_and_forgotten_only_when_empty(store):
    count = collection_count(store.connection)
    assert not store.registered()
    store.register()
    store.register()
    assert store.registered() and collection_count(store.connection) == count + 1
    store.add_pending([A], "job-1", 60)
    assert not store.forget_if_empty() and store.registered()
    store.clear_pending("job-1")
    store.add(B, regions(), None, 1)
    assert not store.forget_if_empty() and store.registered()
    store.remove(B)
    assert store.forget_if_empty() and not store.registered()
    assert collection_count(store.connection) == count


def test_pending_images_belong_to_their_job_and_expire_with_the_upload(store):
    store.add_pending([], "job-0", 60)
    assert not store.connection.exists(store.pending_key)
    store.add_pending([A, B], "job-1", 60)
    store.add_pending([C], "job-2", 30)
    assert store.pending() == {A: "job-1", B: "job-1", C: "job-2"}
    assert 0 < store.connection.ttl(store.pending_key) <= 30  # the latest add's ttl
    store.clear_pending("job-1", [B, C])  # C is job-2's: it stays
    assert store.pending() == {A: "job-1", C: "job-2"}
    store.clear_pending("job-3")
    assert store.pending() == {A: "job-1", C: "job-2"}
    store.clear_pending("job-1")
    assert store.pending() == {C: "job-2"}


def test_info_counts_stored_images_and_their_bytes(store):
    assert store.info() == CollectionInfo(store.name, 0, 0)
    store.add(A, regions(2), b"12345", 1)
    store.add(B, regions(3), None, 1)
    stored = len(encode_record(A, regions(2))) + 5 + len(encode_record(B, regions(3)))
    assert store.info() == CollectionInfo(store.name, 2, stored)
    store.add_pending([C], "job", 60)  # pending images are not stored yet
    assert store.info().images == 2


# --------------------------------------------------------------------------------------------------- ADMIT


def admit(store: CollectionStore, ids: list[str], job: str = "job", collections: int = 100,
          max_bytes: int = 10 ** 9, images: int = 100, ttl: int = 60) -> Admission:
    return store.admit(ids, job, ttl, collections, max_bytes, images)


def test_an_admitted_add_counts_the_collection_and_marks_only_its_new_images_pending(store):
    store.add(A, regions(), None, 1)
    store.add_pending([B], "earlier", 60)
    assert admit(store, [A, B, C, C, "d" * 32], job="this", ttl=45) == Admission(None, 4, [C, "d" * 32])
    assert store.registered()
    assert store.pending() == {B: "earlier", C: "this", "d" * 32: "this"}
    assert 0 < store.connection.ttl(store.pending_key) <= 45


def test_an_add_of_nothing_new_is_admitted_without_touching_pending(store):
    store.add(A, regions(), None, 1)
    assert admit(store, [A, A]) == Admission(None, 1, [])
    assert not store.connection.exists(store.pending_key) and store.registered()
    assert admit(store, []) == Admission(None, 1, [])


def test_images_are_admitted_up_to_the_limit_counting_stored_pending_and_new_once(store):
    store.add(A, regions(), None, 1)
    store.add_pending([A, B], "old", 60)  # A is stored and still pending: counted once
    assert admit(store, [C], images=3) == Admission(None, 3, [C])
    refused = admit(store, ["d" * 32], images=3, job="late")
    assert refused == Admission("collection_full", 4, [])
    assert "d" * 32 not in store.pending()


def test_a_collection_is_refused_once_it_stores_its_byte_limit(store):
    store.add(A, regions(), b"x" * 100, 1)
    stored = store.info().bytes
    assert admit(store, [B], max_bytes=stored + 1) == Admission(None, 2, [B])
    assert admit(store, [C], max_bytes=stored) == Admission("collection_too_large", stored, [])
    assert C not in store.pending()


def test_a_new_collection_is_refused_at_the_collection_limit_an_existing_one_is_not(connection, store):
    count = collection_count(connection)
    other = CollectionStore(connection, f"test-{uuid.uuid4().hex[:8]}")
    assert admit(store, [A], collections=count + 1) == Admission(None, 1, [A])
    assert admit(other, [B], collections=count + 1) == Admission("too_many_collections", count + 1, [])
    assert not other.registered() and other.pending() == {}
    assert admit(store, [C], collections=count + 1) == Admission(None, 2, [C])  # already counted
    assert admit(other, [B], collections=count + 2) == Admission(None, 1, [B])
