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
from redis.exceptions import WatchError
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.job_lifecycle import record_job_failure
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import parse_composite_key

from .contract import ALIVE_PREFIX, WORKER_LOST, alive_key, error_body, upload_key, upload_ledger_keys
from .settings import Settings

log = logging.getLogger(__name__)


def connect(settings: Settings) -> Redis:
    """A client with short timeouts: a Redis outage must turn into a quick 503, not a hung request."""
    return Redis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout,
                          socket_connect_timeout=settings.redis_timeout, health_check_interval=10)


def get_queue(connection: Redis, settings: Settings) -> Queue:
    return Queue(settings.queue_name, connection=connection, serializer=JSONSerializer,
                 default_timeout=settings.job_timeout)


# Admit a job's uploads to the byte budget, atomically: forget entries past their expiry (their upload hash has
# expired too), sum the rest, and add this job's bytes if the sum stays within the budget.
# KEYS: expiry zset, sizes hash. ARGV: job id, bytes, ttl seconds, budget. Returns {admitted (0/1), bytes held}.
_ADMIT = """
local now = tonumber(redis.call('TIME')[1])
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(expired) do redis.call('HDEL', KEYS[2], id) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = 0
for _, size in ipairs(redis.call('HVALS', KEYS[2])) do held = held + tonumber(size) end
if held + tonumber(ARGV[2]) > tonumber(ARGV[4]) then return {0, held} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return {1, held + tonumber(ARGV[2])}
"""


def admit_uploads(connection: Redis, settings: Settings, job_id: str, size: int) -> tuple[bool, int]:
    """Reserve `size` bytes of the queued-upload budget (MAX_QUEUED_BYTES) for a job: (admitted, bytes held)."""
    admitted, held = connection.eval(_ADMIT, 2, *upload_ledger_keys(settings.queue_name), job_id, size,
                                     settings.upload_ttl, settings.max_queued_bytes)
    return bool(admitted), int(held)


def release_uploads(connection: Redis, settings: Settings, job_id: str) -> None:
    """Drop a job's uploads and give their bytes back to the budget (job done, failed or never queued).
    `connection` may be a pipeline, so that the release commits with the job's outcome."""
    expiry, sizes = upload_ledger_keys(settings.queue_name)
    connection.delete(upload_key(job_id))
    connection.zrem(expiry, job_id)
    connection.hdel(sizes, job_id)


def as_utc(value: datetime) -> datetime:
    """`value` in UTC. A naive time is read as UTC, as RQ writes its times, whatever the local time zone."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


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
    """Fail a started job whose worker no longer has a liveness key (killed, crashed, host lost, paused).
    Returns True when the job was failed here.

    One transaction: the job hash and the worker's liveness key are WATCHed before they are read, so if the worker
    writes its outcome (or renews its key) meanwhile, this failure is not committed; and the worker's own writes
    are conditional on the job still being started by it (service.worker.rq_batch's fencing), so once this commits
    the job stays failed."""
    try:
        job.refresh()  # worker and start time as they are now: a copy fetched while the job was queued has neither
    except NoSuchJobError:
        return False
    if job.get_status(refresh=False) != JobStatus.STARTED:
        return False
    # A worker that just reconnected to a restarted Redis may take a job before its next heartbeat: only a job
    # started at least one heartbeat TTL ago, with no live worker, is an orphan.
    if job.started_at is not None:
        if (datetime.now(timezone.utc) - as_utc(job.started_at)).total_seconds() < settings.worker_heartbeat_ttl:
            return False
    registry = job.started_job_registry
    message = (f"the worker {job.worker_name or '?'} stopped (killed, crashed or paused) while running this job; no "
               f"heartbeat for {settings.worker_heartbeat_ttl} s")
    with connection.pipeline() as pipe:
        try:
            pipe.watch(job.key, alive_key(job.worker_name or ""))
            if pipe.hget(job.key, "status") != JobStatus.STARTED.value.encode():
                return False
            if job.worker_name and pipe.exists(alive_key(job.worker_name)):
                return False
            entries = [e for e in pipe.zrange(registry.key, 0, -1) if parse_composite_key(e.decode())[0] == job.id]
            job.meta["error"] = error_body(WORKER_LOST, message)
            pipe.multi()
            pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))
            for entry in entries:
                pipe.zrem(registry.key, entry)
            record_job_failure(job, f"WorkerLost: {message}", pipe)
            release_uploads(pipe, settings, job.id)
            pipe.execute()
        except WatchError:  # the worker wrote its outcome (or came back) meanwhile: not an orphan after all
            return False
    log.warning("job %s failed: %s", job.id, message)
    return True
