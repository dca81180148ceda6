"""gunicorn settings for `gunicorn app:app` (read from the working directory by default; serve.py and the
Dockerfile run gunicorn from the repository root). Command-line flags still override these.

Metrics under several gunicorn workers: prometheus_client's multiprocess mode needs PROMETHEUS_MULTIPROC_DIR set
before any worker imports it. If the operator did not set it, a fresh private directory is made here, in the
master, and removed at exit; an operator-given directory is emptied at start (stale files from an earlier run
would add old counts). A worker that exits has its live gauges dropped (mark_process_dead).
"""

import glob
import os
import shutil
import tempfile

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
