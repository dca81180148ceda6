"""Schemathesis against the live stack: every operation of the OpenAPI description served at
/api/v1/openapi.json, called over HTTP on the real processes (tests/stack.py: a private Redis, a worker on the tiny
bundle, gunicorn), each response checked against the description.

Deterministic and bounded: a fixed seed, Hypothesis derandomized, MAX_EXAMPLES generated cases per operation in the
fuzzing phase plus schemathesis's coverage phase (boundary values, one case per way of breaking the schema, and
the methods the description does not list), positive and negative data, no example database, a timeout per request.
docs/TESTING.md has the run time and how to run this file alone.

Random bytes are never an image, so left alone the run would only ever reach the "not an image" answer of the
submit operations and the 404 of GET /api/v1/jobs/{job_id}. Two substitutions take it further, without changing
what the schema says the case is (a binary part stays a binary part, a string id a string id):
- every other positive submission carries a real 8x6 PNG as its first image part, so the other checks run too
  (text, tasks, top_k, boxes, image count) and some are queued (202);
- every other positive GET of a job asks for a job this run queued, so the Job schema is checked on real jobs."""

from __future__ import annotations

import io
from collections import Counter, defaultdict

import pytest

schemathesis = pytest.importorskip("schemathesis")

from PIL import Image  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

pytestmark = pytest.mark.slow

SEED = 20261204
MAX_EXAMPLES = 40  # generated cases per operation in the fuzzing phase (the coverage phase adds its own)
REQUEST_TIMEOUT = 20  # seconds per request; the service answers each in milliseconds
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, negative_data_rejection,
          content_type_conformance, response_headers_conformance, unsupported_method]
SUBMIT = ("POST /", "POST /api/v1/jobs")
GET_JOB = "GET /api/v1/jobs/{job_id}"

# What the run sent and got back, per operation, for test_the_run_reached_past_input_checking.
SEEN: dict[str, Counter] = defaultdict(Counter)
QUEUED: list[str] = []  # ids of the jobs the run submitted


def tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = tiny_png()


@pytest.fixture(scope="module")
def live_schema(stack):
    config = schemathesis.Config.from_dict({
        "seed": SEED,
        "base-url": stack.url,
        "request-timeout": REQUEST_TIMEOUT,
        "cache": {"enabled": False},  # nothing written into the checkout (.schemathesis/, .hypothesis/)
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
        "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True}},
    })
    # Fetched from the live server, then loaded from the dict: from_url leaves out the operation that served the
    # document (GET /api/v1/openapi.json), and every operation is to be tested.
    status, spec = stack.get("/api/v1/openapi.json")
    assert status == 200, spec
    return schemathesis.openapi.from_dict(spec, config=config)


schema = schemathesis.pytest.from_fixture("live_schema")


def positive(case) -> bool:
    return case.meta is not None and case.meta.generation.mode == GenerationMode.POSITIVE


def substitute(case, label: str, seen: Counter) -> None:
    """The two substitutions of the module docstring, on every other positive case of the operation."""
    if not positive(case):
        return
    if label in SUBMIT and isinstance(case.body, dict):
        images = [field for field in ("image", "fileupload") if isinstance(case.body.get(field), list)
                  and case.body[field] and "features" not in case.body]
        if images and seen["positive image submissions"] % 2 == 0:
            case.body[images[0]] = [PNG, *case.body[images[0]][1:]]
            seen["real image sent"] += 1
        if images:
            seen["positive image submissions"] += 1
    if label == GET_JOB and QUEUED:
        if seen["positive job lookups"] % 2 == 0:
            case.path_parameters = {**(case.path_parameters or {}), "job_id": QUEUED[seen["queued job asked"] % len(QUEUED)]}
            seen["queued job asked"] += 1
        seen["positive job lookups"] += 1


@schema.parametrize()
def test_every_operation_conforms(case):
    label = f"{case.operation.method.upper()} {case.operation.path}"
    seen = SEEN[label]
    substitute(case, label, seen)
    if label in SUBMIT and isinstance(case.body, dict):
        for field in ("image", "fileupload", "features"):
            if isinstance(case.body.get(field), list) and case.body[field]:
                seen[f"{field} parts sent"] += 1
    response = case.call_and_validate(checks=CHECKS)
    if case.method.upper() != case.operation.method.upper():  # the coverage phase's undeclared methods
        SEEN[f"{case.method.upper()} (undeclared)"][response.status_code] += 1
        return
    seen[response.status_code] += 1
    if label in SUBMIT and response.status_code == 202:
        QUEUED.append(response.json()["id"])
    if label == GET_JOB and response.status_code == 200:
        seen[f"job {response.json()['status']}"] += 1


def test_the_run_reached_past_input_checking():
    """The run above exercised what it claims to: multipart file parts, queued jobs, real job lookups."""
    if not SEEN:
        pytest.skip("runs after test_every_operation_conforms, in the same session")
    for label in SUBMIT:
        seen = SEEN[label]
        assert seen[202] > 0 and seen[400] > 0, (label, seen)
        assert seen["real image sent"] > 0 and seen["features parts sent"] > 0, (label, seen)
    assert SEEN[GET_JOB][200] > 0 and SEEN[GET_JOB][404] > 0, SEEN[GET_JOB]
    for label in ("GET /", "GET /api/v1/tasks", "GET /healthz", "GET /readyz", "GET /metrics", "GET /api/v1/openapi.json"):
        assert SEEN[label][200] > 0, (label, SEEN[label])
