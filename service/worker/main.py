"""The model worker process (`python worker.py`): load the detector and ViLBERT once, then serve RQ jobs in this
same process, in batches (service.worker.rq_batch).

Wiring: `main` builds one WorkerContext (settings, pipeline, metrics, Redis connection) and passes it to the
worker; nothing is set on modules or classes from outside.

Shutdown: SIGTERM/SIGINT finish the current batch, then exit (RQ's warm shutdown); a second signal exits at once.
A stop signal between two RQ workers (while waiting for Redis) ends the loop as cleanly, with exit status 0.
Redis outages: the worker keeps retrying and resumes when Redis is back.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import uuid
from datetime import datetime, timezone

from redis import Redis
from redis.exceptions import RedisError

from ..settings import Settings, SettingsError, load_settings

log = logging.getLogger("service.worker")

# prometheus_client reads these when it is first imported and then writes every value to files there.
MULTIPROCESS_VARIABLES = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")


def worker_connection(settings: Settings) -> Redis:
    # No short socket timeout: to RQ a read timeout is an outage, and a loaded server may answer slowly. (The idle
    # worker's blocking pop lasts at most rq_batch.IDLE_POLL_S.)
    return Redis.from_url(settings.redis_url, socket_connect_timeout=settings.redis_timeout, socket_timeout=90,
                          socket_keepalive=True, health_check_interval=30)


def keep_metrics_in_process() -> None:
    """The worker is one process: its metric values stay in memory, even when the web tier's multiprocess
    directory leaks into its environment (serve.py, one host); otherwise it would write files there that the web
    tier's /metrics merges. Must run before anything imports prometheus_client."""
    for name in MULTIPROCESS_VARIABLES:
        os.environ.pop(name, None)


def main() -> int:
    keep_metrics_in_process()
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
    return serve(build_context(settings, pipeline, worker_connection(settings)))


def build_context(settings: Settings, pipeline: "Pipeline", connection: Redis) -> "WorkerContext":
    """The worker's context: its metrics (served on WORKER_METRICS_PORT when set) and the feature cache on the
    pipeline (when FEATURE_CACHE_TTL > 0)."""
    from .cache import FeatureCache, detector_key
    from .context import WorkerContext
    from .metrics import WorkerMetrics

    metrics = WorkerMetrics()
    if settings.worker_metrics_port:
        metrics.serve(settings.worker_metrics_port)
    if settings.feature_cache_ttl > 0:
        pipeline = pipeline.with_cache(FeatureCache(
            connection, detector_key(pipeline.extractor), ttl=settings.feature_cache_ttl,
            max_entries=settings.feature_cache_max_entries, max_bytes=settings.feature_cache_max_bytes,
            on_event=metrics.cache_event))
    log.info("batching up to %d jobs (wait %d ms); feature cache %s", settings.batch_max_jobs,
             settings.batch_max_wait_ms, f"ttl {settings.feature_cache_ttl} s" if pipeline.cache else "off")
    return WorkerContext(settings=settings, pipeline=pipeline, metrics=metrics, connection=connection)


def stop_on_signal(context: "WorkerContext") -> None:
    """SIGTERM/SIGINT set `context.stop` until an RQ worker installs its own handlers (at the start of its
    `work()`); without this a signal while Redis is down at start-up would kill the process mid-wait."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        return

    def request_stop(signum: int, frame: object) -> None:
        log.info("stop requested (%s) while no RQ worker runs", signal.Signals(signum).name)
        context.stop.set()

    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, request_stop)


def serve(context: "WorkerContext") -> int:
    """Take jobs until a stop signal; a Redis outage restarts the RQ worker (with backoff) rather than ending."""
    from ..queue import get_queue
    from .heartbeat import Heartbeat
    from .rq_batch import BatchWorker

    settings, connection = context.settings, context.connection
    base_name = f"{socket.gethostname()}.{os.getpid()}"
    info = {"host": socket.gethostname(), "pid": os.getpid(), "queue": settings.queue_name,
            "started_at": datetime.now(timezone.utc).isoformat(), **context.pipeline.info}
    info.pop("notice", None)
    heartbeat = Heartbeat(connection, settings, info)
    heartbeat.start()
    stop_on_signal(context)
    backoff = 1.0
    try:
        while not context.stop.is_set():
            name = f"{base_name}.{uuid.uuid4().hex[:6]}"  # fresh per (re)start: RQ refuses a registered name
            try:
                worker = BatchWorker([get_queue(connection, settings)], context, name=name, worker_ttl=60)
                heartbeat.worker_name = name
                heartbeat.beat()  # ready now, not after the first interval
                log.info("worker %s ready on queue %s (device %s)", name, settings.queue_name, info["device"])
                backoff = 1.0
                worker.work(logging_level=settings.log_level, with_scheduler=False)
            except RedisError as exc:
                log.warning("redis unavailable (%s); retrying in %.0f s", exc, backoff)
            heartbeat.worker_name = None
            heartbeat.retire(name)
            if not context.stop.is_set():
                context.stop.wait(backoff)  # a stop signal ends the wait
                backoff = min(backoff * 2, 10.0)
    finally:
        heartbeat.stopped.set()
        heartbeat.retire(heartbeat.worker_name)
        log.info("worker stopped")
    return 0
