"""Fencing: a job failed by the orphan reaper stays failed, even when its worker comes back and finishes it.

Live: a real worker is paused (SIGSTOP) mid-job past the heartbeat TTL, the reaper fails the job as worker_lost,
the worker is resumed (SIGCONT) and finishes its batch; its outcome must be discarded (logged, counted in
vilbert_discarded_results_total), and the job must stay failed. Units: the fencing transaction and the reaper's
transaction against a real Redis, including the race where the job changes between the check and the commit."""

from __future__ import annotations

import io
import signal
import time
import urllib.request
import uuid

import numpy as np
import pytest
from PIL import Image
from redis import Redis
from redis.exceptions import WatchError
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from service.contract import alive_key
from service.localstack import free_port, wait_until
from service.queue import fail_if_orphaned
from service.settings import load_settings
from service.worker import rq_batch
from service.worker.rq_batch import FencedRedis, JobNotOwned, owned_hset
from stack import HEARTBEAT_TTL, Stack


def slow_image() -> bytes:
    """A 2000x1500 JPEG of about 150 KB; at DETECTOR_MIN_SIZE=3000 eight of them keep the tiny detector busy for
    seconds, long enough to pause the worker in the middle."""
    pixels = (np.indices((1500, 2000)).sum(0) % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buffer, "JPEG", quality=70)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def paused_stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("fencing"))
    yield stack
    if stack.worker is not None and stack.worker.poll() is None:
        stack.worker.send_signal(signal.SIGCONT)
    stack.close()


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_a_worker_paused_past_its_heartbeat_cannot_turn_a_failed_job_finished(paused_stack):
    stack = paused_stack
    stack.worker.terminate()
    stack.worker.wait(30)
    metrics_port = free_port()
    stack.start_worker(DETECTOR_MIN_SIZE="3000", DETECTOR_MAX_SIZE="4000", FEATURE_CACHE_TTL="0",
                       WORKER_METRICS_PORT=str(metrics_port))
    assert stack.wait_ready(90), stack.tail("worker")
    images = [slow_image()] * 8
    for attempt in range(3):  # the pause must land while the job runs; a busy machine only makes that easier
        job_id = stack.submit("pause me", images, tasks="retrieval_coco")
        running = stack.wait(job_id, 60, until=("finished", "failed", "started"))
        if running["status"] == "started":
            assert wait_until(lambda: stack.get(f"/api/v1/jobs/{job_id}")[1].get("stage") in ("detector", "vilbert")
                              or stack.get(f"/api/v1/jobs/{job_id}")[1]["status"] != "started", 30, interval=0.02)
            stack.worker.send_signal(signal.SIGSTOP)
            if stack.get(f"/api/v1/jobs/{job_id}")[1]["status"] == "started":
                break
            stack.worker.send_signal(signal.SIGCONT)
        stack.wait(job_id, 60)
    else:
        pytest.fail("the job never ran long enough to pause the worker in the middle of it")
    paused_at = time.monotonic()
    try:
        failed = stack.wait(job_id, HEARTBEAT_TTL + 30)  # polling runs the web tier's reaper
        assert (failed["status"], failed["error"]["code"]) == ("failed", "worker_lost"), failed
        assert time.monotonic() - paused_at >= HEARTBEAT_TTL - 1
    finally:
        stack.worker.send_signal(signal.SIGCONT)
    assert wait_until(lambda: "discarding this worker's outcome" in stack.tail("worker"), 120, interval=0.2), \
        stack.tail("worker")
    assert metric(metrics_port, "vilbert_discarded_results_total") == 1.0
    after = stack.get(f"/api/v1/jobs/{job_id}")[1]
    assert (after["status"], after["error"]["code"]) == ("failed", "worker_lost") and "result" not in after, after
    assert metric(metrics_port, "vilbert_worker_jobs_total{status=\"finished\"}") == 0.0
    # The resumed worker goes on serving.
    assert stack.wait_ready(60)
    small = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(small, "PNG")
    assert stack.wait(stack.submit("alive?", [small.getvalue()], tasks="vqa"), 60)["status"] == "finished"


