"""The job layer on RQ: submit, status, the function the worker runs, worker liveness and orphan reaping.

Everything in Redis is JSON (rq's JSONSerializer) or raw image bytes: nothing is ever unpickled.

Keys besides RQ's own:
  vilbert:upload:<job id>         hash of image index -> encoded bytes, expires after UPLOAD_TTL (web and worker may
                                  run on different hosts, so uploads cannot live on a local disk)
  vilbert:worker-alive:<name>     JSON about a worker with its models loaded; expires after WORKER_HEARTBEAT_TTL
                                  unless refreshed. /readyz counts these; a started job whose worker has none is
                                  failed as "worker_lost".
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from redis import Redis
from rq import Queue, get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.job_lifecycle import record_job_failure
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException
from rq.utils import parse_composite_key

from .errors import NotFound, PipelineError, Unavailable
from .inputs import JobRequest
from .settings import Settings

log = logging.getLogger(__name__)

UPLOAD_KEY = "vilbert:upload:{0}"
ALIVE_PREFIX = "vilbert:worker-alive:"
JOB_FUNCTION = "service.jobs.run_job"
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
# RQ status -> the four states clients see.
PUBLIC_STATUS = {
    JobStatus.QUEUED: "queued", JobStatus.DEFERRED: "queued", JobStatus.SCHEDULED: "queued",
    JobStatus.CREATED: "queued", JobStatus.STARTED: "started", JobStatus.FINISHED: "finished",
    JobStatus.FAILED: "failed", JobStatus.STOPPED: "failed", JobStatus.CANCELED: "failed",
}


def connect(settings: Settings) -> Redis:
    """A client with short timeouts: a Redis outage must turn into a quick 503, not a hung request."""
    return Redis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout,
                          socket_connect_timeout=settings.redis_timeout, health_check_interval=10)


def get_queue(connection: Redis, settings: Settings) -> Queue:
    return Queue(settings.queue_name, connection=connection, serializer=JSONSerializer,
                 default_timeout=settings.job_timeout)


def upload_key(job_id: str) -> str:
    return UPLOAD_KEY.format(job_id)


def alive_key(worker_name: str) -> str:
    return ALIVE_PREFIX + worker_name


# ---------------------------------------------------------------------------------------------------- web side


def submit(connection: Redis, settings: Settings, request: JobRequest, images: list[bytes]) -> Job:
    """Store the uploads, then queue the job (in that order, so a worker never sees a job without its images)."""
    queue = get_queue(connection, settings)
    if queue.count >= settings.max_queued_jobs:
        raise Unavailable("queue_full", f"{queue.count} jobs are waiting, the limit is {settings.max_queued_jobs}; "
                                        "retry later")
    job_id = uuid.uuid4().hex
    with connection.pipeline() as pipe:
        pipe.hset(upload_key(job_id), mapping={str(i): data for i, data in enumerate(images)})
        pipe.expire(upload_key(job_id), settings.upload_ttl)
        pipe.execute()
    return queue.enqueue(
        JOB_FUNCTION, kwargs={"request": request.to_json()}, job_id=job_id, job_timeout=settings.job_timeout,
        result_ttl=settings.result_ttl, failure_ttl=settings.failure_ttl, ttl=settings.upload_ttl,
        meta={"stage": "queued", "tasks": request.tasks}, description=f"{','.join(request.tasks)} on "
        f"{len(images)} image(s)",
    )


def fetch_job(connection: Redis, job_id: str) -> Job:
    if not JOB_ID.match(job_id):
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
        job = fetch_job(connection, job_id)
        status = job.get_status(refresh=False)
    public = PUBLIC_STATUS.get(status, "failed")
    body: dict[str, Any] = {"id": job.id, "status": public, "tasks": job.meta.get("tasks", [])}
    for name in ("created_at", "enqueued_at", "started_at", "ended_at"):
        value = getattr(job, name, None)
        if value is not None:
            body[name] = _iso(value)
    if public == "queued":
        position = job.get_position()
        body["queue_position"] = position
    if public == "started":
        stage = job.meta.get("stage")
        # Between RQ marking the job started and run_job's first stage update, meta still says "queued".
        body["stage"] = "starting" if stage in (None, "queued") else stage
        if job.meta.get("stage_detail"):
            body["stage_detail"] = job.meta["stage_detail"]
    if public == "finished":
        body["result"] = job.return_value()
    if public == "failed":
        body["error"] = failure_reason(job)
    return body


def failure_reason(job: Job) -> dict:
    error = job.meta.get("error")
    if error:
        return error
    info = job.exc_info or ""
    if "JobTimeoutException" in info:
        return {"code": "timeout", "message": f"the job ran longer than its timeout of {job.timeout} s"}
    if "AbandonedJobError" in info:
        return {"code": "worker_lost", "message": "the worker running this job stopped before finishing it"}
    if job.get_status(refresh=False) in (JobStatus.STOPPED, JobStatus.CANCELED):
        return {"code": "canceled", "message": "the job was stopped or canceled"}
    last = info.strip().splitlines()[-1] if info.strip() else "unknown error"
    return {"code": "internal_error", "message": last}


def _iso(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat().replace("+00:00", "Z")


# ------------------------------------------------------------------------------------------------- worker side

_pipeline = None  # set once by worker.py, before it takes jobs


def set_pipeline(pipeline: Any) -> None:
    global _pipeline
    _pipeline = pipeline


def run_job(request: dict) -> dict:
    """Executed by the worker (same process that loaded the models). Raises after recording an error code in the
    job's meta, so RQ marks the job failed and the API can say why."""
    job = get_current_job()
    assert job is not None, "run_job runs inside an RQ job"
    from .pipeline import InferenceRequest  # torch: only in the worker

    def stage(name: str, detail: str = "") -> None:
        job.meta.update(stage=name, stage_detail=detail)
        job.save_meta()

    try:
        if _pipeline is None:
            raise PipelineError("not_ready", "this worker has no models loaded", "load")
        parsed = JobRequest.from_json(request)
        stored = job.connection.hgetall(upload_key(job.id))
        if len(stored) != len(parsed.images):
            raise PipelineError("upload_expired", "the uploaded images are gone (expired before the job started); "
                                                  "submit again", "load")
        images = [stored[str(i).encode()] for i in range(len(parsed.images))]
        started = time.perf_counter()
        result = _pipeline.run(InferenceRequest(images, parsed.text, parsed.tasks, parsed.top_k, parsed.boxes),
                               on_stage=stage)
        timings = result["timings"]
        if job.enqueued_at and job.started_at:
            timings["queue_wait_s"] = round(max(0.0, (job.started_at - job.enqueued_at).total_seconds()), 4)
        timings["run_s"] = round(time.perf_counter() - started, 4)
        stage("done")
        return result
    except PipelineError as exc:
        job.meta["error"] = exc.to_dict()
        job.save_meta()
        raise
    except JobTimeoutException:
        job.meta["error"] = {"code": "timeout", "message": f"the job ran longer than its timeout of {job.timeout} s"}
        job.save_meta()
        raise
    except Exception as exc:
        log.exception("job %s failed", job.id)
        job.meta["error"] = {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}
        job.save_meta()
        raise
    finally:
        job.connection.delete(upload_key(job.id))


