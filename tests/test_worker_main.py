"""In-process tests of service/worker/main.py, the worker's entry: `main()` (settings, the bundle, the context)
and `serve()`, the loop that restarts the RQ worker after a Redis outage until a stop signal.

`serve` runs here in the main thread, as in `python worker.py`, because RQ installs its SIGTERM/SIGINT handlers
there; a helper thread acts on what the worker logs and then sends this process the SIGTERM that an operator
would (only once RQ's handler is in place, so that the signal can never reach the default action). The real
backoff waits (1, 2, 4 ... 10 s) are replaced by a recorder that holds the loop at chosen waits while the test
changes the server, so the schedule is checked exactly and fast. tests/test_service_scale.py and the end-to-end
tests hold the same behaviour through real worker processes."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Callable

import numpy as np
import pytest
from PIL import Image
from redis import Redis
from rq.worker import Worker

from service.contract import ALIVE_PREFIX, ImageInfo, JobRequest
from service.localstack import free_port, start_redis, stop
from service.settings import Settings, load_settings
from service.web.jobs import job_status, submit
from service.worker import main as worker_main
from service.worker.cache import detector_key
from service.worker.context import WorkerContext
from service.worker.metrics import WorkerMetrics
from service.worker.pipeline import Pipeline

pytestmark = pytest.mark.timeout(180)

WAIT = 60.0  # seconds any one condition may take on a busy machine


class WorkerLog(logging.Handler):
    """Every message of the `service.worker` loggers, and a way to wait for one."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self.changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.changed:
            self.messages.append(record.getMessage())
            self.changed.notify_all()

    def matching(self, pattern: str) -> list[str]:
        with self.changed:
            return [message for message in self.messages if re.fullmatch(pattern, message)]

    def wait_for(self, pattern: str, count: int = 1) -> list[str]:
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.matching(pattern)) >= count, WAIT):
                raise AssertionError(f"no {count}x {pattern!r} within {WAIT} s; logged: {self.messages}")
        return self.matching(pattern)


@pytest.fixture
def worker_log():
    logger = logging.getLogger("service.worker")
    handler, level = WorkerLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def _not_rq(signum, frame):  # pragma: no cover - only reached if a test signals before RQ's handler is set
    raise AssertionError(f"signal {signum} arrived before RQ installed its handler")


@pytest.fixture
def signals():
    """This process's SIGTERM/SIGINT handlers back as they were after the test (RQ replaces them)."""
    saved = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, _not_rq)
    yield
    for number, handler in saved.items():
        signal.signal(number, handler)


def stop_worker() -> None:
    """SIGTERM to this process once RQ's handler is in place (it is installed at the start of `work()`, just after
    the worker logs that it is ready)."""
    deadline = time.monotonic() + WAIT
    while signal.getsignal(signal.SIGTERM) is _not_rq:
        assert time.monotonic() < deadline, "RQ never installed its SIGTERM handler"
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)


