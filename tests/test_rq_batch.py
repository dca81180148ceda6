"""Fast tests of service/worker/rq_batch.py, the batch loop, in this process: jobs submitted as the web tier does
(service.web.jobs.submit) to a private Redis, a real BatchWorker on the tiny bundle working them in burst mode, and
every outcome read back through the web tier's `job_status`. What a batch takes (jobs, bytes, wait), what each job
gets (its own result or error), the fence around every write, and the request loading the worker does. No worker
process, so that `bench/mutation.sh` can run it per mutant; tests/test_service_scale.py and test_fencing.py hold the
same behaviour through real processes."""

from __future__ import annotations

import io
import logging
import re
import time
import uuid

import numpy as np
import pytest
from PIL import Image
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

from service.contract import ERROR_AT_LOAD, UPLOAD_EXPIRED, VILBERT, ImageInfo, JobRequest, upload_key
from service.errors import PipelineError
from service.features import to_npz
from service.queue import get_queue
from service.settings import Settings, load_settings
from service.web.jobs import job_status, submit
from service.worker.context import WorkerContext
from service.worker.metrics import WorkerMetrics
from service.worker.pipeline import InferenceRequest, Pipeline
from service.worker.rq_batch import (BatchJob, BatchWorker, batched_only, decoded_bytes, load_request, owned_hset,
                                     run_batch)


def photo(seed: int, width: int = 160, height: int = 120) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8)).resize((width, height)).save(buffer, "JPEG")
    return buffer.getvalue()


def info(data: bytes, width: int = 160, height: int = 120) -> ImageInfo:
    return ImageInfo(width, height, len(data), width * height * 3)


def logged(caplog) -> list[str]:
    """What the batch loop logged, each message whole (so that a mutant padding a message cannot pass)."""
    return [record.getMessage() for record in caplog.records if record.name == "service.worker.rq_batch"]


@pytest.fixture(scope="module")
def pipeline(tiny_bundle) -> Pipeline:
    return Pipeline.from_dir(tiny_bundle, device="cpu", min_size=64, max_size=96)


@pytest.fixture
def settings(redis_url) -> Settings:
    """A queue of its own per test."""
    return load_settings({"REDIS_URL": redis_url, "QUEUE_NAME": f"batch-{uuid.uuid4().hex[:8]}",
                          "BATCH_MAX_JOBS": "4", "BATCH_MAX_WAIT_MS": "0"})


@pytest.fixture
def connection(redis_url) -> Redis:
    return Redis.from_url(redis_url)


def context_for(settings: Settings, pipeline: Pipeline, connection: Redis) -> WorkerContext:
    return WorkerContext(settings, pipeline, WorkerMetrics(), connection)


def queue_job(connection: Redis, settings: Settings, text: str, tasks: list[str], images: list[bytes], **fields) -> Job:
    request = JobRequest(text=text, tasks=tasks, images=[info(data) for data in images], **fields)
    return submit(connection, settings, request, images)


def work(settings: Settings, pipeline: Pipeline, connection: Redis) -> BatchWorker:
    worker = BatchWorker([get_queue(connection, settings)], context_for(settings, pipeline, connection),
                         name=f"test-{uuid.uuid4().hex[:8]}")
    worker.work(burst=True, with_scheduler=False)
    return worker


def test_jobs_taken_together_each_get_their_own_result(settings, pipeline, connection):
    a, b = photo(1), photo(2)
    jobs = [queue_job(connection, settings, "what is this?", ["vqa"], [a]),
            queue_job(connection, settings, "two dogs", ["nlvr2"], [a, b]),
            queue_job(connection, settings, "bad", ["vqa"], [b"not an image"]),
            queue_job(connection, settings, "a cat", ["gqa"], [b])]
    worker = work(settings, pipeline, connection)
    statuses = [job_status(connection, settings, job.id) for job in jobs]
    assert [s["status"] for s in statuses] == ["finished", "finished", "failed", "finished"]
    registry = worker.context.metrics.registry
    assert registry.get_sample_value("vilbert_worker_jobs_total", {"status": "finished"}) == 3
    assert registry.get_sample_value("vilbert_worker_failures_total", {"reason": "invalid_image"}) == 1
    for status in (statuses[0], statuses[1], statuses[3]):
        assert status["result"]["batch_size"] == 4
        assert {"queue_wait_s", "run_s"} <= set(status["result"]["timings"])
    assert statuses[2]["error"]["code"] == "invalid_image"
    exc_string = Job.fetch(jobs[2].id, connection=connection, serializer=JSONSerializer).latest_result().exc_string
    assert exc_string.strip().endswith(f"JobFailed: invalid_image: {statuses[2]['error']['message']}")
    # each result is what the pipeline answers for that request alone
    alone = pipeline.run(InferenceRequest([a, b], "two dogs", ["nlvr2"]))
    assert statuses[1]["result"]["tasks"] == alone["tasks"]
    assert all(connection.exists(upload_key(job.id)) == 0 for job in jobs)  # released once the outcome is written


@pytest.mark.parametrize("max_jobs,sizes", [(4, [4, 4, 4, 4, 2, 2]), (1, [1] * 6)])
def test_a_batch_takes_up_to_batch_max_jobs(redis_url, pipeline, connection, max_jobs, sizes):
    settings = load_settings({"REDIS_URL": redis_url, "QUEUE_NAME": f"batch-{uuid.uuid4().hex[:8]}",
                              "BATCH_MAX_JOBS": str(max_jobs), "BATCH_MAX_WAIT_MS": "0"})
    jobs = [queue_job(connection, settings, f"question {i}?", ["vqa"], [photo(i)]) for i in range(6)]
    work(settings, pipeline, connection)
    assert [job_status(connection, settings, job.id)["result"]["batch_size"] for job in jobs] == sizes


def test_a_batch_stops_taking_jobs_once_their_images_reach_the_byte_limit(redis_url, pipeline, connection):
    one = 160 * 120 * 3
    settings = load_settings({"REDIS_URL": redis_url, "QUEUE_NAME": f"batch-{uuid.uuid4().hex[:8]}",
                              "BATCH_MAX_JOBS": "8", "BATCH_MAX_WAIT_MS": "0",
                              "MAX_DECODED_BYTES_PER_BATCH": str(2 * one)})
    jobs = [queue_job(connection, settings, "a?", ["vqa"], [photo(i)]) for i in range(5)]
    work(settings, pipeline, connection)
    # two images reach the limit: the first batch holds two jobs, so does the second, the last one is alone
    assert [job_status(connection, settings, job.id)["result"]["batch_size"] for job in jobs] == [2, 2, 2, 2, 1]


