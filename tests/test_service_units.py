"""Fast tests of the service's plain functions: the OpenAPI description, health checks, serve.py's
weights decision. No HTTP, no Redis, no models."""

from __future__ import annotations

import io
import re

import pytest

from service.settings import Settings
from test_inputs import png


# -------------------------------------------------------------------------------------------------- OpenAPI


def test_openapi_describes_exactly_the_routes():
    from service.web import create_app

    app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"))  # no connection is made at creation
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routes.add((path, method.lower()))
    spec = app.test_client().get("/api/v1/openapi.json").get_json()
    described = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert described == routes


def test_health_needs_no_redis_and_readiness_says_why():
    from service.web import create_app

    client = create_app(Settings(redis_url="redis://127.0.0.1:1/0", redis_timeout=0.5)).test_client()
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["status"] == "not_ready"
    down = client.post("/api/v1/jobs", data={"text": "hi", "image": (io.BytesIO(png()), "a.png")})
    assert down.status_code == 503 and down.get_json()["error"]["code"] == "redis_unavailable"
    lookup = client.get("/api/v1/jobs/0123456789abcdef0123456789abcdef")
    assert lookup.status_code == 503 and lookup.get_json()["error"]["code"] == "redis_unavailable"
    # The OpenAPI description promises Retry-After on both operations' 503.
    assert down.headers["Retry-After"] == lookup.headers["Retry-After"] == "5"


# ------------------------------------------------------------------------------------------------ serve.py


def test_serve_refuses_without_weights_when_asked(tmp_path, capsys):
    import serve

    model_dir, tiny = serve.choose_model_dir(tmp_path / "empty", allow_tiny=False)
    assert model_dir is None and not tiny
    err = capsys.readouterr().err
    assert "NO MODEL WEIGHTS" in err and "python models/fetch.py" in err


def test_serve_no_tiny_and_worker_without_weights_exit_with_instructions(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, MODEL_DIR=str(tmp_path / "empty"), REDIS_URL="redis://127.0.0.1:1/0")
    serve = subprocess.run([sys.executable, str(root / "serve.py"), "--no-tiny"], env=env, capture_output=True,
                           text=True, timeout=60, cwd=root)
    assert serve.returncode == 2 and "python models/fetch.py" in serve.stderr and "Refusing" in serve.stderr
    worker = subprocess.run([sys.executable, str(root / "worker.py")], env=env, capture_output=True, text=True,
                            timeout=120, cwd=root)
    assert worker.returncode == 2 and "models/fetch.py" in worker.stderr and "multi_task_model.bin" in worker.stderr
    bad = subprocess.run([sys.executable, str(root / "worker.py")], env=dict(env, DEVICE="gpu"), capture_output=True,
                         text=True, timeout=60, cwd=root)
    assert bad.returncode == 2 and "DEVICE='gpu'" in bad.stderr


# ------------------------------------------------------------------------------------------ hostile requests


def test_a_job_id_with_a_trailing_newline_is_unknown_not_a_server_error():
    from service.errors import NotFound
    from service.web.jobs import fetch_job

    with pytest.raises(NotFound) as caught:
        fetch_job(None, "0123456789abcdef0123456789abcdef\n")  # refused before Redis is asked
    assert (caught.value.code, caught.value.status) == ("unknown_job", 404)
    client = create_app_down()
    answer = client.get("/api/v1/jobs/0123456789abcdef0123456789abcdef%0A")
    assert answer.status_code == 404 and answer.get_json()["error"]["code"] == "unknown_job"


def test_made_up_http_methods_add_no_metric_series():
    client = create_app_down()
    for method in ("BREW", "PROPFIND", "X-ANYTHING-1", "X-ANYTHING-2"):
        assert client.open("/healthz", method=method).status_code == 405
    assert client.open("/healthz", method="DELETE").status_code == 405
    text = client.get("/metrics").get_data(as_text=True)
    counted = re.findall(r'vilbert_http_requests_total\{[^}]*method="([^"]+)"', text)
    assert set(counted) == {"other", "DELETE"} and "BREW" not in text and "X-ANYTHING" not in text
    assert re.search(r'vilbert_http_requests_total\{[^}]*method="other"[^}]*status="405"[^}]*\} 4\.0', text)


def test_a_method_not_allowed_answer_says_which_methods_are_allowed():
    client = create_app_down()
    answer = client.open("/healthz", method="TRACE")
    assert answer.status_code == 405 and answer.content_type == "application/json"
    assert answer.get_json() == {"error": {"code": "method_not_allowed",
                                           "message": "The method is not allowed for the requested URL."}}
    assert set(answer.headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS"}
    answer = client.put("/api/v1/jobs")
    assert answer.status_code == 405 and set(answer.headers["Allow"].split(", ")) == {"POST", "OPTIONS"}


def test_metrics_content_type_is_prometheus_text_with_one_charset():
    answer = create_app_down().get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "text/plain; version=1.0.0; charset=utf-8"


@pytest.mark.parametrize("field", ["image", "fileupload", "features"])
def test_a_text_value_where_a_file_belongs_is_refused_not_ignored(field):
    client = create_app_down()  # refused before Redis is asked
    answer = client.post("/api/v1/jobs", data={"text": "hi", "image": (io.BytesIO(png()), "a.png"), field: "{}"})
    assert answer.status_code == 400
    assert answer.get_json() == {"error": {"code": "not_a_file", "message": f"the form field '{field}' must be a file "
                                           f"upload (curl --form {field}=@path), not a text value"}}


def create_app_down():
    """The app with a Redis that is not there: routes that need none still answer."""
    from service.web import create_app

    return create_app(Settings(redis_url="redis://127.0.0.1:1/0", redis_timeout=0.5)).test_client()
