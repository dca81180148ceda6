#!/usr/bin/env python3
"""The API. Two ways to run it, both gunicorn (never Flask's debug server), both reading gunicorn.conf.py:

    python app.py [--host 127.0.0.1] [--port 5000] [--workers 2]     # the classic way; prints where it listens
    gunicorn app:app                                                 # make serve, the Dockerfile, the tests

`--host`, `--port` and `--workers` default to $HOST, $PORT and $WEB_CONCURRENCY (127.0.0.1, 5000, 2). The other
settings come from the environment (service/settings.py); a model worker (`python worker.py`) must use the same
REDIS_URL for jobs to run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

ROOT = Path(__file__).resolve().parent
GUNICORN_CONFIG = ROOT / "gunicorn.conf.py"


def load_app() -> Flask:
    """Build the Flask app. Imported here, not at the top: under `python app.py` gunicorn.conf.py must set
    PROMETHEUS_MULTIPROC_DIR (in the master, before the workers fork) before anything imports prometheus_client."""
    from service.web import create_app
    from service.settings import SettingsError

    try:
        return create_app()
    except SettingsError as exc:  # one line per bad variable, not a traceback
        print(f"app: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def parse_args(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> argparse.Namespace:
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # String defaults go through `type` too, so a bad PORT= is an argparse error, not a traceback.
    parser.add_argument("--host", default=environ.get("HOST", "127.0.0.1"),
                        help="address to bind (default $HOST, else 127.0.0.1; now %(default)s)")
    parser.add_argument("--port", type=int, default=environ.get("PORT", "5000"), help="port (default $PORT, else 5000; now %(default)s)")
    parser.add_argument("--workers", type=int, default=environ.get("WEB_CONCURRENCY", "2"),
                        help="gunicorn worker processes (default $WEB_CONCURRENCY, else 2; now %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from gunicorn.app.base import Application

    from service.settings import SettingsError, load_settings

    class Server(Application):
        """gunicorn's own Application, fed gunicorn.conf.py and our flags instead of gunicorn's command line."""

        def load_config(self) -> None:
            self.load_config_from_file(str(GUNICORN_CONFIG))  # sets PROMETHEUS_MULTIPROC_DIR; see load_app
            hook = self.cfg.when_ready

            def when_ready(server) -> None:
                hook(server)
                where = ", ".join(str(listener) for listener in server.LISTENERS)
                workers = f"{self.cfg.workers} worker{'s' if self.cfg.workers != 1 else ''}"
                if self.cfg.threads > 1:
                    workers += f" x {self.cfg.threads} threads"
                print(f"app: serving the API on {where} (gunicorn, {workers}); Ctrl+C stops it", flush=True)

            for name, value in {
                "bind": [f"{args.host}:{args.port}"], "workers": args.workers, "accesslog": "-",
                # gunicorn's control socket has one path per user ($HOME/.gunicorn/gunicorn.ctl): a second
                # `python app.py` (or serve.py's gunicorn) would take it over.
                "control_socket_disable": True, "when_ready": when_ready,
            }.items():
                self.cfg.set(name, value)

        def load(self) -> Flask:
            return load_app()

    try:  # every bad variable reported once, here, not by each gunicorn worker failing to boot
        load_settings()
    except SettingsError as exc:
        print(f"app: {exc}", file=sys.stderr)
        return 2
    Server().run()  # returns only through SystemExit: gunicorn's exit code
    return 0


if __name__ == "__main__":
    sys.exit(main())
else:  # `gunicorn app:app`
    app = load_app()
