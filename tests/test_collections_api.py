"""The collections HTTP API (issue 14): the web tier's plain functions and the Flask app on a real Redis, and the
whole path end to end on the live stack (tests/stack.py: Redis, `python worker.py` on the tiny bundle, gunicorn):
add photos over HTTP, poll the job, look the collection up, search it (each hit's score equal to the
retrieval_coco score of a normal job on that image), thumbnails, deleting, and every limit and bad input."""

from __future__ import annotations

import io
import re
import time
import urllib.request
import uuid
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from redis import Redis

from detector.regions import RegionFeatures
from service.collections import CollectionStore, collection_count, image_id_of
from service.contract import COLLECTION_NAMES_KEY, JobRequest
from service.errors import BadRequest, NotFound
from service.settings import Settings
from service.web.collections import (Conflict, check_uploads, collection_info, delete_collection, delete_image,
                                     parse_search, submit_add, submit_search)

from pictures import sample_jpeg  # noqa: E402


def jpeg(name: str, size: int = 192) -> bytes:
    return sample_jpeg(name, size)


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


# ------------------------------------------------------------------------------------------------ contract


def test_job_request_kind_and_collection_round_trip():
    for kind, collection in (("inference", None), ("collection_add", "a"), ("collection_search", "b")):
        request = JobRequest(text="t", tasks=["retrieval_coco"], kind=kind, collection=collection)
        back = JobRequest.from_json(request.to_json())
        assert back == request and (back.kind, back.collection) == (kind, collection)
    old = JobRequest(text="t", tasks=["vqa"]).to_json()
    del old["kind"], old["collection"]  # a job queued before kinds existed
    assert JobRequest.from_json(old).kind == "inference"
    with pytest.raises(ValueError, match="kind must be one of"):
        JobRequest(text="t", tasks=[], kind="drop_tables")
    with pytest.raises(ValueError, match="kind must be one of"):
        JobRequest.from_json({**old, "kind": "nope"})


# ------------------------------------------------------------------------------------- web tier, plain functions


def test_uploads_are_checked_before_anything_is_stored():
    settings = Settings(max_collection_upload_images=2, max_image_pixels=10_000)
    assert [info.width for info in check_uploads([png(1), png(2)], settings)] == [16, 16]
    for images, code in (([], "missing_image"), ([png(1)] * 3, "too_many_uploads"), ([b"not an image"], "invalid_image"),
                         ([png(1, (200, 100))], "image_too_large")):
        with pytest.raises(BadRequest) as caught:
            check_uploads(images, settings)
        assert caught.value.code == code, images[:1]


def test_add_tracks_pending_images_and_the_limits_refuse_with_their_codes(web):
    settings, connection = web
    name = unique()
    job, ids = submit_add(connection, settings, name, [png(1), png(2), png(1)])
    assert ids == [image_id_of(png(1)), image_id_of(png(2)), image_id_of(png(1))]
    request = JobRequest.from_json(job.kwargs["request"])
    assert (request.kind, request.collection, len(request.images)) == ("collection_add", name, 3)
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
    assert (caught.value.code, caught.value.status) == ("collection_full", 409)
    store.add("a" * 32, regions(), b"thumb", 10)
    with pytest.raises(Conflict) as caught:
        submit_add(connection, replace(settings, max_collection_bytes=10), name, [png(5)])
    assert caught.value.code == "collection_too_large"
    count = collection_count(connection)
    with pytest.raises(Conflict) as caught:
        submit_add(connection, replace(settings, max_collections=count), unique(), [png(6)])
    assert caught.value.code == "too_many_collections" and collection_count(connection) == count
    submit_add(connection, replace(settings, max_collections=count), name, [png(7)])  # an existing one is fine
    with pytest.raises(BadRequest) as caught:
        submit_add(connection, settings, "Bad Name", [png(1)])
    assert caught.value.code == "invalid_collection"


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
    for call in (lambda: submit_search(connection, settings, name, {"text": "x"}),
                 lambda: collection_info(connection, name), lambda: delete_collection(connection, name)):
        with pytest.raises(NotFound) as caught:
            call()
        assert caught.value.code == "unknown_collection"
    store = CollectionStore(connection, name)
    store.register()
    store.add("b" * 32, regions(), b"thumb", 10)
    job = submit_search(connection, settings, name, {"text": "a cat", "top_k": "5"})
    request = JobRequest.from_json(job.kwargs["request"])
    assert (request.kind, request.collection, request.tasks, request.top_k, request.ground) == (
        "collection_search", name, ["retrieval_coco"], 5, True)
    assert (request.first_stage_above, request.rerank_top) == (settings.collection_first_stage_above,
                                                               settings.collection_rerank_top)
    job = submit_search(connection, settings, name, {"text": "a cat", "ground": "0"})
    assert JobRequest.from_json(job.kwargs["request"]).ground is False
    with pytest.raises(NotFound):
        delete_image(connection, name, "../../x")
    assert delete_image(connection, name, "b" * 32) == {"deleted": "b" * 32}
    assert not connection.sismember(COLLECTION_NAMES_KEY, name)  # its last image gone: no longer counted
    with pytest.raises(NotFound) as caught:
        delete_image(connection, name, "b" * 32)
    assert caught.value.code == "unknown_image"


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
    assert ok.get_json()["image_ids"] == [image_id_of(png(1))] and ok.get_json()["collection"] == "a"
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


