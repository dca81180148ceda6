"""Fast tests of the service's plain functions: settings, request parsing, the OpenAPI description, serve.py's
weights decision. No HTTP, no Redis, no models."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from service.errors import BadRequest
from service.boxes import check_boxes
from service.contract import JobRequest
from service.web.inputs import parse_boxes, parse_submission, parse_tasks, parse_top_k
from service.settings import DEFAULT_TASKS, Settings, SettingsError, load_settings
from vilbert.tasks import TaskRegistry

REGISTRY = TaskRegistry.from_file()


def png(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 127, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------- settings


def test_settings_defaults_and_overrides():
    assert load_settings({}) == Settings()
    settings = load_settings({"REDIS_URL": "redis://h:1/2", "DEVICE": "cuda:1", "JOB_TIMEOUT": "60", "PRECISION": "BF16",
                              "MODEL_DIR": "/m", "LOG_LEVEL": "debug", "MAX_IMAGES": ""})
    assert (settings.redis_url, settings.device, settings.job_timeout, settings.precision) == ("redis://h:1/2", "cuda:1", 60, "bf16")
    assert str(settings.model_dir) == "/m" and settings.log_level == "DEBUG" and settings.max_images == Settings().max_images


def test_settings_report_every_bad_variable():
    with pytest.raises(SettingsError) as caught:
        load_settings({"REDIS_URL": "localhost:6379", "DEVICE": "gpu", "JOB_TIMEOUT": "soon", "MAX_IMAGES": "0",
                       "PRECISION": "int8", "QUEUE_NAME": "a b", "REDIS_TIMEOUT": "-1"})
    problems = "\n".join(caught.value.problems)
    for name in ("REDIS_URL", "DEVICE", "JOB_TIMEOUT", "MAX_IMAGES", "PRECISION", "QUEUE_NAME", "REDIS_TIMEOUT"):
        assert name in problems
    assert len(caught.value.problems) == 7
    assert "JOB_TIMEOUT='soon': must be an integer" in problems


def test_settings_cross_checks():
    with pytest.raises(SettingsError, match="DETECTOR_MAX_SIZE"):
        load_settings({"DETECTOR_MIN_SIZE": "800", "DETECTOR_MAX_SIZE": "600"})


# -------------------------------------------------------------------------------------------------- parsing


def form(**fields):
    return {"text": "what is this?", **fields}


def test_parse_submission_defaults():
    request = parse_submission(form(), [png()], Settings(), REGISTRY)
    assert request.tasks == list(DEFAULT_TASKS) and request.top_k == 3 and request.boxes is None
    assert (request.images[0].width, request.images[0].height) == (64, 48)
    assert JobRequest.from_json(request.to_json()) == request


def test_classic_field_names_are_accepted():
    request = parse_submission({"text_input": " swimming elephant "}, [png()], Settings(), REGISTRY)
    assert request.text == "swimming elephant"


def test_default_tasks_follow_the_image_count():
    assert parse_tasks(None, REGISTRY, 2) == ["nlvr2", "retrieval_coco"]
    assert parse_tasks("", REGISTRY, 3) == ["retrieval_coco"]
    assert parse_tasks(" vqa, gqa,vqa ", REGISTRY, 1) == ["vqa", "gqa"]


@pytest.mark.parametrize("fields, images, code", [
    ({}, [], "missing_image"),
    ({"text": None}, [png()], "missing_text"),
    ({"text": "   "}, [png()], "empty_text"),
    ({"text": "x" * 1001}, [png()], "text_too_long"),
    ({"tasks": "vqa,teleport"}, [png()], "unknown_task"),
    ({"tasks": " , "}, [png()], "no_tasks"),
    ({"tasks": "nlvr2"}, [png()], "image_count"),
    ({"tasks": "visual7w"}, [png()], "missing_boxes"),
    ({"tasks": "guesswhat", "boxes": "[[0,0,10,10]]"}, [png(), png()], None),
    ({"tasks": "visual7w", "boxes": "[[1,2,3]]"}, [png()], "invalid_boxes"),
    ({"tasks": "visual7w", "boxes": "[[0,0,10,10]"}, [png()], "invalid_boxes"),
    ({"tasks": "visual7w", "boxes": "[[0,0,100,10]]"}, [png()], "invalid_boxes"),
    ({"tasks": "visual7w", "boxes": "[[5,5,2,10]]"}, [png()], "invalid_boxes"),
    ({"tasks": "visual7w", "boxes": "[[0,0,true,10]]"}, [png()], "invalid_boxes"),
    ({"tasks": "visual7w", "boxes": "[" + ",".join(["[0,0,5,5]"] * 100) + "]"}, [png()], "too_many_boxes"),
    ({"top_k": "abc"}, [png()], "invalid_top_k"),
    ({"top_k": "0"}, [png()], "invalid_top_k"),
    ({"top_k": "21"}, [png()], "invalid_top_k"),
    ({}, [png()] * 9, "too_many_images"),
    ({}, [b"definitely not an image"], "invalid_image"),
    ({}, [b""], "empty_image"),
    ({}, [png()[:60]], "invalid_image"),
])
def test_bad_submissions_get_codes(fields, images, code):
    data = form(**fields)
    data = {k: v for k, v in data.items() if v is not None}
    if code is None:
        assert parse_submission(data, images, Settings(), REGISTRY).boxes == [[0, 0, 10, 10]]
        return
    with pytest.raises(BadRequest) as caught:
        parse_submission(data, images, Settings(), REGISTRY)
    assert caught.value.code == code and caught.value.status == 400 and caught.value.message


def test_pixel_limit_is_413():
    with pytest.raises(BadRequest) as caught:
        parse_submission(form(), [png(200, 200)], Settings(max_image_pixels=10_000), REGISTRY)
    assert (caught.value.code, caught.value.status) == ("image_too_large", 413)


def test_box_checks():
    check_boxes([[0, 0, 64, 48]], 64, 48)
    with pytest.raises(BadRequest):
        check_boxes([[0, 0, float("nan"), 4]], 64, 48)
    assert parse_boxes(None) is None and parse_boxes("[[1, 2, 3.5, 4]]") == [[1.0, 2.0, 3.5, 4.0]]
    with pytest.raises(BadRequest):
        parse_boxes("[]")
    assert parse_top_k(None, 20) == 3 and parse_top_k("20", 20) == 20


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


# ------------------------------------------------------------------------------------------------ serve.py


def test_serve_refuses_without_weights_when_asked(tmp_path, capsys):
    import serve

    model_dir, tiny = serve.choose_model_dir(tmp_path / "empty", allow_tiny=False)
    assert model_dir is None and not tiny
    err = capsys.readouterr().err
    assert "NO MODEL WEIGHTS" in err and "python models/fetch.py" in err


def test_service_doc_lists_every_setting():
    from pathlib import Path

    from service.settings import ENV_VARIABLES

    doc = (Path(__file__).resolve().parent.parent / "docs" / "SERVICE.md").read_text()
    for variable in ENV_VARIABLES.values():
        assert f"`{variable}`" in doc, variable


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
