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
- every other positive submission (of a job, or of images to a collection) carries a real 8x6 PNG as its first
  image part, so the other checks run too (text, tasks, top_k, boxes, image count) and some are queued (202);
- every other positive GET of a job asks for a job this run queued, so the Job schema is checked on real jobs.

The checks: not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance,
response_headers_conformance, unsupported_method (405 with Allow for the methods the description leaves out) and
negative_data_rejection, the last through negative_form_data_rejection below: it does not count a negative form
that arrives as a valid one (a text field generated as an array goes out as text), which schemathesis 4.32.5 gets
wrong for forms with a file part."""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections import Counter, defaultdict
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")

import jsonschema_rs  # noqa: E402  (schemathesis's validator)
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402
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

# 10-20 s on two cores; the timeout only stops a hung run (each request also has REQUEST_TIMEOUT). No
# Hypothesis deadline: the time of one example on a loaded machine is not what this test is about.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# The suite's run is fixed; the variables explore further (docs/TESTING.md), e.g. SCHEMATHESIS_SEED=7 or
# SCHEMATHESIS_MAX_EXAMPLES=500.
SEED = int(os.environ.get("SCHEMATHESIS_SEED", "20261204"))
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "100"))  # per operation, fuzzing phase
REQUEST_TIMEOUT = 20  # seconds per request; the service answers each in milliseconds
INTEGER_TEXT = re.compile(r"\s*[+-]?[0-9]+\s*", re.ASCII)
SUBMIT = ("POST /", "POST /api/v1/jobs")
GET_JOB = "GET /api/v1/jobs/{job_id}"
ADD_IMAGES = "POST /api/v1/collections/{name}/images"
COLLECTION_OPERATIONS = (ADD_IMAGES, "POST /api/v1/collections/{name}/search", "GET /api/v1/collections/{name}",
                         "DELETE /api/v1/collections/{name}", "DELETE /api/v1/collections/{name}/images/{image_id}",
                         "GET /api/v1/collections/{name}/images/{image_id}/thumbnail")

# What the run sent and got back, per operation, for test_the_run_reached_past_input_checking.
SEEN: dict[str, Counter] = defaultdict(Counter)
QUEUED: list[str] = []  # ids of the jobs the run submitted


def tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = tiny_png()

# Hypothesis keeps caches (constants found in the source, Unicode tables) in ./.hypothesis unless told otherwise;
# they go to the temporary directory instead, so the run writes nothing into the checkout. Set on import, before
# schemathesis builds its first Hypothesis test; no other test module uses Hypothesis.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "vilbert-serve-hypothesis")


@pytest.fixture(scope="module")
def live_schema(stack):
    config = schemathesis.Config.from_dict({
        "seed": SEED,
        "base-url": stack.url,
        "request-timeout": REQUEST_TIMEOUT,
        "cache": {"enabled": False},  # schemathesis's own cache would be ./.schemathesis
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
    if label in (*SUBMIT, ADD_IMAGES) and isinstance(case.body, dict):
        images = [field for field in ("image", "fileupload") if isinstance(case.body.get(field), list)
                  and case.body[field] and "features" not in case.body]
        if images and seen["positive image submissions"] % 2 == 0:
            case.body[images[0]] = [PNG, *case.body[images[0]][1:]]
            seen["real image sent"] += 1
        if images:
            seen["positive image submissions"] += 1
    if label == GET_JOB and QUEUED:
        if seen["positive job lookups"] % 2 == 0:
            job_id = QUEUED[seen["queued job asked"] % len(QUEUED)]
            case.path_parameters = {**(case.path_parameters or {}), "job_id": job_id}
            seen["queued job asked"] += 1
        seen["positive job lookups"] += 1


def sent_form(response) -> dict[str, list[str | None]] | None:
    """The multipart form as it went over the wire: field -> its parts' texts, None for a file part."""
    request = response.request
    content_type = request.headers.get("Content-Type", "")
    if not content_type.startswith("multipart/form-data") or not isinstance(request.body, bytes):
        return None
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + request.body)
    fields: dict[str, list[str | None]] = {}
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        text = payload.decode(errors="replace") if part.get_filename() is None else None
        fields.setdefault(part.get_param("name", header="content-disposition"), []).append(text)
    return fields


def form_is_valid_as_sent(case, response) -> bool:
    """Whether the form the server received satisfies the operation's schema, reading it as a form server does:
    every text part is text, and an integer field's text may be an ASCII integer; a binary field takes file
    parts only; a field the schema calls an array is all of its parts, any other field one of them.

    schemathesis 4.32.5 asks the same question (specs/openapi/checks.py, _form_body_is_valid_as_sent) but puts
    the generated bytes of file parts into the instance it validates, which jsonschema_rs refuses ("Unsupported
    type: 'bytes'"), so for a form with a file it always answers no. A text field mutated to an array or number
    (text_input=[] goes out as the text "[]") was then reported as invalid data the service accepted."""
    fields = sent_form(response)
    if fields is None:
        return False
    body = case.operation.schema.raw_schema["paths"][case.operation.path][case.operation.method.lower()]["requestBody"]
    schema = body["content"]["multipart/form-data"]["schema"]
    properties = schema.get("properties", {})
    sent: dict[str, object] = {}
    for name, texts in fields.items():
        field = properties.get(name, {})
        binary = field.get("format", field.get("items", {}).get("format")) == "binary"
        readings = [[read_part(text, binary)[0] for text in texts]] if field.get("type") == "array" else []
        readings += [reading for text in texts for reading in read_part(text, binary)]
        valid = jsonschema_rs.validator_for(field).is_valid
        sent[name] = next((reading for reading in readings if valid(reading)), readings[0])
    return jsonschema_rs.validator_for(schema).is_valid(sent)


def read_part(text: str | None, binary: bool) -> list:
    """The values a server may read from one part (text None: a file part)."""
    if binary:  # only a file part is a file; a text part in a file field is no value of its schema
        return ["" if text is None else None]
    if text is None:
        return [None]
    return [text, int(text)] if INTEGER_TEXT.fullmatch(text) else [text]


def negative_form_data_rejection(ctx, response, case):
    """negative_data_rejection, except where the negative form could not be told from a valid one on the wire."""
    if (case.meta is not None and case.meta.generation.mode == GenerationMode.NEGATIVE
            and 200 <= response.status_code < 300 and form_is_valid_as_sent(case, response)):
        return None
    return negative_data_rejection(ctx, response, case)


CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, negative_form_data_rejection,
          content_type_conformance, response_headers_conformance, unsupported_method]


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
    if label in (*SUBMIT, ADD_IMAGES) and response.status_code == 202:
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
    assert SEEN[ADD_IMAGES][202] > 0 and SEEN[ADD_IMAGES]["real image sent"] > 0, SEEN[ADD_IMAGES]
    for label in COLLECTION_OPERATIONS:
        assert SEEN[label][400] > 0, (label, SEEN[label])
    for label in ("GET /", "GET /api/v1/tasks", "GET /healthz", "GET /readyz", "GET /metrics",
                  "GET /api/v1/openapi.json"):
        assert SEEN[label][200] > 0, (label, SEEN[label])
