"""service/contract.py on its own: the job payload's JSON round trip (including payloads an older or newer web
tier wrote), the error object (and service/errors.py, the exceptions that become it), the Redis key layout and the latency buckets the docs promise. Fast and without
Redis, so that the mutation check (bench/mutation.py) runs it per mutant; the seam between the two processes
(import picture, RQ version, the one way a job runs) is tests/test_service_contract.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from service.contract import (COLLECTION_NAMES_KEY, COLLECTION_PREFIX, FEATURE_CACHE_PREFIX, LATENCY_BUCKETS,
                              ImageInfo, JobRequest, alive_key, error_body, timing_key, upload_key, upload_ledger_keys)
from service.errors import BadRequest, NotFound, PipelineError, ServiceError, Unavailable
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_job_request_survives_the_json_round_trip():
    for request in (
        JobRequest(text="what is this?", tasks=["vqa", "refcoco"], top_k=5, boxes=[[1.0, 2.0, 3.0, 4.0]],
                   images=[ImageInfo(width=640, height=480, bytes=1234, decoded_bytes=921600)]),
        JobRequest(text="two", tasks=["nlvr2"], images=[ImageInfo(2, 3, 4), ImageInfo(5, 6, 7)], inputs="features"),
    ):
        wire = json.loads(json.dumps(request.to_json()))  # what RQ's JSONSerializer stores
        assert JobRequest.from_json(wire) == request
    assert JobRequest.from_json({"text": "t", "tasks": ["vqa"]}).inputs == "images"
    with pytest.raises(ValueError, match="inputs"):
        JobRequest.from_json({"text": "t", "tasks": ["vqa"], "inputs": "pixels"})


def test_a_payload_from_an_older_web_tier_reads_with_the_dataclass_defaults():
    # During a rolling deploy a new worker may read a job that an older web tier wrote, without the newer fields.
    assert JobRequest.from_json({"text": "t", "tasks": ("vqa",)}) == JobRequest(text="t", tasks=["vqa"])
    loose = JobRequest.from_json({"text": "t", "tasks": ["vqa"], "top_k": "5", "rerank_top": 7.0, "ground": 0,
                                  "first_stage_above": 10, "kind": "collection_search", "collection": "c"})
    assert (loose.top_k, loose.rerank_top, loose.ground, loose.first_stage_above) == (5, 7, False, 10)
    assert (loose.kind, loose.collection) == ("collection_search", "c")
    assert type(loose.top_k) is int and type(loose.rerank_top) is int and loose.ground is False


@pytest.mark.parametrize("field, value", [("inputs", "pixels"), ("kind", "training")])
def test_a_payload_with_an_unknown_input_or_job_kind_is_refused_by_name(field, value):
    allowed = {"inputs": "('images', 'features')",
               "kind": "('inference', 'collection_add', 'collection_search')"}[field]
    with pytest.raises(ValueError) as refused:
        JobRequest.from_json({"text": "t", "tasks": ["vqa"], field: value})
    assert str(refused.value) == f"{field} must be one of {allowed}, got {value!r}"


def test_the_error_object_has_a_stage_only_when_one_is_given():
    assert error_body("timeout", "too long") == {"code": "timeout", "message": "too long"}
    assert error_body("invalid_image", "bad", "decode") == {"code": "invalid_image", "message": "bad",
                                                            "stage": "decode"}
    assert error_body("x", "y", "") == {"code": "x", "message": "y", "stage": ""}


def test_key_names_keep_their_redis_layout():
    # Running workers and web processes of different versions share one Redis during a deploy.
    assert upload_key("ab") == "vilbert:upload:ab" and alive_key("w.1") == "vilbert:worker-alive:w.1"
    assert upload_ledger_keys("q") == ("vilbert:upload-ledger:q:expiry", "vilbert:upload-ledger:q:bytes")
    assert FEATURE_CACHE_PREFIX == "vilbert:feat:" and COLLECTION_PREFIX == "vilbert:coll:"
    assert COLLECTION_NAMES_KEY == "vilbert:coll:_names"
    assert timing_key("detector") == "detector_s"


def test_the_latency_buckets_are_the_documented_ones():
    # Operators write latency objectives against these bounds (docs/OPERATIONS.md, "Reading the metrics").
    doc = (ROOT / "docs" / "OPERATIONS.md").read_text()
    listed = re.search(r"same bucket bounds, in seconds: ([0-9., \n]+)", doc).group(1)
    assert tuple(float(v) for v in re.findall(r"[0-9]+(?:\.[0-9]+)?", listed)) == LATENCY_BUCKETS
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))
    assert LATENCY_BUCKETS[-1] == Settings.job_timeout  # a job that ran to its timeout still lands in a bucket


@pytest.mark.parametrize("error_class, status", [(ServiceError, 400), (BadRequest, 400), (NotFound, 404),
                                                 (Unavailable, 503)])
def test_a_service_error_answers_with_its_class_status_and_the_error_object(error_class, status):
    error = error_class("some_code", "what went wrong")
    assert (error.code, error.message, error.status, str(error)) == ("some_code", "what went wrong", status,
                                                                     "what went wrong")
    assert error.to_dict() == {"code": "some_code", "message": "what went wrong"}
    assert error_class("c", "m", status=409).status == 409 and error_class.status == status  # the instance only


def test_a_client_error_found_while_running_a_job_fails_it_at_its_stage():
    error = PipelineError.at("decode", BadRequest("invalid_image", "not an image"), prefix="image 2: ")
    assert (error.status, error.code, error.message, error.stage) == (422, "invalid_image", "image 2: not an image",
                                                                      "decode")
    assert str(error) == "image 2: not an image"
    assert error.to_dict() == {"code": "invalid_image", "message": "image 2: not an image", "stage": "decode"}
    assert PipelineError.at("load", NotFound("gone", "no such thing")).to_dict() == {
        "code": "gone", "message": "no such thing", "stage": "load"}


def test_job_request_kind_and_collection_round_trip():
    for kind, collection in (("inference", None), ("collection_add", "a"), ("collection_search", "b")):
        request = JobRequest(text="t", tasks=["retrieval_coco"], kind=kind, collection=collection)
        back = JobRequest.from_json(request.to_json())
        assert back == request and (back.kind, back.collection) == (kind, collection)
    old = JobRequest(text="t", tasks=["vqa"]).to_json()
    del old["kind"], old["collection"]  # a job queued before kinds existed
    assert JobRequest.from_json(old).kind == "inference"
    with pytest.raises(ValueError, match="kind must be one of"):
        JobRequest(text="t", tasks=[], kind="drop_tables")
    with pytest.raises(ValueError, match="kind must be one of"):
        JobRequest.from_json({**old, "kind": "nope"})