def test_decoded_bytes_as_the_web_tier_priced_them(connection, settings):
    job = queue_job(connection, settings, "x", ["nlvr2"], [photo(1), photo(2, 320, 240)])
    job.kwargs["request"]["images"][1]["decoded_bytes"] = 320 * 240 * 3
    assert decoded_bytes(job) == 160 * 120 * 3 + 320 * 240 * 3
    job.kwargs["request"]["images"][1] = {"width": 320, "height": 240}  # priced by an older web tier: unknown
    assert decoded_bytes(job) == 160 * 120 * 3
    for broken in ({}, {"images": [{"decoded_bytes": "many"}]}, {"images": None}, "text"):
        job.kwargs["request"] = broken
        assert decoded_bytes(job) == 0


def test_a_job_whose_uploads_expired_fails_alone_and_says_so(settings, pipeline, connection):
    gone = queue_job(connection, settings, "a?", ["vqa"], [photo(1)])
    kept = queue_job(connection, settings, "b?", ["vqa"], [photo(2)])
    connection.delete(upload_key(gone.id))
    with pytest.raises(PipelineError) as caught:
        load_request(connection, gone)
    assert (caught.value.code, caught.value.stage) == (UPLOAD_EXPIRED, ERROR_AT_LOAD)
    assert caught.value.message == "the uploaded images are gone (expired before the job started); submit again"
    work(settings, pipeline, connection)
    assert job_status(connection, settings, gone.id)["error"]["code"] == UPLOAD_EXPIRED
    assert job_status(connection, settings, kept.id)["status"] == "finished"


def test_stored_features_are_checked_again_by_the_worker(settings, pipeline, connection):
    image = photo(3)
    regions = pipeline.extractor.extract([np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))])[0]
    data = to_npz(regions)
    boxes = [[1.0, 2.0, 50.0, 60.0]]
    request = JobRequest(text="a dog", tasks=["refcoco"], top_k=5, boxes=boxes,
                         images=[ImageInfo(160, 120, len(data))], inputs="features")
    job = submit(connection, settings, request, [data])
    loaded = load_request(connection, job)
    assert (loaded.images, loaded.text, loaded.tasks, loaded.top_k, loaded.boxes) == ([], "a dog", ["refcoco"], 5,
                                                                                      boxes)
    np.testing.assert_array_equal(loaded.features[0].features, regions.features)
    connection.hset(upload_key(job.id), "0", b"PK\x03\x04 damaged")
    with pytest.raises(PipelineError) as caught:
        load_request(connection, job)
    assert caught.value.stage == ERROR_AT_LOAD and caught.value.message.startswith("stored features: ")


def test_a_job_run_outside_the_batch_worker_says_where_it_belongs(settings, connection):
    with pytest.raises(RuntimeError) as caught:
        batched_only({"text": "x"})
    assert str(caught.value) == ("service jobs run only in the batch worker (python worker.py), not as plain RQ "
                                 "jobs")
    job = queue_job(connection, settings, "a?", ["vqa"], [photo(1)])
    plain = BatchJob.fetch(job.id, connection=connection, serializer=JSONSerializer)
    with pytest.raises(RuntimeError, match="only in the batch worker"):
        plain._execute()


def test_owned_writes_need_the_job_started_by_that_worker(settings, connection):
    job = queue_job(connection, settings, "a?", ["vqa"], [photo(1)])
    assert not owned_hset(connection, job, "w1", "meta", "{}")  # queued: nobody's
    with connection.pipeline() as pipe:
        job.prepare_for_execution("w1", pipeline=pipe)
        pipe.execute()
    assert not owned_hset(connection, job, "w2", "meta", "{}")
    assert owned_hset(connection, job, "w1", "meta", '{"stage": "x"}')
    assert connection.hget(job.key, "meta") == b'{"stage": "x"}'


def slowed(pipeline: Pipeline, monkeypatch, seconds: float, during=None) -> None:
    """Make the batch's pipeline pass take `seconds` longer (a slow model, which tiny weights cannot be), running
    `during()` in the middle of it."""
    import time

    run_many = pipeline.run_many

    def slow_run_many(requests, on_stage=None):
        if during is not None:
            during()
        time.sleep(seconds)
        return run_many(requests, on_stage)

    monkeypatch.setattr(pipeline, "run_many", slow_run_many)


def test_a_job_whose_own_timeout_the_batch_overran_fails_alone(redis_url, pipeline, connection, monkeypatch):
    name = f"batch-{uuid.uuid4().hex[:8]}"
    short, long = (load_settings({"REDIS_URL": redis_url, "QUEUE_NAME": name, "JOB_TIMEOUT": timeout,
                                  "BATCH_MAX_WAIT_MS": "0"}) for timeout in ("1", "60"))
    hurried = queue_job(connection, short, "a?", ["vqa"], [photo(1)])  # queued before a config change
    patient = queue_job(connection, long, "b?", ["vqa"], [photo(2)])
    slowed(pipeline, monkeypatch, 1.2)
    work(long, pipeline, connection)
    assert job_status(connection, long, patient.id)["status"] == "finished"
    failed = job_status(connection, long, hurried.id)
    assert failed["status"] == "failed" and failed["error"]["code"] == "timeout"
    assert failed["error"]["message"] == "the job's batch ran longer than its timeout of 1 s"


def test_a_batch_past_every_timeout_is_stopped_and_each_job_fails_as_timeout(redis_url, pipeline, connection,
                                                                             monkeypatch):
    settings = load_settings({"REDIS_URL": redis_url, "QUEUE_NAME": f"batch-{uuid.uuid4().hex[:8]}",
                              "JOB_TIMEOUT": "1", "BATCH_MAX_WAIT_MS": "0"})
    jobs = [queue_job(connection, settings, "a?", ["vqa"], [photo(i)]) for i in range(2)]
    slowed(pipeline, monkeypatch, 6)  # the death penalty ends it after 1 s
    work(settings, pipeline, connection)
    for job in jobs:
        status = job_status(connection, settings, job.id)
        assert (status["status"], status["error"]["code"]) == ("failed", "timeout")
        # stopped by RQ's death penalty at the longest timeout, not found overdue after 30 s
        exc_string = Job.fetch(job.id, connection=connection, serializer=JSONSerializer).latest_result().exc_string
        assert exc_string.strip().endswith("JobTimeoutException: Task exceeded maximum timeout value (1 seconds)")
        assert connection.exists(upload_key(job.id)) == 0  # nothing left behind


