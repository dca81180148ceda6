"""The seam between the web tier and the worker: the import picture of the two sides, the RQ version the batch
worker's internals target, the one way a job runs and the contract's code for expired uploads. The contract module
on its own: tests/test_contract.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import rq

from service.contract import ImageInfo, JobRequest, upload_key

ROOT = Path(__file__).resolve().parent.parent


def imported_after(statement: str, env: dict | None = None) -> set[str]:
    """The modules a fresh interpreter has loaded after running `statement`."""
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, env=env)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_contract_imports_neither_side():
    loaded = imported_after("import service.contract")
    assert not {m for m in loaded if m.startswith(("service.web", "service.worker"))}
    assert not loaded & {"torch", "flask", "rq", "redis"}


def test_web_tier_imports_no_torch_and_nothing_of_the_worker():
    loaded = imported_after("import app")
    assert "torch" not in loaded
    assert not {m for m in loaded if m.startswith("service.worker")}


def test_worker_side_imports_nothing_of_the_web_tier():
    loaded = imported_after("import service.worker.main, service.worker.rq_batch, service.worker.heartbeat")
    assert not {m for m in loaded if m.startswith("service.web")}


def test_rq_internals_target_the_installed_rq():
    """service/worker/rq_batch.py overrides RQ's execute_job/prepare_job_execution and uses its private helpers:
    an RQ upgrade must fail here first, and be checked against that module, not surface as odd job states."""
    from service.worker.rq_batch import RQ_VERSION

    assert rq.__version__ == RQ_VERSION


def test_a_job_cannot_run_outside_the_batch_worker():
    from service.contract import JOB_FUNCTION
    from service.worker import rq_batch

    module, _, name = JOB_FUNCTION.rpartition(".")
    assert module == rq_batch.__name__ and getattr(rq_batch, name) is rq_batch.batched_only
    with pytest.raises(RuntimeError, match="batch worker"):
        rq_batch.batched_only({"text": "t", "tasks": ["vqa"]})


def test_a_job_whose_uploads_expired_fails_at_load_with_the_contract_code(redis_url):
    """The worker reads a job's uploads from their own hash; once that has expired the job fails at the contract's
    `load` stage with `upload_expired`, before any pipeline stage, and says what to do."""
    from redis import Redis
    from rq import Queue

    from service.contract import ERROR_AT_LOAD, UPLOAD_EXPIRED, error_body
    from service.errors import PipelineError
    from service.worker.rq_batch import load_request

    connection = Redis.from_url(redis_url)
    request = JobRequest("what is this?", ["vqa"], images=[ImageInfo(4, 4, 10), ImageInfo(4, 4, 10)])
    job = Queue("contract-test", connection=connection).enqueue("service.worker.rq_batch.batched_only",
                                                                 request=request.to_json())
    connection.hset(upload_key(job.id), "0", b"only one of the two uploads is left")
    with pytest.raises(PipelineError) as failure:
        load_request(connection, job)
    assert failure.value.to_dict() == error_body(
        UPLOAD_EXPIRED, "the uploaded images are gone (expired before the job started); submit again", ERROR_AT_LOAD)
    assert failure.value.to_dict()["stage"] == "load"


def test_worker_metrics_stay_in_process_when_the_multiprocess_dir_leaks(tmp_path):
    """serve.py starts the worker from an environment where gunicorn's PROMETHEUS_MULTIPROC_DIR may be set."""
    import os

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    code = ("from service.worker.main import keep_metrics_in_process\nkeep_metrics_in_process()\n"
            "from service.worker.metrics import WorkerMetrics\nm = WorkerMetrics()\nm.batch(3)\n"
            "m.job_done({'timings': {'run_s': 0.5}}, None)")
    imported_after(code, env=env)
    assert list(tmp_path.iterdir()) == []  # in multiprocess mode every value is a .db file there
    # Without the call, the same code would write there: the test can tell the two apart.
    imported_after(code.replace("keep_metrics_in_process()\n", ""), env=env)
    assert list(tmp_path.glob("*.db"))
