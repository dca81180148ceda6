"""Collections on the live stack with several workers and a persistent Redis (issue 14, acceptance): a private
server with its append-only file on (as Compose runs Redis), two `python worker.py` processes on the tiny bundle
and gunicorn, everything over HTTP (tests/stack.py).

- Two workers serving one collection: adds taken by both workers, then searches run by both, each search seeing
  every image with the same scores whichever worker ran it (the regions live in Redis, not in a worker).
- Persistence: after the server is stopped and started again on its data directory, the collection's info,
  thumbnails and a search (hits, scores, boxes) are what they were before."""

from __future__ import annotations

import urllib.request
import uuid

import pytest
from rq.job import Job
from rq.serializers import JSONSerializer

from service.collections import image_id_of
from service.contract import ALIVE_PREFIX
from service.localstack import wait_until
from service.queue import live_workers
from stack import Stack

from pictures import sample_jpeg  # noqa: E402

pytestmark = pytest.mark.slow

WORKERS = 2
JOB_WAIT = 300  # seconds for one job: the detector on a busy 2-core machine shared with other work
PICTURES = ("astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field", "immunohistochemistry",
            "colorwheel", "clock", "horse", "coins", "page")


def jpeg(name: str, size: int = 160) -> bytes:
    return sample_jpeg(name, size)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("stack"), workers=WORKERS, appendonly=True)
    yield stack
    stack.close()


def both_workers_live(stack: Stack) -> None:
    pids = {w.pid for w in stack.workers}
    assert wait_until(lambda: {int(w["pid"]) for w in live_workers(stack.connection())} == pids, 120, 0.2), \
        stack.tail("worker")


def worker_pid(stack: Stack, job_id: str) -> int:
    """The pid of the worker process that ran a job: RQ records the worker's name, `host.pid.suffix`
    (service.worker.main)."""
    name = Job.fetch(job_id, connection=stack.connection(), serializer=JSONSerializer).worker_name
    return int(name.rsplit(".", 2)[1])


def thumbnail(stack: Stack, base: str, image_id: str) -> bytes:
    with urllib.request.urlopen(f"{stack.url}{base}/images/{image_id}/thumbnail", timeout=30) as response:
        assert response.headers["Content-Type"] == "image/jpeg"
        return response.read()


def add(stack: Stack, base: str, images: list[bytes]) -> str:
    status, body, _ = stack.post(f"{base}/images", files=[("image", data) for data in images])
    assert status == 202, body
    return body["id"]


def search(stack: Stack, base: str, text: str) -> str:
    status, body, _ = stack.post(f"{base}/search", fields={"text": text, "top_k": "100"})
    assert status == 202, body
    return body["id"]


def finished(stack: Stack, job_id: str) -> dict:
    job = stack.wait(job_id, timeout=JOB_WAIT)
    assert job["status"] == "finished", (job, stack.tail("worker"))
    return job["result"]


def test_a_collection_survives_a_redis_restart_with_the_append_only_file(stack):
    both_workers_live(stack)
    photos = [jpeg(name) for name in ("astronaut", "coffee", "rocket")]
    ids = [image_id_of(data) for data in photos]
    base = f"/api/v1/collections/p-{uuid.uuid4().hex[:10]}"
    assert finished(stack, add(stack, base, photos))["added"] == 3
    status, info = stack.get(base)
    assert status == 200 and info["images"] == 3 and info["pending"] == 0
    thumbs = {image_id: thumbnail(stack, base, image_id) for image_id in ids}
    text = "a rocket on its launch pad"
    before = finished(stack, search(stack, base, text))
    assert before["scored"] == 3

    stack.restart_redis()
    # What comes back is the append-only file's: snapshots are off, so there is no RDB to load instead.
    assert (stack.redis_dir / "appendonlydir").is_dir() and not (stack.redis_dir / "dump.rdb").exists()
    # The web tier reconnects by itself: the collection answers again, as it was.
    assert wait_until(lambda: stack.get(base)[0] == 200, 120, 0.2), stack.tail("web")
    assert stack.get(base) == (200, info)
    for image_id in ids:
        assert thumbnail(stack, base, image_id) == thumbs[image_id]
    # The workers reconnect by themselves too: a search submitted now is run, and ranks as before.
    after = finished(stack, search(stack, base, text))
    assert after["scored"] == 3 and [h["image_id"] for h in after["hits"]] == [h["image_id"] for h in before["hits"]]
    for hit, want in zip(after["hits"], before["hits"]):
        assert abs(hit["score"] - want["score"]) <= 2e-6 and hit["box"] == want["box"], (hit, want)
    # Both workers are back, each publishing its heartbeat again (the keys the old server had are removed first, so
    # only a fresh heartbeat counts).
    connection = stack.connection()
    for key in connection.scan_iter(match=ALIVE_PREFIX + "*"):
        connection.delete(key)
    both_workers_live(stack)


def test_two_workers_serve_one_collection(stack):
    both_workers_live(stack)
    pids = {w.pid for w in stack.workers}
    assert len(pids) == WORKERS == 2
    base = f"/api/v1/collections/c-{uuid.uuid4().hex[:10]}"
    pictures = iter(PICTURES)
    added: list[bytes] = []
    add_workers: set[int] = set()
    # Adds of two images each, sent together so that one worker is busy when the next arrives; another round only
    # if one worker happened to take them all.
    for _ in range(len(PICTURES) // 4):
        batch = [[jpeg(next(pictures)), jpeg(next(pictures))] for _ in range(2)]
        jobs = [add(stack, base, images) for images in batch]
        for job_id, images in zip(jobs, batch):
            assert finished(stack, job_id)["added"] == 2
            added.extend(images)
            add_workers.add(worker_pid(stack, job_id))
        if add_workers == pids:
            break
    assert add_workers == pids, f"adds ran only on {add_workers} of {pids}"
    ids = {image_id_of(data) for data in added}
    assert stack.get(base)[1]["images"] == len(ids) >= 4

    text = "a cat sitting on a sofa"
    results: dict[int, list[dict]] = {}
    for _ in range(5):  # searches sent together, until each worker has run some
        jobs = [search(stack, base, text) for _ in range(3)]
        for job_id in jobs:
            result = finished(stack, job_id)
            assert result["scored"] == len(ids) and {h["image_id"] for h in result["hits"]} == ids  # every image
            results.setdefault(worker_pid(stack, job_id), []).append(result)
        if set(results) == pids:
            break
    assert set(results) == pids, f"searches ran only on {set(results)} of {pids}"
    reference = next(iter(results.values()))[0]["hits"]
    for pid, outcomes in results.items():
        for result in outcomes:  # the same ranking, scores and boxes, whatever worker ran it
            assert [h["image_id"] for h in result["hits"]] == [h["image_id"] for h in reference], pid
            for hit, want in zip(result["hits"], reference):
                assert abs(hit["score"] - want["score"]) <= 2e-6 and hit["box"] == want["box"], (pid, hit, want)
