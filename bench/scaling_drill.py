#!/usr/bin/env python3
"""Queue-driven scaling drill: what KEDA does to the worker Deployment (deploy/k8s/base/scaledobject.yaml), with real
processes on one machine.

A private Redis (service/localstack.py), `python worker.py` processes on a tiny random-weight bundle
(`python models/make_tiny.py`), jobs submitted with service.web.jobs.submit (what POST /api/v1/jobs does after
validation). A controller polls LLEN rq:queue:<QUEUE_NAME> (the list KEDA's redis scaler reads) and sets the number of
workers to KEDA's/the HPA's

    desired = clamp(ceil(listLength / target), min, max)

scaling up at once and down only to the highest desired count of the last `window` seconds (the HPA's scale-down
stabilisation window, 300 s in the manifests, shortened here). Scale-down sends SIGTERM to the newest worker, as
Kubernetes does to a pod: the worker finishes its running batch and exits (service/worker/main.py).

Checks: every job ends `finished` with exactly one result (none lost, none run twice), none failed, the queue and
the started registry are empty at the end, every stopped worker exited 0.

    python bench/scaling_drill.py                       # the KEDA loop, then fixed worker counts 1 2 3
    python bench/scaling_drill.py --jobs 200 --fixed 1 2 --no-keda --json out.json

Timings on a shared machine move with its load: compare drain times within one run.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.localstack import free_port, start_redis, stop, wait_until  # noqa: E402
from service.settings import Settings, load_settings  # noqa: E402


def keda_desired(list_length: int, target: int, minimum: int, maximum: int) -> int:
    """Replicas KEDA's redis scaler (metric type AverageValue) makes the HPA ask for."""
    return max(minimum, min(maximum, math.ceil(list_length / target)))


def photo(size: int = 192) -> bytes:
    from PIL import Image

    image = Image.open(ROOT / "samples" / "astronaut.jpg").convert("RGB")
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


@dataclass
class Worker:
    process: subprocess.Popen
    started: float
    stopping_since: float | None = None
    ready_at_sigterm: bool = False  # registered with its models loaded when it got SIGTERM


@dataclass
class Outcome:
    workers: str  # "keda" or the fixed count
    jobs: int
    drain_s: float  # first submission -> last job finished
    statuses: dict
    max_workers: int
    scale_ups: int = 0
    scale_downs: int = 0
    busy_at_sigterm: int = 0  # workers that had a job running when they got SIGTERM
    timeline: list = field(default_factory=list)  # (t, queue length, desired, workers)
    exit_codes: list = field(default_factory=list)  # (exit code, was ready at SIGTERM) of each stopped worker
    per_worker: dict = field(default_factory=dict)  # worker name -> jobs finished


