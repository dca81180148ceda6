"""Prometheus metrics for the web tier and the model worker.

Web tier (`GET /metrics` on the API): gunicorn runs several worker processes, each with its own counters, so
prometheus_client runs in multiprocess mode: gunicorn.conf.py points PROMETHEUS_MULTIPROC_DIR at a fresh
directory before the workers start, every process writes its values to files there, and `/metrics` merges
them (MultiProcessCollector). Without that variable (flask dev runs, tests of the app object) the values stay
in-process. Queue depth, started jobs and ready workers are read from Redis at scrape time, so every web
process reports the same numbers.

Worker (`python worker.py` with WORKER_METRICS_PORT=N): its own HTTP endpoint (prometheus_client's
start_http_server on N; one worker process per port). Chosen over pushing through Redis: no extra moving parts,
the worker's numbers survive a Redis outage, and Prometheus scrapes each GPU's worker as its own target.

Names (all prefixed vilbert_):
  web:    http_requests_total{route,method,status}, http_request_duration_seconds{route},
          http_errors_total{route,code}, queue_depth, jobs_started, workers_ready, redis_up
  worker: worker_jobs_total{status}, worker_failures_total{reason}, worker_stage_seconds{stage},
          worker_batch_size, feature_cache_events_total{event}, device_memory_bytes{device,kind} (GPU only)
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)
STAGES = ("queue_wait", "decode", "detector", "vilbert", "run", "total")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None


# ------------------------------------------------------------------------------------------------------ web tier


class QueueCollector:
    """Queue depth, started jobs and ready workers, read from Redis at scrape time."""

    def __init__(self, connection: Any, settings: Any):
        self.connection, self.settings = connection, settings

    def collect(self) -> Iterable[GaugeMetricFamily]:
        from redis.exceptions import RedisError
        from rq.registry import StartedJobRegistry
        from rq.serializers import JSONSerializer

        from . import jobs

        up = GaugeMetricFamily("vilbert_redis_up", "1 when the job store (Redis) answered this scrape")
        try:
            queue = jobs.get_queue(self.connection, self.settings)
            depth = queue.count
            started = StartedJobRegistry(self.settings.queue_name, connection=self.connection,
                                         serializer=JSONSerializer).count
            workers = len(jobs.live_workers(self.connection))
        except RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily("vilbert_queue_depth", "jobs waiting in the queue", value=depth)
        yield GaugeMetricFamily("vilbert_jobs_started", "jobs being run by workers now", value=started)
        yield GaugeMetricFamily("vilbert_workers_ready", "workers with models loaded and a fresh heartbeat",
                                value=workers)


class WebMetrics:
    def __init__(self) -> None:
        self.multiprocess = multiprocess_dir() is not None
        self.registry = CollectorRegistry()
        # In multiprocess mode the values live in files and the scrape builds its own registry.
        own = None if self.multiprocess else self.registry
        self.requests = Counter("vilbert_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=own)
        self.latency = Histogram("vilbert_http_request_duration_seconds", "HTTP request handling time by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=own)
        self.errors = Counter("vilbert_http_errors", "error responses by route and error code (queue_full = "
                              "back-pressure)", ["route", "code"], registry=own)

    def observe(self, route: str, method: str, status: int, seconds: float, error_code: str | None) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if error_code:
            self.errors.labels(route, error_code).inc()

    def render(self, extra: Any) -> bytes:
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            text = generate_latest(registry)
        else:
            text = generate_latest(self.registry)
        scrape = CollectorRegistry()
        scrape.register(extra)
        return text + generate_latest(scrape)


def install(app: Any, connection: Any, settings: Any) -> WebMetrics:
    """Count every request of a Flask app and serve GET /metrics."""
    from flask import Response, g, request

    web = WebMetrics()
    queue = QueueCollector(connection, settings)

    @app.before_request
    def _start_timer() -> None:
        g.metrics_started = time.perf_counter()

    @app.after_request
    def _count(response: Any) -> Any:
        started = g.pop("metrics_started", None)
        if started is None:
            return response
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        code = None
        if response.status_code >= 400 and response.mimetype == "application/json":
            try:
                code = json.loads(response.get_data())["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = "unknown"
        web.observe(route, request.method, response.status_code, time.perf_counter() - started, code)
        return response

    @app.get("/metrics")
    def metrics_endpoint() -> Any:
        return Response(web.render(queue), mimetype=CONTENT_TYPE_LATEST)

    return web


# -------------------------------------------------------------------------------------------------------- worker


class DeviceMemoryCollector:
    def collect(self) -> Iterable[GaugeMetricFamily]:
        import torch

        family = GaugeMetricFamily("vilbert_device_memory_bytes", "GPU memory of this worker process",
                                   labels=["device", "kind"])
        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                family.add_metric([str(index), "allocated"], torch.cuda.memory_allocated(index))
                family.add_metric([str(index), "reserved"], torch.cuda.memory_reserved(index))
                family.add_metric([str(index), "max_allocated"], torch.cuda.max_memory_allocated(index))
        yield family


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.jobs = Counter("vilbert_worker_jobs", "jobs ended by this worker, by status", ["status"],
                            registry=self.registry)
        self.failures = Counter("vilbert_worker_failures", "failed jobs by reason (error code)", ["reason"],
                                registry=self.registry)
        self.stages = Histogram("vilbert_worker_stage_seconds", "job latency per stage (a batched job waits for "
                                "its whole batch)", ["stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("vilbert_worker_batch_size", "jobs run together in one batch",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.cache = Counter("vilbert_feature_cache_events", "feature cache hits, misses, stores, evictions and "
                             "errors, per image", ["event"], registry=self.registry)
        for event in ("hit", "miss", "store", "eviction", "error"):
            self.cache.labels(event)
        for status in ("finished", "failed"):
            self.jobs.labels(status)
        self.registry.register(DeviceMemoryCollector())

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def cache_event(self, kind: str, count: int) -> None:
        self.cache.labels(kind).inc(count)

    def job_done(self, job: Any, outcome: Any) -> None:
        if isinstance(outcome, dict):
            self.jobs.labels("finished").inc()
            timings = outcome.get("timings", {})
            for stage in STAGES:
                if f"{stage}_s" in timings:
                    self.stages.labels(stage).observe(timings[f"{stage}_s"])
            self.stages.labels("total").observe(timings.get("queue_wait_s", 0.0) + timings.get("run_s", 0.0))
            return
        self.jobs.labels("failed").inc()
        error = job.meta.get("error") or {}
        self.failures.labels(error.get("code") or type(outcome).__name__).inc()

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        from prometheus_client import start_http_server

        start_http_server(port, addr=host, registry=self.registry)
        log.info("worker metrics on http://%s:%d/metrics", host, port)


class _NoWorkerMetrics:
    """What batching reports to before the worker starts its metrics (in-process use, tests)."""

    def batch(self, size: int) -> None:
        pass

    def cache_event(self, kind: str, count: int) -> None:
        pass

    def job_done(self, job: Any, outcome: Any) -> None:
        pass


worker: WorkerMetrics | _NoWorkerMetrics = _NoWorkerMetrics()


def start_worker_metrics(port: int) -> WorkerMetrics:
    """The worker's metrics, served on `port` (0: collected but not served)."""
    global worker
    from prometheus_client import values

    # The worker is one process: its values stay in memory even when PROMETHEUS_MULTIPROC_DIR leaks into its
    # environment (serve.py, one host); otherwise it would write files that the web tier's /metrics merges.
    values.ValueClass = values.MutexValue
    metrics = WorkerMetrics()
    if port:
        metrics.serve(port)
    worker = metrics
    return metrics