def in_background(steps: Callable[[], None]) -> Callable[[], None]:
    """Run `steps` in a thread that ends with SIGTERM (also when a step fails, so that the worker in the main
    thread stops either way); returns a check that re-raises a failed step's error."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            steps()
        except BaseException as exc:  # re-raised in the test's own thread
            errors.append(exc)
        finally:
            stop_worker()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def check() -> None:
        thread.join(WAIT)
        if errors:
            raise errors[0]

    return check


class HeldStop(threading.Event):
    """The worker's stop event (`WorkerContext.stop`), whose `wait(backoff)` is the loop's wait between tries:
    records each wait and, instead of sleeping, holds the loop at the waits numbered in `hold` (1-based) until the
    test releases them or a stop signal sets the event."""

    def __init__(self, *hold: int):
        super().__init__()
        self.waits: list[float] = []
        self.gates = {number: threading.Event() for number in hold}
        self.changed = threading.Condition()

    def wait(self, timeout: float | None = None) -> bool:
        with self.changed:
            self.waits.append(timeout)
            number = len(self.waits)
            self.changed.notify_all()
        gate = self.gates.get(number)
        deadline = time.monotonic() + WAIT
        while gate is not None and not gate.is_set() and not self.is_set():
            assert time.monotonic() < deadline, f"wait {number} was never released"
            gate.wait(0.01)  # short, so that a signal handler runs promptly in this (the main) thread
        return self.is_set()

    def wait_for_calls(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.waits) >= count, WAIT), f"waits so far: {self.waits}"

    def release(self, number: int) -> None:
        self.gates[number].set()


def photo(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = (np.random.default_rng(seed).random((12, 16, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).resize((160, 120)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pipeline(tiny_bundle) -> Pipeline:
    return Pipeline.from_dir(tiny_bundle, device="cpu", min_size=64, max_size=96)


def settings_for(url: str, **values: str) -> Settings:
    return load_settings({"REDIS_URL": url, "QUEUE_NAME": f"main-{uuid.uuid4().hex[:8]}", "WORKER_HEARTBEAT_TTL": "3",
                          **values})


READY = r"worker (\S+) ready on queue (\S+) \(device (\S+)\)"


# --- the pieces ------------------------------------------------------------------------------------------------

def test_metrics_stay_in_process_whichever_spelling_leaked_in(monkeypatch):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/tmp/web-tier")
    monkeypatch.setenv("prometheus_multiproc_dir", "/tmp/web-tier")
    monkeypatch.setenv("QUEUE_NAME", "kept")
    worker_main.keep_metrics_in_process()
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ and "prometheus_multiproc_dir" not in os.environ
    assert os.environ["QUEUE_NAME"] == "kept"
    worker_main.keep_metrics_in_process()  # nothing left to remove is fine


def test_the_worker_connection_waits_out_blocking_reads_and_keeps_alive(redis_url):
    settings = settings_for(redis_url, REDIS_TIMEOUT="2.5")
    connection = worker_main.worker_connection(settings)
    options = connection.connection_pool.connection_kwargs
    assert options["socket_connect_timeout"] == 2.5
    # to RQ a read timeout is an outage: it stays far above any command's time on a loaded server
    assert options["socket_timeout"] == 90
    assert options["socket_keepalive"] is True
    assert options["health_check_interval"] == 30
    assert (options["host"], options["port"]) == ("127.0.0.1", int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    assert connection.ping()


def test_the_context_without_cache_or_metrics_port(redis_url, pipeline, worker_log):
    settings = settings_for(redis_url, BATCH_MAX_JOBS="3", BATCH_MAX_WAIT_MS="25", FEATURE_CACHE_TTL="0")
    connection = Redis.from_url(redis_url)
    context = worker_main.build_context(settings, pipeline, connection)
    assert isinstance(context, WorkerContext) and isinstance(context.metrics, WorkerMetrics)
    assert context.settings is settings and context.connection is connection and context.pipeline is pipeline
    assert context.pipeline.cache is None and not context.stop.is_set()
    assert worker_log.messages == ["batching up to 3 jobs (wait 25 ms); feature cache off"]


def test_the_context_with_the_feature_cache_and_metrics_served(redis_url, pipeline, worker_log):
    import urllib.request

    port = free_port()
    settings = settings_for(redis_url, FEATURE_CACHE_TTL="120", FEATURE_CACHE_MAX_ENTRIES="7",
                            FEATURE_CACHE_MAX_BYTES="4096", WORKER_METRICS_PORT=str(port))
    connection = Redis.from_url(redis_url)
    context = worker_main.build_context(settings, pipeline, connection)
    cache = context.pipeline.cache
    assert context.pipeline is not pipeline and pipeline.cache is None  # a new pipeline; the shared one unchanged
    assert cache.connection is connection and cache.detector == detector_key(pipeline.extractor)
    assert (cache.ttl, cache.max_entries, cache.max_bytes) == (120, 7, 4096)
    cache.on_event("hit", 2)  # the cache reports to this worker's metrics
    assert context.metrics.registry.get_sample_value("vilbert_feature_cache_events_total", {"event": "hit"}) == 2
    assert worker_log.messages == [f"worker metrics on http://0.0.0.0:{port}/metrics",
                                   "batching up to 8 jobs (wait 2 ms); feature cache ttl 120 s"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as response:
        assert 'vilbert_feature_cache_events_total{event="hit"} 2.0' in response.read().decode()


def test_a_feature_cache_ttl_of_one_second_is_a_cache(redis_url, pipeline):
    settings = settings_for(redis_url, FEATURE_CACHE_TTL="1")
    context = worker_main.build_context(settings, pipeline, Redis.from_url(redis_url))
    assert context.pipeline.cache is not None and context.pipeline.cache.ttl == 1


# --- main() ----------------------------------------------------------------------------------------------------

def test_the_worker_logs_at_log_level_with_its_pid(monkeypatch, tmp_path):
    """main() sets up logging itself (a bare process has no handler); pytest's own handlers are set aside here,
    or logging.basicConfig would do nothing."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers = []
    root.setLevel(logging.DEBUG)
    try:
        monkeypatch.setenv("MODEL_DIR", str(tmp_path))
        monkeypatch.setenv("LOG_LEVEL", "error")
        assert worker_main.main() == 2  # after logging is set up: the bundle is missing
        [handler] = root.handlers
        assert root.level == logging.ERROR
        assert handler.formatter._fmt == "%(asctime)s worker[%(process)d] %(levelname)s %(message)s"
    finally:
        root.handlers = saved_handlers
        root.setLevel(saved_level)