def publish_alive(connection: Redis, worker_name: str, info: dict, ttl: int) -> None:
    connection.set(alive_key(worker_name), json.dumps(info), ex=ttl)


def live_workers(connection: Redis) -> list[dict]:
    """Workers with models loaded and a fresh heartbeat."""
    workers = []
    for key in connection.scan_iter(match=ALIVE_PREFIX + "*", count=100):
        raw = connection.get(key)
        if raw:
            try:
                workers.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
    return workers


def fail_if_orphaned(connection: Redis, settings: Settings, job: Job) -> bool:
    """Fail a started job whose worker no longer has a liveness key (killed, crashed, host lost).
    Returns True when the job was failed here."""
    if job.get_status(refresh=True) != JobStatus.STARTED:
        return False
    if job.worker_name and connection.exists(alive_key(job.worker_name)):
        return False
    # A worker that just reconnected to a restarted Redis may take a job before its next heartbeat: only a job
    # started at least one heartbeat TTL ago, with no live worker, is an orphan.
    if job.started_at is not None:
        started = job.started_at if job.started_at.tzinfo else job.started_at.replace(tzinfo=timezone.utc)
        if (datetime.now(timezone.utc) - started).total_seconds() < settings.worker_heartbeat_ttl:
            return False
    registry = StartedJobRegistry(settings.queue_name, connection=connection, serializer=JSONSerializer)
    message = (f"the worker {job.worker_name or '?'} stopped (killed or crashed) while running this job; no "
               f"heartbeat for {settings.worker_heartbeat_ttl} s")
    job.meta["error"] = {"code": "worker_lost", "message": message}
    job.save_meta()
    with connection.pipeline() as pipe:
        for entry in connection.zrange(registry.key, 0, -1):
            if parse_composite_key(entry.decode())[0] == job.id:
                pipe.zrem(registry.key, entry)
        record_job_failure(job, f"WorkerLost: {message}", pipe)
        pipe.execute()
    connection.delete(upload_key(job.id))
    log.warning("job %s failed: %s", job.id, message)
    return True


def reap_orphans(connection: Redis, settings: Settings) -> list[str]:
    """Fail every started job of the queue whose worker is gone. Called periodically by every worker."""
    registry = StartedJobRegistry(settings.queue_name, connection=connection, serializer=JSONSerializer)
    failed = []
    for entry in connection.zrange(registry.key, 0, -1):
        job_id = parse_composite_key(entry.decode())[0]
        try:
            job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
        except NoSuchJobError:
            connection.zrem(registry.key, entry)
            continue
        if fail_if_orphaned(connection, settings, job):
            failed.append(job_id)
    return failed

