"""Helpers for running the stack's processes on one machine: free ports, a private redis-server, waiting.

Used by serve.py (the one-command local run) and by the end-to-end tests.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
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


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if not binary:
        raise LocalStackError(
            "redis-server was not found on PATH. Install it (Debian/Ubuntu: `sudo apt-get install redis-server`, "
            "macOS: `brew install redis`) or point REDIS_URL at a running Redis, e.g. "
            "REDIS_URL=redis://127.0.0.1:6379/0"
        )
    return binary


def start_redis(port: int, workdir: str | Path, log_file: str | Path | None = None) -> subprocess.Popen:
    """A private redis-server on 127.0.0.1:port that keeps nothing on disk (no RDB, no AOF)."""
    command = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(workdir), "--daemonize", "no", "--loglevel", "warning"]
    output = open(log_file, "ab") if log_file else subprocess.DEVNULL
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    if not wait_until(lambda: _redis_ping(port), timeout=10):
        process.kill()
        raise LocalStackError(f"redis-server did not answer on 127.0.0.1:{port} within 10 s")
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
