"""Scale features with real processes (the end-to-end Stack of test_service_e2e: a private Redis server,
`python worker.py`, gunicorn serving `app:app`): the feature cache, batching equality, precomputed-feature
submissions, Prometheus metrics of both tiers, and back-pressure."""

from __future__ import annotations

import io
import shutil
import signal
import time
import urllib.request

import numpy as np
import pytest
import torch

from stack import Stack
from test_service_e2e import ASTRONAUT, CAT, COFFEE, ROCKET

from detector.images import load_image
from detector.store import encode_record
from service.contract import JobRequest
from service.worker.cache import FeatureCache, detector_key
from service.features import to_npz
from service.queue import get_queue
from service.web.inputs import parse_submission
from service.web.jobs import submit
from service.localstack import free_port, wait_until
from service.settings import load_settings
from test_predict_many import assert_close
from vilbert.tasks import TaskRegistry

pytestmark = pytest.mark.slow
MAX_QUEUED = 5


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    metrics_port = free_port()
    # Stack copies os.environ: the scale knobs go in through it.
    patch.setenv("WORKER_METRICS_PORT", str(metrics_port))
    patch.setenv("MAX_QUEUED_JOBS", str(MAX_QUEUED))
    patch.setenv("BATCH_MAX_JOBS", "8")
    patch.setenv("BATCH_MAX_WAIT_MS", "20")
    try:
        stack = Stack(tmp_path_factory.mktemp("scale"))
    finally:
        patch.undo()
    stack.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def pipeline(stack):
    from service.worker.pipeline import Pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker (OMP_NUM_THREADS=1): same kernels, same sums
    yield Pipeline.from_settings(stack.settings)
    torch.set_num_threads(threads)