def test_invalid_settings_end_the_worker_with_status_2_and_every_problem(monkeypatch, capsys):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/tmp/web-tier")
    monkeypatch.setenv("BATCH_MAX_JOBS", "0")
    monkeypatch.setenv("DEVICE", "tpu")
    assert worker_main.main() == 2
    error = capsys.readouterr().err
    assert error.startswith("worker: ") and "BATCH_MAX_JOBS='0'" in error and "DEVICE='tpu'" in error
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ  # removed before anything else


def test_a_folder_without_the_bundle_ends_the_worker_with_status_2_and_how_to_fetch_it(monkeypatch, tmp_path,
                                                                                       worker_log):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("LOG_LEVEL", "info")
    assert worker_main.main() == 2
    [message] = worker_log.messages
    assert message.startswith(f"the weights bundle in {tmp_path} lacks ") and "models/fetch.py" in message


def test_the_worker_serves_jobs_until_sigterm_then_retires(monkeypatch, tiny_bundle, redis_url, worker_log,
                                                          signals):
    queue = f"main-{uuid.uuid4().hex[:8]}"
    for name, value in {"REDIS_URL": redis_url, "MODEL_DIR": str(tiny_bundle), "DEVICE": "cpu", "QUEUE_NAME": queue,
                        "DETECTOR_MIN_SIZE": "64", "DETECTOR_MAX_SIZE": "96", "WORKER_HEARTBEAT_TTL": "3",
                        "LOG_LEVEL": "warning"}.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    connection = Redis.from_url(redis_url)
    seen: dict[str, object] = {}

    def steps() -> None:
        [ready] = worker_log.wait_for(READY)
        seen["name"] = re.fullmatch(READY, ready).group(1)
        seen["alive"] = connection.get(ALIVE_PREFIX + seen["name"])
        image = photo(1)
        request = JobRequest(text="a photo", tasks=["vqa"], images=[ImageInfo(160, 120, len(image), 160 * 120 * 3)])
        job = submit(connection, settings, request, [image])
        deadline = time.monotonic() + WAIT
        while (status := job_status(connection, settings, job.id))["status"] not in ("finished", "failed"):
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        seen["status"] = status
        # RQ's record of the worker (registered once work() starts, after the "ready" line; certainly by now):
        # under our name, its key kept for worker_ttl (60 s) + 60 s from its heartbeat after the job (during the
        # job RQ keeps it for the job's timeout), no scheduler
        deadline = time.monotonic() + WAIT
        while (ttl := connection.pttl(f"rq:worker:{seen['name']}")) > 120_000:
            assert time.monotonic() < deadline, f"RQ's worker key still kept for {ttl} ms"
            time.sleep(0.05)
        seen["ttl_ms"] = ttl
        seen["rq_workers"] = sorted(worker.name for worker in Worker.all(connection=connection))
        seen["schedulers"] = connection.keys("rq:scheduler*")
        seen["rq_level"] = logging.getLogger("rq.worker").level

    rq_log = logging.getLogger("rq.worker")
    rq_handlers, rq_level = rq_log.handlers[:], rq_log.level
    try:
        check = in_background(steps)
        assert worker_main.main() == 0
        check()
    finally:
        rq_log.handlers, _ = rq_handlers, rq_log.setLevel(rq_level)
    assert seen["rq_workers"] == [seen["name"]] and seen["schedulers"] == []
    assert 60_000 < seen["ttl_ms"] <= 120_000
    assert seen["rq_level"] == logging.WARNING  # RQ's own log follows LOG_LEVEL
    assert seen["status"]["status"] == "finished" and "vqa" in seen["status"]["result"]["tasks"]
    name = seen["name"]
    assert re.fullmatch(rf"[^.]+\.{os.getpid()}\.[0-9a-f]{{6}}", name)
    assert connection.get(ALIVE_PREFIX + name) is None  # retired at the stop
    alive = json.loads(seen["alive"])
    assert alive["host"] == socket.gethostname() and name.startswith(f"{socket.gethostname()}.")
    started = datetime.fromisoformat(alive["started_at"])
    assert started.tzinfo is not None and abs((datetime.now(timezone.utc) - started).total_seconds()) < 600
    assert alive["name"] == name and alive["queue"] == queue and alive["pid"] == os.getpid() and alive["tiny"]
    assert "notice" not in alive and alive["device"] == "cpu"
    assert worker_log.matching(r"serving a TINY RANDOM-WEIGHT bundle from .*") == [
        f"serving a TINY RANDOM-WEIGHT bundle from {tiny_bundle}: answers are meaningless"]
    assert worker_log.matching(READY) == [f"worker {name} ready on queue {queue} (device cpu)"]
    assert worker_log.messages[-1] == "worker stopped"