def test_a_batch_that_breaks_fails_each_of_its_jobs_with_the_cause(settings, pipeline, connection, monkeypatch,
                                                                   caplog):
    jobs = [queue_job(connection, settings, "a?", ["vqa"], [photo(i)]) for i in range(2)]

    def broken(requests, on_stage=None):
        raise MemoryError("out of memory in the detector")  # a fault tiny weights cannot cause

    monkeypatch.setattr(pipeline, "run_many", broken)
    with caplog.at_level(logging.ERROR, logger="service.worker.rq_batch"):
        work(settings, pipeline, connection)
    for job in jobs:
        error = job_status(connection, settings, job.id)["error"]
        assert error == {"code": "internal_error", "message": "MemoryError: out of memory in the detector",
                         "stage": "batch"}
    assert "batch of 2 failed" in logged(caplog)


def test_an_outcome_computed_after_the_reaper_failed_the_job_is_discarded(settings, pipeline, connection,
                                                                          monkeypatch, caplog):
    from rq.job_lifecycle import record_job_failure

    job = queue_job(connection, settings, "a?", ["vqa"], [photo(1)])

    def reaped():  # what service.queue.fail_if_orphaned does to a job whose worker stopped beating
        stored = Job.fetch(job.id, connection=connection, serializer=JSONSerializer)
        with connection.pipeline() as pipe:
            record_job_failure(stored, "worker_lost", pipe)
            pipe.execute()

    slowed(pipeline, monkeypatch, 0, during=reaped)
    with caplog.at_level(logging.WARNING, logger="service.worker.rq_batch"):
        worker = work(settings, pipeline, connection)
    assert job_status(connection, settings, job.id)["status"] == "failed"
    assert Job.fetch(job.id, connection=connection, serializer=JSONSerializer).return_value() is None
    assert (f"job {job.id}: discarding this worker's outcome, computed after the job was failed as orphaned "
            "(before its outcome was written)") in logged(caplog)
    registry = worker.context.metrics.registry
    assert registry.get_sample_value("vilbert_discarded_results_total") == 1
    assert not registry.get_sample_value("vilbert_worker_jobs_total", {"status": "finished"})
    assert connection.exists(upload_key(job.id)) == 0


def test_collection_jobs_run_after_the_inference_jobs_of_their_batch(settings, pipeline, connection):
    from service.collections import CollectionStore, image_id_of
    from service.web.collections import collection_info, submit_add, submit_search

    name = f"photos-{uuid.uuid4().hex[:6]}"
    photos = [photo(20), photo(21), photo(22)]
    inference = queue_job(connection, settings, "what is this?", ["vqa"], [photos[0]])
    add, ids = submit_add(connection, settings, name, photos)
    work(settings, pipeline, connection)
    assert job_status(connection, settings, inference.id)["result"]["batch_size"] == 2
    added = job_status(connection, settings, add.id)
    assert added["status"] == "finished"
    assert added["result"] == {"collection": name, "image_ids": [image_id_of(p) for p in photos], "added": 3,
                               "images": 3}
    assert ids == added["result"]["image_ids"] and collection_info(connection, name)["images"] == 3
    assert CollectionStore(connection, name).pending() == {}

    search = submit_search(connection, settings, name, {"text": "a dog", "top_k": "2"})
    again, _ = submit_add(connection, settings, name, [photos[0], photo(23)])
    connection.hset(upload_key(again.id), "1", b"not an image")  # the worker trusts no stored bytes
    work(settings, pipeline, connection)
    found = job_status(connection, settings, search.id)["result"]
    assert found["collection"] == name and len(found["hits"]) == 2 and found["scored"] == 3
    failed = job_status(connection, settings, again.id)
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_image"
    assert failed["error"]["message"] == ("image 1: cannot decode the image: not an image in an accepted format "
                                          "(JPEG, PNG, GIF, BMP, TIFF, WEBP, PPM, MPO)")
    assert failed["error"]["stage"] == "indexing"
    assert CollectionStore(connection, name).pending() == {}  # a failed add leaves nothing pending


def test_a_job_started_when_its_batch_started(settings, pipeline, connection, monkeypatch):
    jobs = [queue_job(connection, settings, "a?", ["vqa"], [photo(i)]) for i in range(2)]
    slowed(pipeline, monkeypatch, 0.5)
    work(settings, pipeline, connection)
    for job in jobs:
        stored = Job.fetch(job.id, connection=connection, serializer=JSONSerializer)
        # RQ stamps started_at again as it records each outcome; the batch's start is kept, so a job's run time
        # includes the batch it waited for
        assert (stored.ended_at - stored.started_at).total_seconds() >= 0.5


# --- Redis going away under a running batch: a private server with its append-only file, stopped (SIGTERM, which
# writes the file out) and started again on the same port and directory, as a Redis restart in production.


class RestartingRedis:
    """A private server that a test stops and starts again mid-batch. Its clients retry a command once at once
    (production's clients retry for seconds, which would only make these tests slower, not different)."""

    def __init__(self, workdir):
        from service.localstack import free_port

        self.workdir, self.port = workdir, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None
        self.start()

    def start(self) -> None:
        from service.localstack import start_redis

        self.process = start_redis(self.port, self.workdir, self.workdir / "redis.log", appendonly=True)

    def stop(self) -> None:
        from service.localstack import stop

        stop(self.process)

    @property
    def refused(self) -> str:
        """redis-py's message for a command sent while the server is down."""
        return f"Error 111 connecting to 127.0.0.1:{self.port}. Connection refused."

    def client(self) -> Redis:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return Redis.from_url(self.url, retry=Retry(NoBackoff(), 1), socket_timeout=5)

    def restart_after(self, event) -> "threading.Thread":
        """Start the server again once `event` is set (in a thread, while the batch waits for it)."""
        import threading

        def start_when_told():
            event.wait(60)
            self.start()

        thread = threading.Thread(target=start_when_told, daemon=True)
        thread.start()
        return thread


@pytest.fixture
def restarting(tmp_path):
    server = RestartingRedis(tmp_path)
    yield server
    server.stop()


def restarting_settings(server: RestartingRedis, **values: str) -> Settings:
    return load_settings({"REDIS_URL": server.url, "QUEUE_NAME": f"batch-{uuid.uuid4().hex[:8]}",
                          "BATCH_MAX_JOBS": "4", "BATCH_MAX_WAIT_MS": "0", **values})


