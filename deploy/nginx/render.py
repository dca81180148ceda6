#!/usr/bin/env python3
"""Fill in deploy/nginx/nginx.conf.template: the ${PROXY_*} placeholders, nothing else (nginx's own $variables
are left alone). The Docker image does the same with its envsubst entrypoint (docker-compose.yml).

    python deploy/nginx/render.py --upstream 127.0.0.1:5001 --listen 127.0.0.1:8080 --dir /tmp/nginx-run > nginx.conf
    nginx -e stderr -p /tmp/nginx-run -c "$PWD/nginx.conf" -g 'daemon off;'

--dir holds the pid file, the temporary files of buffered bodies and (unless --access-log) the access log.
--max-body defaults to $MAX_UPLOAD_BYTES, else the service's default (service/settings.py): keep it equal to the
service's limit, so that nginx's 413 and the service's agree.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
TEMPLATE = Path(__file__).resolve().parent / "nginx.conf.template"
PLACEHOLDERS = ("PROXY_LISTEN", "PROXY_UPSTREAM", "PROXY_PID", "PROXY_TEMP_DIR", "PROXY_ACCESS_LOG", "PROXY_MAX_BODY")
_PLACEHOLDER = re.compile(r"\$\{(PROXY_[A-Z_]+)\}")


def default_max_body() -> int:
    """$MAX_UPLOAD_BYTES if set, else the service's default limit."""
    sys.path.insert(0, str(ROOT))
    from service.settings import load_settings

    return load_settings({"MAX_UPLOAD_BYTES": os.environ.get("MAX_UPLOAD_BYTES", "")}).max_upload_bytes


def render(values: dict[str, str | int | Path], template: str | None = None) -> str:
    """The template with every ${PROXY_*} replaced; a missing or unknown name is a ValueError."""
    text = TEMPLATE.read_text() if template is None else template
    missing = sorted(set(PLACEHOLDERS) - set(values))
    unknown = sorted(set(values) - set(PLACEHOLDERS))
    if missing or unknown:
        raise ValueError(f"placeholders missing: {missing}, unknown: {unknown}")
    for name, value in values.items():
        if re.search(r"[\s;{}'\"$]", str(value)):
            raise ValueError(f"{name}={value!r}: no spaces, quotes, braces, ';' or '$'")
    return _PLACEHOLDER.sub(lambda match: str(values[match.group(1)]), text)


def values_for(upstream: str, listen: str, directory: Path, max_body: int | None = None,
               access_log: str | Path | None = None) -> dict[str, str | int | Path]:
    return {"PROXY_LISTEN": listen, "PROXY_UPSTREAM": upstream, "PROXY_PID": directory / "nginx.pid",
            "PROXY_TEMP_DIR": directory, "PROXY_ACCESS_LOG": access_log or directory / "access.log",
            "PROXY_MAX_BODY": default_max_body() if max_body is None else max_body}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="gunicorn's host:port")
    parser.add_argument("--listen", default="127.0.0.1:8080", help="[address:]port nginx listens on")
    parser.add_argument("--dir", type=Path, required=True, help="directory for the pid file, temp files and log")
    parser.add_argument("--max-body", type=int, help="largest body in bytes (default $MAX_UPLOAD_BYTES or 20 MiB)")
    parser.add_argument("--access-log", help="access log (default DIR/access.log)")
    args = parser.parse_args(argv)
    sys.stdout.write(render(values_for(args.upstream, args.listen, args.dir.resolve(), args.max_body, args.access_log)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
