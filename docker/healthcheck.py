#!/usr/bin/env python3
"""Container health check for the one image that runs both roles.

    python docker/healthcheck.py [web|worker]     (default: $SERVICE_ROLE, else web)

web:    GET http://127.0.0.1:$PORT/healthz answers 200 (liveness of the gunicorn workers).
worker: an RQ worker started in this container (same hostname) is registered in Redis. RQ drops a
        worker's key when its heartbeats stop, so a hung or dead worker turns the container unhealthy.

Exit 0 = healthy, 1 = unhealthy (Docker's convention); one line of reason on stderr.
"""
from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request


def check_web() -> str | None:
    url = f"http://127.0.0.1:{os.environ.get('PORT', '5000')}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:  # noqa: S310 - fixed loopback URL
            return None if response.status == 200 else f"{url} answered {response.status}"
    except (urllib.error.URLError, OSError) as exc:
        return f"{url}: {getattr(exc, 'reason', exc)}"


def check_worker() -> str | None:
    from redis import Redis
    from redis.exceptions import RedisError
    from rq import Worker

    url = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
    try:
        connection = Redis.from_url(url, socket_timeout=4, socket_connect_timeout=4)
        mine = [w for w in Worker.all(connection=connection) if w.hostname == socket.gethostname()]
    except RedisError as exc:
        return f"redis at {url}: {exc}"
    return None if mine else f"no RQ worker from host {socket.gethostname()} is registered"


def main(argv: list[str]) -> int:
    role = argv[1] if len(argv) > 1 else os.environ.get("SERVICE_ROLE", "web")
    checks = {"web": check_web, "worker": check_worker}
    if role not in checks:
        print(f"healthcheck: unknown role {role!r} (web|worker)", file=sys.stderr)
        return 1
    problem = checks[role]()
    if problem:
        print(f"healthcheck: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