def test_a_batch_loading_its_requests_waits_for_a_restarting_redis(restarting, pipeline, monkeypatch):
    import threading

    from service.worker import rq_batch

    connection = restarting.client()
    settings = restarting_settings(restarting)
    jobs = [queue_job(connection, settings, f"question {i}?", ["vqa"], [photo(i)]) for i in range(2)]
    failed, calls = threading.Event(), []
    real = rq_batch.load_request

    def load_during_a_restart(conn, job):
        calls.append(job.id)
        if len(calls) > 1:
            return real(conn, job)
        restarting.stop()  # Redis goes away as the first job's request is read
        try:
            return real(conn, job)
        except Exception:
            failed.set()  # it comes back only after the read failed, while the batch waits for it
            raise

    monkeypatch.setattr(rq_batch, "load_request", load_during_a_restart)
    thread = restarting.restart_after(failed)
    work(settings, pipeline, connection)
    thread.join(60)
    assert failed.is_set() and calls == [jobs[0].id, jobs[0].id, jobs[1].id]  # read again once Redis was back
    for job in jobs:
        status = job_status(connection, settings, job.id)
        assert status["status"] == "finished" and status["result"]["batch_size"] == 2


def test_a_request_that_cannot_be_loaded_while_redis_stays_away_fails_its_job_alone(restarting, pipeline,
                                                                                      monkeypatch, caplog):
    from service.contract import INTERNAL_ERROR
    from service.worker import rq_batch

    connection = restarting.client()
    settings = restarting_settings(restarting)
    jobs = [queue_job(connection, settings, f"question {i}?", ["vqa"], [photo(i)]) for i in range(2)]
    fetched = [Job.fetch(job.id, connection=connection, serializer=JSONSerializer) for job in jobs]
    real = rq_batch.load_request
    calls = []

    def load(conn, job):
        calls.append(job.id)
        if len(calls) == 1:
            restarting.stop()  # down for the first job's request and the wait after it
        elif job.id == jobs[1].id and calls.count(job.id) == 1:
            restarting.start()  # back for its partner
        return real(conn, job)

    monkeypatch.setattr(rq_batch, "load_request", load)
    monkeypatch.setattr(rq_batch, "REDIS_WAIT_S", 0.2)
    with caplog.at_level(logging.ERROR, logger="service.worker.rq_batch"):
        outcomes = run_batch(pipeline, connection, fetched)
    assert calls == [jobs[0].id, jobs[1].id]  # the wait ran out: the first request is not read again
    lost = outcomes[jobs[0].id]
    assert isinstance(lost, PipelineError)
    assert (lost.code, lost.stage) == (INTERNAL_ERROR, ERROR_AT_LOAD)
    assert lost.message.startswith("ConnectionError: ")
    assert f"job {jobs[0].id}: cannot load its request" in logged(caplog)
    # its partner is answered; a job never started (no started_at) has no queue wait to report
    answered = outcomes[jobs[1].id]
    assert answered["batch_size"] == 2 and answered["tasks"]
    assert "run_s" in answered["timings"] and "queue_wait_s" not in answered["timings"]


def test_an_add_indexing_while_redis_restarts_waits_and_indexes_the_image_again(restarting, pipeline,
                                                                                 monkeypatch, caplog):
    import threading

    from service.collections import CollectionStore, image_id_of
    from service.web.collections import submit_add
    from service.worker import collections as worker_collections

    connection = restarting.client()
    settings = restarting_settings(restarting)
    name = f"photos-{uuid.uuid4().hex[:6]}"
    photos = [photo(30), photo(31)]
    add, ids = submit_add(connection, settings, name, photos)
    failed, calls = threading.Event(), []
    real = worker_collections.index_images

    def index_during_a_restart(pipe, store, images):
        calls.append(image_id_of(images[0]))
        if len(calls) != 2:
            return real(pipe, store, images)
        restarting.stop()  # Redis goes away as the second image is stored
        try:
            return real(pipe, store, images)
        except Exception:
            failed.set()
            raise

    monkeypatch.setattr(worker_collections, "index_images", index_during_a_restart)
    thread = restarting.restart_after(failed)
    with caplog.at_level(logging.WARNING, logger="service.worker.rq_batch"):
        work(settings, pipeline, connection)
    thread.join(60)
    assert calls == [ids[0], ids[1], ids[1]]  # the second image indexed again once Redis was back
    assert (f"job {add.id}: Redis was unavailable while indexing image 1; indexed after it came back"
            in logged(caplog))
    status = job_status(connection, settings, add.id)
    assert status["status"] == "finished"
    assert status["result"] == {"collection": name, "image_ids": ids, "added": 2, "images": 2}
    assert CollectionStore(connection, name).pending() == {}


def test_an_add_fails_as_an_outage_when_redis_stays_away_while_indexing(restarting, pipeline, monkeypatch,
                                                                        caplog):
    from service.contract import ERROR_AT_BATCH, INTERNAL_ERROR
    from service.web.collections import submit_add
    from service.worker import collections as worker_collections
    from service.worker import rq_batch

    connection = restarting.client()
    settings = restarting_settings(restarting)
    add, _ = submit_add(connection, settings, f"photos-{uuid.uuid4().hex[:6]}", [photo(32)])
    fetched = Job.fetch(add.id, connection=connection, serializer=JSONSerializer)
    real, calls = worker_collections.index_images, []

    def index_while_redis_is_down(pipe, store, images):
        calls.append(len(images))
        restarting.stop() if len(calls) == 1 else None
        return real(pipe, store, images)

    monkeypatch.setattr(worker_collections, "index_images", index_while_redis_is_down)
    monkeypatch.setattr(rq_batch, "REDIS_WAIT_S", 0.2)
    with caplog.at_level(logging.ERROR, logger="service.worker.rq_batch"):
        outcome = run_batch(pipeline, connection, [fetched])[add.id]
    assert calls == [1]  # the wait ran out: not indexed again, and not reported as a bad image
    assert isinstance(outcome, PipelineError)
    assert (outcome.code, outcome.stage) == (INTERNAL_ERROR, ERROR_AT_BATCH)
    assert outcome.message.startswith("ConnectionError: ")
    assert f"job {add.id}: collection job failed" in logged(caplog)


