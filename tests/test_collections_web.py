"""The collections' web tier (service/web/collections.py) against a real private Redis, with no worker: the checks
of an add and its admission at each limit, search fields, info and deleting, and the Flask app's JSON answer for
every refusal. Fast, so that the mutation check (bench/mutation.py) runs it per mutant; the whole path with a
worker is tests/test_collections_api.py."""

from __future__ import annotations

import io
import uuid
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from redis import Redis

from detector.regions import RegionFeatures
from service.collections import CollectionStore, collection_count, image_id_of
from service.contract import COLLECTION_NAMES_KEY, JobRequest
from service.errors import BadRequest, NotFound, Unavailable
from service.settings import Settings
from service.web.collections import (Conflict, check_uploads, collection_info, delete_collection, delete_image,
                                     parse_search, submit_add, submit_search)


def png(seed: int, size: tuple[int, int] = (16, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(
        buffer, "PNG")
    return buffer.getvalue()


def regions(count: int = 2) -> RegionFeatures:
    return RegionFeatures(boxes=np.array([[0, 0, 4, 4]] * count, np.float32), features=np.ones((count, 8), np.float32),
                          scores=np.ones(count, np.float32), class_ids=np.zeros(count, np.int64), num_boxes=count,
                          image_width=10, image_height=10)


def unique() -> str:
    return f"c-{uuid.uuid4().hex[:10]}"


@pytest.fixture()
def web(redis_url):
    """(settings, connection) of a web tier on the module's private Redis, its own queue; collections cleared."""
    connection = Redis.from_url(redis_url)
    for key in connection.scan_iter(match="vilbert:coll*"):
        connection.delete(key)
    return Settings(redis_url=redis_url, queue_name=f"q-{uuid.uuid4().hex[:8]}"), connection


# ------------------------------------------------------------------------------------- web tier, plain functions


def test_uploads_are_checked_before_anything_is_stored():
    settings = Settings(max_collection_upload_images=2, max_image_pixels=10_000)
    assert [info.width for info in check_uploads([png(1), png(2)], settings)] == [16, 16]
    for images, code, status, message in (
            ([], "missing_image", 400, "at least one image file is required (form field 'image')"),
            ([png(1)] * 3, "too_many_uploads", 400, "3 images sent, the limit per request is 2"),
            ([png(1), b"not an image"], "invalid_image", 400, "image 1: cannot decode the image"),
            ([png(1, (200, 100))], "image_too_large", 413, "image 0: image has 200x100 pixels, more than the limit of 10000")):
        with pytest.raises(BadRequest) as caught:
            check_uploads(images, settings)
        assert (caught.value.code, caught.value.status) == (code, status), images[:1]
        assert caught.value.message.startswith(message), caught.value.message


def test_add_tracks_pending_images_and_the_limits_refuse_with_their_codes(web):
    settings, connection = web
    name = unique()
    job, ids = submit_add(connection, settings, name, [png(1), png(2), png(1)])
    assert ids == [image_id_of(png(1)), image_id_of(png(2)), image_id_of(png(1))]
    request = JobRequest.from_json(job.kwargs["request"])
    assert request == JobRequest(text="", tasks=[], top_k=0, images=check_uploads([png(1), png(2), png(1)], settings),
                                 kind="collection_add", collection=name)
    store = CollectionStore(connection, name)
    assert store.pending() == {ids[0]: job.id, ids[1]: job.id}
    assert 0 < connection.ttl(store.pending_key) <= settings.upload_ttl
    assert collection_info(connection, name) == {"name": name, "images": 0, "pending": 2, "bytes": 0}
    again, _ = submit_add(connection, settings, name, [png(1)])  # already pending: not pending twice
    assert store.pending() == {ids[0]: job.id, ids[1]: job.id}
    store.clear_pending(again.id)
    assert len(store.pending()) == 2
    store.clear_pending(job.id, [ids[0]])
    assert store.pending() == {ids[1]: job.id}

    with pytest.raises(Conflict) as caught:  # 1 pending + 2 new > 2
        submit_add(connection, replace(settings, max_collection_images=2), name, [png(3), png(4)])
    assert (caught.value.code, caught.value.status, caught.value.message) == (
        "collection_full", 409, f"collection {name} would hold 3 images, the limit is 2")
    store.add("a" * 32, regions(), b"thumb", 10)
    stored = store.info().bytes
    with pytest.raises(Conflict) as caught:
        submit_add(connection, replace(settings, max_collection_bytes=10), name, [png(5)])
    assert (caught.value.code, caught.value.message) == (
        "collection_too_large", f"collection {name} stores {stored} bytes, the limit is 10")
    count = collection_count(connection)
    with pytest.raises(Conflict) as caught:
        submit_add(connection, replace(settings, max_collections=count), unique(), [png(6)])
    assert (caught.value.code, caught.value.message) == (
        "too_many_collections", f"there are {count} collections, the limit; delete one first")
    assert collection_count(connection) == count
    submit_add(connection, replace(settings, max_collections=count), name, [png(7)])  # an existing one is fine
    with pytest.raises(BadRequest) as caught:
        submit_add(connection, settings, "Bad Name", [png(1)])
    assert caught.value.code == "invalid_collection"


def test_an_add_the_queue_refuses_leaves_nothing_pending_and_no_collection_counted(web):
    settings, connection = web
    settings = replace(settings, max_queued_jobs=1)
    kept = unique()
    first, _ = submit_add(connection, settings, kept, [png(1)])  # fills the queue
    count, name = collection_count(connection), unique()
    with pytest.raises(Unavailable) as refused:
        submit_add(connection, settings, name, [png(2), png(3)])
    assert refused.value.code == "queue_full"
    assert CollectionStore(connection, name).pending() == {} and not CollectionStore(connection, name).registered()
    assert collection_count(connection) == count
    with pytest.raises(Unavailable):  # into an existing collection: its other job's pending image stays
        submit_add(connection, settings, kept, [png(4)])
    assert CollectionStore(connection, kept).pending() == {image_id_of(png(1)): first.id}


def test_search_fields_and_unknown_collections(web):
    settings, connection = web
    above = settings.collection_first_stage_above
    assert parse_search({"text": " a dog "}, settings) == ("a dog", 10, "retrieval_coco", True, above)
    assert parse_search({"text": "x", "top_k": "100", "task": "retrieval_flickr30k", "ground": "off"}, settings) == \
        ("x", 100, "retrieval_flickr30k", False, above)
    for raw, value in (("1", True), ("true", True), ("yes", True), ("on", True), ("0", False), ("false", False),
                       ("no", False), ("off", False), ("", True)):
        assert parse_search({"text": "x", "ground": raw}, settings).ground is value, raw
    for raw, value in (("auto", above), ("", above), ("on", 0), ("off", None)):
        assert parse_search({"text": "x", "first_stage": raw}, settings).first_stage_above == value, raw
    for form, code in (({}, "missing_text"), ({"text": "  "}, "empty_text"), ({"text": "x", "top_k": "0"}, "invalid_top_k"),
                       ({"text": "x", "top_k": "101"}, "invalid_top_k"), ({"text": "x", "top_k": "1_0"}, "invalid_top_k"),
                       ({"text": "x", "task": "vqa"}, "unknown_task"), ({"text": "x", "ground": "maybe"}, "invalid_flag"),
                       ({"text": "x", "ground": "true" * 3}, "invalid_flag"), ({"text": "x", "ground": "2"}, "invalid_flag"),
                       ({"text": "x", "ground": "TRUE"}, "invalid_flag"), ({"text": "x", "ground": " yes"}, "invalid_flag"),
                       ({"text": "x", "first_stage": "yes"}, "invalid_flag"),
                       ({"text": "x", "first_stage": "Auto"}, "invalid_flag"),
                       ({"text": "x" * (settings.max_text_chars + 1)}, "text_too_long")):
        with pytest.raises(BadRequest) as caught:
            parse_search(form, settings)
        assert caught.value.code == code, form
    name = unique()
    for call, message in ((lambda: submit_search(connection, settings, name, {"text": "x"}), "no indexed image"),
                          (lambda: collection_info(connection, name), "no image"),
                          (lambda: delete_collection(connection, name), "no image")):
        with pytest.raises(NotFound) as caught:
            call()
        assert (caught.value.code, caught.value.message) == ("unknown_collection",
                                                             f"no collection {name} (or it has {message})")
    store = CollectionStore(connection, name)
    store.register()
    store.add("b" * 32, regions(), b"thumb", 10)
    settings = replace(settings, collection_rerank_top=7, collection_first_stage_above=33)
    job = submit_search(connection, settings, name, {"text": "a cat", "top_k": "5"})
    assert JobRequest.from_json(job.kwargs["request"]) == JobRequest(
        text="a cat", tasks=["retrieval_coco"], top_k=5, kind="collection_search", collection=name, ground=True,
        first_stage_above=33, rerank_top=7)
    job = submit_search(connection, settings, name, {"text": "a cat", "ground": "0"})
    assert JobRequest.from_json(job.kwargs["request"]).ground is False
    for image_id in ("../../x", "c" * 32):
        with pytest.raises(NotFound) as caught:
            delete_image(connection, name, image_id)
        assert caught.value.message == f"no image {image_id!r} in collection {name}"
    assert delete_image(connection, name, "b" * 32) == {"deleted": "b" * 32}
    assert not connection.sismember(COLLECTION_NAMES_KEY, name)  # its last image gone: no longer counted
    with pytest.raises(NotFound) as caught:
        delete_image(connection, name, "b" * 32)
    assert caught.value.code == "unknown_image"


@pytest.mark.parametrize("form, message", [
    ({"text": "x", "ground": "y" * 30}, f"ground must be one of true/false, 1/0, on/off, yes/no; got {'y' * 20!r}"),
    ({"text": "x", "first_stage": "z" * 30}, f"first_stage must be auto, on or off; got {'z' * 20!r}"),
    ({"text": "x", "task": "t" * 50}, f"task must be one of retrieval_coco, retrieval_flickr30k, got {'t' * 40!r}"),
])
def test_a_refused_search_field_is_named_and_quoted_within_bounds(web, form, message):
    with pytest.raises(BadRequest) as caught:
        parse_search(form, web[0])
    assert caught.value.message == message


def test_the_app_answers_json_errors_for_every_collection_refusal(web):
    from service.web import create_app

    settings, connection = web
    client = create_app(replace(settings, max_collection_upload_images=2, max_collections=1)).test_client()
    base = "/api/v1/collections"

    def code(response, status):
        assert response.status_code == status and response.is_json, (response.status_code, response.data[:200])
        return response.get_json()["error"]["code"]

    assert code(client.post(f"{base}/Bad!/images", data={"image": (io.BytesIO(png(1)), "a.png")}), 400) == \
        "invalid_collection"
    assert code(client.post(f"{base}/a/images", data={"image": "x"}), 400) == "not_a_file"
    assert code(client.post(f"{base}/a/images", data={}), 400) == "missing_image"
    three = [(io.BytesIO(png(i)), f"{i}.png") for i in range(3)]
    assert code(client.post(f"{base}/a/images", data={"image": three}), 400) == "too_many_uploads"
    assert code(client.post(f"{base}/a/images", data={"image": (io.BytesIO(b"text"), "a.png")}), 400) == "invalid_image"
    ok = client.post(f"{base}/a/images", data={"image": (io.BytesIO(png(1)), "a.png")})
    assert ok.status_code == 202 and ok.headers["Location"] == ok.get_json()["url"] == f"/api/v1/jobs/{ok.get_json()['id']}"
    assert ok.get_json() == {"id": ok.get_json()["id"], "status": "queued", "url": ok.headers["Location"],
                             "collection": "a", "image_ids": [image_id_of(png(1))]}
    assert code(client.post(f"{base}/b/images", data={"image": (io.BytesIO(png(2)), "a.png")}), 409) == \
        "too_many_collections"
    assert client.get(f"{base}/a").get_json() == {"name": "a", "images": 0, "pending": 1, "bytes": 0}
    assert code(client.get(f"{base}/b"), 404) == "unknown_collection"
    assert code(client.post(f"{base}/a/search", data={"text": "x"}), 404) == "unknown_collection"  # nothing indexed
    assert code(client.post(f"{base}/a/search", data={"text": "x", "top_k": "x"}), 400) == "invalid_top_k"
    assert code(client.get(f"{base}/a/images/{'c' * 32}/thumbnail"), 404) == "unknown_image"
    assert code(client.delete(f"{base}/a/images/{'c' * 32}"), 404) == "unknown_image"
    assert client.delete(f"{base}/a").get_json() == {"deleted": 0}  # only pending: dropped
    assert code(client.delete(f"{base}/a"), 404) == "unknown_collection"
    store = CollectionStore(connection, "a")  # an image indexed from a feature store without its file
    store.add("d" * 32, regions(), None, 0, source="img0")
    assert code(client.get(f"{base}/a/images/{'d' * 32}/thumbnail"), 404) == "no_thumbnail"
    assert client.get(f"{base}/a").get_json()["images"] == 1
    store.add("e" * 32, regions(), b"\xff\xd8 a thumbnail", 0)
    thumb = client.get(f"{base}/a/images/{'e' * 32}/thumbnail")
    assert (thumb.status_code, thumb.mimetype, thumb.data) == (200, "image/jpeg", b"\xff\xd8 a thumbnail")
    search = client.post(f"{base}/a/search", data={"text": "a dog"})
    assert search.status_code == 202 and search.headers["Location"] == f"/api/v1/jobs/{search.get_json()['id']}"
    assert search.get_json() == {"id": search.get_json()["id"], "status": "queued", "url": search.headers["Location"],
                                 "collection": "a"}
    assert client.delete(f"{base}/a/images/{'e' * 32}").get_json() == {"deleted": "e" * 32}
    assert client.delete(f"{base}/a").get_json() == {"deleted": 1}