# ------------------------------------------------------------------------------------------ end to end, live


@pytest.mark.slow
def test_collections_end_to_end(stack):
    photos = [jpeg(n) for n in ("astronaut", "chelsea", "coffee", "rocket")]
    name = unique()
    base = f"/api/v1/collections/{name}"
    status, body, headers = stack.post(f"{base}/images", files=[("image", p) for p in photos + [photos[0]]])
    assert status == 202, body
    ids = [image_id_of(p) for p in photos]
    assert body["image_ids"] == ids + [ids[0]] and body["collection"] == name
    assert headers["Location"] == body["url"] == f"/api/v1/jobs/{body['id']}"
    progress = []  # (stage, stage_detail) seen while the job ran; on a fast machine possibly none
    deadline = time.monotonic() + 240  # the detector on 5 images, on a busy CPU
    while True:
        status, job = stack.get(f"/api/v1/jobs/{body['id']}")
        assert status == 200, job
        if job["status"] == "started" and job.get("stage") not in (None, "starting"):
            progress.append((job["stage"], job.get("stage_detail")))
        if job["status"] in ("finished", "failed"):
            break
        assert time.monotonic() < deadline, job
        time.sleep(0.02)
    assert job["status"] == "finished", job
    for stage, detail in progress:
        assert stage == "indexing" and re.fullmatch(r"[0-5]/5", detail), progress
    assert job["result"] == {"collection": name, "image_ids": ids + [ids[0]], "added": 4, "images": 4}
    status, info = stack.get(base)
    assert status == 200 and info["images"] == 4 and info["pending"] == 0 and info["bytes"] > 0

    # re-adding the same bytes is a no-op
    status, body, _ = stack.post(f"{base}/images", files=[("image", photos[1])])
    assert status == 202 and stack.wait(body["id"], timeout=120)["result"]["added"] == 0

    text = "an astronaut holding a helmet"
    status, body, headers = stack.post(f"{base}/search", fields={"text": text, "top_k": "3"})
    assert status == 202 and headers["Location"] == body["url"], body
    result = stack.wait(body["id"], timeout=120)
    assert result["status"] == "finished", result
    hits = result["result"]["hits"]
    assert result["result"]["collection"] == name and result["result"]["scored"] == 4
    assert [h["rank"] for h in hits] == [1, 2, 3] and [h["score"] for h in hits] == sorted(
        (h["score"] for h in hits), reverse=True)
    scores = {}
    for image_id, data in zip(ids, photos):  # a normal job's retrieval_coco score on each image
        normal = stack.wait(stack.submit(text, [data], tasks="retrieval_coco"), timeout=120)
        scores[image_id] = normal["result"]["tasks"]["retrieval_coco"]["scores"][0]
    assert [h["image_id"] for h in hits] == sorted(scores, key=lambda i: -scores[i])[:3]
    for hit in hits:
        assert abs(hit["score"] - scores[hit["image_id"]]) <= 2e-6, (hit, scores)
    # ground (default on): the box of each hit is the top refcoco region of a normal job on that image
    for hit in hits:
        normal = stack.wait(stack.submit(text, [photos[ids.index(hit["image_id"])]], tasks="refcoco"), timeout=120)
        best = normal["result"]["tasks"]["refcoco"]["regions"][0]
        assert hit["box"] == best["box"] and abs(hit["box_score"] - best["score"]) <= 1e-5, (hit, best)
        assert hit["label"] == best["label"] and (hit["label"] or best["region"] == 0), (hit, best)
    assert result["result"]["first_stage"] == {"used": False} and result["result"]["images"] == 4

    with urllib.request.urlopen(f"{stack.url}{base}/images/{ids[0]}/thumbnail", timeout=30) as response:
        assert response.headers["Content-Type"] == "image/jpeg"
        thumb = Image.open(io.BytesIO(response.read()))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256

    top = hits[0]["image_id"]
    status, deleted, _ = stack.request("DELETE", f"{base}/images/{top}")
    assert (status, deleted) == (200, {"deleted": top})
    status, body, _ = stack.post(f"{base}/search", fields={"text": text, "top_k": "10"})
    again = stack.wait(body["id"], timeout=120)["result"]
    assert again["scored"] == 3 and top not in {h["image_id"] for h in again["hits"]}
    assert stack.request("DELETE", f"{base}/images/{top}")[:2] == (404, {"error": {
        "code": "unknown_image", "message": f"no image {top!r} in collection {name}"}})
    assert stack.request("DELETE", base)[:2] == (200, {"deleted": 3})
    assert stack.get(base)[0] == 404

    # every bad input and limit answers 4xx JSON with its code
    def refused(response, status, code):
        assert response[0] == status and response[1]["error"]["code"] == code, response[:2]

    refused(stack.post("/api/v1/collections/Bad!/images", files=[("image", photos[0])]), 400, "invalid_collection")
    refused(stack.post(f"{base}/images", fields={"image": "x"}), 400, "not_a_file")
    refused(stack.post(f"{base}/images"), 400, "missing_image")
    refused(stack.post(f"{base}/images", files=[("image", b"no image")]), 400, "invalid_image")
    refused(stack.post(f"{base}/images", files=[("image", png(i)) for i in range(33)]), 400, "too_many_uploads")
    refused(stack.post(f"{base}/search", fields={"text": "x"}), 404, "unknown_collection")
    refused(stack.post(f"{base}/search", fields={"top_k": "3"}), 400, "missing_text")
    refused(stack.post(f"{base}/search", fields={"text": "x", "top_k": "101"}), 400, "invalid_top_k")
    refused(stack.post(f"{base}/search", fields={"text": "x", "task": "vqa"}), 400, "unknown_task")
    refused(stack.request("GET", f"{base}/images/{ids[0]}/thumbnail"), 404, "unknown_image")
    refused(stack.request("DELETE", base), 404, "unknown_collection")