def test_progress_lost_to_a_restarting_redis_is_only_logged_and_the_outcome_waits_for_it(restarting, pipeline,
                                                                                      monkeypatch, caplog):
    import threading

    connection = restarting.client()
    settings = restarting_settings(restarting)
    job = queue_job(connection, settings, "what is this?", ["vqa"], [photo(5)])
    computed = threading.Event()
    run_many = pipeline.run_many

    def run_while_redis_is_down(requests, on_stage=None):
        restarting.stop()  # every stage's progress write fails
        try:
            return run_many(requests, on_stage)
        finally:
            computed.set()  # back only after the results are computed: their writes wait for it

    monkeypatch.setattr(pipeline, "run_many", run_while_redis_is_down)
    thread = restarting.restart_after(computed)
    with caplog.at_level(logging.WARNING, logger="service.worker.rq_batch"):
        work(settings, pipeline, connection)
    thread.join(60)
    for stage in ("decode", "detector", "vilbert"):
        assert f"stage {stage} not recorded: redis unavailable ({restarting.refused})" in logged(caplog)
    assert job_status(connection, settings, job.id)["status"] == "finished"


def test_an_add_reports_its_progress_image_by_image(settings, pipeline, connection, monkeypatch, caplog):
    from service.web.collections import submit_add
    from service.worker import collections as worker_collections

    add, ids = submit_add(connection, settings, f"photos-{uuid.uuid4().hex[:6]}", [photo(40), photo(41), photo(42)])
    seen, pending = [], []
    real = worker_collections.index_images

    def index_and_look(pipe, store, images):
        status = job_status(connection, settings, add.id)  # what a client polling the job sees meanwhile
        seen.append((status["status"], status["stage"], status.get("stage_detail")))
        pending.append(sorted(store.pending()))  # an image stays pending until it is indexed
        return real(pipe, store, images)

    monkeypatch.setattr(worker_collections, "index_images", index_and_look)
    with caplog.at_level(logging.WARNING, logger="service.worker.rq_batch"):
        work(settings, pipeline, connection)
    assert logged(caplog) == []  # every progress write was the job's own
    assert seen == [("started", "indexing", "0/3"), ("started", "indexing", "1/3"), ("started", "indexing", "2/3")]
    assert pending == [sorted(ids), sorted(ids[1:]), sorted(ids[2:])]
    meta = Job.fetch(add.id, connection=connection, serializer=JSONSerializer).meta
    assert (meta["stage"], meta["stage_detail"]) == ("indexing", "3/3")


def test_a_search_reports_that_it_is_searching(settings, pipeline, connection, monkeypatch):
    from service.web.collections import submit_add, submit_search
    from service.worker import collections as worker_collections

    name = f"photos-{uuid.uuid4().hex[:6]}"
    submit_add(connection, settings, name, [photo(43)])
    work(settings, pipeline, connection)
    job = submit_search(connection, settings, name, {"text": "a dog"})
    seen = []
    real = worker_collections.search

    def search_and_look(*args, **kwargs):
        status = job_status(connection, settings, job.id)
        seen.append((status["status"], status["stage"], status.get("stage_detail")))
        return real(*args, **kwargs)

    monkeypatch.setattr(worker_collections, "search", search_and_look)
    work(settings, pipeline, connection)
    assert seen == [("started", "searching", None)]
    assert job_status(connection, settings, job.id)["status"] == "finished"


def test_progress_of_a_collection_job_lost_to_redis_is_only_logged(restarting, pipeline, monkeypatch, caplog):
    from service.web.collections import submit_add, submit_search
    from service.worker import rq_batch

    connection = restarting.client()
    settings = restarting_settings(restarting)
    name = f"photos-{uuid.uuid4().hex[:6]}"
    submit_add(connection, settings, name, [photo(44)])
    work(settings, pipeline, connection)
    job = submit_search(connection, settings, name, {"text": "a dog"})
    real, calls = rq_batch.owned_hset, []

    def write_during_a_restart(conn, member, worker_name, field, value):
        calls.append(field)
        if len(calls) > 1:
            return real(conn, member, worker_name, field, value)
        restarting.stop()  # the "searching" progress write fails; the search itself runs with Redis back
        try:
            return real(conn, member, worker_name, field, value)
        finally:
            restarting.start()

    monkeypatch.setattr(rq_batch, "owned_hset", write_during_a_restart)
    with caplog.at_level(logging.WARNING, logger="service.worker.rq_batch"):
        work(settings, pipeline, connection)
    assert calls == ["meta"]
    assert logged(caplog) == [f"job {job.id}: progress not recorded: redis unavailable ({restarting.refused})"]
    assert job_status(connection, settings, job.id)["status"] == "finished"


def test_an_add_reaped_while_it_indexes_records_no_more_progress_and_no_outcome(settings, pipeline, connection,
                                                                                 monkeypatch, caplog):
    from rq.job_lifecycle import record_job_failure

    from service.web.collections import submit_add
    from service.worker import collections as worker_collections

    add, _ = submit_add(connection, settings, f"photos-{uuid.uuid4().hex[:6]}", [photo(45), photo(46)])
    real = worker_collections.index_images

    def reaped_while_indexing(pipe, store, images):
        stored = Job.fetch(add.id, connection=connection, serializer=JSONSerializer)
        if stored.get_status() == "started":  # what the orphan reaper does to a worker that stopped beating
            with connection.pipeline() as transaction:
                record_job_failure(stored, "worker_lost", transaction)
                transaction.execute()
        return real(pipe, store, images)

    monkeypatch.setattr(worker_collections, "index_images", reaped_while_indexing)
    with caplog.at_level(logging.WARNING, logger="service.worker.rq_batch"):
        worker = work(settings, pipeline, connection)
    refused = f"job {add.id}: progress not recorded, the job is no longer this worker's"
    assert logged(caplog).count(refused) == 2  # after each of the two images; the first write was still ours
    meta = Job.fetch(add.id, connection=connection, serializer=JSONSerializer).meta
    assert meta.get("stage_detail") == "0/2"  # the last progress written while the job was ours
    assert job_status(connection, settings, add.id)["status"] == "failed"
    assert worker.context.metrics.registry.get_sample_value("vilbert_discarded_results_total") == 1


@pytest.mark.parametrize("lost", ["all", "one"])
def test_an_add_whose_uploads_expired_fails_and_leaves_nothing_pending(settings, pipeline, connection, lost):
    from service.collections import CollectionStore
    from service.web.collections import submit_add

    name = f"photos-{uuid.uuid4().hex[:6]}"
    add, _ = submit_add(connection, settings, name, [photo(47), photo(48)])
    if lost == "all":
        connection.delete(upload_key(add.id))
    else:  # one image's upload gone, the other kept: the job cannot be done as asked either
        connection.hdel(upload_key(add.id), "1")
    work(settings, pipeline, connection)
    status = job_status(connection, settings, add.id)
    assert status["status"] == "failed"
    assert status["error"]["code"] == UPLOAD_EXPIRED and status["error"]["stage"] == ERROR_AT_LOAD
    assert status["error"]["message"] == ("the uploaded images are gone (expired before the job started); submit "
                                          "again")
    assert CollectionStore(connection, name).pending() == {}


