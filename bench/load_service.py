#!/usr/bin/env python3
"""Load, overhead, batching and fault drills of the whole service, over loopback only, bounded in count and time.

    python bench/load_service.py [--phases load,overhead,batching,full,faults] [--jobs 500] [--out results.json]

Each phase starts its own private stack: a redis-server on a free loopback port, `python worker.py`, gunicorn
serving `app:app` with 2 processes, on a tiny random-weight bundle (the `full` phase: the official-size ViLBERT
with random weights, feature width 2048). Clients are threads in this process: POST a job, poll it every few
ms until it ends.

- load: --jobs jobs (>= 500) at concurrency 32; errors, p50/p99 latency (submit -> finished, seen by the
  client), jobs/s, RSS of the web tier (gunicorn master + workers) and of the worker at start and end.
- overhead: the same requests alternately through HTTP + Redis + worker and through Pipeline.run in this
  process (same bundle, same settings, warm feature cache on both sides, one thread each); p50 difference.
- batching: jobs/s at concurrency 8 with BATCH_MAX_JOBS=8 against BATCH_MAX_JOBS=1 in the same run, with cached
  features (ViLBERT only) and with the detector (cache off, distinct images).
- full: the batching comparison with the full-size ViLBERT and cached features.
- faults: worker SIGKILL under load, Redis restart under load (append-only file on, as in production), and a
  burst over MAX_QUEUED_JOBS; every accepted job must end finished or failed with a reason.
Every number printed is also written to --out as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.bundle import write_tiny_bundle  # noqa: E402
from service.localstack import free_port, start_redis, stop, wait_until  # noqa: E402

TERMINAL = ("finished", "failed")
POLL = 0.005  # client poll interval of the overhead phase (seconds)


# ----------------------------------------------------------------------------------------------------- inputs


def photos(count: int, size: int = 192, seed: int = 0) -> list[bytes]:
    """Distinct JPEGs: scikit-image's sample photographs, cropped and flipped differently when more are needed."""
    from skimage import data

    sources = [getattr(data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")]
    rng = random.Random(seed)
    out = []
    for index in range(count):
        image = Image.fromarray(sources[index % len(sources)]).convert("RGB")
        if index >= len(sources):
            w, h = image.size
            left, top = rng.randint(0, w // 4), rng.randint(0, h // 4)
            image = image.crop((left, top, left + w * 3 // 4, top + h * 3 // 4))
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


QUESTIONS = ["what is in the picture?", "what color is it?", "is there a person?", "how many are there?",
             "what is on the table?", "is it outdoors?", "what is the animal doing?", "where is this?"]


def write_full_size_bundle(out: Path) -> Path:
    """The official-size ViLBERT (config/bert_base_6layer_6conect.json, feature width 2048) with random weights,
    written with the project's save_checkpoint, plus the tiny detector widened to 2048-d features so the
    bundle is consistent. Meaningless answers, real cost."""
    import torch

    from detector.config import load_config
    from detector.model import RegionDetector
    from vilbert.checkpoint import save_checkpoint
    from vilbert.configuration import ViLBertConfig
    from vilbert.modeling import ViLBertForVLTasks
    from vilbert.predictor import CHECKPOINT_FILE, CONFIG_FILE, PACKAGED_CONFIG

    write_tiny_bundle(out)
    yaml_path = out / "detectron_config.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("MLP_HEAD_DIM: 64", "MLP_HEAD_DIM: 2048"))
    torch.manual_seed(0)
    detector = RegionDetector(load_config(yaml_path))
    torch.save({"model": detector.state_dict(), "iteration": 0}, out / "detectron_model.pth")
    config = ViLBertConfig.from_json_file(PACKAGED_CONFIG)
    config.to_json_file(out / CONFIG_FILE)
    save_checkpoint(ViLBertForVLTasks(config), out / CHECKPOINT_FILE)
    return out


# ------------------------------------------------------------------------------------------------------ stack


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


class BenchStack:
    def __init__(self, root: Path, bundle: Path, persistent_redis: bool = False, **env: str):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.redis_port, self.web_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.web_port}"
        self.persistent = persistent_redis
        self.env = {
            **os.environ, "REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0", "MODEL_DIR": str(bundle),
            "QUEUE_NAME": f"bench-{uuid.uuid4().hex[:8]}", "DETECTOR_MIN_SIZE": "224", "DETECTOR_MAX_SIZE": "384",
            "WORKER_HEARTBEAT_TTL": "3", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "LOG_LEVEL": "warning",
            "MAX_QUEUED_JOBS": "5000", **env,
        }
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.redis = self.start_redis()
        self.worker = self.start_worker()
        self.web = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.web_port}", "--workers", "2",
             "--no-control-socket", "--log-level", "warning", "app:app"], cwd=ROOT, env=self.env,
            stdout=self.log("web"), stderr=subprocess.STDOUT)
        if not self.wait_ready(300):
            self.close()
            raise RuntimeError(f"stack not ready; see {root}")

    def log(self, name: str):
        return open(self.root / f"{name}.log", "ab")

    def start_redis(self) -> subprocess.Popen:
        # The one helper that starts servers (service/localstack.py); with the append-only file fsynced on every
        # write here, so that a restart under load loses nothing.
        return start_redis(self.redis_port, self.root, self.root / "redis.log", appendonly=self.persistent,
                           appendfsync="always")

    def start_worker(self, **env: str) -> subprocess.Popen:
        self.worker = subprocess.Popen([sys.executable, str(ROOT / "worker.py")], cwd=ROOT, env=dict(self.env, **env),
                                       stdout=self.log("worker"), stderr=subprocess.STDOUT)
        return self.worker

    def restart_worker(self, **env: str) -> None:
        stop(self.worker, 30)
        self.start_worker(**env)
        assert self.wait_ready(300, fresh=True), "worker did not come back"

    def wait_ready(self, timeout: float, fresh: bool = False) -> bool:
        def ready() -> bool:
            status, body = get(self.url + "/readyz")
            if status != 200:
                return False
            return not fresh or any(w.get("pid") == self.worker.pid for w in body.get("workers", []))
        return wait_until(ready, timeout, interval=0.2)

    def memory(self) -> dict:
        web = [self.web.pid] + children(self.web.pid)
        return {"web_rss_mb": round(sum(rss_mb(p) for p in web), 1), "worker_rss_mb": round(rss_mb(self.worker.pid), 1)}

    def close(self) -> None:
        for process in (self.web, self.worker, self.redis):
            if process is not None:
                stop(process, 30)


# ----------------------------------------------------------------------------------------------------- client


def request(method: str, url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 60):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read())
        except ValueError:
            body = {}
        return exc.code, body, dict(exc.headers)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return 0, {"error": {"code": "connection", "message": str(exc)}}, {}