# ------------------------------------------------------------------------------------------- units, real Redis

@pytest.fixture
def started_job(redis_url):
    """A job marked started by worker "w1", as prepare_job_execution leaves it."""
    connection = Redis.from_url(redis_url)
    settings = load_settings({"REDIS_URL": redis_url, "QUEUE_NAME": f"fence-{uuid.uuid4().hex[:8]}",
                              "WORKER_HEARTBEAT_TTL": "2"})
    queue = Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)
    job = queue.enqueue("service.worker.rq_batch.batched_only", kwargs={"request": {}}, job_id=uuid.uuid4().hex)
    with connection.pipeline() as pipe:
        job.prepare_for_execution("w1", pipeline=pipe)
        pipe.execute()
    job = Job.fetch(job.id, connection=connection, serializer=JSONSerializer)
    return connection, settings, job


def fenced(job: Job, worker: str):
    rq_batch._fence.job, rq_batch._fence.worker, rq_batch._fence.refused = job, worker, False


def test_owned_hset_writes_only_for_the_owner_of_a_started_job(started_job):
    connection, _, job = started_job
    assert owned_hset(connection, job, "w1", "meta", b'{"stage": "detector"}')
    assert connection.hget(job.key, "meta") == b'{"stage": "detector"}'
    assert not owned_hset(connection, job, "w2", "meta", b"{}")
    connection.hset(job.key, "status", "failed")
    assert not owned_hset(connection, job, "w1", "meta", b"{}")
    assert connection.hget(job.key, "meta") == b'{"stage": "detector"}'


def test_the_fencing_transaction_commits_for_the_owner_and_refuses_everyone_else(started_job):
    connection, _, job = started_job
    worker = FencedRedis(connection_pool=connection.connection_pool)
    try:
        fenced(job, "w1")
        with worker.pipeline() as pipe:
            pipe.hset(job.key, "probe", "1")
            pipe.execute()
        assert connection.hget(job.key, "probe") == b"1" and not rq_batch._fence.refused
        fenced(job, "w2")
        with worker.pipeline() as pipe, pytest.raises(JobNotOwned):
            pipe.hset(job.key, "probe", "2")
            pipe.execute()
        assert connection.hget(job.key, "probe") == b"1" and rq_batch._fence.refused
        # The race: the check passes, then the reaper's change lands before our EXEC. Redis aborts the EXEC.
        fenced(job, "w1")
        with worker.pipeline() as pipe:
            pipe.multi()  # WATCH + check happen here
            pipe.hset(job.key, "probe", "3")
            connection.hset(job.key, "status", "failed")  # the reaper commits first
            with pytest.raises(WatchError):
                pipe.execute()
        assert connection.hget(job.key, "probe") == b"1"
        fenced(job, "w1")
        with worker.pipeline() as pipe, pytest.raises(JobNotOwned):  # and the retry sees it is no longer ours
            pipe.multi()
    finally:
        rq_batch._fence.job = None


def test_the_reaper_fails_an_orphan_once_and_backs_off_when_the_worker_is_alive(started_job):
    connection, settings, job = started_job
    connection.set(alive_key("w1"), "{}", ex=30)
    assert wait_until(lambda: not fail_if_orphaned(connection, settings, job) and
                      (time.time() - job.started_at.timestamp()) > settings.worker_heartbeat_ttl, 10, interval=0.1)
    assert Job.fetch(job.id, connection=connection, serializer=JSONSerializer).get_status() == JobStatus.STARTED
    connection.delete(alive_key("w1"))
    assert fail_if_orphaned(connection, settings, job)
    failed = Job.fetch(job.id, connection=connection, serializer=JSONSerializer)
    assert failed.get_status() == JobStatus.FAILED and failed.meta["error"]["code"] == "worker_lost"
    assert not fail_if_orphaned(connection, settings, failed)  # already failed: nothing more is written
