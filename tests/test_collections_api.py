"""The collections HTTP API (issue 14) end to end on the live stack (tests/stack.py: Redis, `python worker.py` on
the tiny bundle, gunicorn): add photos over HTTP, poll the job, look the collection up, search it (each hit's score
equal to the retrieval_coco score of a normal job on that image), thumbnails, deleting, and every limit and bad
input; and the worker's side of adds (progress, a failing add, a Redis outage). The web tier alone, without a
worker: tests/test_collections_web.py."""

from __future__ import annotations

import io
import re
import time
import urllib.request
import uuid
from dataclasses import replace

import pytest
from PIL import Image
from redis import Redis

from service.collections import CollectionStore, image_id_of
from service.contract import JobRequest
from service.web.collections import check_uploads, submit_add, submit_search
from test_collections_web import png, unique, web  # noqa: F401 (web: a fixture)

from pictures import sample_jpeg  # noqa: E402


def jpeg(name: str, size: int = 192) -> bytes:
    return sample_jpeg(name, size)


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