def test_a_request_with_one_of_its_images_gone_is_expired(settings, connection):
    job = queue_job(connection, settings, "two dogs", ["nlvr2"], [photo(1), photo(2)])
    loaded = load_request(connection, job)
    assert loaded.images == [photo(1), photo(2)]  # in upload order
    assert (loaded.text, loaded.tasks, loaded.top_k, loaded.boxes, loaded.features) == ("two dogs", ["nlvr2"], 3,
                                                                                         None, None)
    pointing = queue_job(connection, settings, "the dog", ["refcoco"], [photo(3)], top_k=2, boxes=[[0, 0, 9, 9]])
    loaded = load_request(connection, pointing)
    assert (loaded.tasks, loaded.top_k, loaded.boxes) == (["refcoco"], 2, [[0, 0, 9, 9]])
    connection.hdel(upload_key(job.id), "0")
    with pytest.raises(PipelineError) as caught:
        load_request(connection, job)
    assert caught.value.code == UPLOAD_EXPIRED


def taken(connection: Redis, settings: Settings) -> bool:
    """The worker has taken the queue's job (RQ moves it to its intermediate list): it now waits for partners."""
    return get_queue(connection, settings).count == 0


def test_a_job_queued_while_the_batch_waits_for_partners_joins_it(redis_url, pipeline, connection):
    import threading

    from service.localstack import wait_until

    settings = load_settings({"REDIS_URL": redis_url, "QUEUE_NAME": f"batch-{uuid.uuid4().hex[:8]}",
                              "BATCH_MAX_JOBS": "2", "BATCH_MAX_WAIT_MS": "10000"})
    first = queue_job(connection, settings, "a?", ["vqa"], [photo(1)])
    later = []

    def queue_once_the_worker_waits():
        assert wait_until(lambda: taken(connection, settings), 60)
        later.append(queue_job(connection, settings, "b?", ["vqa"], [photo(2)]))

    thread = threading.Thread(target=queue_once_the_worker_waits, daemon=True)
    thread.start()
    worker = work(settings, pipeline, connection)
    thread.join(60)
    # both in one batch of two: the wait ended when the batch was full, not after 10 s
    assert [job_status(connection, settings, job.id)["result"]["batch_size"] for job in (first, *later)] == [2, 2]
    registry = worker.context.metrics.registry
    assert registry.get_sample_value("vilbert_worker_batch_size_count") == 1
    assert registry.get_sample_value("vilbert_worker_batch_size_sum") == 2
    assert connection.llen(get_queue(connection, settings).intermediate_queue_key) == 0


def test_a_stop_request_ends_the_wait_for_partners(redis_url, pipeline, connection):
    import os
    import signal
    import threading
    import time

    from service.localstack import wait_until

    settings = load_settings({"REDIS_URL": redis_url, "QUEUE_NAME": f"batch-{uuid.uuid4().hex[:8]}",
                              "BATCH_MAX_JOBS": "4", "BATCH_MAX_WAIT_MS": "10000"})
    job = queue_job(connection, settings, "a?", ["vqa"], [photo(1)])
    worker = BatchWorker([get_queue(connection, settings)], context_for(settings, pipeline, connection),
                         name=f"test-{uuid.uuid4().hex[:8]}")

    signalled = []

    def stop_once_it_waits():
        assert wait_until(lambda: taken(connection, settings), 60)
        signalled.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)  # as `docker stop` does; RQ's handler runs in the main thread

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=stop_once_it_waits, daemon=True)
    thread.start()
    try:
        worker.work(burst=True, with_scheduler=False)
    finally:
        for sig, handler in handlers.items():  # RQ's handlers would outlive the worker in this process
            signal.signal(sig, handler)
    thread.join(60)
    assert time.monotonic() - signalled[0] < 5  # not the rest of the 10 s wait, which began before the signal
    assert worker.context.stop.is_set()  # the outer loop (service.worker.main) ends too
    # the job taken before the stop runs: RQ would have stopped at once and left it in its intermediate queue
    assert job_status(connection, settings, job.id)["result"]["batch_size"] == 1
    assert connection.llen(get_queue(connection, settings).intermediate_queue_key) == 0


def test_waiting_for_redis_answers_at_once_when_it_is_up_and_gives_up_at_the_limit(connection):
    import time

    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from service.localstack import free_port
    from service.worker.rq_batch import wait_for_redis

    began = time.monotonic()
    assert wait_for_redis(connection, 30) is True
    assert time.monotonic() - began < 5
    nobody = Redis(port=free_port(), retry=Retry(NoBackoff(), 0), socket_connect_timeout=1)
    began = time.monotonic()
    assert wait_for_redis(nobody, 1.2) is False
    waited = time.monotonic() - began
    assert 1.2 <= waited < 10  # tried every half second until the limit, then gave up


def test_an_outcome_the_reaper_fails_while_it_is_written_is_discarded(settings, pipeline, connection, monkeypatch,
                                                                      caplog):
    from rq.job_lifecycle import record_job_failure

    job = queue_job(connection, settings, "a?", ["vqa"], [photo(1)])
    execute = BatchJob._execute

    def reaped_as_it_is_recorded(self):
        # after the worker checked the job was still its own, before the outcome's transaction: only the fence
        # inside the transaction can notice
        stored = Job.fetch(self.id, connection=connection, serializer=JSONSerializer)
        with connection.pipeline() as transaction:
            record_job_failure(stored, "worker_lost", transaction)
            transaction.execute()
        return execute(self)

    monkeypatch.setattr(BatchJob, "_execute", reaped_as_it_is_recorded)
    with caplog.at_level(logging.WARNING):
        worker = work(settings, pipeline, connection)
    # RQ's log of the refused write (the traceback's last line), naming the worker and what the job became
    refusal = (f"service.worker.rq_batch.JobNotOwned: job {job.id} is no longer started by {worker.name} (status "
               "b'failed'); its outcome is discarded")
    assert worker.name.startswith("test-") and refusal in caplog.text.splitlines()
    assert (f"job {job.id}: discarding this worker's outcome, computed after the job was failed as orphaned "
            "(while its outcome was being written)") in logged(caplog)
    stored = Job.fetch(job.id, connection=connection, serializer=JSONSerializer)
    assert stored.get_status() == "failed" and stored.return_value() is None
    registry = worker.context.metrics.registry
    assert registry.get_sample_value("vilbert_discarded_results_total") == 1
    assert not registry.get_sample_value("vilbert_worker_jobs_total", {"status": "finished"})
    assert connection.exists(upload_key(job.id)) == 0


