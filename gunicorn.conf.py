"""gunicorn settings for `gunicorn app:app` (read from the working directory by default; serve.py and the
Dockerfile run gunicorn from the repository root). Command-line flags still override these.

Metrics under several gunicorn workers: prometheus_client's multiprocess mode needs PROMETHEUS_MULTIPROC_DIR set
before any worker imports it. If the operator did not set it, a fresh private directory is made here, in the
master, and removed at exit; an operator-given directory is emptied at start (stale files from an earlier run
would add old counts). A worker that exits has its live gauges dropped (mark_process_dead).

Workers: gthread, WEB_THREADS threads each (default 32). A sync worker is one request at a time: two clients
that upload one byte every two seconds hold both default workers, and /healthz waits until gunicorn's 30 s worker
timeout kills one (docs/PERFORMANCE.md, "Slow clients"). A gthread worker reads each request in one of its
threads; a thread does block on a slow body, so the threads are sized well above the slow uploads one should
expect to reach gunicorn directly (20 slow uploads, all on one worker, still leave 12 threads free per worker).
Threads are cheap here: the web tier does no model work, a request is validation plus a few Redis calls.
Deployments put nginx in front (deploy/nginx/), which reads whole bodies before gunicorn sees them.
Note: gunicorn runs gthread whenever threads > 1, even with `--worker-class sync`; sync workers need
`--worker-class sync --threads 1` (and then answer gunicorn's own errors in HTML).
"""

import glob
import os
import shutil
import tempfile

# gthread, answering gunicorn's own errors (request line or headers too long, malformed HTTP) in the service's
# JSON error shape instead of HTML (service/web/gunicorn_worker.py).
worker_class = "service.web.gunicorn_worker.JSONErrorThreadWorker"
try:
    threads = int(os.environ.get("WEB_THREADS", "") or 32)
except ValueError:
    raise SystemExit(f"gunicorn.conf.py: WEB_THREADS={os.environ['WEB_THREADS']!r} must be an integer") from None
if not 1 <= threads <= 1024:
    raise SystemExit(f"gunicorn.conf.py: WEB_THREADS={threads} must be between 1 and 1024")

_made_dir = None
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _made_dir = tempfile.mkdtemp(prefix="vilbert-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _made_dir
else:
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    for stale in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
        os.remove(stale)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _made_dir:
        shutil.rmtree(_made_dir, ignore_errors=True)
