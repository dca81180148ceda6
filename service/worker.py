"""The model worker process: load the detector and ViLBERT once, then serve RQ jobs in this same process.

Why SimpleWorker: RQ's default Worker forks a child per job, and CUDA state does not survive fork (and
reloading the models per job would cost seconds). SimpleWorker runs each job in the main process.

Liveness: a thread refreshes `vilbert:worker-alive:<rq worker name>` every WORKER_HEARTBEAT_TTL/3 s, also while
a job runs (SimpleWorker itself sends no heartbeat during a job). The same thread fails started jobs whose
worker's key has expired (see service.jobs.reap_orphans), so a SIGKILLed worker's job ends `failed` within
about WORKER_HEARTBEAT_TTL seconds even when nobody polls it.

Shutdown: SIGTERM/SIGINT finish the current job, then exit (RQ's warm shutdown); a second signal exits at once.
Redis outages: the worker keeps retrying and resumes when Redis is back.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timezone

from redis import Redis
from redis.exceptions import RedisError
from rq import SimpleWorker
from rq.serializers import JSONSerializer

from . import batching, jobs
from .settings import Settings, SettingsError, load_settings

log = logging.getLogger("service.worker")


class ModelWorker(SimpleWorker):
    """SimpleWorker that remembers a stop request, so the outer loop does not restart it."""

    stop_requested = False

    def request_stop(self, signum, frame):
        ModelWorker.stop_requested = True
        super().request_stop(signum, frame)


class Heartbeat(threading.Thread):
    def __init__(self, connection: Redis, settings: Settings, info: dict):
        super().__init__(name="heartbeat", daemon=True)
        self.connection, self.settings, self.info = connection, settings, info
        self.worker_name: str | None = None
        self.stopped = threading.Event()

    def beat(self) -> None:
        name = self.worker_name
        if name:
            jobs.publish_alive(self.connection, name, {**self.info, "name": name}, self.settings.worker_heartbeat_ttl)
        jobs.reap_orphans(self.connection, self.settings)

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
                self.connection.delete(jobs.alive_key(name))
            except RedisError:
                pass


def worker_connection(settings: Settings) -> Redis:
    # No short socket timeout here: RQ blocks in BLPOP for up to its dequeue timeout (worker_ttl - 15 s).
    return Redis.from_url(settings.redis_url, socket_connect_timeout=settings.redis_timeout, socket_timeout=90,
                          socket_keepalive=True, health_check_interval=30)


def main() -> int:
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s")
    from .pipeline import Pipeline  # torch

    try:
        pipeline = Pipeline.from_settings(settings)
    except FileNotFoundError as exc:
        log.error("%s", exc)
        return 2
    if pipeline.tiny:
        log.warning("serving a TINY RANDOM-WEIGHT bundle from %s: answers are meaningless", settings.model_dir)
    jobs.set_pipeline(pipeline)

    connection = worker_connection(settings)
    worker_class = batching.prepare_worker(pipeline, settings, connection, ModelWorker)  # cache, metrics, batches
    base_name = f"{socket.gethostname()}.{os.getpid()}"
    info = {"host": socket.gethostname(), "pid": os.getpid(), "queue": settings.queue_name,
            "started_at": datetime.now(timezone.utc).isoformat(), **pipeline.info}
    info.pop("notice", None)
    heartbeat = Heartbeat(connection, settings, info)
    heartbeat.start()
    backoff = 1.0
    try:
        while not ModelWorker.stop_requested:
            name = f"{base_name}.{uuid.uuid4().hex[:6]}"  # fresh per (re)start: RQ refuses a registered name
            try:
                worker = worker_class([jobs.get_queue(connection, settings)], connection=connection, name=name,
                                     serializer=JSONSerializer, worker_ttl=60)
                heartbeat.worker_name = name
                heartbeat.beat()  # ready now, not after the first interval
                log.info("worker %s ready on queue %s (device %s)", name, settings.queue_name, info["device"])
                backoff = 1.0
                worker.work(logging_level=settings.log_level, with_scheduler=False)
            except RedisError as exc:
                log.warning("redis unavailable (%s); retrying in %.0f s", exc, backoff)
            heartbeat.worker_name = None
            heartbeat.retire(name)
            if not ModelWorker.stop_requested:
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
    finally:
        heartbeat.stopped.set()
        heartbeat.retire(heartbeat.worker_name)
        log.info("worker stopped")
    return 0
