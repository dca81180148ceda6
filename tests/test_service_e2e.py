"""End-to-end tests of the service with real processes: a private Redis server, `python worker.py` on a tiny
bundle written by `python models/make_tiny.py`, gunicorn serving `app:app`, HTTP over loopback, real photographs
(scikit-image's samples, downscaled so the tiny detector stays fast on CPU).

The in-process Pipeline tests at the top use the same bundle."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from pictures import sample_jpeg  # noqa: E402

from service.contract import JobRequest, upload_key  # noqa: E402
from service.errors import PipelineError, Unavailable  # noqa: E402
from service.web.inputs import parse_submission  # noqa: E402
from service.web.jobs import submit  # noqa: E402
from service.localstack import free_port, stop, wait_until  # noqa: E402
from stack import HEARTBEAT_TTL  # noqa: E402
from vilbert.tasks import TaskRegistry  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def photo(name: str, size: int = 192) -> bytes:
    return sample_jpeg(name, size)


ASTRONAUT, CAT, COFFEE, ROCKET = (photo(n) for n in ("astronaut", "chelsea", "coffee", "rocket"))


@pytest.fixture(scope="module")
def pipeline(stack):
    """The same bundle and settings in this process, on one thread like the worker (OMP_NUM_THREADS=1), so both
    sum floats in the same order."""
    import torch

    from service.worker.pipeline import Pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Pipeline.from_settings(stack.settings)
    torch.set_num_threads(threads)


def assert_close(a, b, tolerance: float = 1e-4, where: str = "result") -> None:
    """Equal structure and strings; numbers within `tolerance`."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_close(a[key], b[key], tolerance, f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, tolerance, f"{where}[{index}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= tolerance, f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ------------------------------------------------------------------------------------------- in-process pipeline


def test_bundle_is_complete_and_marked_tiny(stack):
    from service.bundle import REQUIRED_FILES, TINY_MARKER

    for name in REQUIRED_FILES + (TINY_MARKER, "README.txt", "vocab.txt", "vilbert_config.json"):
        assert (stack.bundle / name).is_file(), name
    assert "meaningless" in (stack.bundle / "README.txt").read_text()
    config = json.loads((stack.bundle / "vilbert_config.json").read_text())
    assert config["v_feature_size"] == 64  # the tiny detector's fc6 width


def test_reduced_precision_is_reported_and_keeps_the_cpu_detector_in_fp32(stack):
    from service.worker.pipeline import InferenceRequest, Pipeline
    from vilbert.cpu_inference import native_bf16_linear_available

    bf16 = Pipeline.from_dir(stack.bundle, device="cpu", precision="bf16")
    assert bf16.info["precision"] == {"vilbert": "bf16", "detector": "fp32"}
    assert bf16.predictor.packed_weights == native_bf16_linear_available()
    result = bf16.run(InferenceRequest([ASTRONAUT], "what is she holding?", ["vqa"], top_k=2))
    assert result["model"]["precision"]["vilbert"] == "bf16" and len(result["tasks"]["vqa"]["answers"]) == 2


def test_pipeline_in_process(pipeline):
    from service.worker.pipeline import InferenceRequest

    result = pipeline.run(InferenceRequest([ASTRONAUT], "what is she holding?", ["vqa", "refcoco"], top_k=4))
    assert len(result["tasks"]["vqa"]["answers"]) == 4 and len(result["tasks"]["refcoco"]["regions"]) == 4
    assert result["model"]["tiny"] is True and "meaningless" in result["model"]["notice"]
    assert result["model"]["precision"] == {"vilbert": "fp32", "detector": "fp32"}
    assert set(result["timings"]) == {"decode_s", "detector_s", "vilbert_s"}
    # run_many: one failing request does not fail the others, and each result equals running it alone.
    outcomes = pipeline.run_many([InferenceRequest([b"not an image"], "x", ["vqa"]),
                                  InferenceRequest([CAT, COFFEE], "two cups", ["nlvr2", "retrieval_coco"])])
    assert isinstance(outcomes[0], PipelineError) and (outcomes[0].code, outcomes[0].stage) == ("invalid_image", "decode")
    alone = pipeline.run(InferenceRequest([CAT, COFFEE], "two cups", ["nlvr2", "retrieval_coco"]))
    assert_close(outcomes[1]["tasks"], alone["tasks"], tolerance=0)


def test_pipeline_rejects_bad_boxes_and_missing_candidates(pipeline):
    from service.worker.pipeline import InferenceRequest

    with pytest.raises(PipelineError) as caught:
        pipeline.run(InferenceRequest([CAT], "which?", ["visual7w"], boxes=[[0, 0, 5000, 10]]))
    assert caught.value.code == "invalid_boxes"
    with pytest.raises(PipelineError) as caught:
        pipeline.run(InferenceRequest([CAT], "which?", ["visual7w"]))
    assert (caught.value.code, caught.value.stage) == ("missing_candidates", "vilbert")


# --------------------------------------------------------------------------------------------------- HTTP API


def test_health_ready_tasks_and_openapi(stack):
    assert stack.get("/healthz") == (200, {"status": "ok"})
    status, ready = stack.get("/readyz")
    assert status == 200 and ready["redis"] == "ok" and ready["workers"][0]["tiny"] is True
    status, tasks = stack.get("/api/v1/tasks")
    names = {t["name"]: t for t in tasks["tasks"]}
    assert status == 200 and len(names) == 12 and names["nlvr2"]["images"] == 2 and names["visual7w"]["needs_candidate_boxes"]
    status, spec = stack.get("/api/v1/openapi.json")
    assert status == 200 and "/api/v1/jobs/{job_id}" in spec["paths"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="the curl binary is not installed")
def test_classic_curl_form(stack, tmp_path):
    image = tmp_path / "photo.jpg"
    image.write_bytes(ROCKET)
    headers = tmp_path / "headers"
    body = subprocess.run(["curl", "-s", "-D", str(headers), "--form", f"fileupload=@{image}", "--form",
                           "text_input=swimming elephant", stack.url + "/"], capture_output=True, text=True,
                          check=True).stdout
    head = headers.read_bytes().decode().split("\r\n\r\n")[-2]  # the last response (curl may show a 100 Continue first)
    assert head.startswith("HTTP/1.1 202"), head
    accepted = json.loads(body)
    assert f"Location: /api/v1/jobs/{accepted['id']}" in head
    job = stack.wait(accepted["id"])
    assert job["status"] == "finished", job
    assert set(job["result"]["tasks"]) == {"vqa", "gqa", "snli_ve", "refcoco", "retrieval_coco"}
    assert job["result"]["text"] == "swimming elephant"


def test_single_image_tasks_match_the_pipeline(stack, pipeline):
    from service.worker.pipeline import InferenceRequest

    tasks = ["vqa", "genome_qa", "gqa", "snli_ve", "refcoco", "refcoco_plus", "refcocog", "retrieval_coco",
             "retrieval_flickr30k"]
    job = stack.wait(stack.submit("what is the astronaut holding?", [ASTRONAUT], tasks=",".join(tasks), top_k=2))
    assert job["status"] == "finished", job
    result = job["result"]
    assert list(result["tasks"]) == tasks
    width, height = Image.open(io.BytesIO(ASTRONAUT)).size
    assert result["images"] == [{"width": width, "height": height, "regions": result["images"][0]["regions"]}]
    assert 1 <= result["images"][0]["regions"] <= 100
    vqa_vocab = set(json.loads((stack.bundle / "vqa_answers.json").read_text()))
    gqa_vocab = set(json.loads((stack.bundle / "gqa_answers.json").read_text()))
    for name, vocab in (("vqa", vqa_vocab), ("genome_qa", vqa_vocab), ("gqa", gqa_vocab)):
        answers = result["tasks"][name]["answers"]
        assert len(answers) == 2 and all(a["answer"] in vocab for a in answers)
        assert answers[0]["probability"] >= answers[1]["probability"] > 0
    snli = result["tasks"]["snli_ve"]
    assert snli["label"] in ("contradiction", "neutral", "entailment")
    assert abs(sum(snli["probabilities"].values()) - 1) < 1e-4
    for name in ("refcoco", "refcoco_plus", "refcocog"):
        for region in result["tasks"][name]["regions"]:
            x1, y1, x2, y2 = region["box"]
            assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
    assert result["tasks"]["retrieval_coco"]["ranking"] == [0]
    timings = result["timings"]
    assert {"queue_wait_s", "decode_s", "detector_s", "vilbert_s"} <= set(timings)
    assert all(v >= 0 for v in timings.values())
    # The service returns what the in-process pipeline computes for the same request.
    direct = pipeline.run(InferenceRequest([ASTRONAUT], "what is the astronaut holding?", tasks, top_k=2))
    assert_close(direct["tasks"], result["tasks"])


def test_two_and_more_images(stack):
    job = stack.wait(stack.submit("two animals are sleeping", [CAT, COFFEE]))
    assert job["status"] == "finished", job
    assert set(job["result"]["tasks"]) == {"nlvr2", "retrieval_coco"}
    nlvr2 = job["result"]["tasks"]["nlvr2"]
    assert nlvr2["label"] in ("true", "false") and abs(sum(nlvr2["probabilities"].values()) - 1) < 1e-4
    job = stack.wait(stack.submit("a rocket on the launch pad", [CAT, ROCKET, COFFEE, ASTRONAUT], tasks="retrieval_flickr30k"))
    ranking = job["result"]["tasks"]["retrieval_flickr30k"]
    assert sorted(ranking["ranking"]) == [0, 1, 2, 3] and len(ranking["scores"]) == 4
    assert ranking["scores"][ranking["ranking"][0]] == max(ranking["scores"])
    assert len(job["result"]["images"]) == 4


def test_pointing_tasks_with_candidate_boxes(stack):
    boxes = [[10, 10, 90, 120], [100, 20, 180, 100], [0, 0, 50, 50]]
    job = stack.wait(stack.submit("which one is the face?", [ASTRONAUT], tasks="visual7w,guesswhat",
                                  boxes=json.dumps(boxes)))
    assert job["status"] == "finished", job
    for name in ("visual7w", "guesswhat"):
        answer = job["result"]["tasks"][name]
        assert [c["box"] for c in answer["candidates"]] == boxes
        scores = [c["score"] for c in answer["candidates"]]
        assert abs(sum(scores) - 1) < 1e-4 and answer["best"] == int(np.argmax(scores))


def bomb_png() -> bytes:
    """A 1-bit PNG of 20000 x 20000 pixels that compresses to a few kB."""
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("fields, files, status, code", [
    ({"text": "hi"}, [], 400, "missing_image"),
    ({}, [("image", CAT)], 400, "missing_text"),
    ({"text": "   "}, [("image", CAT)], 400, "empty_text"),
    ({"text": "x" * 301}, [("image", CAT)], 400, "text_too_long"),
    ({"text": "hi"}, [("image", b"GIF89a but not really")], 400, "invalid_image"),
    ({"text": "hi"}, [("image", CAT[: len(CAT) // 2])], 400, "invalid_image"),
    ({"text": "hi"}, [("image", b"%PDF-1.4 not an image at all")], 400, "invalid_image"),
    ({"text": "hi"}, [("image", bomb_png())], 413, "image_too_large"),
    ({"text": "hi"}, [("image", os.urandom(2_100_000))], 413, "payload_too_large"),
    ({"text": "hi", "tasks": "vqa,mindreading"}, [("image", CAT)], 400, "unknown_task"),
    ({"text": "hi", "tasks": "nlvr2"}, [("image", CAT)], 400, "image_count"),
    ({"text": "hi", "tasks": "visual7w"}, [("image", CAT)], 400, "missing_boxes"),
    ({"text": "hi", "tasks": "guesswhat", "boxes": "[[0, 0, 10]]"}, [("image", CAT)], 400, "invalid_boxes"),
    ({"text": "hi", "tasks": "visual7w", "boxes": "[[0, 0, 9999, 10]]"}, [("image", CAT)], 400, "invalid_boxes"),
    ({"text": "hi", "top_k": "many"}, [("image", CAT)], 400, "invalid_top_k"),
    ({"text": "hi", "top_k": "0"}, [("image", CAT)], 400, "invalid_top_k"),
    ({"text": "hi"}, [("image", CAT)] * 9, 400, "too_many_images"),
], ids=["no-image", "no-text", "empty-text", "long-text", "not-image", "truncated-jpeg", "pdf", "bomb", "oversize",
        "unknown-task", "nlvr2-one-image", "visual7w-no-boxes", "malformed-boxes", "box-outside", "top-k-text",
        "top-k-zero", "too-many-images"])
def test_bad_input_gets_4xx_json(stack, fields, files, status, code):
    got, body, headers = stack.post(fields=fields, files=files)
    assert (got, body["error"]["code"]) == (status, code), body
    assert body["error"]["message"] and headers["Content-Type"] == "application/json"


def test_client_filenames_are_never_paths(stack):
    status, body, _ = stack.post(fields={"text": "hi", "tasks": "vqa"}, files=[("image", CAT, "../../../../etc/passwd")])
    assert status == 202 and stack.wait(body["id"])["status"] == "finished"


def test_unknown_ids_are_404(stack):
    for job_id in (uuid.uuid4().hex, "not-a-job", "..%2F..%2Fetc"):
        status, body = stack.get(f"/api/v1/jobs/{job_id}")
        assert status == 404 and body["error"]["code"] in ("unknown_job", "not_found")
    status, body = stack.get("/api/v2/nothing")
    assert status == 404 and body["error"]["code"] == "not_found"


def test_image_the_worker_cannot_decode_fails_the_job_with_a_code(stack):
    """The web tier checks uploads, but the worker must not trust Redis contents: bytes queued past the web tier
    (another client of the queue, a corrupted upload) fail the job with the decoder's code."""
    connection = stack.connection()
    request = JobRequest(text="hi", tasks=["vqa"], images=parse_submission({"text": "hi"}, [CAT], stack.settings,
                                                                           TaskRegistry.from_file()).images)
    job = submit(connection, stack.settings, request, [b"\x89PNG\r\n\x1a\n garbage"])
    body = stack.wait(job.id)
    assert body["status"] == "failed" and body["error"]["code"] == "invalid_image" and body["error"]["stage"] == "decode"
    assert not connection.exists(upload_key(job.id))  # the upload is dropped with the job


# -------------------------------------------------------------------------------------------- faults and lifecycle


def test_redis_down_then_back(stack):
    stop(stack.redis)
    status, body = stack.get("/readyz")
    assert status == 503 and body["status"] == "not_ready"
    status, body, headers = stack.post(fields={"text": "hi"}, files=[("image", CAT)])
    assert status == 503 and body["error"]["code"] == "redis_unavailable" and headers.get("Retry-After")
    status, body = stack.get(f"/api/v1/jobs/{uuid.uuid4().hex}")
    assert status == 503 and body["error"]["code"] == "redis_unavailable"
    assert stack.get("/healthz")[0] == 200
    stack.start_redis()  # same port, empty: the worker must reconnect and announce itself again
    assert stack.wait_ready(30), stack.tail("worker")
    job = stack.wait(stack.submit("back again?", [CAT], tasks="vqa"))
    assert job["status"] == "finished", job


def test_worker_lifecycle_graceful_stop_queueing_and_sigkill(stack):
    # 1. SIGTERM on an idle worker: it exits cleanly and withdraws itself from readiness at once.
    stack.worker.send_signal(signal.SIGTERM)
    assert stack.worker.wait(30) == 0
    status, body = stack.get("/readyz")
    assert status == 503 and body["workers"] == []

    # 2. With no worker, a job waits in the queue and says where it stands.
    first = stack.submit("who is first?", [CAT], tasks="vqa")
    second = stack.submit("who is second?", [CAT], tasks="vqa")
    assert stack.get(f"/api/v1/jobs/{first}")[1]["queue_position"] == 0
    queued = stack.get(f"/api/v1/jobs/{second}")[1]
    assert (queued["status"], queued["queue_position"]) == ("queued", 1)
    connection = stack.connection()
    request = JobRequest.from_json({"text": "x", "tasks": ["retrieval_coco"],
                                    "images": [{"width": 1, "height": 1, "bytes": 1}] * 8})
    with pytest.raises(Unavailable) as caught:  # back-pressure: the queue holds two, the bound is two
        submit(connection, replace(stack.settings, max_queued_jobs=2), request, [CAT] * 8)
    assert caught.value.code == "queue_full"
    # A job whose timeout is shorter than its work (8 images at twice the full detector size take seconds).
    # Eight distinct uploads (other sizes than the photos above): no feature-cache hit, no shared detector run.
    slow_images = [photo(name, size) for name in ("astronaut", "chelsea", "coffee", "rocket") for size in (180, 200)]
    too_slow = submit(connection, replace(stack.settings, job_timeout=1), request, slow_images).id

    # 3. A slower worker picks them up, the three in one batch: the short-timeout job fails alone, its partners
    #    finish. SIGTERM mid-job finishes that job first.
    # ~4x the pixels of 800x1333 (seconds per job), and no feature cache: every job below runs the detector.
    slow = {"DETECTOR_MIN_SIZE": "1600", "DETECTOR_MAX_SIZE": "2666", "FEATURE_CACHE_TTL": "0"}
    stack.start_worker(**slow)
    assert stack.wait(first, 90)["status"] == "finished"
    assert stack.wait(second, 30)["status"] == "finished"
    timed_out = stack.wait(too_slow, 60)
    assert (timed_out["status"], timed_out["error"]["code"]) == ("failed", "timeout"), timed_out
    job_id = stack.submit("a long one", [ASTRONAUT, CAT, COFFEE, ROCKET] * 2, tasks="retrieval_coco")
    started = stack.wait(job_id, 30, until=("started", "finished", "failed"))
    assert started["status"] == "started" and started["stage"] in ("starting", "decode", "detector", "vilbert", "done")
    stack.worker.send_signal(signal.SIGTERM)
    assert stack.wait(job_id, 60)["status"] == "finished"
    assert stack.worker.wait(30) == 0

    # 4. SIGKILL mid-job: the job ends failed with a reason within about the heartbeat TTL; nothing hangs.
    stack.start_worker(**slow)
    assert stack.wait_ready(60)
    job_id = stack.submit("this one dies", [ASTRONAUT, CAT, COFFEE, ROCKET] * 2, tasks="retrieval_coco")
    started = stack.wait(job_id, 30, until=("started", "finished", "failed"))
    assert started["status"] == "started", started
    stack.worker.send_signal(signal.SIGKILL)
    stack.worker.wait(10)
    killed_at = time.monotonic()
    failed = stack.wait(job_id, HEARTBEAT_TTL + 15)
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_lost", failed
    assert "stopped" in failed["error"]["message"]
    assert time.monotonic() - killed_at < HEARTBEAT_TTL + 10
    assert stack.get("/readyz")[0] == 503

    # 5. Same again, but nobody polls: the next worker's heartbeat thread finds the orphan and fails it.
    stack.start_worker(**slow)
    assert stack.wait_ready(60)
    job_id = stack.submit("this one dies unwatched", [ASTRONAUT, CAT, COFFEE, ROCKET] * 2, tasks="retrieval_coco")
    assert wait_until(lambda: Job.fetch(job_id, connection=connection, serializer=JSONSerializer).get_status()
                      == JobStatus.STARTED, 30, interval=0.02)
    stack.worker.send_signal(signal.SIGKILL)
    stack.worker.wait(10)
    stack.start_worker()  # a fresh worker serves again
    assert wait_until(lambda: Job.fetch(job_id, connection=connection, serializer=JSONSerializer).get_status()
                      == JobStatus.FAILED, 60, interval=0.2), stack.tail("worker")
    assert stack.get(f"/api/v1/jobs/{job_id}")[1]["error"]["code"] == "worker_lost"
    assert stack.wait_ready(60)
    assert stack.wait(stack.submit("alive?", [CAT], tasks="vqa"))["status"] == "finished"


# ------------------------------------------------------------------------------------- serve.py + demo.py


def test_serve_runs_the_stack_and_demo_prints_answers(stack, tmp_path):
    """The one-command local run as a new user meets it: no weights in MODEL_DIR (tiny demo bundle instead), no
    REDIS_URL (embedded server); demo.py against it prints answers; SIGINT stops everything cleanly."""
    import re

    from service.localstack import port_in_use

    port = free_port()
    env = {k: v for k, v in stack.env.items() if k not in ("REDIS_URL", "QUEUE_NAME")}
    env.update(MODEL_DIR=str(tmp_path / "no-weights-here"), WEB_CONCURRENCY="1")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--port", str(port), "--tiny-dir",
                                  str(stack.bundle)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: "Ready: " in log.read_text(), 90, interval=0.2), log.read_text()
        text = log.read_text()
        assert "NO MODEL WEIGHTS" in text and "python models/fetch.py" in text and "MEANINGLESS" in text
        redis_port = int(re.search(r"embedded (?:redis|valkey)-server on 127\.0\.0\.1:(\d+)", text).group(1))
        assert "memory only (no RDB, no AOF" in text
        drawn = tmp_path / "boxes.png"
        demo = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--url", f"http://127.0.0.1:{port}",
                               "--draw", str(drawn)], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert demo.returncode == 0, demo.stderr
        for expected in ("TINY RANDOM-WEIGHT", "vqa", "gqa", "snli_ve", "refcoco", "retrieval_coco", "untrained-vqa-answer"):
            assert expected in demo.stdout
        assert Image.open(drawn).size == (512, 512)  # demo.py's sample, samples/astronaut.jpg, with boxes drawn
        refused = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--url", f"http://127.0.0.1:{port}", "--tasks",
                                  "teleport"], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert refused.returncode == 1 and "unknown_task" in refused.stderr
    finally:
        serve.send_signal(signal.SIGINT)
        code = serve.wait(90)
    text = log.read_text()
    assert code == 0, text
    for part in ("web", "worker", "redis"):
        assert f"{part} stopped (exit code 0)" in text, text
    assert not port_in_use(port) and not port_in_use(redis_port)