def test_the_loops_own_stop_handlers_set_the_stop_event_and_only_the_main_thread_sets_them(pipeline, signals,
                                                                                         worker_log):
    settings = settings_for(f"redis://127.0.0.1:{free_port()}/0")
    context = WorkerContext(settings, pipeline, WorkerMetrics(), Redis.from_url(settings.redis_url))
    elsewhere = threading.Thread(target=worker_main.stop_on_signal, args=(context,))
    elsewhere.start()
    elsewhere.join(WAIT)
    assert signal.getsignal(signal.SIGTERM) is _not_rq  # a thread may not set handlers: nothing changed, no error
    worker_main.stop_on_signal(context)
    handler = signal.getsignal(signal.SIGTERM)
    assert handler is signal.getsignal(signal.SIGINT) and handler is not _not_rq and not context.stop.is_set()
    handler(signal.SIGINT, None)
    assert context.stop.is_set()
    assert worker_log.messages == ["stop requested (SIGINT) while no RQ worker runs"]


# --- serve(): restarts and stops between workers ---------------------------------------------------------------

def refuse_blocking_pops(admin: Redis) -> None:
    """The server refuses RQ's blocking pop from now on (an ACL change), and the worker's pop in progress is
    woken as if it had timed out: its next pop fails, RQ's `work()` ends, and the loop starts a fresh worker."""
    admin.acl_setuser("default", enabled=True, nopass=True, commands=["-blmove", "-blpop"])
    for client in admin.client_list():
        if client["cmd"] in ("blmove", "blpop"):
            admin.client_unblock(int(client["id"]))