def test_a_job_without_a_timeout_lets_its_batch_run_on_and_its_partner_fails_alone(redis_url, pipeline, connection,
                                                                                    monkeypatch):
    settings = load_settings({"REDIS_URL": redis_url, "QUEUE_NAME": f"batch-{uuid.uuid4().hex[:8]}",
                              "JOB_TIMEOUT": "1", "BATCH_MAX_JOBS": "2", "BATCH_MAX_WAIT_MS": "0"})
    # two batches of two: a job with RQ's "no timeout" (-1, an operator's job, say), then one with no timeout
    # stored (RQ's default, 180 s, applies), each with a partner whose own timeout is 1 s
    unlimited, hurried, unset, rushed = (queue_job(connection, settings, f"{i}?", ["vqa"], [photo(i)])
                                         for i in range(4))
    connection.hset(unlimited.key, "timeout", "-1")
    connection.hdel(unset.key, "timeout")
    slowed(pipeline, monkeypatch, 1.5)  # past the partners' timeouts: neither batch is killed
    work(settings, pipeline, connection)
    for job in (unlimited, unset):
        assert job_status(connection, settings, job.id)["result"]["batch_size"] == 2
    for job in (hurried, rushed):
        failed = job_status(connection, settings, job.id)
        assert failed["status"] == "failed" and failed["error"]["code"] == "timeout"
        assert failed["error"]["message"] == "the job's batch ran longer than its timeout of 1 s"
        # what RQ keeps of the failure (the worker's log, `rq info`): how long the batch took
        stored = Job.fetch(job.id, connection=connection, serializer=JSONSerializer)
        assert re.search(r"JobTimeoutException: the batch took \d+\.\d s$", stored.latest_result().exc_string.strip())


def indexed_collection(settings: Settings, pipeline: Pipeline, connection: Redis, *seeds: int) -> str:
    from service.web.collections import submit_add

    name = f"photos-{uuid.uuid4().hex[:6]}"
    submit_add(connection, settings, name, [photo(seed) for seed in seeds])
    work(settings, pipeline, connection)
    return name


def test_searches_the_worker_cannot_answer_fail_with_the_reason(settings, pipeline, connection, monkeypatch,
                                                                  caplog):
    from service.collections import CollectionStore
    from service.contract import ERROR_AT_BATCH, INTERNAL_ERROR, SEARCHING
    from service.web.collections import submit_search

    name = indexed_collection(settings, pipeline, connection, 50, 51)
    store = CollectionStore(connection, name)

    def search_job(**changes) -> Job:
        job = Job.fetch(submit_search(connection, settings, name, {"text": "a dog"}).id, connection=connection,
                        serializer=JSONSerializer)
        job.kwargs["request"].update(changes)  # a job queued by another (older, newer) web tier
        return job

    unknown_task, bad_name = search_job(tasks=["vqa"]), search_job(collection="Not A Name")
    outcomes = run_batch(pipeline, connection, [unknown_task, bad_name])
    refused = outcomes[unknown_task.id]
    assert (refused.code, refused.stage) == ("unknown_task", SEARCHING)
    assert refused.message == "task must be one of retrieval_coco, retrieval_flickr30k, got 'vqa'"
    refused = outcomes[bad_name.id]
    assert (refused.code, refused.stage) == ("invalid_collection", ERROR_AT_LOAD)
    assert refused.message.startswith("a collection name is 1 to 63 characters")

    # an image deleted (by a client) between the search listing the images and reading them
    listed, gone = CollectionStore.ids, []

    def listed_then_deleted(self):
        ids = listed(self)
        gone.append(ids[0])
        CollectionStore(connection, name).remove(ids[0])
        return ids

    monkeypatch.setattr(CollectionStore, "ids", listed_then_deleted)
    raced = search_job()
    refused = run_batch(pipeline, connection, [raced])[raced.id]
    assert (refused.code, refused.stage) == ("unknown_image", SEARCHING)
    assert refused.message == f"no image {gone[0]} in collection {name}"
    monkeypatch.undo()

    # a damaged record is not the client's doing: an internal error that names the image
    survivor = store.ids()[0]
    connection.hset(store.regions_key, survivor, b"damaged")
    damaged = search_job()
    with caplog.at_level(logging.ERROR, logger="service.worker.rq_batch"):
        broken = run_batch(pipeline, connection, [damaged])[damaged.id]
    assert (broken.code, broken.stage) == (INTERNAL_ERROR, ERROR_AT_BATCH)
    assert broken.message.startswith(f"FeatureStoreError: collection {name}, image {survivor}: ")
    assert f"job {damaged.id}: collection job failed" in logged(caplog)


def test_an_add_whose_indexing_breaks_fails_with_the_image_and_the_cause(settings, pipeline, connection,
                                                                          monkeypatch):
    from service.collections import CollectionStore
    from service.web.collections import submit_add
    from service.worker import collections as worker_collections

    name = f"photos-{uuid.uuid4().hex[:6]}"
    add, ids = submit_add(connection, settings, name, [photo(52), photo(53)])
    real = worker_collections.index_images

    def second_image_breaks(pipe, store, images):
        if store.image_count():
            raise RuntimeError("CUDA error: an illegal memory access")  # a fault tiny weights cannot cause
        return real(pipe, store, images)

    monkeypatch.setattr(worker_collections, "index_images", second_image_breaks)
    work(settings, pipeline, connection)
    error = job_status(connection, settings, add.id)["error"]
    assert error == {"code": "internal_error", "message": "image 1: CUDA error: an illegal memory access",
                     "stage": "indexing"}
    assert Job.fetch(add.id, connection=connection, serializer=JSONSerializer).meta["stage"] == "failed"
    store = CollectionStore(connection, name)
    assert store.ids() == [ids[0]] and store.pending() == {}  # the first image stays indexed; nothing pending


