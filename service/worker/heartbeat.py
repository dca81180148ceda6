"""Worker liveness: a thread refreshes `vilbert:worker-alive:<rq worker name>` (service.contract) every
WORKER_HEARTBEAT_TTL/3 s, also while a job runs (SimpleWorker itself sends no heartbeat during a job). The same
thread fails started jobs whose worker's key has expired (`reap_orphans`), so a SIGKILLed worker's job ends
`failed` within about WORKER_HEARTBEAT_TTL seconds even when nobody polls it."""

from __future__ import annotations

import json
import logging
import threading

from redis import Redis
from redis.exceptions import RedisError
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import parse_composite_key

from ..contract import alive_key
from ..queue import fail_if_orphaned, started_registry
from ..settings import Settings

log = logging.getLogger(__name__)


def publish_alive(connection: Redis, worker_name: str, info: dict, ttl: int) -> None:
    connection.set(alive_key(worker_name), json.dumps(info), ex=ttl)


def reap_orphans(connection: Redis, settings: Settings) -> list[str]:
    """Fail every started job of the queue whose worker is gone. Called periodically by every worker."""
    registry = started_registry(connection, settings)
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


class Heartbeat(threading.Thread):
    def __init__(self, connection: Redis, settings: Settings, info: dict):
        super().__init__(name="heartbeat", daemon=True)
        self.connection, self.settings, self.info = connection, settings, info
        self.worker_name: str | None = None
        self.stopped = threading.Event()

    def beat(self) -> None:
        name = self.worker_name
        if name:
            publish_alive(self.connection, name, {**self.info, "name": name}, self.settings.worker_heartbeat_ttl)
        reap_orphans(self.connection, self.settings)

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.beat()
            except RedisError as exc:
                log.warning("heartbeat: redis unavailable (%s)", exc)
            except Exception:
                log.exception("heartbeat failed")
            self.stopped.wait(self.settings.heartbeat_interval)

    def retire(self, name: str | None) -> None:
        if name:
            try:
                self.connection.delete(alive_key(name))
            except RedisError:
                pass
