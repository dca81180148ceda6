"""The web tier's side of the queue: store a job's uploads and queue it; tell a client how its job stands."""

from __future__ import annotations

import re
import uuid
from typing import Any

from redis import Redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.results import Result
from rq.serializers import JSONSerializer

from ..contract import (CANCELED, INTERNAL_ERROR, JOB_FUNCTION, STAGE_QUEUED, STAGE_STARTING, TIMEOUT, WORKER_LOST,
                        JobRequest, error_body, upload_key)
from ..errors import NotFound, Unavailable
from ..queue import admit_uploads, as_utc, fail_if_orphaned, get_queue, release_uploads
from ..settings import Settings

JOB_ID = re.compile(r"[0-9a-f]{32}")
# RQ status -> the four states clients see (every status RQ has; tests/test_jobs.py holds the two together).
PUBLIC_STATUS = {
    JobStatus.QUEUED: "queued", JobStatus.DEFERRED: "queued", JobStatus.SCHEDULED: "queued",
    JobStatus.CREATED: "queued", JobStatus.READY_TO_ENQUEUE: "queued", JobStatus.RATE_LIMITED: "queued",
    JobStatus.STARTED: "started", JobStatus.FINISHED: "finished",
    JobStatus.FAILED: "failed", JobStatus.STOPPED: "failed", JobStatus.CANCELED: "failed",
}


def submit(connection: Redis, settings: Settings, request: JobRequest, uploads: list[bytes],
           job_id: str | None = None) -> Job:
    """Store the uploads, then queue the job (in that order, so a worker never sees a job without its uploads).
    `job_id`: the id to queue it under (a new one when None)."""
    queue = get_queue(connection, settings)
    if queue.count >= settings.max_queued_jobs:
        raise Unavailable("queue_full", f"{queue.count} jobs are waiting, the limit is {settings.max_queued_jobs}; "
                                        "retry later")
    job_id = job_id or uuid.uuid4().hex
    size = sum(len(data) for data in uploads)
    admitted, held = admit_uploads(connection, settings, job_id, size)
    if not admitted:
        raise Unavailable("queue_full", f"waiting jobs hold {held} bytes of uploads; this job's {size} bytes would "
                                        f"pass the limit of {settings.max_queued_bytes}; retry later")
    try:
        if uploads:  # a collection search has none
            with connection.pipeline() as pipe:
                pipe.hset(upload_key(job_id), mapping={str(i): data for i, data in enumerate(uploads)})
                pipe.expire(upload_key(job_id), settings.upload_ttl)
                pipe.execute()
        return _enqueue(queue, settings, job_id, request, len(uploads))
    except BaseException:
        release_uploads(connection, settings, job_id)
        raise


def _enqueue(queue: Queue, settings: Settings, job_id: str, request: JobRequest, count: int) -> Job:
    description = f"{','.join(request.tasks)} on {count} image(s)"
    if request.kind != "inference":
        description = f"{request.kind} {request.collection}: {count} image(s)"
    # The job's timeout is the queue's default (JOB_TIMEOUT, service.queue.get_queue).
    return queue.enqueue(
        JOB_FUNCTION, kwargs={"request": request.to_json()}, job_id=job_id, result_ttl=settings.result_ttl,
        failure_ttl=settings.failure_ttl, ttl=settings.upload_ttl,
        meta={"stage": STAGE_QUEUED, "tasks": request.tasks}, description=description,
    )


def fetch_job(connection: Redis, job_id: str) -> Job:
    if not JOB_ID.fullmatch(job_id):  # not match: "$" also matches before a trailing newline
        raise NotFound("unknown_job", f"no job {job_id!r} (unknown or expired)")
    try:
        return Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    except NoSuchJobError:
        raise NotFound("unknown_job", f"no job {job_id!r} (unknown or expired)") from None


def job_status(connection: Redis, settings: Settings, job_id: str) -> dict:
    """The client's view of a job: status, queue position or stage, result or error."""
    job = fetch_job(connection, job_id)
    status = job.get_status(refresh=False)
    if status == JobStatus.STARTED and fail_if_orphaned(connection, settings, job):
        job, status = fetch_job(connection, job_id), JobStatus.FAILED  # now with its worker_lost error
    public = PUBLIC_STATUS[status]
    body: dict[str, Any] = {"id": job.id, "status": public, "tasks": job.meta.get("tasks", [])}
    for name in ("created_at", "enqueued_at", "started_at", "ended_at"):
        value = getattr(job, name)
        if value is not None:
            body[name] = as_utc(value).isoformat().replace("+00:00", "Z")
    if public == "queued":
        position = job.get_position()
        body["queue_position"] = position
    if public == "started":
        stage = job.meta.get("stage")
        # Between RQ marking the job started and the batch's first stage update, meta still says "queued".
        body["stage"] = STAGE_STARTING if stage in (None, STAGE_QUEUED) else stage
        if job.meta.get("stage_detail"):
            body["stage_detail"] = job.meta["stage_detail"]
    if public == "finished":
        body["result"] = job.return_value()
    if public == "failed":
        body["error"] = failure_reason(job)
    return body


def failure_reason(job: Job) -> dict:
    """The worker's error object; for a job that ended without one, the reason read from RQ's record of it."""
    error = job.meta.get("error")
    if error:
        return error
    latest = job.latest_result()
    info = (latest.exc_string or "") if latest is not None and latest.type == Result.Type.FAILED else ""
    if "JobTimeoutException" in info:
        return error_body(TIMEOUT, f"the job ran longer than its timeout of {job.timeout} s")
    if "AbandonedJobError" in info:
        return error_body(WORKER_LOST, "the worker running this job stopped before finishing it")
    if job.get_status(refresh=False) in (JobStatus.STOPPED, JobStatus.CANCELED):
        return error_body(CANCELED, "the job was stopped or canceled")
    last = info.strip().splitlines()[-1] if info.strip() else "unknown error"
    return error_body(INTERNAL_ERROR, last)
