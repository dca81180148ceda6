"""The API's routes and the app's error handling (service/web/routes.py, service/web/app.py) through Flask's test
client against a real private Redis, with no worker: submitting by either form, every read-only route, readiness,
and the JSON answer of each kind of error (the service's own, an over-limit body, Redis gone, Werkzeug's, a bug).
Fast, so that the mutation check (bench/mutation.py) runs it per mutant; the same routes over real HTTP through
gunicorn are tests/test_service_e2e.py and tests/test_schemathesis.py."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from rq.serializers import JSONSerializer
from rq.job import Job

from detector.records import encode_record
from detector.regions import RegionFeatures
from service.contract import LATENCY_BUCKETS, JobRequest, alive_key, upload_key
from service.localstack import free_port
from service.settings import Settings
from service.web import create_app
from service.web.app import DRAIN_CHUNK, SECURITY_HEADERS, drain_request_body
from service.web.openapi import openapi_spec
from service.web.inputs import parse_tasks
from service.web.metrics import multiprocess_dir
from vilbert.tasks import TaskRegistry

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def settings(redis_url) -> Settings:
    connection = Redis.from_url(redis_url)
    for key in connection.scan_iter(match="vilbert:worker-alive:*"):
        connection.delete(key)
    return Settings(redis_url=redis_url, queue_name=f"api-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def client(settings):
    return create_app(settings).test_client()


@pytest.fixture
def connection(settings) -> Redis:
    return Redis.from_url(settings.redis_url)


def png(width: int = 24, height: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buffer, "PNG")
    return buffer.getvalue()


def features_file(dim: int = 8) -> bytes:
    regions = RegionFeatures(boxes=np.array([[0, 0, 4, 4], [1, 1, 8, 6]], np.float32),
                             features=np.ones((2, dim), np.float32), scores=np.ones(2, np.float32),
                             class_ids=np.ones(2, np.int64), num_boxes=2, image_width=24, image_height=16)
    return encode_record("img", regions)


def error_of(response, status: int) -> dict:
    assert response.status_code == status and response.is_json, (response.status_code, response.data[:300])
    body = response.get_json()
    assert set(body) == {"error"}
    return body["error"]


def queued_job(connection: Redis, job_id: str) -> Job:
    return Job.fetch(job_id, connection=connection, serializer=JSONSerializer)


# ---------------------------------------------------------------------------------------------- submitting


def test_the_seeds_form_queues_a_job_and_answers_where_to_poll(client, connection, settings):
    response = client.post("/", data={"text_input": "what is this?", "fileupload": (io.BytesIO(png()), "x.jpg")})
    assert response.status_code == 202
    body = response.get_json()
    location = f"/api/v1/jobs/{body['id']}"
    tasks = parse_tasks(None, TaskRegistry.from_file(), 1)
    assert body == {"id": body["id"], "status": "queued", "url": location, "tasks": tasks}
    assert response.headers["Location"] == location
    job = queued_job(connection, body["id"])
    request = JobRequest.from_json(job.kwargs["request"])
    assert (request.text, request.tasks, request.inputs) == ("what is this?", tasks, "images")
    assert connection.hgetall(upload_key(body["id"])) == {b"0": png()}
    assert job.origin == settings.queue_name


def test_the_api_form_takes_images_under_both_names_in_order(client, connection):
    response = client.post("/api/v1/jobs", data={
        "text": "is the left one red?", "tasks": "nlvr2",
        "image": (io.BytesIO(png(30, 20)), "a.png"), "fileupload": (io.BytesIO(png(40, 20)), "b.png")})
    assert response.status_code == 202 and response.get_json()["tasks"] == ["nlvr2"]
    assert connection.hgetall(upload_key(response.get_json()["id"])) == {b"0": png(30, 20), b"1": png(40, 20)}


def test_an_empty_part_counts_as_an_image_only_when_it_names_a_file(client):
    # An empty file the user chose is refused for what it is; a form's unused file input sends no name and no bytes.
    chosen = client.post("/api/v1/jobs", data={"text": "x", "image": (io.BytesIO(b""), "empty.jpg")})
    assert error_of(chosen, 400)["code"] == "empty_image"
    unused = client.post("/api/v1/jobs", data={"text": "x", "image": (io.BytesIO(b""), ""),
                                               "fileupload": (io.BytesIO(png()), "x.png")})
    assert unused.status_code == 202


@pytest.mark.parametrize("field", ["image", "fileupload", "features"])
def test_a_text_value_where_a_file_belongs_is_refused_by_name(client, field):
    response = client.post("/api/v1/jobs", data={"text": "x", field: "photo.jpg"})
    assert error_of(response, 400) == {
        "code": "not_a_file",
        "message": f"the form field '{field}' must be a file upload (curl --form {field}=@path), not a text value"}


def test_precomputed_features_are_checked_against_the_workers_width(client, connection):
    connection.set(alive_key("w-api"), json.dumps({"name": "w-api", "feature_dim": 16}))
    wrong = client.post("/api/v1/jobs", data={"text": "x", "tasks": "vqa", "features": (io.BytesIO(features_file(8)),
                                                                                         "f.bin")})
    assert error_of(wrong, 400)["code"] == "feature_size"
    right = client.post("/api/v1/jobs", data={"text": "x", "tasks": "vqa",
                                              "features": (io.BytesIO(features_file(16)), "f.bin")})
    assert right.status_code == 202
    request = JobRequest.from_json(queued_job(connection, right.get_json()["id"]).kwargs["request"])
    assert request.inputs == "features" and request.tasks == ["vqa"]
    mixed = client.post("/api/v1/jobs", data={"text": "x", "features": (io.BytesIO(features_file(16)), "f.bin"),
                                              "image": (io.BytesIO(png()), "x.png")})
    assert error_of(mixed, 400)["code"] == "mixed_inputs"


# ----------------------------------------------------------------------------------------------- reading


def test_the_index_lists_the_api_for_clients_and_the_page_for_browsers(client):
    index = client.get("/", headers={"Accept": "application/json"})
    assert index.get_json() == {"service": "12-in-1 ViLBERT", "submit": "/api/v1/jobs", "tasks": "/api/v1/tasks",
                                "openapi": "/api/v1/openapi.json", "health": "/healthz", "ready": "/readyz"}
    page = client.get("/", headers={"Accept": "text/html"})
    assert page.mimetype == "text/html" and "Accept" in page.headers["Vary"]


def test_a_job_is_read_back_and_an_unknown_one_is_404(client):
    job_id = client.post("/api/v1/jobs", data={"text": "x", "image": (io.BytesIO(png()), "x.png")}).get_json()["id"]
    body = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert (body["id"], body["status"], body["queue_position"]) == (job_id, "queued", 0)
    assert error_of(client.get(f"/api/v1/jobs/{'0' * 32}"), 404)["code"] == "unknown_job"


def test_the_tasks_and_the_openapi_description_are_served(client, settings):
    registry = TaskRegistry.from_file()
    tasks = client.get("/api/v1/tasks").get_json()
    assert tasks == {"tasks": [task.describe() for task in registry],
                     "default": {str(n): parse_tasks(None, registry, n) for n in (1, 2, 3)}}
    assert client.get("/api/v1/openapi.json").get_json() == json.loads(json.dumps(openapi_spec(settings)))
    assert client.get("/healthz").get_json() == {"status": "ok"}


def test_ready_only_with_a_live_worker_and_never_without_redis(client, connection, settings):
    waiting = client.get("/readyz")
    assert waiting.status_code == 503 and waiting.get_json() == {
        "status": "not_ready", "redis": "ok", "workers": [],
        "reason": "no worker with models loaded and a fresh heartbeat"}
    connection.set(alive_key("w-ready"), json.dumps({"name": "w-ready", "device": "cpu"}))
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json() == {"status": "ready", "redis": "ok",
                                                             "workers": [{"name": "w-ready", "device": "cpu"}]}
    gone = create_app(replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")).test_client()
    down = gone.get("/readyz")
    assert down.status_code == 503 and down.get_json() == {"status": "not_ready", "redis": "unreachable: ConnectionError",
                                                           "workers": []}


# ------------------------------------------------------------------------------------------------- errors


def test_a_full_queue_is_a_503_with_retry_after(settings):
    client = create_app(replace(settings, max_queued_jobs=1)).test_client()
    first = client.post("/api/v1/jobs", data={"text": "x", "image": (io.BytesIO(png()), "x.png")})
    assert first.status_code == 202 and "Retry-After" not in first.headers
    full = client.post("/api/v1/jobs", data={"text": "x", "image": (io.BytesIO(png()), "x.png")})
    assert error_of(full, 503)["code"] == "queue_full" and full.headers["Retry-After"] == "5"
    refused = client.post("/api/v1/jobs", data={"text": ""})
    assert error_of(refused, 400)["code"] in ("missing_image", "empty_text") and "Retry-After" not in refused.headers


def test_redis_gone_is_a_503_redis_unavailable_and_logged(settings, caplog):
    client = create_app(replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")).test_client()
    with caplog.at_level(logging.WARNING, logger="service.web.app"):
        response = client.post("/api/v1/jobs", data={"text": "x", "image": (io.BytesIO(png()), "x.png")})
    assert error_of(response, 503) == {"code": "redis_unavailable",
                                       "message": "the job store (Redis) is unavailable; retry shortly"}
    assert response.headers["Retry-After"] == "5"
    assert any(m.startswith("redis unavailable: Error ") for m in caplog.messages)


def test_werkzeugs_errors_are_json_with_their_own_headers(client):
    missing = client.get("/no/such/route")
    assert error_of(missing, 404) == {
        "code": "not_found",
        "message": "The requested URL was not found on the server. If you entered the URL manually please check "
                   "your spelling and try again."}
    wrong = client.delete("/api/v1/jobs")
    assert error_of(wrong, 405)["code"] == "method_not_allowed"
    assert set(wrong.headers["Allow"].split(", ")) == {"POST", "OPTIONS"}
    assert wrong.mimetype == "application/json"


def test_a_bug_is_a_500_with_no_details_and_a_logged_traceback(settings, caplog):
    app = create_app(settings)

    @app.get("/boom")
    def boom():
        raise ZeroDivisionError("a bug")

    with caplog.at_level(logging.ERROR, logger="service.web.app"):
        response = app.test_client().get("/boom")
    assert error_of(response, 500) == {"code": "internal_error", "message": "internal error; see the server log"}
    assert "a bug" not in response.get_data(as_text=True)
    assert [r.getMessage() for r in caplog.records] == ["unhandled error"] and caplog.records[0].exc_info


def test_responses_are_strict_json_and_keep_their_key_order(settings, caplog):
    app = create_app(settings)
    with app.app_context():
        with pytest.raises(ValueError):
            app.json.dumps({"score": float("nan")})
        assert app.json.dumps({"b": 1, "a": 2}) == '{"b": 1, "a": 2}'

    @app.get("/nan")
    def nan():
        return {"score": float("inf")}

    with caplog.at_level(logging.ERROR):
        response = app.test_client().get("/nan")
    # The same answer as a bug inside a view, although Flask meets this one outside it (making the response).
    assert error_of(response, 500) == {"code": "internal_error", "message": "internal error; see the server log"}
    assert [r.getMessage() for r in caplog.records] == ["Exception on /nan [GET]"] and caplog.records[0].exc_info


def test_every_answer_carries_the_security_headers(client):
    for response in (client.get("/healthz"), client.get("/no/such/route"), client.get("/readyz")):
        assert {name: response.headers[name] for name in SECURITY_HEADERS} == SECURITY_HEADERS


# ------------------------------------------------------------------------------------ an over-limit body


class Stream(io.BytesIO):
    """A request body whose reads are counted; `fail` makes the client go away (OSError) at the first read."""

    def __init__(self, data: bytes, fail: bool = False):
        super().__init__(data)
        self.reads, self.fail = 0, fail

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        if self.fail:
            raise OSError("connection reset by peer")
        assert size == DRAIN_CHUNK
        return super().read(size)


@pytest.mark.parametrize("length, limit, drained", [
    (3 * DRAIN_CHUNK + 5, 10 * DRAIN_CHUNK, True),
    (1, 10 * DRAIN_CHUNK, True),
    (10 * DRAIN_CHUNK, 10 * DRAIN_CHUNK, True),  # exactly at the limit
    (10 * DRAIN_CHUNK + 1, 10 * DRAIN_CHUNK, False),  # over it: the connection is closed on it instead
    (0, 10 * DRAIN_CHUNK, False),
])
def test_a_refused_body_is_read_and_dropped_only_up_to_the_drain_limit(length, limit, drained):
    stream = Stream(b"x" * length)
    drain_request_body({"wsgi.input": stream, "CONTENT_LENGTH": str(length)}, limit)
    assert (stream.tell() == length and stream.reads >= 1) if drained else stream.reads == 0


@pytest.mark.parametrize("environ", [{"CONTENT_LENGTH": "12"}, {"wsgi.input": "set below", "CONTENT_LENGTH": "ab"},
                                     {"wsgi.input": "set below", "CONTENT_LENGTH": ""}, {"wsgi.input": "set below"}])
def test_a_body_of_unknown_length_is_never_drained(environ):
    stream = Stream(b"x" * 12)
    drain_request_body({k: stream if v == "set below" else v for k, v in environ.items()}, 1 << 20)
    assert stream.reads == 0


def test_a_client_that_goes_away_while_its_body_is_drained_is_no_error():
    stream = Stream(b"x" * 100, fail=True)
    drain_request_body({"wsgi.input": stream, "CONTENT_LENGTH": "100"}, 1000)
    assert stream.reads == 1


# ------------------------------------------------------------------------------------------------ /metrics


def scrape(client) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value of every sample GET /metrics gives."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.get_data(as_text=True)) for s in family.samples}


def test_metrics_count_requests_errors_and_read_the_queue(client, connection, settings):
    client.post("/api/v1/jobs", data={"text": "x", "image": (io.BytesIO(png()), "x.png")})
    client.post("/api/v1/jobs", data={"text": "x"})
    client.get("/no/such/route")
    client.open("/healthz", method="BREW")
    connection.set(alive_key("w-metrics"), json.dumps({"name": "w-metrics"}))
    samples = scrape(client)
    jobs = "/api/v1/jobs"
    assert samples[("vilbert_http_requests_total", (("method", "POST"), ("route", jobs), ("status", "202")))] == 1
    assert samples[("vilbert_http_requests_total", (("method", "POST"), ("route", jobs), ("status", "400")))] == 1
    assert samples[("vilbert_http_errors_total", (("code", "missing_image"), ("route", jobs)))] == 1
    assert samples[("vilbert_http_errors_total", (("code", "not_found"), ("route", "unmatched")))] == 1
    assert samples[("vilbert_http_requests_total", (("method", "other"), ("route", "unmatched"), ("status", "405")))] == 1
    assert samples[("vilbert_http_request_duration_seconds_count", (("route", jobs),))] == 2
    assert ("vilbert_http_errors_total", (("code", "queue_full"), ("route", jobs))) not in samples
    for name, value in (("vilbert_redis_up", 1), ("vilbert_queue_depth", 1), ("vilbert_jobs_started", 0),
                        ("vilbert_workers_ready", 1)):
        assert samples[(name, ())] == value, name


def test_an_error_answer_of_another_shape_is_counted_as_unknown(settings):
    app = create_app(settings)

    @app.get("/teapot")
    def teapot():
        return {"not": "an error object"}, 418

    client = app.test_client()
    client.get("/teapot")
    assert scrape(client)[("vilbert_http_errors_total", (("code", "unknown"), ("route", "/teapot")))] == 1


def test_metrics_say_when_redis_is_down_and_still_answer(settings):
    client = create_app(replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")).test_client()
    samples = scrape(client)
    assert samples[("vilbert_redis_up", ())] == 0 and ("vilbert_queue_depth", ()) not in samples


def test_every_series_has_its_help_text_and_the_shared_latency_buckets(client):
    client.get("/healthz")
    text = client.get("/metrics").get_data(as_text=True)
    helps = {family.name: family.documentation for family in text_string_to_metric_families(text)
             if not family.name.endswith("_created")}  # the client library's creation-time series
    assert helps == {
        "vilbert_http_requests": "HTTP requests by route, method and status",
        "vilbert_http_request_duration_seconds": "HTTP request handling time by route",
        "vilbert_http_errors": "error responses by route and error code (queue_full = back-pressure)",
        "vilbert_redis_up": "1 when the job store (Redis) answered this scrape",
        "vilbert_queue_depth": "jobs waiting in the queue",
        "vilbert_jobs_started": "jobs being run by workers now",
        "vilbert_workers_ready": "workers with models loaded and a fresh heartbeat",
    }
    bounds = {float(s.labels["le"]) for family in text_string_to_metric_families(text) for s in family.samples
              if s.name == "vilbert_http_request_duration_seconds_bucket"}
    assert bounds == {*LATENCY_BUCKETS, float("inf")}


MULTIPROCESS_PROBE = """
import json, sys
from prometheus_client.parser import text_string_to_metric_families
from service.settings import Settings
from service.web import create_app
settings = Settings(redis_url=sys.argv[1], queue_name="mp")
first, second = create_app(settings).test_client(), create_app(settings).test_client()  # two gunicorn workers
first.get("/healthz"), second.get("/healthz"), second.get("/healthz")
text = first.get("/metrics").get_data(as_text=True)
print(json.dumps([s.value for f in text_string_to_metric_families(text) for s in f.samples
                  if s.name == "vilbert_http_requests_total" and s.labels["route"] == "/healthz"]))
"""


@pytest.mark.parametrize("variable", ["PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"])
def test_with_a_multiprocess_directory_every_process_counts_into_one_scrape(settings, tmp_path, variable,
                                                                           monkeypatch):
    for name in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"):
        monkeypatch.delenv(name, raising=False)
    assert multiprocess_dir() is None  # here neither is set: this process keeps its own registry
    assert scrape(create_app(settings).test_client())[("vilbert_redis_up", ())] == 1
    # prometheus_client picks its storage when imported, so this runs in a fresh interpreter, as gunicorn's are.
    env = {k: v for k, v in os.environ.items() if k.lower() != "prometheus_multiproc_dir"}
    env[variable] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", MULTIPROCESS_PROBE, settings.redis_url], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [3.0]  # both apps' requests, summed from the files
    assert list(tmp_path.glob("counter_*.db"))
