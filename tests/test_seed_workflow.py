"""The seed's workflow, word for word, as its README gave it: `python worker.py`, `python app.py`, the curl line
`curl --form "fileupload=@img.jpg" --form text_input="a caption" http://127.0.0.1:5000/`, then `python demo.py`.

Real processes (tests/stack.py): a private server, `python worker.py` on the tiny bundle, and `python app.py
--port N` instead of `gunicorn app:app`. Only the port differs from the seed's lines (5000 may be taken here)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stack import Stack

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "samples" / "astronaut.jpg"
DEFAULT_TASKS = {"vqa", "gqa", "snli_ve", "refcoco", "retrieval_coco"}


@pytest.fixture(scope="module")
def classic(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("classic"), web="app.py")
    yield stack
    stack.close()


@pytest.mark.slow
def test_app_py_serves_with_gunicorn_and_says_where(classic):
    log = (classic.root / "web.log").read_text()  # all of it: the access lines of the readiness polls come after
    assert f"app: serving the API on http://127.0.0.1:{classic.web_port} (gunicorn, 2 workers x 32 threads)" in log, log
    status, index, headers = classic.request("GET", "/", headers={"Accept": "application/json"})
    assert status == 200 and index["submit"] == "/api/v1/jobs"
    # Flask's debug server answers as "Werkzeug/x Python/y" and warns "This is a development server" in its log.
    assert headers["Server"].startswith("gunicorn"), headers
    assert "Werkzeug" not in log and "development server" not in log, log


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="the curl binary is not installed")
def test_the_seed_curl_line(classic, tmp_path):
    (tmp_path / "img.jpg").write_bytes(SAMPLE.read_bytes())
    line = ["curl", "--silent", "--form", "fileupload=@img.jpg", "--form", "text_input=a caption", classic.url + "/"]
    accepted = json.loads(subprocess.run(line, cwd=tmp_path, capture_output=True, text=True, check=True).stdout)
    job = classic.wait(accepted["id"])
    assert job["status"] == "finished", job
    assert set(job["result"]["tasks"]) == DEFAULT_TASKS and job["result"]["text"] == "a caption"
    assert job["result"]["images"][0]["width"] == 512  # the sample photo, not some other image


@pytest.mark.slow
def test_demo_with_no_arguments_on_a_bare_python(classic, tmp_path):
    # -I -S: no site-packages (not even the venv's), no PYTHON* variables, no script directory on sys.path: the
    # standard library alone. Run from elsewhere, so the sample is found next to demo.py, not in the working directory.
    bare = [sys.executable, "-I", "-S"]
    assert subprocess.run([*bare, "-c", "import PIL"], capture_output=True).returncode != 0
    assert subprocess.run([*bare, "-c", "import skimage"], capture_output=True).returncode != 0
    env = {"PATH": "/usr/bin:/bin", "VILBERT_URL": classic.url}  # the only way to point it elsewhere without arguments
    demo = subprocess.run([*bare, str(ROOT / "demo.py")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    out = demo.stdout
    assert "submitting 1 image(s) [samples/astronaut.jpg (sample)]" in out and ": finished" in out, out
    assert "TINY RANDOM-WEIGHT MODEL" in out and "images: 512x512" in out, out
    for task in DEFAULT_TASKS:
        assert f"\n{task}\n" in out, out
    # Only --draw needs Pillow: refused up front, before a job is submitted, not with a traceback after it ran.
    draw = subprocess.run([*bare, str(ROOT / "demo.py"), "--draw", "boxes.png"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert draw.returncode == 2 and "--draw needs Pillow" in draw.stderr and "submitting" not in draw.stdout, draw


def test_app_py_port_and_host_from_the_environment():
    """PORT and HOST are the defaults of --port and --host (argparse only: --help exits before gunicorn starts)."""
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "200", "PORT": "6123", "HOST": "0.0.0.0", "WEB_CONCURRENCY": "3"}
    help_text = subprocess.run([sys.executable, str(ROOT / "app.py"), "--help"], env=env, capture_output=True,
                               text=True, check=True).stdout
    assert "now 6123" in help_text and "now 0.0.0.0" in help_text and "now 3" in help_text, help_text
    refused = subprocess.run([sys.executable, str(ROOT / "app.py")], env=dict(env, PORT="five thousand"),
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "invalid int value: 'five thousand'" in refused.stderr, refused.stderr
