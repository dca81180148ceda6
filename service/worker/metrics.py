"""Prometheus metrics of the model worker (`python worker.py` with WORKER_METRICS_PORT=N).

Its own HTTP endpoint (prometheus_client's start_http_server on N; one worker process per port). Chosen over
pushing through Redis: no extra moving parts, the worker's numbers survive a Redis outage, and Prometheus scrapes
each GPU's worker as its own target. The values stay in this process's memory: the worker's entry point
(service.worker.main) drops PROMETHEUS_MULTIPROC_DIR from its environment before prometheus_client is imported,
so a variable leaked from the web tier's setup (serve.py, one host) cannot make it write files that the web
tier's /metrics would merge.

Names (all prefixed vilbert_): worker_jobs_total{status}, worker_failures_total{reason},
worker_stage_seconds{stage}, worker_batch_size, feature_cache_events_total{event},
discarded_results_total (outcomes dropped because the job had been failed as orphaned meanwhile: fencing,
service.worker.rq_batch), device_memory_bytes{device,kind} (GPU only).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from ..contract import LATENCY_BUCKETS, TIMINGS, timing_key

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)


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
        self.discarded_results = Counter("vilbert_discarded_results", "outcomes this worker computed for jobs that "
                                         "had meanwhile been failed as orphaned, and did not write",
                                         registry=self.registry)
        for event in ("hit", "miss", "store", "eviction", "error"):
            self.cache.labels(event)
        for status in ("finished", "failed"):
            self.jobs.labels(status)
        self.registry.register(DeviceMemoryCollector())

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def discarded(self) -> None:
        self.discarded_results.inc()

    def cache_event(self, kind: str, count: int) -> None:
        self.cache.labels(kind).inc(count)

    def job_done(self, outcome: Any, error: dict | None) -> None:
        """One job ended: `outcome` is its result dict, or what failed it (`error`: its error object, if any)."""
        if isinstance(outcome, dict):
            self.jobs.labels("finished").inc()
            timings = outcome.get("timings", {})
            for stage in TIMINGS:
                if timing_key(stage) in timings:
                    self.stages.labels(stage).observe(timings[timing_key(stage)])
            self.stages.labels("total").observe(timings.get(timing_key("queue_wait"), 0.0)
                                                + timings.get(timing_key("run"), 0.0))
            return
        self.jobs.labels("failed").inc()
        self.failures.labels((error or {}).get("code") or type(outcome).__name__).inc()

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        from prometheus_client import start_http_server

        start_http_server(port, addr=host, registry=self.registry)
        log.info("worker metrics on http://%s:%d/metrics", host, port)