def test_a_worker_started_before_redis_backs_off_to_10_s_then_serves_and_restarts(pipeline, tmp_path, worker_log,
                                                                                  signals):
    """Redis down at the start: waits of 1, 2, 4, 8, 10, 10 s between tries; once it is up the worker is ready,
    and after each later failure the wait is 1 s again and the new worker has a new name. The stop signal comes
    in the last wait, where the handler in place is RQ's of a worker that has already returned."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    settings = settings_for(url)
    stop_event = HeldStop(6, 7, 8)
    context = WorkerContext(settings, pipeline, WorkerMetrics(), worker_main.worker_connection(settings),
                            stop=stop_event)
    server: dict[str, object] = {}
    refused = f"Error 111 connecting to 127.0.0.1:{port}. Connection refused."

    def steps() -> None:
        stop_event.wait_for_calls(6)  # held at the sixth wait
        server["process"] = start_redis(port, tmp_path, tmp_path / "redis.log")
        stop_event.release(6)
        worker_log.wait_for(READY)
        admin = Redis.from_url(url)
        refuse_blocking_pops(admin)
        stop_event.wait_for_calls(7)
        admin.acl_setuser("default", enabled=True, nopass=True, commands=["+blmove", "+blpop"])
        stop_event.release(7)
        worker_log.wait_for(READY, count=2)
        refuse_blocking_pops(admin)
        stop_event.wait_for_calls(8)  # then SIGTERM, to RQ's handler of the worker that ended

    check = in_background(steps)
    try:
        assert worker_main.serve(context) == 0
        check()
        names = [re.fullmatch(READY, line).group(1) for line in worker_log.matching(READY)]
        assert len(names) == len(set(names)) == 2
        assert not Redis.from_url(url).keys(ALIVE_PREFIX + "*")  # both retired
    finally:
        if "process" in server:
            stop(server["process"])
    assert stop_event.waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 1.0, 1.0]
    assert worker_log.matching(r"redis unavailable .*") == [
        f"redis unavailable ({refused}); retrying in {seconds} s" for seconds in (1, 2, 4, 8, 10, 10)]
    assert context.stop.is_set() and worker_log.messages[-1] == "worker stopped"


def test_a_stop_signal_while_redis_is_down_at_start_ends_the_worker_cleanly(pipeline, worker_log, signals):
    """No RQ worker has run yet, so no RQ handler is in place: the loop's own ends the wait and the worker. The
    models are not marked tiny here, as with released weights (no notice in the worker's info)."""
    settings = settings_for(f"redis://127.0.0.1:{free_port()}/0")
    stop_event = HeldStop(2)
    released = Pipeline(pipeline.extractor, pipeline.predictor)
    assert "notice" not in released.info
    context = WorkerContext(settings, released, WorkerMetrics(), worker_main.worker_connection(settings),
                            stop=stop_event)
    check = in_background(lambda: stop_event.wait_for_calls(2))  # then SIGTERM, in the second wait
    assert worker_main.serve(context) == 0
    check()
    handler = signal.getsignal(signal.SIGTERM)  # the loop's own, still in place: no RQ worker replaced it
    assert handler is signal.getsignal(signal.SIGINT) and handler is not _not_rq
    assert stop_event.waits == [1.0, 2.0] and not worker_log.matching(READY)
    assert worker_log.messages[-2:] == ["stop requested (SIGTERM) while no RQ worker runs", "worker stopped"]


# --- serve(): a stop signal at each point of the RQ worker's loop -----------------------------------------------

def queued_job(connection: Redis, settings: Settings, seed: int):
    image = photo(seed)
    request = JobRequest(text="a photo", tasks=["vqa"], images=[ImageInfo(160, 120, len(image), 160 * 120 * 3)])
    return submit(connection, settings, request, [image])


def test_a_stop_signal_just_after_a_pop_runs_the_popped_job_and_takes_no_other(redis_url, pipeline, worker_log,
                                                                              signals, monkeypatch, caplog):
    """SIGTERM between RQ's pop (the job moved into the intermediate queue) and the job's start, the window a
    scale-down hits now and then: the popped job runs and finishes, the intermediate queue is empty, the next job
    stays queued for another worker, and the worker ends. (RQ's own handler raised there, leaving the job in the
    intermediate queue until RQ failed it as stuck 10+ minutes later.) The signal is sent from reorder_queues,
    the first thing RQ does with a popped job: no outside timing lands it in that window every time."""
    from service.queue import get_queue, started_registry
    from service.worker.rq_batch import BatchWorker

    settings = settings_for(redis_url)
    connection = Redis.from_url(redis_url)
    first, second = queued_job(connection, settings, 3), queued_job(connection, settings, 4)
    intermediate = get_queue(connection, settings).intermediate_queue_key
    popped: list[list[bytes]] = []
    reorder = BatchWorker.reorder_queues

    def reorder_then_stop(self, reference_queue):
        if not popped:
            popped.append(connection.lrange(intermediate, 0, -1))
            os.kill(os.getpid(), signal.SIGTERM)
        return reorder(self, reference_queue)

    monkeypatch.setattr(BatchWorker, "reorder_queues", reorder_then_stop)
    context = WorkerContext(settings, pipeline, WorkerMetrics(), worker_main.worker_connection(settings))
    assert worker_main.serve(context) == 0
    assert popped == [[first.id.encode()]]  # the signal came with the first job popped and not yet started
    assert job_status(connection, settings, first.id)["status"] == "finished"
    assert job_status(connection, settings, second.id)["status"] == "queued"
    assert get_queue(connection, settings).job_ids == [second.id]
    assert connection.llen(intermediate) == 0 and started_registry(connection, settings).count == 0
    assert context.stop.is_set() and worker_log.messages[-1] == "worker stopped"
    [name] = [re.fullmatch(READY, line).group(1) for line in worker_log.matching(READY)]
    rq_lines = [record.getMessage() for record in caplog.records if record.name == "rq.worker"]
    assert f"Worker {name}: {settings.queue_name}: {first.id}" in rq_lines  # RQ's line for a popped job
    assert f"Worker {name} [PID {os.getpid()}]: warm shut down requested" in rq_lines


def run_with_signals_after_the_pop(redis_url, pipeline, monkeypatch, second: signal.Signals, after: float):
    """serve() with SIGTERM sent as the first job is popped and `second` `after` seconds later (RQ ignores a
    second signal within 1 s of the first, as a duplicate); returns (the job, settings, connection, the outcome:
    serve's return value or the exception it raised)."""
    from service.worker.rq_batch import BatchWorker

    settings = settings_for(redis_url)
    connection = Redis.from_url(redis_url)
    job = queued_job(connection, settings, 6)
    reorder = BatchWorker.reorder_queues
    sent: list[float] = []

    def reorder_then_stop_twice(self, reference_queue):
        if not sent:
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGTERM)
            while time.monotonic() - sent[0] < after:  # past RQ's duplicate window, or not
                time.sleep(0.01)
            os.kill(os.getpid(), second)
        return reorder(self, reference_queue)

    monkeypatch.setattr(BatchWorker, "reorder_queues", reorder_then_stop_twice)
    context = WorkerContext(settings, pipeline, WorkerMetrics(), worker_main.worker_connection(settings))
    try:
        outcome: object = worker_main.serve(context)
    except BaseException as exc:  # SystemExit: RQ's cold stop
        outcome = exc
    return job, settings, connection, outcome


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_stop_signal_after_a_second_is_rqs_cold_stop(redis_url, pipeline, worker_log, signals, monkeypatch,
                                                              caplog, second):
    job, settings, connection, outcome = run_with_signals_after_the_pop(redis_url, pipeline, monkeypatch, second,
                                                                        after=1.1)
    assert isinstance(outcome, SystemExit)  # immediate exit: the job it had popped is left to RQ's maintenance
    assert job_status(connection, settings, job.id)["status"] != "finished"
    assert any(record.name == "rq.worker" and record.getMessage().endswith(": cold shut down")
               for record in caplog.records)
    assert worker_log.messages[-1] == "worker stopped"  # the loop's own clean-up still ran
    assert not connection.keys(ALIVE_PREFIX + "*")