# ------------------------------------------------------------------------------------------ worker side


def started_by(connection: Redis, job_id: str, worker: str):
    """The job as a worker holds it: marked started by `worker` (as BatchWorker.prepare_job_execution does)."""
    from rq.job import Job
    from rq.serializers import JSONSerializer

    connection.hset(f"rq:job:{job_id}", mapping={"status": "started", "worker_name": worker})
    job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    job.worker_name = worker
    return job


def test_progress_is_written_only_while_the_job_is_ours(web):
    from service.worker.rq_batch import set_progress

    settings, connection = web
    job, _ = submit_add(connection, settings, unique(), [png(1)])
    job = started_by(connection, job.id, "w1")
    set_progress(connection, job, "indexing", "0/1")
    job.refresh()
    assert (job.meta["stage"], job.meta["stage_detail"]) == ("indexing", "0/1")
    connection.hset(job.key, "status", "failed")  # the reaper failed it (worker_lost)
    set_progress(connection, job, "indexing", "1/1")
    job.refresh()
    assert job.meta["stage_detail"] == "0/1"  # never written for a job that is no longer ours


def test_a_failing_add_keeps_what_it_indexed_and_drops_its_pending_entries(web, tiny_bundle):
    from service.errors import PipelineError
    from service.web.jobs import submit
    from service.worker.pipeline import Pipeline
    from service.worker.rq_batch import run_batch

    settings, connection = web
    pipeline = Pipeline.from_dir(tiny_bundle, device="cpu", min_size=96, max_size=160)
    name = unique()
    good, bad = png(11, (64, 48)), b"GIF89a not really"  # bytes the web tier would refuse reach the worker anyway
    store = CollectionStore(connection, name)
    infos = check_uploads([good], settings) * 2
    request = JobRequest(text="", tasks=[], top_k=0, images=infos, kind="collection_add", collection=name)
    job = submit(connection, settings, request, [good, bad], job_id=uuid.uuid4().hex)
    store.register()
    store.add_pending([image_id_of(good), image_id_of(bad)], job.id, 60)
    outcome = run_batch(pipeline, connection, [started_by(connection, job.id, "w1")])[job.id]
    assert isinstance(outcome, PipelineError) and outcome.stage == "indexing" and "image 1" in outcome.message
    assert store.ids() == [image_id_of(good)] and store.pending() == {}

    search = submit_search(connection, settings, name, {"text": "a red square", "top_k": "5"})
    result = run_batch(pipeline, connection, [started_by(connection, search.id, "w1")])[search.id]
    assert result["collection"] == name and result["scored"] == 1 and result["hits"][0]["image_id"] == image_id_of(good)
    assert started_by(connection, search.id, "w1").meta["stage"] == "searching"

    ok = submit(connection, settings, replace(request, images=infos[:1]), [good], job_id=uuid.uuid4().hex)
    result = run_batch(pipeline, connection, [started_by(connection, ok.id, "w1")])[ok.id]
    assert result == {"collection": name, "image_ids": [image_id_of(good)], "added": 0, "images": 1}