def get(url: str):
    status, body, _ = request("GET", url)
    return status, body


def multipart(fields: dict, files: list[tuple[str, bytes]]) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, value in fields.items():
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, data in files:
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="f"\r\n'
                   f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def run_job(url: str, text: str, image: bytes, tasks: str, poll: float, deadline_s: float = 300) -> dict:
    """Submit and poll one job; retries the POST while the service says 503 (back-pressure, Redis down)."""
    body, headers = multipart({"text": text, "tasks": tasks}, [("image", image)])
    started = time.perf_counter()
    rejected = 0
    while True:
        status, answer, response_headers = request("POST", url + "/api/v1/jobs", body, headers)
        if status == 202:
            break
        if status in (429, 503, 0) and time.perf_counter() - started < deadline_s:
            rejected += 1
            time.sleep(float(response_headers.get("Retry-After", 1)) if status else 0.5)
            continue
        return {"status": "submit_error", "http": status, "error": answer.get("error"), "rejected": rejected}
    job_id = answer["id"]
    posted = time.perf_counter()
    while True:
        status, job = get(f"{url}/api/v1/jobs/{job_id}")
        if status == 200 and job["status"] in TERMINAL:
            return {"status": job["status"], "latency_s": time.perf_counter() - started, "id": job_id,
                    "post_s": posted - started, "enqueued_to_ended_s": _span(job, "enqueued_at", "ended_at"),
                    "error": job.get("error"), "rejected": rejected,
                    "batch_size": (job.get("result") or {}).get("batch_size"),
                    "cache": (job.get("result") or {}).get("cache")}
        if status == 404:
            return {"status": "lost", "id": job_id, "rejected": rejected}
        if time.perf_counter() - started > deadline_s:
            return {"status": "stuck", "id": job_id, "last": job, "rejected": rejected}
        time.sleep(poll)


