"""Strict JSON everywhere: a model output that is not finite fails its job with its own code (no result with a bare
NaN is ever stored), and every API response is serialised with allow_nan=False."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image
from rq import Queue
from rq.job import JobStatus
from rq.results import Result
from rq.serializers import JSONSerializer

from service.contract import NON_FINITE_OUTPUT, VILBERT
from service.errors import PipelineError
from service.queue import connect
from service.settings import load_settings
from service.web import create_app
from service.worker.pipeline import InferenceRequest, Pipeline, strict_json



def png(width: int = 96, height: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Path:
    return tiny_bundle


def test_strict_json_tells_finite_from_non_finite():
    assert strict_json({"a": [1.0, 2, "x", None]})
    assert not strict_json({"a": [1.0, float("nan")]}) and not strict_json([float("-inf")])


def test_a_model_that_outputs_nan_fails_the_job_with_its_own_code(bundle):
    pipeline = Pipeline.from_dir(bundle, device="cpu", min_size=64, max_size=96)
    request = InferenceRequest(images=[png()], text="what is this?", tasks=["vqa"])
    healthy = pipeline.run(request)
    assert strict_json(healthy) and healthy["tasks"]["vqa"]
    with torch.no_grad():  # a fault no input can cause with healthy weights: a poisoned classifier layer
        for name, parameter in pipeline.predictor.model.named_parameters():
            if "vil_prediction" in name:
                parameter.fill_(float("nan"))
    outcomes = pipeline.run_many([request, InferenceRequest(images=[png(64, 64)], text="hi", tasks=["vqa"])])
    for outcome in outcomes:
        assert isinstance(outcome, PipelineError)
        assert (outcome.code, outcome.stage) == (NON_FINITE_OUTPUT, VILBERT)
        assert outcome.message == ("the model produced a non-finite value (NaN or infinity) for this input; no answer "
                                   "is given")


def test_responses_are_strict_json_and_a_stored_nan_is_a_logged_500(redis_url, caplog):
    settings = load_settings({"REDIS_URL": redis_url, "QUEUE_NAME": f"strict-{uuid.uuid4().hex[:8]}"})
    app = create_app(settings)
    with pytest.raises(ValueError):
        app.json.dumps({"score": float("nan")})
    assert json.loads(app.json.dumps({"score": 1.5})) == {"score": 1.5}
    # A result with NaN written by something other than our worker (an old version, a hand-made job).
    queue = Queue(settings.queue_name, connection=connect(settings), serializer=JSONSerializer)
    job = queue.enqueue("service.worker.rq_batch.batched_only", kwargs={"request": {}}, job_id=uuid.uuid4().hex)
    job.set_status(JobStatus.FINISHED)
    Result.create(job, Result.Type.SUCCESSFUL, ttl=60, return_value={"score": float("nan")})
    response = app.test_client().get(f"/api/v1/jobs/{job.id}")
    assert response.status_code == 500
    body = response.get_data(as_text=True)
    assert "NaN" not in body and json.loads(body)["error"]["code"] == "internal_error"