def test_demo_py_adds_a_folder_and_searches_it_on_a_bare_python(stack, tmp_path):
    """`python demo.py --collection NAME --add DIR` then `--search TEXT`, on the standard library alone."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut", "coffee", "rocket"):
        (folder / f"{name}.jpg").write_bytes(jpeg(name))
    (folder / "notes.txt").write_text("not an image")
    bare = [sys.executable, "-I", "-S", str(root / "demo.py"), "--url", stack.url, "--collection", unique()]
    added = subprocess.run([*bare, "--add", str(folder)], capture_output=True, text=True, timeout=300)
    assert added.returncode == 0, added.stderr
    assert "adding 1-3 of 3" in added.stdout and "3 images" in added.stdout, added.stdout
    again = subprocess.run([*bare, "--add", str(folder / "coffee.jpg")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "3 images" in again.stdout, again.stdout + again.stderr
    found = subprocess.run([*bare, "--search", "a cup of coffee", "--top-k", "2"], capture_output=True, text=True,
                           timeout=300)
    assert found.returncode == 0, found.stderr
    assert "2 best of 3 images scored for 'a cup of coffee':" in found.stdout
    hit = r"^\s+[12]\. [0-9a-f]{32}  score [+-]\d\.\d{4}  [a-z ]+ at \[[-0-9., ]+\] \(\d\.\d\d\)$"
    assert len(re.findall(hit, found.stdout, re.M)) == 2, found.stdout  # with the grounded region and its name
    staged = subprocess.run([*bare, "--search", "a cup of coffee", "--top-k", "1", "--first-stage", "on"],
                            capture_output=True, text=True, timeout=300)
    assert staged.returncode == 0 and re.search(r"\(first stage: \d+ images named a word of it, 3 re-ranked\)",
                                                staged.stdout), staged.stdout + staged.stderr
    wrong = subprocess.run([*bare, "--search", "x", "--add", str(folder)], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "exactly one of --add" in wrong.stderr


def test_an_add_waits_out_a_redis_outage_and_indexes_every_image(web, tiny_bundle, monkeypatch):
    """A Redis restart mid-add (caused live in tests/test_collections_live.py's restart, here at one exact moment: the
    connection error of the first write of the second image) costs a wait, not the job."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from service.web.jobs import submit
    from service.worker.pipeline import Pipeline
    from service.worker.rq_batch import run_batch

    settings, connection = web
    pipeline = Pipeline.from_dir(tiny_bundle, device="cpu", min_size=96, max_size=160)
    name = unique()
    images = [png(21, (64, 48)), png(22, (64, 48)), png(23, (64, 48))]
    request = JobRequest(text="", tasks=[], top_k=0, images=check_uploads(images, settings), kind="collection_add",
                         collection=name)
    job = submit(connection, settings, request, images, job_id=uuid.uuid4().hex)
    real_has, calls = CollectionStore.has, []

    def has_with_an_outage(store, image_id):
        calls.append(image_id)
        if len(calls) == 2:  # the second image: Redis is restarting
            raise RedisConnectionError("Connection refused")
        return real_has(store, image_id)

    monkeypatch.setattr(CollectionStore, "has", has_with_an_outage)
    outcome = run_batch(pipeline, connection, [started_by(connection, job.id, "w1")])[job.id]
    assert outcome == {"collection": name, "image_ids": [image_id_of(i) for i in images], "added": 3, "images": 3}
    assert calls == [image_id_of(images[0])] + [image_id_of(images[1])] * 2 + [image_id_of(images[2])]