def _span(job: dict, start: str, end: str) -> float | None:
    if not (job.get(start) and job.get(end)):
        return None
    parse = lambda value: datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()  # noqa: E731
    return parse(job[end]) - parse(job[start])


def drive(url: str, jobs: list[tuple[str, bytes, str]], concurrency: int, poll: float) -> dict:
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(lambda job: run_job(url, *job, poll=poll), jobs))
    wall = time.perf_counter() - started
    latencies = sorted(o["latency_s"] for o in outcomes if o["status"] == "finished")
    statuses: dict[str, int] = {}
    for o in outcomes:
        statuses[o["status"]] = statuses.get(o["status"], 0) + 1
    batches = [o["batch_size"] for o in outcomes if o.get("batch_size")]
    return {
        "jobs": len(jobs), "concurrency": concurrency, "statuses": statuses, "wall_s": round(wall, 2),
        "jobs_per_s": round(len(jobs) / wall, 2),
        "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1) if latencies else None,
        "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1) if latencies else None,
        "mean_batch": round(statistics.mean(batches), 2) if batches else None,
        "errors": [o for o in outcomes if o["status"] != "finished"][:5],
        "failure_reasons": sorted({(o.get("error") or {}).get("code", o["status"]) for o in outcomes
                                   if o["status"] != "finished"}),
        "outcomes": outcomes,
    }


def brief(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "outcomes"}


# ----------------------------------------------------------------------------------------------------- phases