def scrape(url: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (labels as printed)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = values.get(key, 0.0) + float(value)  # multiprocess output may repeat a series
    return values


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the series of `name` whose labels include `labels`."""
    total = 0.0
    for key, value in values.items():
        series, _, rest = key.partition("{")
        if series == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def submit_features(stack: Stack, text: str, files: list[bytes], **fields):
    return stack.post(fields={"text": text, **fields}, files=[("features", data, "f.bin") for data in files])


# ---------------------------------------------------------------------------------------------------- cache


def test_cache_hit_skips_the_detector_and_a_changed_detector_config_misses(stack, pipeline, tmp_path):
    from service.worker.pipeline import InferenceRequest, Pipeline

    connection = stack.connection()
    namespace_free = FeatureCache(connection, "test-" + detector_key(pipeline.extractor), ttl=60)
    cached = pipeline.with_cache(namespace_free)
    assert pipeline.cache is None and cached.extractor is pipeline.extractor  # same models, the original untouched
    calls = []
    extract = pipeline.extractor.extract
    pipeline.extractor.extract = lambda images: calls.append(len(images)) or extract(images)
    try:
        first = cached.run(InferenceRequest([COFFEE], "what is in the cup?", ["vqa", "refcoco"]))
        second = cached.run(InferenceRequest([COFFEE], "is it hot?", ["vqa", "refcoco"]))
        assert calls == [1]  # the second question about the same bytes never reached the detector
        assert (first["cache"], second["cache"]) == ("miss", "hit")
        assert second["timings"]["detector_s"] < first["timings"]["detector_s"]
        again = cached.run(InferenceRequest([COFFEE], "what is in the cup?", ["vqa", "refcoco"]))
        assert_close(again["tasks"], first["tasks"])  # cached features give the detector's answers
        assert namespace_free.stats.hits == 2 and namespace_free.stats.misses == 1
    finally:
        pipeline.extractor.extract = extract

    # Another detector config (a copy of the bundle with another RPN NMS threshold): another key, a miss.
    changed = tmp_path / "bundle"
    shutil.copytree(stack.bundle, changed)
    config = changed / "detectron_config.yaml"
    config.write_text(config.read_text().replace("NMS_THRESH: 0.7", "NMS_THRESH: 0.6"))
    other = Pipeline.from_settings(load_settings(dict(stack.env, MODEL_DIR=str(changed))))
    assert detector_key(other.extractor) != detector_key(pipeline.extractor)
    other = other.with_cache(FeatureCache(connection, "test-" + detector_key(other.extractor), ttl=60))
    assert other.run(InferenceRequest([COFFEE], "is it hot?", ["vqa"]))["cache"] == "miss"
    # ... and other sizes too.
    resized = Pipeline.from_settings(load_settings(dict(stack.env, DETECTOR_MIN_SIZE="256")))
    assert detector_key(resized.extractor) not in (detector_key(pipeline.extractor), detector_key(other.extractor))


def test_cache_bounds_entries_bytes_and_ttl(stack, pipeline):
    connection = stack.connection()
    regions = pipeline.extractor.extract([load_image(CAT)])[0]
    record = len(encode_record("", regions))
    for key in connection.scan_iter(match="vilbert:feat:*"):
        connection.delete(key)
    cache = FeatureCache(connection, "bounds", ttl=60, max_entries=3, max_bytes=10 * record)
    for i in range(5):
        cache.put(b"image %d" % i, regions)
    assert cache.size() == (3, 3 * (record))
    assert cache.stats.evictions == 2
    assert cache.get_many([b"image 0", b"image 1", b"image 4"])[:2] == [None, None]  # least recently used went first
    cache.get_many([b"image 2"])  # touched: now the newest
    cache.max_bytes = 2 * record + 1
    cache.put(b"image 5", regions)
    assert cache.get_many([b"image 3"]) == [None] and cache.get_many([b"image 2"])[0] is not None
    assert cache.size()[1] <= cache.max_bytes
    short = FeatureCache(connection, "bounds", ttl=1, max_entries=100, max_bytes=1 << 30)
    short.put(b"old", regions)
    time.sleep(1.2)
    assert short.get_many([b"old"]) == [None]  # expired in Redis ...
    short.put(b"new", regions)  # ... and dropped from the index and the byte count by the next put
    assert short.size() == (1, record)
    for key in connection.scan_iter(match="vilbert:feat:*"):
        connection.delete(key)


# --------------------------------------------------------------------------- batching, back-pressure, metrics


def test_batch_equals_each_job_alone_back_pressure_and_metrics(stack, pipeline):
    from service.worker.pipeline import InferenceRequest

    connection = stack.connection()
    queue = get_queue(connection, stack.settings)
    worker_before = scrape(stack.metrics_url)
    web_before = scrape(stack.url + "/metrics")
    requests = [
        ("what is the astronaut holding?", [ASTRONAUT], "vqa,refcoco,snli_ve"),
        ("a cat on a sofa", [CAT], "retrieval_coco,gqa"),
        ("the left image shows a rocket", [ROCKET, COFFEE], "nlvr2"),
        ("what is in the cup?", [COFFEE], "vqa"),
    ]
    stack.worker.send_signal(signal.SIGSTOP)  # idle in its dequeue: everything below waits in the queue
    try:
        ids = [stack.submit(text, images, tasks=tasks, top_k=2) for text, images, tasks in requests]
        # A job whose bytes are not an image (queued past the web tier): it must fail alone, not its batch.
        infos = parse_submission({"text": "hi"}, [CAT], stack.settings, TaskRegistry.from_file()).images
        bad = submit(connection, stack.settings, JobRequest(text="hi", tasks=["vqa"], images=infos),
                          [b"\x89PNG\r\n\x1a\n garbage"]).id
        # The stopped worker may already hold the first job (Redis answered its blocking dequeue): top up.
        while queue.count < MAX_QUEUED:
            requests.append(("is it hot?", [COFFEE], "vqa,gqa"))
            ids.append(stack.submit(*requests[-1][:2], tasks=requests[-1][2], top_k=2))
        assert queue.count == MAX_QUEUED
        # Back-pressure: the queue is at its bound, so the next POST is refused and nothing is stored.
        status, body, headers = stack.post(fields={"text": "one too many"}, files=[("image", CAT)])
        assert status in (429, 503) and body["error"]["code"] == "queue_full", body
        assert int(headers["Retry-After"]) > 0
        assert queue.count == MAX_QUEUED and len(connection.keys("vilbert:upload:*")) == len(ids) + 1
    finally:
        stack.worker.send_signal(signal.SIGCONT)
    finished = [stack.wait(job_id, 60) for job_id in ids]
    failed = stack.wait(bad, 30)
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_image", failed
    for (text, images, tasks), job in zip(requests, finished):
        assert job["status"] == "finished", job
        assert job["result"]["batch_size"] == len(ids) + 1  # every queued job went through in one batch
        alone = pipeline.run(InferenceRequest(images, text, tasks.split(","), top_k=2))
        assert_close(job["result"]["tasks"], alone["tasks"])
    assert stack.post(fields={"text": "room again"}, files=[("image", CAT)])[0] == 202

    worker = scrape(stack.metrics_url)
    assert metric(worker, "vilbert_worker_jobs_total", status="finished") - \
        metric(worker_before, "vilbert_worker_jobs_total", status="finished") >= 4
    assert metric(worker, "vilbert_worker_failures_total", reason="invalid_image") - \
        metric(worker_before, "vilbert_worker_failures_total", reason="invalid_image") == 1
    assert metric(worker, "vilbert_worker_batch_size_bucket", le="4.0") - \
        metric(worker_before, "vilbert_worker_batch_size_bucket", le="4.0") < \
        metric(worker, "vilbert_worker_batch_size_count") - metric(worker_before, "vilbert_worker_batch_size_count")
    for stage in ("queue_wait", "decode", "detector", "vilbert", "total"):
        assert metric(worker, "vilbert_worker_stage_seconds_count", stage=stage) > \
            metric(worker_before, "vilbert_worker_stage_seconds_count", stage=stage), stage
    assert metric(worker, "vilbert_feature_cache_events_total", event="miss") > \
        metric(worker_before, "vilbert_feature_cache_events_total", event="miss")
    assert "vilbert_feature_cache_events_total{event=\"hit\"}" in worker

    web = scrape(stack.url + "/metrics")  # merged over both gunicorn workers
    assert metric(web, "vilbert_http_requests_total", route="/api/v1/jobs", method="POST", status="202") - \
        metric(web_before, "vilbert_http_requests_total", route="/api/v1/jobs", method="POST", status="202") == len(ids) + 1
    assert metric(web, "vilbert_http_errors_total", code="queue_full") - \
        metric(web_before, "vilbert_http_errors_total", code="queue_full") == 1
    assert metric(web, "vilbert_http_request_duration_seconds_count", route="/api/v1/jobs/<job_id>") > 0
    assert metric(web, "vilbert_redis_up") == 1 and metric(web, "vilbert_workers_ready") == 1
    assert "vilbert_queue_depth" in web


def test_second_question_over_http_is_a_cache_hit(stack):
    before = scrape(stack.metrics_url)
    first = stack.wait(stack.submit("what is this?", [ROCKET], tasks="vqa"))
    second = stack.wait(stack.submit("is it flying?", [ROCKET], tasks="vqa"))
    assert first["status"] == second["status"] == "finished"
    assert second["result"]["cache"] == "hit" and first["result"]["cache"] in ("miss", "hit")
    after = scrape(stack.metrics_url)
    assert metric(after, "vilbert_feature_cache_events_total", event="hit") > \
        metric(before, "vilbert_feature_cache_events_total", event="hit")


# ---------------------------------------------------------------------------------------- precomputed features


def test_submitting_precomputed_features(stack, pipeline):
    regions = pipeline.extractor.extract([load_image(CAT)])[0]
    from_image = stack.wait(stack.submit("what animal is this?", [CAT], tasks="vqa,refcoco,snli_ve"))
    for payload in (encode_record("cat", regions), to_npz(regions)):
        status, body, _ = submit_features(stack, "what animal is this?", [payload], tasks="vqa,refcoco,snli_ve")
        assert status == 202, body
        job = stack.wait(body["id"])
        assert job["status"] == "finished", job
        assert job["result"]["cache"] == "features"
        assert job["result"]["images"] == from_image["result"]["images"]
        assert_close(job["result"]["tasks"], from_image["result"]["tasks"])
    two = submit_features(stack, "the left one is a cat", [encode_record("a", regions), to_npz(regions)],
                          tasks="nlvr2")
    assert two[0] == 202 and stack.wait(two[1]["id"])["status"] == "finished"

    narrow = type(regions)(**{**regions.__dict__, "features": regions.features[:, :32]})
    buffer = io.BytesIO()
    np.savez(buffer, boxes=np.array([object()], dtype=object), features=regions.features, image_width=1,
             image_height=1)
    cases = [
        ([encode_record("n", narrow)], {}, "feature_size"),  # the web tier knows the workers' width (64)
        ([b"not a feature file"], {}, "invalid_features"),
        ([encode_record("x", regions)[:40]], {}, "invalid_features"),  # truncated record
        ([buffer.getvalue()], {}, "invalid_features"),  # object array: refused, never unpickled
        ([to_npz(type(regions)(**{**regions.__dict__, "boxes": regions.boxes[:, :3]}))], {}, "invalid_features"),
        ([to_npz(regions)], {"boxes": "[[0, 0, 5, 5]]"}, "boxes_need_image"),
        ([to_npz(regions)], {"tasks": "nlvr2"}, "image_count"),
    ]
    for files, fields, code in cases:
        status, body, _ = submit_features(stack, "hi", files, **fields)
        assert status == 400 and body["error"]["code"] == code, (code, body)
    status, body, _ = stack.post(fields={"text": "hi"}, files=[("image", CAT), ("features", to_npz(regions))])
    assert status == 400 and body["error"]["code"] == "mixed_inputs"


# ------------------------------------------------------------------------------------------------ faults


def test_a_worker_killed_mid_batch_fails_every_job_of_its_batch(stack):
    """Runs last: it replaces the module's worker. All jobs of the batch are marked started before any work, so
    the orphan reaper fails each of them as worker_lost; none stays queued or started."""
    from test_service_e2e import HEARTBEAT_TTL, photo

    stack.worker.send_signal(signal.SIGTERM)
    assert stack.worker.wait(30) == 0
    uploads = [[photo(name, size) for name in ("astronaut", "chelsea", "coffee", "rocket")] for size in (150, 170, 210)]
    ids = [stack.submit("who is there?", images, tasks="retrieval_coco") for images in uploads]
    # Slow on purpose (full detector size, no cache): the batch is still running when it is killed.
    stack.start_worker(DETECTOR_MIN_SIZE="800", DETECTOR_MAX_SIZE="1333", FEATURE_CACHE_TTL="0")
    assert wait_until(lambda: all(stack.get(f"/api/v1/jobs/{i}")[1]["status"] == "started" for i in ids), 60,
                      interval=0.05), [stack.get(f"/api/v1/jobs/{i}")[1] for i in ids]
    stack.worker.send_signal(signal.SIGKILL)
    stack.worker.wait(10)
    for job_id in ids:
        job = stack.wait(job_id, HEARTBEAT_TTL + 15)
        assert job["status"] == "failed" and job["error"]["code"] == "worker_lost", job
