"""The model worker's Prometheus metrics (service/worker/metrics.py): what each call counts, under which name and
labels, and the endpoint a scraper reads. The worker's own tests (test_rq_batch.py) check that jobs reach these
calls; here each call's effect is checked on its own, values read back from the registry and from real HTTP."""

from __future__ import annotations

import logging
import socket
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.contract import LATENCY_BUCKETS, TIMINGS, timing_key
from service.worker.metrics import BATCH_BUCKETS, DeviceMemoryCollector, WorkerMetrics


def value(metrics: WorkerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_every_series_a_dashboard_plots_exists_at_zero_before_the_first_job():
    """Rates of a counter that appears only with its first event start from nothing; the statuses and cache events
    are listed up front so that every series exists, at 0, from the start."""
    metrics = WorkerMetrics()
    for status in ("finished", "failed"):
        assert value(metrics, "vilbert_worker_jobs_total", status=status) == 0
    for event in ("hit", "miss", "store", "eviction", "error"):
        assert value(metrics, "vilbert_feature_cache_events_total", event=event) == 0
    assert value(metrics, "vilbert_discarded_results_total") == 0
    assert value(metrics, "vilbert_worker_batch_size_count") == 0


def test_each_worker_has_its_own_registry_unless_given_one():
    """Two workers in one process (the tests, a notebook) must not share or clash over their counters."""
    first, second = WorkerMetrics(), WorkerMetrics()
    first.batch(2)
    assert value(first, "vilbert_worker_batch_size_count") == 1
    assert value(second, "vilbert_worker_batch_size_count") == 0
    registry = CollectorRegistry()
    assert WorkerMetrics(registry).registry is registry


def test_a_finished_job_counts_once_and_observes_each_stage_it_reports():
    metrics = WorkerMetrics()
    timings = {timing_key("queue_wait"): 0.25, timing_key("run"): 1.5, timing_key(TIMINGS[1]): 0.02}
    metrics.job_done({"tasks": {}, "timings": timings}, None)
    assert value(metrics, "vilbert_worker_jobs_total", status="finished") == 1
    assert value(metrics, "vilbert_worker_jobs_total", status="failed") == 0
    for stage in TIMINGS:
        seconds = timings.get(timing_key(stage))
        count = value(metrics, "vilbert_worker_stage_seconds_count", stage=stage)
        if seconds is None:  # a stage the job did not report is not observed as 0
            assert count is None
        else:
            assert count == 1
            assert value(metrics, "vilbert_worker_stage_seconds_sum", stage=stage) == seconds
    # total: waiting in the queue plus running
    assert value(metrics, "vilbert_worker_stage_seconds_sum", stage="total") == 1.75
    assert value(metrics, "vilbert_worker_stage_seconds_count", stage="total") == 1


@pytest.mark.parametrize("timings,total", [({}, 0.0), ({"run_s": 2.0}, 2.0), ({"queue_wait_s": 3.0}, 3.0)])
def test_the_total_stage_counts_a_missing_part_as_zero(timings, total):
    metrics = WorkerMetrics()
    metrics.job_done({"timings": timings}, None)
    assert value(metrics, "vilbert_worker_stage_seconds_sum", stage="total") == total
    assert value(metrics, "vilbert_worker_stage_seconds_count", stage="total") == 1


def test_a_result_without_timings_is_still_counted():
    metrics = WorkerMetrics()
    metrics.job_done({"tasks": {}}, None)
    assert value(metrics, "vilbert_worker_jobs_total", status="finished") == 1
    assert value(metrics, "vilbert_worker_stage_seconds_sum", stage="total") == 0


def test_stage_latencies_use_the_buckets_shared_with_the_web_tier():
    metrics = WorkerMetrics()
    metrics.job_done({"timings": {"run_s": LATENCY_BUCKETS[0]}}, None)
    for bound in LATENCY_BUCKETS:
        assert value(metrics, "vilbert_worker_stage_seconds_bucket", stage="run", le=str(bound)) == 1
    just_above = (LATENCY_BUCKETS[0] + LATENCY_BUCKETS[1]) / 2
    metrics.job_done({"timings": {"run_s": just_above}}, None)
    assert value(metrics, "vilbert_worker_stage_seconds_bucket", stage="run", le=str(LATENCY_BUCKETS[0])) == 1
    assert value(metrics, "vilbert_worker_stage_seconds_bucket", stage="run", le=str(LATENCY_BUCKETS[1])) == 2


@pytest.mark.parametrize("outcome,error,reason", [
    (RuntimeError("boom"), {"code": "invalid_image", "message": "not an image"}, "invalid_image"),
    (RuntimeError("boom"), None, "RuntimeError"),  # no error object: the exception's type names the failure
    (MemoryError(), {"message": "no code"}, "MemoryError"),  # an error object without a code
    (None, {"code": ""}, "NoneType"),
])
def test_a_failed_job_is_counted_by_its_error_code(outcome, error, reason):
    metrics = WorkerMetrics()
    metrics.job_done(outcome, error)
    assert value(metrics, "vilbert_worker_jobs_total", status="failed") == 1
    assert value(metrics, "vilbert_worker_jobs_total", status="finished") == 0
    assert value(metrics, "vilbert_worker_failures_total", reason=reason) == 1
    assert value(metrics, "vilbert_worker_stage_seconds_count", stage="total") is None


def test_batch_sizes_cache_events_and_discarded_results_add_up():
    metrics = WorkerMetrics()
    for size in (1, 4, 4, 300):
        metrics.batch(size)
    assert value(metrics, "vilbert_worker_batch_size_count") == 4
    assert value(metrics, "vilbert_worker_batch_size_sum") == 309
    assert value(metrics, "vilbert_worker_batch_size_bucket", le="1.0") == 1
    assert value(metrics, "vilbert_worker_batch_size_bucket", le="4.0") == 3
    assert value(metrics, "vilbert_worker_batch_size_bucket", le=str(float(BATCH_BUCKETS[-1]))) == 3
    assert value(metrics, "vilbert_worker_batch_size_bucket", le="+Inf") == 4
    metrics.cache_event("hit", 3)
    metrics.cache_event("hit", 2)
    metrics.cache_event("miss", 1)
    assert value(metrics, "vilbert_feature_cache_events_total", event="hit") == 5
    assert value(metrics, "vilbert_feature_cache_events_total", event="miss") == 1
    assert value(metrics, "vilbert_feature_cache_events_total", event="store") == 0
    metrics.discarded()
    metrics.discarded()
    assert value(metrics, "vilbert_discarded_results_total") == 2


def test_device_memory_is_a_gauge_family_without_series_on_a_cpu_worker():
    import torch

    (family,) = DeviceMemoryCollector().collect()
    assert (family.name, family.type) == ("vilbert_device_memory_bytes", "gauge")
    if not torch.cuda.is_available():
        assert family.samples == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_a_scrape_with_the_workers_own_registry():
    """On every interface by default: Prometheus scrapes the worker from another host (or pod)."""
    metrics = WorkerMetrics()
    metrics.job_done({"timings": {"run_s": 0.5}}, None)
    metrics.job_done(ValueError("x"), {"code": "bad_input"})
    port = free_port()
    metrics.serve(port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        body = response.read().decode()
    families = {family.name: family for family in text_string_to_metric_families(body)}
    jobs = {s.labels["status"]: s.value for s in families["vilbert_worker_jobs"].samples if s.name.endswith("_total")}
    assert jobs == {"finished": 1.0, "failed": 1.0}
    failures = [s for s in families["vilbert_worker_failures"].samples if s.name.endswith("_total")]
    assert [(s.labels["reason"], s.value) for s in failures] == [("bad_input", 1.0)]
    assert "vilbert_device_memory_bytes" in families
    # only this worker's registry: none of the process-wide default collectors (python_info, process_*)
    assert not [name for name in families if not name.startswith("vilbert_")]


def test_every_series_has_its_help_text():
    """The HELP lines are what a dashboard author reads in Prometheus: the description of each series (as the
    web tier's, tests/test_web_api.py)."""
    text = generate_latest(WorkerMetrics().registry).decode()
    helps = {family.name: family.documentation for family in text_string_to_metric_families(text)
             if not family.name.endswith("_created")}
    assert helps == {
        "vilbert_worker_jobs": "jobs ended by this worker, by status",
        "vilbert_worker_failures": "failed jobs by reason (error code)",
        "vilbert_worker_stage_seconds": "job latency per stage (a batched job waits for its whole batch)",
        "vilbert_worker_batch_size": "jobs run together in one batch",
        "vilbert_feature_cache_events": "feature cache hits, misses, stores, evictions and errors, per image",
        "vilbert_discarded_results": "outcomes this worker computed for jobs that had meanwhile been failed as "
                                     "orphaned, and did not write",
        "vilbert_device_memory_bytes": "GPU memory of this worker process",
    }


def test_serve_logs_where_to_scrape(caplog):
    port = free_port()
    with caplog.at_level(logging.INFO, logger="service.worker.metrics"):
        WorkerMetrics().serve(port)
    assert caplog.messages == [f"worker metrics on http://0.0.0.0:{port}/metrics"]


class FakeCuda:
    """torch.cuda of a two-GPU machine with known memory figures: the GPU branch, which CI (no GPU) cannot reach
    otherwise. What is checked is our mapping of PyTorch's figures to series, not PyTorch's figures."""

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 2

    @staticmethod
    def memory_allocated(index: int) -> int:
        return 1000 + index

    @staticmethod
    def memory_reserved(index: int) -> int:
        return 2000 + index

    @staticmethod
    def max_memory_allocated(index: int) -> int:
        return 3000 + index


def test_device_memory_has_a_series_per_gpu_and_kind_with_that_gpus_value(monkeypatch):
    import torch

    monkeypatch.setattr(torch, "cuda", FakeCuda)
    (family,) = DeviceMemoryCollector().collect()
    values = {(s.labels["device"], s.labels["kind"]): s.value for s in family.samples}
    assert values == {("0", "allocated"): 1000, ("0", "reserved"): 2000, ("0", "max_allocated"): 3000,
                      ("1", "allocated"): 1001, ("1", "reserved"): 2001, ("1", "max_allocated"): 3001}
    assert {s.name for s in family.samples} == {"vilbert_device_memory_bytes"}


def test_serve_listens_only_on_the_address_given():
    """Linux routes all of 127.0.0.0/8 to the loopback: a server on 127.0.0.1 alone refuses 127.0.0.2, one on every
    interface answers it."""
    port = free_port()
    WorkerMetrics().serve(port, host="127.0.0.1")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        assert response.status == 200
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port), timeout=30).close()