def phase_load(work: Path, bundle: Path, jobs: int) -> dict:
    stack = BenchStack(work / "load", bundle)
    try:
        images = photos(8)
        # Warm the cache and the batch-of-8 buffers, so start/end memory compares steady states.
        drive(stack.url, [(QUESTIONS[i % 8], images[i % 8], "vqa,snli_ve,refcoco") for i in range(64)], 32, 0.02)
        memory_start = stack.memory()
        rng = random.Random(1)
        load = [(rng.choice(QUESTIONS), rng.choice(images), rng.choice(["vqa", "vqa,gqa", "vqa,snli_ve,refcoco"]))
                for _ in range(jobs)]
        # Memory sampled once a second during the run: stable = no growth from the middle to the end.
        samples, done = [], threading.Event()

        def sample() -> None:
            while not done.wait(1.0):
                samples.append(stack.memory())
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result = drive(stack.url, load, 32, 0.02)
        done.set()
        sampler.join()
        result.update(memory_start=memory_start, memory_middle=samples[len(samples) // 2] if samples else None,
                      memory_end=stack.memory(),
                      worker_rss_max_mb=max((m["worker_rss_mb"] for m in samples), default=None),
                      web_rss_max_mb=max((m["web_rss_mb"] for m in samples), default=None),
                      # the shape of the curve over the run: levelling off, or still climbing at the end
                      worker_rss_by_tenth_mb=[samples[len(samples) * k // 10]["worker_rss_mb"] for k in range(10)]
                      if len(samples) >= 10 else None)
        return brief(result)
    finally:
        stack.close()


def phase_overhead(work: Path, bundle: Path, count: int = 60) -> dict:
    import torch

    from redis import Redis

    from service.worker.cache import FeatureCache, detector_key
    from service.worker.pipeline import InferenceRequest, Pipeline
    from service.settings import load_settings

    stack = BenchStack(work / "overhead", bundle)
    try:
        torch.set_num_threads(1)  # as the worker (OMP_NUM_THREADS=1)
        settings = load_settings(stack.env)
        pipeline = Pipeline.from_settings(settings)
        pipeline.cache = FeatureCache(Redis.from_url(settings.redis_url), detector_key(pipeline.extractor))
        images = photos(4)
        for index, image in enumerate(images):  # warm both sides' cache and code paths
            run_job(stack.url, "warm up", image, "vqa", poll=0.005)
            pipeline.run(InferenceRequest([image], "warm up", ["vqa"]))
        in_process, over_http, server = [], [], []
        for index in range(count):
            image, text = images[index % len(images)], QUESTIONS[index % len(QUESTIONS)]
            started = time.perf_counter()
            pipeline.run(InferenceRequest([image], text, ["vqa"]))
            in_process.append(time.perf_counter() - started)
            outcome = run_job(stack.url, text, image, "vqa", poll=POLL)
            assert outcome["status"] == "finished", outcome
            over_http.append(outcome["latency_s"])
            # Server side, free of the client's polling delay: POST handling + enqueued -> ended.
            server.append(outcome["post_s"] + outcome["enqueued_to_ended_s"])
        p50_in, p50_http = float(np.median(in_process)) * 1000, float(np.median(over_http)) * 1000
        p50_server = float(np.median(server)) * 1000
        return {"requests": count, "in_process_p50_ms": round(p50_in, 1), "http_p50_ms": round(p50_http, 1),
                "overhead_p50_ms": round(p50_http - p50_in, 1), "server_side_p50_ms": round(p50_server, 1),
                "server_side_overhead_p50_ms": round(p50_server - p50_in, 1), "poll_interval_ms": POLL * 1000,
                "batch_max_wait_ms": settings.batch_max_wait_ms}
    finally:
        stack.close()


def compare_batching(stack: BenchStack, jobs: list, concurrency: int = 8, rounds: int = 2) -> dict:
    """Alternate BATCH_MAX_JOBS=1 and =8 (rounds times each) on the same stack; restart the worker between."""
    runs: dict[str, list] = {"1": [], "8": []}
    for _ in range(rounds):
        for size in ("1", "8"):
            stack.restart_worker(BATCH_MAX_JOBS=size)
            drive(stack.url, jobs[:concurrency], concurrency, 0.01)  # warm-up round
            runs[size].append(brief(drive(stack.url, jobs, concurrency, 0.01)))
    rate = {size: statistics.mean(r["jobs_per_s"] for r in results) for size, results in runs.items()}
    return {"batch_1_jobs_per_s": round(rate["1"], 2), "batch_8_jobs_per_s": round(rate["8"], 2),
            "speedup": round(rate["8"] / rate["1"], 2), "runs": runs}


def phase_batching(work: Path, bundle: Path, count: int = 48) -> dict:
    results = {}
    stack = BenchStack(work / "batching-cached", bundle)
    try:
        images = photos(4)
        jobs = [(QUESTIONS[i % len(QUESTIONS)], images[i % len(images)], "vqa") for i in range(count)]
        drive(stack.url, jobs[:4], 4, 0.01)  # fill the feature cache
        results["cached_features"] = compare_batching(stack, jobs)
    finally:
        stack.close()
    stack = BenchStack(work / "batching-detector", bundle, FEATURE_CACHE_TTL="0")
    try:
        images = photos(count)
        jobs = [(QUESTIONS[i % len(QUESTIONS)], images[i], "vqa") for i in range(count)]
        results["with_detector"] = compare_batching(stack, jobs, rounds=1)
    finally:
        stack.close()
    return results


def phase_full(work: Path, count: int = 32) -> dict:
    bundle = write_full_size_bundle(work / "full-bundle")
    stack = BenchStack(work / "full", bundle, OMP_NUM_THREADS="2", JOB_TIMEOUT="600")
    try:
        images = photos(4)
        jobs = [(QUESTIONS[i % len(QUESTIONS)], images[i % len(images)], "vqa") for i in range(count)]
        drive(stack.url, jobs[:4], 4, 0.05)
        return compare_batching(stack, jobs, rounds=1)
    finally:
        stack.close()


def _concurrently(action, delay: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay), action()), daemon=True)
    thread.start()
    return thread


def phase_faults(work: Path, bundle: Path, count: int = 80) -> dict:
    results = {}
    images = photos(6)
    jobs = [(QUESTIONS[i % len(QUESTIONS)], images[i % len(images)], "vqa,refcoco") for i in range(count)]

    stack = BenchStack(work / "fault-worker", bundle, FEATURE_CACHE_TTL="0")
    try:
        def kill_and_restart():
            stack.worker.send_signal(signal.SIGKILL)
            stack.worker.wait(10)
            stack.start_worker()
        thread = _concurrently(kill_and_restart, 3.0)
        results["worker_sigkill"] = brief(drive(stack.url, jobs, 8, 0.02))
        thread.join()
    finally:
        stack.close()

    stack = BenchStack(work / "fault-redis", bundle, persistent_redis=True, FEATURE_CACHE_TTL="0")
    try:
        def restart_redis():
            stop(stack.redis, 10)
            time.sleep(1.0)
            stack.redis = stack.start_redis()
        thread = _concurrently(restart_redis, 3.0)
        results["redis_restart"] = brief(drive(stack.url, jobs, 8, 0.02))
        thread.join()
    finally:
        stack.close()

    stack = BenchStack(work / "fault-burst", bundle, MAX_QUEUED_JOBS="16")
    try:
        burst = (jobs * 2)[:120]
        full = drive(stack.url, burst, 64, 0.02)
        result = brief(full)
        # Refused POSTs (503 queue_full + Retry-After) that the client retried after waiting.
        result["refused_posts_retried"] = sum(o.get("rejected", 0) for o in full["outcomes"])
        results["burst_over_queue_limit"] = result
        metrics_text = ""
        try:
            with urllib.request.urlopen(stack.url + "/metrics", timeout=10) as response:
                metrics_text = response.read().decode()
        except OSError:
            pass
        results["burst_over_queue_limit"]["queue_full_responses"] = sum(
            float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines()
            if line.startswith("vilbert_http_errors_total") and 'code="queue_full"' in line)
    finally:
        stack.close()
    return results


# ------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default="load,overhead,batching,full,faults")
    parser.add_argument("--jobs", type=int, default=500, help="jobs of the load phase (default 500)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="load-service-"))
    work.mkdir(parents=True, exist_ok=True)
    bundle = work / "bundle"
    if any(p != "full" for p in phases):
        write_tiny_bundle(bundle)
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor()
              or platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}
    for phase in phases:
        started = time.perf_counter()
        if phase == "load":
            report["load"] = phase_load(work, bundle, args.jobs)
        elif phase == "overhead":
            report["overhead"] = phase_overhead(work, bundle)
        elif phase == "batching":
            report["batching"] = phase_batching(work, bundle)
        elif phase == "full":
            report["full"] = phase_full(work)
        elif phase == "faults":
            report["faults"] = phase_faults(work, bundle)
        else:
            parser.error(f"unknown phase {phase}")
        print(f"== {phase} ({time.perf_counter() - started:.0f} s)\n{json.dumps(report[phase], indent=1)[:4000]}",
              flush=True)
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
