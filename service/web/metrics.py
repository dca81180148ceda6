"""Prometheus metrics of the web tier (`GET /metrics` on the API); the worker's are in service.worker.metrics.

gunicorn runs several worker processes, each with its own counters, so
prometheus_client runs in multiprocess mode: gunicorn.conf.py points PROMETHEUS_MULTIPROC_DIR at a fresh
directory before the workers start, every process writes its values to files there, and `/metrics` merges
them (MultiProcessCollector). Without that variable (flask dev runs, tests of the app object) the values stay
in-process. Queue depth, started jobs and ready workers are read from Redis at scrape time, so every web
process reports the same numbers.

Names (all prefixed vilbert_): http_requests_total{route,method,status}, http_request_duration_seconds{route},
http_errors_total{route,code}, queue_depth, jobs_started, workers_ready, redis_up.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Iterable

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from redis.exceptions import RedisError

from ..contract import LATENCY_BUCKETS
from ..queue import get_queue, live_workers, started_registry

log = logging.getLogger(__name__)

def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None


class QueueCollector:
    """Queue depth, started jobs and ready workers, read from Redis at scrape time."""

    def __init__(self, connection: Any, settings: Any):
        self.connection, self.settings = connection, settings

    def collect(self) -> Iterable[GaugeMetricFamily]:
        up = GaugeMetricFamily("vilbert_redis_up", "1 when the job store (Redis) answered this scrape")
        try:
            depth = get_queue(self.connection, self.settings).count
            started = started_registry(self.connection, self.settings).count
            workers = len(live_workers(self.connection))
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


# The methods counted under their own name; any other (clients may send any token) is counted as "other", so a
# client cannot add label values, and with them series, to /metrics at will.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def method_label(method: str) -> str:
    return method if method in HTTP_METHODS else "other"


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
        self.requests.labels(route, method_label(method), str(status)).inc()
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


def install(app: Flask, connection: Any, settings: Any) -> WebMetrics:
    """Count every request of a Flask app and serve GET /metrics."""
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
        return Response(web.render(queue), content_type=CONTENT_TYPE_LATEST)  # as is: mimetype= adds a second charset

    return web
