#!/usr/bin/env python3
"""/healthz latency while slow clients upload (issue 13), over loopback, three configurations of the web tier:

    python bench/slow_clients.py [--clients 20] [--seconds 20] [--probe-timeout 60] [--configs sync,gthread,nginx]

- sync: gunicorn with sync workers (`--worker-class sync --threads 1`, the configuration before gthread), 2 workers;
- gthread: gunicorn as make serve runs it now (gunicorn.conf.py: gthread, WEB_THREADS threads, 2 workers);
- nginx: the same gunicorn behind a private nginx started from deploy/nginx/nginx.conf.template.

Each starts the test stack (tests/stack.py: a private Redis, `python worker.py` on the tiny bundle, gunicorn),
measures /healthz 10 times unloaded, then opens --clients connections that POST a multipart job body one byte a
second (never finishing: Content-Length 100 000), waits until each has sent 2 bytes of body, and for --seconds
sends GET /healthz on a new connection every 0.5 s, one at a time, each bounded by --probe-timeout (a probe that
times out counts as that many seconds and is reported). Prints median and max per configuration and, with --out,
writes every latency as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from stack import Nginx, SlowUploads, Stack, find_nginx, healthz_latency  # noqa: E402

CONFIGS = ("sync", "gthread", "nginx")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe(port: int, timeout: float) -> tuple[float, bool]:
    """(seconds, timed out?) for one /healthz."""
    begun = time.monotonic()
    try:
        return healthz_latency(port, timeout=timeout), False
    except (socket.timeout, TimeoutError):
        return time.monotonic() - begun, True


def measure(port: int, clients: int, seconds: float, probe_timeout: float) -> dict:
    idle = [probe(port, probe_timeout)[0] for _ in range(10)]
    uploads = SlowUploads(port, count=clients, interval=1.0)
    latencies, timeouts = [], 0
    try:
        if not uploads.wait_rounds(2, timeout=30):
            raise RuntimeError("the slow uploads did not start")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            latency, timed_out = probe(port, probe_timeout)
            latencies.append(latency)
            timeouts += timed_out
            time.sleep(0.5)  # pacing of the probes, not a wait for a condition
        answered = uploads.answered()
    finally:
        uploads.close()
    return {"idle_median_ms": statistics.median(idle) * 1000, "median_ms": statistics.median(latencies) * 1000,
            "max_ms": max(latencies) * 1000, "probes": len(latencies), "timeouts": timeouts,
            "slow_uploads_answered_or_closed": answered, "latencies_ms": [x * 1000 for x in latencies]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long /healthz is probed per configuration")
    parser.add_argument("--probe-timeout", type=float, default=60.0)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl+C, so that the stacks' processes are stopped by the `finally` below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configurations: {', '.join(sorted(unknown))}")
    nginx_binary = find_nginx()
    if "nginx" in configs and nginx_binary is None:
        parser.error("no nginx binary (install Debian's nginx or set NGINX_PATH), or leave out the nginx config")

    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(), "cpus": os.cpu_count(),
               "clients": args.clients, "seconds": args.seconds, "probe_timeout": args.probe_timeout, "configs": {}}
    print(f"{results['date']}, {results['cpu']}, {results['cpus']} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; {args.clients} slow uploads, /healthz probed for {args.seconds:.0f} s",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="slow-clients-") as scratch:
        stacks: dict[str, Stack] = {}
        try:
            for config in configs:
                kind = "sync" if config == "sync" else "gthread"
                if kind not in stacks:
                    # gunicorn turns sync into gthread when threads > 1, so the threads go back to 1 as well
                    args_ = ("--worker-class", "sync", "--threads", "1") if kind == "sync" else ()
                    stacks[kind] = Stack(Path(scratch) / kind, gunicorn_args=args_)
                stack = stacks[kind]
                nginx = Nginx(nginx_binary, stack.web_port, stack.root) if config == "nginx" else None
                try:
                    port = nginx.port if nginx else stack.web_port
                    result = measure(port, args.clients, args.seconds, args.probe_timeout)
                finally:
                    if nginx:
                        nginx.close()
                result["load_average"] = os.getloadavg()[0]
                results["configs"][config] = result
                print(f"{config:8s} /healthz unloaded median {result['idle_median_ms']:.1f} ms; with "
                      f"{args.clients} slow uploads: median {result['median_ms']:.1f} ms, "
                      f"max {result['max_ms']:.1f} ms "
                      f"over {result['probes']} probes ({result['timeouts']} timed out at {args.probe_timeout:.0f} s); "
                      f"slow uploads answered or closed by the server: {result['slow_uploads_answered_or_closed']}",
                      flush=True)
                if kind == "sync" and "sync" in stacks:  # done with it: its workers may still be stuck
                    stacks.pop("sync").close()
        finally:
            for stack in stacks.values():
                stack.close()
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