class Drill:
    def __init__(self, root: Path, batch_max_jobs: int = 4, detector_size: int = 800, photo_size: int = 1024,
                 log=print):
        self.root = root
        self.log = log
        self.bundle = root / "bundle"
        subprocess.run([sys.executable, str(ROOT / "models" / "make_tiny.py"), "--out", str(self.bundle)], check=True,
                       capture_output=True, cwd=ROOT)
        self.port = free_port()
        self.redis = start_redis(self.port, root, root / "redis.log")
        self.env = dict(
            os.environ, REDIS_URL=f"redis://127.0.0.1:{self.port}/0", MODEL_DIR=str(self.bundle),
            QUEUE_NAME=f"drill-{uuid.uuid4().hex[:8]}", DETECTOR_MIN_SIZE=str(detector_size),
            DETECTOR_MAX_SIZE=str(max(detector_size, 1000)),
            JOB_TIMEOUT="120", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", DEVICE="cpu",
            # Every job runs the detector: with the cache, repeats of the one photo would cost ~nothing.
            FEATURE_CACHE_TTL="0", BATCH_MAX_JOBS=str(batch_max_jobs), BATCH_MAX_WAIT_MS="2",
        )
        for name in ("WORKER_METRICS_PORT", "PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"):
            self.env.pop(name, None)
        self.settings: Settings = load_settings(self.env)
        from service.queue import connect

        self.connection = connect(self.settings)
        self.list_key = f"rq:queue:{self.settings.queue_name}"  # what the ScaledObject's listName names
        self.workers: list[Worker] = []
        self.stopping: list[Worker] = []
        self.image = photo(photo_size)
        from service.web.inputs import parse_submission
        from vilbert.tasks import TaskRegistry

        self.request = parse_submission({"text": "what is this?", "tasks": "vqa"}, [self.image], self.settings,
                                        TaskRegistry.from_file())

    # ---- workers
    def start_worker(self) -> None:
        log = open(self.root / "workers.log", "ab")
        process = subprocess.Popen([sys.executable, str(ROOT / "worker.py")], cwd=ROOT, env=self.env, stdout=log,
                                   stderr=subprocess.STDOUT)
        self.workers.append(Worker(process, time.monotonic()))

    def sigterm_newest(self) -> bool:
        """SIGTERM, as the kubelet does on scale-down; True when that worker was running a job."""
        worker = self.workers.pop()
        busy = self.busy(worker)
        worker.ready_at_sigterm = worker.process.pid in self.ready_pids()
        worker.process.send_signal(signal.SIGTERM)
        worker.stopping_since = time.monotonic()
        self.stopping.append(worker)
        return busy

    def busy(self, worker: Worker) -> bool:
        from rq import Worker as RQWorker

        for rq_worker in RQWorker.all(connection=self.connection):
            if rq_worker.name.rsplit(".", 2)[1:2] == [str(worker.process.pid)] and rq_worker.get_current_job_id():
                return True
        return False

    def ready_pids(self) -> set[int]:
        from service.queue import live_workers

        return {info.get("pid") for info in live_workers(self.connection)}

    def live(self) -> int:
        return len(self.ready_pids() & {w.process.pid for w in self.workers})

    def reap(self) -> list[tuple[int, bool]]:
        """(exit code, was ready) of the stopped workers that have exited. A ready worker must exit 0 (warm
        shutdown); one still loading its models dies of the signal (-15), as a pod killed during start-up."""
        codes = [(w.process.returncode, w.ready_at_sigterm) for w in self.stopping if w.process.poll() is not None]
        self.stopping = [w for w in self.stopping if w.process.poll() is None]
        return codes

    def scale_to(self, count: int, timeout: float = 120) -> None:
        while len(self.workers) < count:
            self.start_worker()
        while len(self.workers) > count:
            self.sigterm_newest()
        assert wait_until(lambda: self.live() >= count, timeout, 0.2), "workers did not become ready"

    # ---- jobs
    def submit(self, count: int) -> list[str]:
        from service.web.jobs import submit

        return [submit(self.connection, self.settings, self.request, [self.image]).id for _ in range(count)]

    def statuses(self, ids: list[str]) -> dict[str, str]:
        from rq.job import Job
        from rq.serializers import JSONSerializer

        jobs = Job.fetch_many(ids, connection=self.connection, serializer=JSONSerializer)
        return {job_id: (job.get_status(refresh=False).value if job else "missing") for job_id, job in zip(ids, jobs)}

    def where(self, ids: list[str]) -> str:
        """Where the jobs are, in one line: for a drill that did not drain."""
        from collections import Counter

        from service.queue import get_queue, started_registry

        queue = get_queue(self.connection, self.settings)
        return (f"statuses {dict(Counter(self.statuses(ids).values()))}, {queue.count} queued, "
                f"{self.connection.llen(queue.intermediate_queue_key)} in the intermediate queue, "
                f"{started_registry(self.connection, self.settings).count} started, {len(self.workers)} workers, "
                f"{len(self.stopping)} stopping")

    def ended(self) -> int:
        """Jobs finished or failed so far (two registry counts: cheap enough to poll)."""
        from service.queue import get_queue

        queue = get_queue(self.connection, self.settings)
        return queue.finished_job_registry.count + queue.failed_job_registry.count

    def verify(self, ids: list[str]) -> tuple[dict, dict]:
        """Every job finished exactly once; returns the status counts and jobs per worker name."""
        from rq.job import Job
        from rq.serializers import JSONSerializer

        from service.queue import get_queue, started_registry

        counts: dict[str, int] = {}
        per_worker: dict[str, int] = {}
        for job_id in ids:
            job = Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
            status = job.get_status().value
            counts[status] = counts.get(status, 0) + 1
            results = job.results()
            assert len(results) == 1, f"job {job_id} has {len(results)} results"
            assert status == "finished", f"job {job_id} ended {status}: {job.meta}"
            per_worker[job.worker_name] = per_worker.get(job.worker_name, 0) + 1
        assert self.connection.llen(self.list_key) == 0 and get_queue(self.connection, self.settings).count == 0
        assert started_registry(self.connection, self.settings).count == 0
        return counts, per_worker

    # ---- the drills
    def run_fixed(self, workers: int, jobs: int, timeout: float = 300) -> Outcome:
        self.scale_to(workers)
        ended_before = self.ended()
        begun = time.monotonic()
        ids = self.submit(jobs)
        assert wait_until(lambda: self.ended() >= ended_before + jobs, timeout, 0.05), self.where(ids)
        drain = time.monotonic() - begun
        counts, per_worker = self.verify(ids)
        self.log(f"fixed {workers} worker(s): {jobs} jobs drained in {drain:.1f} s ({jobs / drain:.1f} jobs/s)")
        return Outcome(str(workers), jobs, drain, counts, workers, per_worker=per_worker)

    def run_keda(self, jobs: int, target: int, minimum: int, maximum: int, window: float = 2.0,
                 poll: float = 0.25, timeout: float = 300) -> Outcome:
        """The ScaledObject's loop over a burst of `jobs`: scale up on the queue, then back down to `minimum`."""
        self.scale_to(minimum)
        outcome = Outcome("keda", jobs, 0.0, {}, minimum)
        history: list[tuple[float, int]] = []
        ended_before = self.ended()
        begun = time.monotonic()
        ids = self.submit(jobs)
        deadline = begun + timeout
        finished_at = None
        while time.monotonic() < deadline:
            now = time.monotonic()
            length = self.connection.llen(self.list_key)
            desired = keda_desired(length, target, minimum, maximum)
            history = [(t, d) for t, d in history if now - t <= window] + [(now, desired)]
            # Up at once; down only to the highest recommendation within the stabilisation window.
            goal = desired if desired > len(self.workers) else max(d for _, d in history)
            if goal > len(self.workers):
                outcome.scale_ups += goal - len(self.workers)
                while len(self.workers) < goal:
                    self.start_worker()
            while goal < len(self.workers):
                outcome.scale_downs += 1
                outcome.busy_at_sigterm += self.sigterm_newest()
            outcome.exit_codes += self.reap()
            outcome.max_workers = max(outcome.max_workers, len(self.workers))
            outcome.timeline.append((round(now - begun, 2), length, desired, len(self.workers)))
            if finished_at is None and self.ended() >= ended_before + jobs:
                finished_at = now
            if finished_at is not None and len(self.workers) == minimum and not self.stopping:
                break
            time.sleep(poll)
        assert finished_at is not None, f"not drained within {timeout} s: {self.where(ids)}; {outcome.timeline[-4:]}"
        assert not self.stopping, "a stopped worker did not exit"
        outcome.drain_s = finished_at - begun
        outcome.statuses, outcome.per_worker = self.verify(ids)
        self.log(f"keda target {target}, replicas [{minimum}, {maximum}]: {jobs} jobs drained in "
                 f"{outcome.drain_s:.1f} s, up to {outcome.max_workers} workers, {outcome.scale_ups} started, "
                 f"{outcome.scale_downs} stopped ({outcome.busy_at_sigterm} mid-job), exit codes {outcome.exit_codes}")
        return outcome

    def run_sigterm_mid_batch(self, jobs: int, workers: int = 2, timeout: float = 120) -> dict:
        """Scale-down of a busy worker: SIGTERM a worker the moment RQ shows it running a job; it must finish that
        job (its batch) itself, exit 0, and the others take the rest."""
        from rq import Worker as RQWorker

        self.scale_to(workers)
        ids = self.submit(jobs)
        found: list[tuple[Worker, str, str]] = []

        def busy_worker() -> bool:
            pids = {w.process.pid: w for w in self.workers}
            for rq_worker in RQWorker.all(connection=self.connection):
                job_id = rq_worker.get_current_job_id()
                pid = int(rq_worker.name.rsplit(".", 2)[1])
                if job_id and pid in pids:
                    pids[pid].process.send_signal(signal.SIGTERM)
                    found.append((pids[pid], job_id, rq_worker.name))
                    return True
            return False

        assert wait_until(busy_worker, 30, 0.01), "no worker was seen running a job"
        worker, job_id, name = found[0]
        self.workers.remove(worker)
        assert wait_until(lambda: worker.process.poll() is not None, timeout, 0.05), "the worker did not exit"
        assert worker.process.returncode == 0, f"exit code {worker.process.returncode}"
        assert wait_until(lambda: set(self.statuses(ids).values()) <= {"finished", "failed"}, timeout, 0.05)
        counts, per_worker = self.verify(ids)
        from rq.job import Job
        from rq.serializers import JSONSerializer

        job = Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
        assert job.get_status().value == "finished" and job.worker_name == name, (job.get_status(), job.worker_name)
        self.log(f"SIGTERM mid-job: worker {name} finished job {job_id} and exited 0; {counts}, per worker "
                 f"{per_worker}")
        return {"statuses": counts, "per_worker": per_worker, "stopped": name}

    def close(self) -> None:
        for worker in self.workers + self.stopping:
            stop(worker.process, timeout=30)
        self.workers, self.stopping = [], []
        self.connection.close()
        stop(self.redis)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--target", type=int, default=50, help="the ScaledObject's listLength")
    parser.add_argument("--min", type=int, default=1)
    parser.add_argument("--max", type=int, default=3)
    parser.add_argument("--window", type=float, default=2.0, help="scale-down stabilisation window, seconds")
    parser.add_argument("--batch", type=int, default=4, help="BATCH_MAX_JOBS")
    parser.add_argument("--detector-size", type=int, default=800, help="DETECTOR_MIN_SIZE of the workers")
    parser.add_argument("--photo-size", type=int, default=1024, help="longer side of the submitted photo")
    parser.add_argument("--fixed", type=int, nargs="*", default=[1, 2, 3], help="fixed worker counts to time")
    parser.add_argument("--no-keda", action="store_true")
    parser.add_argument("--json", type=Path, help="write the outcomes here")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="vilbert-drill-"))
    drill = Drill(root, batch_max_jobs=args.batch, detector_size=args.detector_size, photo_size=args.photo_size)
    outcomes = []
    try:
        if not args.no_keda:
            outcomes.append(drill.run_keda(args.jobs, args.target, args.min, args.max, args.window))
        for count in args.fixed:
            outcomes.append(drill.run_fixed(count, args.jobs))
    finally:
        drill.close()
    print(f"{'workers':>8} {'jobs':>5} {'drain s':>8} {'jobs/s':>7}")
    for o in outcomes:
        print(f"{o.workers:>8} {o.jobs:>5} {o.drain_s:>8.1f} {o.jobs / o.drain_s:>7.2f}")
    if args.json:
        args.json.write_text(json.dumps([o.__dict__ for o in outcomes], indent=1))
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