def test_a_second_stop_signal_within_a_second_is_taken_as_the_same_one(redis_url, pipeline, worker_log, signals,
                                                                       monkeypatch):
    job, settings, connection, outcome = run_with_signals_after_the_pop(redis_url, pipeline, monkeypatch,
                                                                        signal.SIGTERM, after=0)
    assert outcome == 0
    assert job_status(connection, settings, job.id)["status"] == "finished"


def channel_listeners() -> list[threading.Thread]:
    """RQ workers' threads listening on their Redis channels (redis-py's PubSubWorkerThread), still running."""
    from redis.client import PubSubWorkerThread

    return [thread for thread in threading.enumerate() if isinstance(thread, PubSubWorkerThread) and thread.is_alive()]


def wait_until_blocked_in_its_pop(admin: Redis) -> None:
    """Until the worker (the only client of this server besides `admin`) waits in RQ's blocking pop: idle."""
    deadline = time.monotonic() + WAIT
    while not any(client["cmd"] == "blmove" for client in admin.client_list()):
        assert time.monotonic() < deadline, "the worker never blocked in its pop"
        time.sleep(0.01)


class SignalOnReady(logging.Handler):
    """Sends this process SIGTERM from the worker's "ready" line: after the loop's own handler is in place and
    before the RQ worker installs its handlers."""

    def emit(self, record: logging.LogRecord) -> None:
        if re.fullmatch(READY, record.getMessage()):
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_stop_signal_before_the_rq_worker_sets_its_handlers_ends_it_before_any_job(redis_url, pipeline,
                                                                                   worker_log, signals):
    """The signal reaches the loop's own handler just before RQ's replaces it: the RQ worker, once started, stops
    at once instead of serving on with the stop forgotten (a guard thread signals again if it does not)."""
    settings = settings_for(redis_url)
    connection = Redis.from_url(redis_url)
    job = queued_job(connection, settings, 5)
    context = WorkerContext(settings, pipeline, WorkerMetrics(), worker_main.worker_connection(settings))
    returned = threading.Event()

    def guard() -> None:
        if not returned.wait(WAIT):
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=guard, daemon=True).start()
    logger = logging.getLogger("service.worker")
    trigger = SignalOnReady()
    logger.addHandler(trigger)
    try:
        started = time.monotonic()
        assert worker_main.serve(context) == 0
        took = time.monotonic() - started
    finally:
        returned.set()
        logger.removeHandler(trigger)
    assert took < WAIT, "the RQ worker served on after the stop signal"
    assert job_status(connection, settings, job.id)["status"] == "queued"  # left for another worker
    assert len(worker_log.matching(READY)) == 1
    assert "stop requested (SIGTERM) while no RQ worker runs" in worker_log.messages
    assert worker_log.messages[-1] == "worker stopped"