def test_a_malformed_job_fails_alone_and_a_job_without_a_kind_is_an_inference(settings, pipeline, connection,
                                                                               caplog):
    from service.contract import INTERNAL_ERROR

    jobs = [Job.fetch(queue_job(connection, settings, f"q{i}?", ["vqa"], [photo(i)]).id, connection=connection,
                      serializer=JSONSerializer) for i in range(3)]
    jobs[0].kwargs["request"] = "what is this?"  # not a request object at all
    del jobs[1].kwargs["request"]["text"]
    del jobs[2].kwargs["request"]["kind"]  # queued by a web tier from before collections: an inference job
    with caplog.at_level(logging.ERROR, logger="service.worker.rq_batch"):
        outcomes = run_batch(pipeline, connection, jobs)
    for job, message in ((jobs[0], "TypeError: string indices must be integers, not 'str'"),
                         (jobs[1], "KeyError: 'text'")):
        assert (outcomes[job.id].code, outcomes[job.id].stage) == (INTERNAL_ERROR, ERROR_AT_LOAD)
        assert outcomes[job.id].message == message
        assert f"job {job.id}: cannot load its request" in logged(caplog)
    assert outcomes[jobs[2].id]["batch_size"] == 3 and outcomes[jobs[2].id]["tasks"]["vqa"]


def test_an_outcome_for_a_job_another_worker_now_holds_is_discarded(settings, pipeline, connection, monkeypatch,
                                                                     caplog):
    job = queue_job(connection, settings, "a?", ["vqa"], [photo(1)])
    partner = queue_job(connection, settings, "b?", ["vqa"], [photo(2)])
    # still `started`, but by another worker (the job changed hands while this one was cut off)
    slowed(pipeline, monkeypatch, 0, during=lambda: connection.hset(job.key, "worker_name", "another-worker"))
    with caplog.at_level(logging.WARNING, logger="service.worker.rq_batch"):
        worker = work(settings, pipeline, connection)
    assert logged(caplog) == [f"job {job.id}: discarding this worker's outcome, computed after the job was failed as "
                              "orphaned (before its outcome was written)"]
    stored = Job.fetch(job.id, connection=connection, serializer=JSONSerializer)
    assert stored.get_status() == "started" and stored.return_value() is None  # left to its holder
    assert job_status(connection, settings, partner.id)["status"] == "finished"  # its partner's is written
    assert worker.context.metrics.registry.get_sample_value("vilbert_discarded_results_total") == 1


def test_a_search_job_runs_with_the_parameters_it_was_queued_with(redis_url, pipeline, connection):
    from service.web.collections import submit_search

    settings = load_settings({"REDIS_URL": redis_url, "QUEUE_NAME": f"batch-{uuid.uuid4().hex[:8]}",
                              "COLLECTION_RERANK_TOP": "2"})
    name = indexed_collection(settings, pipeline, connection, 54, 55, 56)
    plain = submit_search(connection, settings, name, {"text": "a dog", "ground": "off", "first_stage": "on"})
    grounded = submit_search(connection, settings, name, {"text": "a dog", "first_stage": "off", "top_k": "1"})
    work(settings, pipeline, connection)
    result = job_status(connection, settings, plain.id)["result"]
    assert result["first_stage"]["used"] and result["first_stage"]["reranked"] == 2 and result["scored"] == 2
    assert not result["grounded"] and all(hit["box"] is None for hit in result["hits"])
    result = job_status(connection, settings, grounded.id)["result"]
    assert result["first_stage"] == {"used": False} and result["scored"] == 3
    assert result["grounded"] and len(result["hits"]) == 1 and result["hits"][0]["box"] is not None


def test_jobs_of_a_batch_report_each_stage_and_their_timings(settings, pipeline, connection, monkeypatch, caplog):
    import time

    jobs = [queue_job(connection, settings, "what is this?", ["vqa"], [photo(1)]),
            queue_job(connection, settings, "two dogs", ["nlvr2"], [photo(2), photo(3)])]
    run_many, seen = pipeline.run_many, []

    def run_and_look(requests, on_stage=None):
        def look(name, detail):
            on_stage(name, detail)  # the batch loop's progress writer, then what a client polling sees
            seen.append([(status["status"], status["stage"], status.get("stage_detail"))
                         for status in (job_status(connection, settings, job.id) for job in jobs)])
        return run_many(requests, look)

    monkeypatch.setattr(pipeline, "run_many", run_and_look)
    began = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="service.worker.rq_batch"):
        work(settings, pipeline, connection)
    wall = time.perf_counter() - began
    assert seen == [[("started", "decode", "3 image(s)")] * 2, [("started", "detector", "3 image(s)")] * 2,
                    [("started", "vilbert", "2 task(s)")] * 2]
    assert logged(caplog) == []
    for job in jobs:
        timings = job_status(connection, settings, job.id)["result"]["timings"]
        stored = Job.fetch(job.id, connection=connection, serializer=JSONSerializer)
        # the batch's run time, rounded to 4 decimals; the queue wait from the job's own times
        assert 0 < timings["run_s"] < wall and timings["run_s"] == round(timings["run_s"], 4)
        assert timings["run_s"] != round(timings["run_s"])
        waited = (stored.started_at - stored.enqueued_at).total_seconds()
        assert timings["queue_wait_s"] == round(waited, 4)


def test_a_batch_waits_batch_max_wait_ms_for_partners_that_do_not_come(redis_url, pipeline, connection):
    settings = load_settings({"REDIS_URL": redis_url, "QUEUE_NAME": f"batch-{uuid.uuid4().hex[:8]}",
                              "BATCH_MAX_JOBS": "4", "BATCH_MAX_WAIT_MS": "1500"})
    job = queue_job(connection, settings, "a?", ["vqa"], [photo(1)])
    work(settings, pipeline, connection)
    assert job_status(connection, settings, job.id)["result"]["batch_size"] == 1
    stored = Job.fetch(job.id, connection=connection, serializer=JSONSerializer)
    assert (stored.started_at - stored.enqueued_at).total_seconds() >= 1.5  # the batch started after the wait


@pytest.mark.timeout(120)
def test_rqs_max_idle_time_stays_rqs_own(settings, pipeline, connection):
    """`work(max_idle_time=N)`, RQ's option (the service does not use it), ends an idle worker after N s of waiting,
    as RQ's own pop does: not at once, and not never."""
    worker = BatchWorker([get_queue(connection, settings)], context_for(settings, pipeline, connection),
                         name=f"test-{uuid.uuid4().hex[:8]}")
    started = time.monotonic()
    assert worker.work(max_idle_time=2, with_scheduler=False) is False  # no job
    assert 1.9 <= time.monotonic() - started < 60
