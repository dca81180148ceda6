"""The job queue on RQ, as both processes use it: connections, the queue, live workers and orphaned jobs.

Everything in Redis is JSON (rq's JSONSerializer) or raw upload bytes: nothing is ever unpickled. The key names
besides RQ's own are in service.contract: the uploads of a job (a hash that expires after UPLOAD_TTL; web and
worker may run on different hosts, so uploads cannot live on a local disk) and each worker's liveness key (JSON
about a worker with its models loaded, expiring after WORKER_HEARTBEAT_TTL unless refreshed). /readyz counts the
liveness keys; a started job whose worker has none is failed as "worker_lost" (`fail_if_orphaned`), by the web
tier when a client asks about it and by every worker's heartbeat thread otherwise.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.job_lifecycle import record_job_failure
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import parse_composite_key

from .contract import ALIVE_PREFIX, WORKER_LOST, alive_key, error_body, upload_key
from .settings import Settings

log = logging.getLogger(__name__)


def connect(settings: Settings) -> Redis:
    """A client with short timeouts: a Redis outage must turn into a quick 503, not a hung request."""
    return Redis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout,
                          socket_connect_timeout=settings.redis_timeout, health_check_interval=10)


def get_queue(connection: Redis, settings: Settings) -> Queue:
    return Queue(settings.queue_name, connection=connection, serializer=JSONSerializer,
                 default_timeout=settings.job_timeout)


def started_registry(connection: Redis, settings: Settings) -> StartedJobRegistry:
    return StartedJobRegistry(settings.queue_name, connection=connection, serializer=JSONSerializer)


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
    registry = started_registry(connection, settings)
    message = (f"the worker {job.worker_name or '?'} stopped (killed or crashed) while running this job; no "
               f"heartbeat for {settings.worker_heartbeat_ttl} s")
    job.meta["error"] = error_body(WORKER_LOST, message)
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