def test_a_stop_signal_to_an_idle_worker_ends_it_within_seconds(redis_url, pipeline, worker_log, signals):
    """Idle, the worker pops in waits of at most IDLE_POLL_S (1 s): a stop ends it well inside Kubernetes' 30 s
    grace period, not after RQ's 45 s blocking pop."""
    settings = settings_for(redis_url)
    context = WorkerContext(settings, pipeline, WorkerMetrics(), worker_main.worker_connection(settings))
    signalled: list[float] = []
    seen: dict[str, list] = {}

    def steps() -> None:
        worker_log.wait_for(READY)
        admin = Redis.from_url(redis_url)
        wait_until_blocked_in_its_pop(admin)
        seen["states"] = [worker.get_state() for worker in Worker.all(connection=admin)
                          if worker.name.split(".")[1] == str(os.getpid())]
        signalled.append(time.monotonic())

    check = in_background(steps)
    assert worker_main.serve(context) == 0
    ended = time.monotonic()
    check()
    assert ended - signalled[0] < 20
    assert seen["states"] == ["idle"]  # RQ's record of this worker while it waits
    assert worker_log.messages[-1] == "worker stopped"


def test_a_stop_signal_during_a_redis_outage_of_an_idle_worker_ends_its_waits(pipeline, tmp_path, worker_log,
                                                                              signals):
    """Redis goes away while the worker waits for jobs: it retries after 1, 2, 4 ... 60 s (RQ's schedule), each
    wait on the stop event (held here by the test), so SIGTERM in the seventh wait ends the worker at once (RQ
    slept those waits out)."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = start_redis(port, tmp_path, tmp_path / "redis.log")
    settings = settings_for(url)
    stop_event = HeldStop(*range(1, 8))
    context = WorkerContext(settings, pipeline, WorkerMetrics(), worker_main.worker_connection(settings),
                            stop=stop_event)

    def steps() -> None:
        worker_log.wait_for(READY)
        wait_until_blocked_in_its_pop(Redis.from_url(url))  # past RQ's start-up maintenance, idle
        stop(server)
        for number in range(1, 7):
            stop_event.wait_for_calls(number)
            stop_event.release(number)
        stop_event.wait_for_calls(7)  # then SIGTERM, in the seventh wait

    listeners_before = set(channel_listeners())
    check = in_background(steps)
    try:
        assert worker_main.serve(context) == 0
        check()
    finally:
        stop(server)
    # The RQ worker's channel listener ends too, although Redis was down when the worker deregistered.
    deadline = time.monotonic() + WAIT
    while set(channel_listeners()) - listeners_before:
        assert time.monotonic() < deadline, "the worker's channel listener is still running"
        time.sleep(0.05)
    assert stop_event.waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0]
    outage = worker_log.matching(r"worker \S+: redis unavailable while idle \(.*\); retrying in \d+ s")
    assert [line.rsplit(" ", 2)[1] for line in outage] == ["1", "2", "4", "8", "16", "32", "60"]
    assert worker_log.messages[-1] == "worker stopped"
