"""models/fetch.py against a real HTTP server on loopback serving generated release files.

The server speaks HTTP/1.1 with Range support and can drop the connection part-way through a
body, which is how an interrupted download really looks to the client. The fetcher runs
in-process through its `main(argv)` (so the mutation check sees it), and as a real process, exactly
as `python models/fetch.py` runs in the compose stack, where exit codes and stderr matter most.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import tarfile
import threading
import urllib.error
import urllib.request
from collections import namedtuple
from contextlib import redirect_stderr, redirect_stdout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from unittest import mock

import pytest

from models.fetch import ANSWER_LISTS, CHUNK, FetchError, Http, ResumingStream, read_tar_members
from models.fetch import main as fetch_main

shutil_usage = namedtuple("usage", "total used free")
REPO = Path(__file__).resolve().parent.parent
FETCH = REPO / "models" / "fetch.py"
VQA_MEMBER = "datasets/VQA/cache/trainval_label2ans.pkl"
CATEGORIES = "visual_genome_categories.json"
GQA_MEMBER = "datasets/gqa/cache/trainval_label2ans.pkl"


def _answers(prefix: str, n: int) -> list[str]:
    return [f"{prefix} answer {i}" for i in range(n)]


def make_archive(members: dict[str, bytes], trailing: int = 0) -> bytes:
    """A datasets.tar.gz stand-in; `trailing` bytes of incompressible data follow the given members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for name, data in {**members, **({"datasets/zz_features.bin": os.urandom(trailing)} if trailing else {})}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def release_files(archive_members: dict[str, bytes] | None = None) -> dict[str, bytes]:
    if archive_members is None:
        archive_members = {
            "./datasets/VQA/cache/trainval_ans2label.pkl": pickle.dumps({"yes": 0}),
            "./" + VQA_MEMBER: pickle.dumps(_answers("vqa", 3129)),
            "./datasets/gqa/annotations/readme.txt": b"filler\n" * 100,
            "./" + GQA_MEMBER: pickle.dumps(_answers("gqa", 1533), protocol=2),
        }
    return {
        "multi_task_model.bin": os.urandom(300_000),
        "detectron_model.pth": os.urandom(200_000),
        "detectron_config.yaml": b"MODEL:\n  META_ARCHITECTURE: GeneralizedRCNN\n",
        "datasets.tar.gz": make_archive(archive_members),
        CATEGORIES: json.dumps({"categories": [{"id": i, "name": f"class{i}"} for i in range(1600)]}).encode(),
    }


class ReleaseServer:
    """Serves `files` over HTTP on 127.0.0.1 with Range support and scripted connection drops."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.cuts: dict[str, list[int]] = {}  # name -> byte counts at which to drop the next requests
        self.log: list[tuple[str, str | None]] = []  # (name, Range header)
        self.paths: list[str] = []  # every path asked for
        self.statuses: dict[str, list[int]] = {}  # name -> error statuses to answer the next requests with
        self.no_range: set[str] = set()  # names served whole (200) even when a Range is asked for
        self.wrong_start: dict[str, int] = {}  # name -> a start the server claims in Content-Range instead
        self.lengths: dict[str, str | None] = {}  # name -> the Content-Length to send instead (None: none at all)
        self.hangups: dict[str, int] = {}  # name -> requests to close without any answer
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                server.log.append((name, rng))
                server.paths.append(self.path)
                body = server.files.get(name)
                if body is None:
                    self.send_error(404)
                    return
                if server.hangups.get(name):
                    server.hangups[name] -= 1
                    self.close_connection = True
                    return
                if server.statuses.get(name):
                    self.send_error(server.statuses[name].pop(0))
                    return
                if name in server.no_range:
                    rng = None
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(body) and rng:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    claimed = server.wrong_start.get(name, start)
                    self.send_header("Content-Range", f"bytes {claimed}-{len(body) - 1}/{len(body)}")
                length = server.lengths.get(name, str(len(body) - start))
                if length is not None:
                    self.send_header("Content-Length", length)
                else:  # the body ends when the connection closes
                    self.close_connection = True
                self.end_headers()
                cuts = server.cuts.get(name)
                if cuts:
                    # Send part of the promised body, then hang up.
                    self.wfile.write(body[start:start + cuts.pop(0)])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/vilbert-multi-task/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    def requests_for(self, name: str) -> list[str | None]:
        return [rng for n, rng in self.log if n == name]


@pytest.fixture
def server():
    srv = ReleaseServer(release_files())
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def run_fetch(dest: Path, *args: str, base_url: str | None = None, process: bool = False, quiet: bool = True
              ) -> subprocess.CompletedProcess:
    """`python models/fetch.py --dest DEST --quiet ...`: in this process, with its output captured (where the
    mutation check, bench/mutation.py, sees the code run), or with `process=True` as a real process (the exit
    status and output a shell sees, as in the compose stack)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_DIR", "VILBERT_WEIGHTS_URL")}
    if base_url:
        env["VILBERT_WEIGHTS_URL"] = base_url  # the env route; --base-url is exercised below
    argv = ["--dest", str(dest), *(["--quiet"] if quiet else []), "--retry-wait", "0.05", "--timeout", "10", *args]
    if process:
        return subprocess.run([sys.executable, str(FETCH), *argv], env=env, capture_output=True, text=True, timeout=60)
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, env, clear=True), redirect_stdout(out), redirect_stderr(err):
        code = fetch_main(argv)
    return subprocess.CompletedProcess([str(FETCH), *argv], code, out.getvalue(), err.getvalue())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fetch: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_happy_path_installs_bundle_and_manifest(server, tmp_path):
    dest = tmp_path / "weights"
    proc = run_fetch(dest, base_url=server.url, process=True)
    assert proc.returncode == 0, proc.stderr

    for name in ("multi_task_model.bin", "detectron_model.pth", "detectron_config.yaml", CATEGORIES):
        assert (dest / name).read_bytes() == server.files[name]
    # the category file comes from the host's pythia/data/ folder, beside the release folder
    assert f"/pythia/data/{CATEGORIES}" in server.paths
    assert (dest / "vocab.txt").read_bytes() == (REPO / "vilbert/data/bert-base-uncased-vocab.txt").read_bytes()
    vqa = json.loads((dest / "vqa_answers.json").read_text())
    gqa = json.loads((dest / "gqa_answers.json").read_text())
    assert vqa == _answers("vqa", 3129) and gqa == _answers("gqa", 1533)
    assert not list(dest.glob("*.part"))

    manifest = json.loads((dest / "manifest.json").read_text())["files"]
    assert set(manifest) == {"multi_task_model.bin", "detectron_model.pth", "detectron_config.yaml", "vocab.txt",
                             "vqa_answers.json", "gqa_answers.json", CATEGORIES}
    for name, record in manifest.items():
        data = (dest / name).read_bytes()
        assert record["size"] == len(data) and record["sha256"] == sha(data)
    assert manifest["vqa_answers.json"]["source"].endswith("datasets.tar.gz:" + VQA_MEMBER)

    # Second run: everything is verified from the manifest, nothing is downloaded again.
    before = len(server.log)
    proc = run_fetch(dest, base_url=server.url)
    assert proc.returncode == 0, proc.stderr
    assert len(server.log) == before


def test_a_category_file_that_does_not_fit_the_detector_is_not_installed(server, tmp_path):
    server.files[CATEGORIES] = json.dumps({"categories": [{"id": i, "name": "x"} for i in range(1500)]}).encode()
    proc = run_fetch(tmp_path, base_url=server.url)
    assert_one_line_error(proc, CATEGORIES, "this detector has 1600 object classes", "not installed")
    assert not (tmp_path / CATEGORIES).exists() and not list(tmp_path.glob("*.part"))
    # --categories-url: another place for it (a mirror that keeps it elsewhere)
    good = json.dumps({"categories": [{"id": i, "name": f"c{i}"} for i in range(1600)]}).encode()
    server.files["names.json"] = good
    proc = run_fetch(tmp_path, "--categories-url", server.url + "elsewhere/names.json", base_url=server.url)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / CATEGORIES).read_bytes() == good
    assert "/vilbert-multi-task/elsewhere/names.json" in server.paths


def test_interrupted_download_resumes_within_a_run(server, tmp_path):
    server.cuts["multi_task_model.bin"] = [100_000]
    server.cuts["datasets.tar.gz"] = [5_000]  # the archive stream reconnects too
    proc = run_fetch(tmp_path, "--base-url", server.url)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "multi_task_model.bin").read_bytes() == server.files["multi_task_model.bin"]
    assert server.requests_for("multi_task_model.bin") == [None, "bytes=100000-"]
    assert server.requests_for("datasets.tar.gz") == [None, "bytes=5000-"]
    assert json.loads((tmp_path / "gqa_answers.json").read_text()) == _answers("gqa", 1533)


def test_interrupted_download_resumes_on_the_next_run(server, tmp_path):
    server.cuts["detectron_model.pth"] = [64_000]
    proc = run_fetch(tmp_path, "--retries", "0", base_url=server.url)
    assert_one_line_error(proc, "detectron_model.pth", "rerun to resume")
    assert not (tmp_path / "detectron_model.pth").exists()
    assert (tmp_path / "detectron_model.pth.part").stat().st_size == 64_000

    proc = run_fetch(tmp_path, base_url=server.url)
    assert proc.returncode == 0, proc.stderr
    assert server.requests_for("detectron_model.pth") == [None, "bytes=64000-"]
    assert (tmp_path / "detectron_model.pth").read_bytes() == server.files["detectron_model.pth"]
    assert not (tmp_path / "detectron_model.pth.part").exists()


def test_checksum_mismatch_is_refused_and_not_installed(server, tmp_path):
    expect = tmp_path / "expect.json"
    expect.write_text(json.dumps({"files": {"detectron_model.pth": {"sha256": "0" * 64}}}))
    dest = tmp_path / "w"
    proc = run_fetch(dest, "--expect", str(expect), base_url=server.url)
    assert_one_line_error(proc, "detectron_model.pth", "sha256 mismatch", "not installed")
    assert not (dest / "detectron_model.pth").exists()
    assert not (dest / "detectron_model.pth.part").exists()
    assert "detectron_model.pth" not in json.loads((dest / "manifest.json").read_text())["files"]


def test_recorded_checksum_catches_a_changed_file_on_the_server(server, tmp_path):
    assert run_fetch(tmp_path, base_url=server.url).returncode == 0
    original = server.files["multi_task_model.bin"]

    # Damage the installed copy: --verify notices, fetches it again, and it matches the record.
    damaged = bytearray(original)
    damaged[1234] ^= 0xFF
    (tmp_path / "multi_task_model.bin").write_bytes(bytes(damaged))
    proc = run_fetch(tmp_path, "--verify", base_url=server.url)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "multi_task_model.bin").read_bytes() == original

    # The server now serves different bytes of the same size: refused against the first download's record.
    server.files["multi_task_model.bin"] = os.urandom(len(original))
    (tmp_path / "multi_task_model.bin").unlink()
    proc = run_fetch(tmp_path, base_url=server.url)
    assert_one_line_error(proc, "multi_task_model.bin", "sha256 mismatch")
    assert not (tmp_path / "multi_task_model.bin").exists()

    # A deliberate upgrade (--refresh) accepts and records the new file.
    proc = run_fetch(tmp_path, "--refresh", base_url=server.url)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "manifest.json").read_text())["files"]["multi_task_model.bin"]
    assert record["sha256"] == sha(server.files["multi_task_model.bin"])


def test_truncated_body_without_resume_support_is_not_installed(server, tmp_path):
    # The server always hangs up early: after the retries the file must not be installed.
    server.cuts["detectron_config.yaml"] = [10, 10, 10]
    proc = run_fetch(tmp_path, "--retries", "2", base_url=server.url)
    assert_one_line_error(proc, "detectron_config.yaml", "3 attempt(s)")
    assert not (tmp_path / "detectron_config.yaml").exists()


def test_missing_archive_member(tmp_path):
    files = release_files({"datasets/VQA/cache/trainval_label2ans.pkl": pickle.dumps(_answers("vqa", 3129))})
    srv = ReleaseServer(files)
    srv.thread.start()
    try:
        proc = run_fetch(tmp_path, base_url=srv.url)
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
    assert_one_line_error(proc, "datasets.tar.gz has no member " + GQA_MEMBER)
    assert not (tmp_path / "gqa_answers.json").exists()
    assert not (tmp_path / "vqa_answers.json").exists()
    assert (tmp_path / "multi_task_model.bin").exists()  # what did download stays installed


def test_wrong_answer_count_is_refused(tmp_path, server):
    bad = tmp_path / "gqa.pkl"
    bad.write_bytes(pickle.dumps(_answers("gqa", 10)))
    proc = run_fetch(tmp_path / "w", "--gqa-label2ans", str(bad), base_url=server.url)
    assert_one_line_error(proc, "has 10 answers", "1533")


def test_local_archive_and_pickles_need_no_archive_download(server, tmp_path):
    archive = tmp_path / "datasets.tar.gz"
    archive.write_bytes(server.files["datasets.tar.gz"])
    del server.files["datasets.tar.gz"]
    proc = run_fetch(tmp_path / "a", "--archive", str(archive), base_url=server.url)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "a" / "vqa_answers.json").read_text()) == _answers("vqa", 3129)

    vqa, gqa = tmp_path / "vqa.pkl", tmp_path / "gqa.pkl"
    vqa.write_bytes(pickle.dumps(_answers("v", 3129)))
    gqa.write_bytes(pickle.dumps(dict(enumerate(_answers("g", 1533)))))  # {id: answer} is accepted too
    proc = run_fetch(tmp_path / "b", "--vqa-label2ans", str(vqa), "--gqa-label2ans", str(gqa), base_url=server.url)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "b" / "gqa_answers.json").read_text()) == _answers("g", 1533)
    assert "datasets.tar.gz" not in [name for name, _ in server.log]


def test_offline_gives_one_line_error(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_fetch(tmp_path, base_url=f"http://127.0.0.1:{port}/", process=True)
    assert_one_line_error(proc, "connection refused", "multi_task_model.bin")
    assert not [p for p in tmp_path.iterdir() if p.name not in (".fetch.lock",)]


def test_archive_stream_stops_after_the_answer_lists():
    members = {VQA_MEMBER: pickle.dumps(["a"]), GQA_MEMBER: pickle.dumps(["b"])}
    data = make_archive(members, trailing=2_000_000)

    class Counting(io.BytesIO):
        consumed = 0

        def read(self, n=-1):
            block = super().read(n)
            Counting.consumed += len(block)
            return block

    found = read_tar_members(Counting(data), [VQA_MEMBER, "./" + GQA_MEMBER])
    assert found == members
    assert Counting.consumed < len(data) // 4  # the 2 MB tail was never read

    with pytest.raises(FetchError, match="not a readable"):
        read_tar_members(io.BytesIO(b"not gzip at all"), [VQA_MEMBER])


def test_archive_links_are_refused():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(VQA_MEMBER)
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(FetchError, match="not a regular file"):
        read_tar_members(io.BytesIO(buf.getvalue()), [VQA_MEMBER])


def test_answer_list_table_matches_the_model_heads():
    from vilbert.configuration import GQA_NUM_ANSWERS, VQA_NUM_ANSWERS

    sizes = {a.filename: a.size for a in ANSWER_LISTS}
    assert sizes == {"vqa_answers.json": VQA_NUM_ANSWERS, "gqa_answers.json": GQA_NUM_ANSWERS}


def test_complete_part_file_from_a_crash_is_installed_without_download(server, tmp_path):
    # A run that died between the last byte and the rename leaves a complete .part behind.
    body = server.files["detectron_model.pth"]
    (tmp_path / "detectron_model.pth.part").write_bytes(body)
    proc = run_fetch(tmp_path, base_url=server.url)
    assert proc.returncode == 0, proc.stderr
    assert server.requests_for("detectron_model.pth") == [f"bytes={len(body)}-"]  # answered 416, nothing sent
    assert (tmp_path / "detectron_model.pth").read_bytes() == body


# ------------------------------------------------------------------------------------------------------------
# Every refusal and each step's message, in-process


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert_one_line_error(proc)
    return proc.stderr.strip().removeprefix("fetch: error: ")


def log_lines(stderr: str) -> list[str]:
    """stderr without the progress bars (each redraw starts with a carriage return)."""
    return [line.rsplit("\r", 1)[-1] for line in stderr.splitlines() if line.rsplit("\r", 1)[-1].strip()]


def test_each_step_says_what_it_did(server, tmp_path):
    dest = tmp_path / "w"
    proc = run_fetch(dest, "--base-url", server.url.rstrip("/"), quiet=False)  # the missing slash is added
    assert proc.returncode == 0, proc.stderr
    lines = log_lines(proc.stderr)
    model = server.files["multi_task_model.bin"]
    assert f"fetch: multi_task_model.bin: downloading {server.url}multi_task_model.bin" in lines
    assert f"fetch: multi_task_model.bin: installed ({len(model)} bytes, sha256 {sha(model)[:12]}…)" in lines
    host = server.url.removesuffix("vilbert-multi-task/")
    assert f"fetch: {CATEGORIES}: downloading {host}pythia/data/{CATEGORIES}" in lines
    assert (f"fetch: datasets.tar.gz: streaming {server.url}datasets.tar.gz for 2 answer list(s) (stops once found)"
            in lines)
    assert lines[-1] == f"fetch: done: {dest}"
    again = run_fetch(dest, "--base-url", server.url, quiet=False)
    names = ["multi_task_model.bin", "detectron_model.pth", "detectron_config.yaml", CATEGORIES, "vocab.txt",
             "vqa_answers.json", "gqa_answers.json"]
    assert log_lines(again.stderr) == [f"fetch: {name}: ok" for name in names] + [f"fetch: done: {dest}"]


def test_quiet_prints_nothing_on_success(server, tmp_path):
    proc = run_fetch(tmp_path, "--skip-answers", base_url=server.url)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_only_http_urls_are_accepted(tmp_path):
    proc = run_fetch(tmp_path, "--base-url", "file:///etc/")
    assert (proc.returncode, proc.stderr) == (2, "fetch: error: --base-url must be an http(s) URL, got 'file:///etc/'\n")
    assert not tmp_path.joinpath("manifest.json").exists()


def test_the_release_host_is_the_default_and_matches_the_docs(tmp_path, monkeypatch):
    """Without --base-url or VILBERT_WEIGHTS_URL the files come from the release host that docs/WEIGHTS.md lists
    (this machine cannot reach it: the connection is refused here, and the message names the address tried)."""
    asked: list[str] = []

    def refuse(request, timeout):
        asked.append(request.full_url)
        raise urllib.error.URLError(ConnectionRefusedError())

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    proc = run_fetch(tmp_path)
    url = "https://dl.fbaipublicfiles.com/vilbert-multi-task/multi_task_model.bin"
    assert asked == [url]  # refused: not retried
    assert error_line(proc) == (f"cannot download {url}: connection refused. Check the network, or pass local "
                                "copies (see --help)")
    assert f"`{url}`" in (REPO / "docs" / "WEIGHTS.md").read_text(encoding="utf-8")


def test_model_dir_is_the_default_destination(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "bundle"))
    monkeypatch.setenv("VILBERT_WEIGHTS_URL", server.url)
    with redirect_stderr(io.StringIO()):
        assert fetch_main(["--quiet", "--skip-answers"]) == 0
    assert (tmp_path / "bundle" / "multi_task_model.bin").read_bytes() == server.files["multi_task_model.bin"]


@pytest.mark.parametrize("reason,message,attempts", [
    (socket.gaierror(-2, "Name or service not known"), "host name does not resolve (offline?)", 1),
    (OSError(errno.ENETUNREACH, "Network is unreachable"), "[Errno 101] Network is unreachable", 1),
    (OSError(errno.EHOSTUNREACH, "No route to host"), "[Errno 113] No route to host", 1),
    (TimeoutError(), "timed out", 3),  # transient: retried
])
def test_network_failures_are_told_apart(tmp_path, monkeypatch, reason, message, attempts):
    asked: list[str] = []

    def fail(request, timeout):
        asked.append(request.full_url)
        raise urllib.error.URLError(reason)

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    proc = run_fetch(tmp_path, "--retries", "2", base_url="http://mirror.invalid/w/")
    assert len(asked) == attempts
    url = "http://mirror.invalid/w/multi_task_model.bin"
    if attempts == 1:
        assert error_line(proc) == (f"cannot download {url}: {message}. Check the network, or pass local copies "
                                    "(see --help)")
    else:
        assert error_line(proc) == (f"download of {url} failed after 3 attempt(s) ({message}); 0 bytes kept in "
                                    f"{tmp_path / 'multi_task_model.bin.part'}, rerun to resume")


def test_a_missing_file_on_the_server_is_named_with_a_hint(server, tmp_path):
    del server.files["detectron_model.pth"]
    proc = run_fetch(tmp_path, base_url=server.url)
    assert error_line(proc) == (f"{server.url}detectron_model.pth does not exist on the server (HTTP 404); check "
                                "--base-url")


def test_server_errors_are_retried_and_a_refusal_is_not(server, tmp_path):
    server.statuses["multi_task_model.bin"] = [503, 500]
    proc = run_fetch(tmp_path / "a", "--skip-answers", base_url=server.url)
    assert proc.returncode == 0, proc.stderr
    assert server.requests_for("multi_task_model.bin") == [None, None, None]
    server.statuses["detectron_config.yaml"] = [403]
    proc = run_fetch(tmp_path / "b", "--skip-answers", base_url=server.url)
    assert error_line(proc) == f"cannot download {server.url}detectron_config.yaml: HTTP 403 Forbidden"
    assert len(server.requests_for("detectron_config.yaml")) == 2  # one in each run: the 403 was not retried
    server.statuses["detectron_config.yaml"] = [503, 503]
    proc = run_fetch(tmp_path / "c", "--skip-answers", "--retries", "1", base_url=server.url)
    assert error_line(proc) == (f"download of {server.url}detectron_config.yaml failed after 2 attempt(s) (HTTP 503 "
                                f"Service Unavailable); 0 bytes kept in "
                                f"{tmp_path / 'c' / 'detectron_config.yaml.part'}, rerun to resume")


def test_a_server_that_ignores_range_is_read_from_the_start(server, tmp_path):
    body = server.files["detectron_model.pth"]
    (tmp_path / "detectron_model.pth.part").write_bytes(b"old bytes of something else")
    server.no_range.add("detectron_model.pth")
    proc = run_fetch(tmp_path, "--skip-answers", base_url=server.url)
    assert proc.returncode == 0, proc.stderr
    assert server.requests_for("detectron_model.pth") == ["bytes=27-"]
    assert (tmp_path / "detectron_model.pth").read_bytes() == body


def test_a_server_resuming_at_another_byte_is_refused(server, tmp_path):
    body = server.files["detectron_model.pth"]
    (tmp_path / "detectron_model.pth.part").write_bytes(body[:1000])
    server.wrong_start["detectron_model.pth"] = 0
    proc = run_fetch(tmp_path, base_url=server.url)
    assert error_line(proc) == f"{server.url}detectron_model.pth: server resumed at byte 0, asked for 1000"
    assert not (tmp_path / "detectron_model.pth").exists()


def test_a_part_file_longer_than_the_servers_file_is_started_over(server, tmp_path):
    body = server.files["detectron_config.yaml"]
    (tmp_path / "detectron_config.yaml.part").write_bytes(body + b"# and more")
    proc = run_fetch(tmp_path, "--skip-answers", base_url=server.url)
    assert proc.returncode == 0, proc.stderr
    assert server.requests_for("detectron_config.yaml") == [f"bytes={len(body) + 10}-", None]
    assert (tmp_path / "detectron_config.yaml").read_bytes() == body


def test_a_part_file_longer_than_the_expected_size_is_dropped_before_asking(server, tmp_path):
    body = server.files["detectron_config.yaml"]
    expect = tmp_path / "expect.json"
    expect.write_text(json.dumps({"files": {"detectron_config.yaml": {"size": len(body), "sha256": sha(body)}}}))
    dest = tmp_path / "w"
    dest.mkdir()
    (dest / "detectron_config.yaml.part").write_bytes(body + b"# and more")
    proc = run_fetch(dest, "--skip-answers", "--expect", str(expect), base_url=server.url)
    assert proc.returncode == 0, proc.stderr
    assert server.requests_for("detectron_config.yaml") == [None]
    assert (dest / "detectron_config.yaml").read_bytes() == body


def test_a_size_other_than_expected_is_not_installed(server, tmp_path):
    expect = tmp_path / "expect.json"
    expect.write_text(json.dumps({"detectron_config.yaml": {"size": 5}}))  # a plain {name: record} object works too
    body = server.files["detectron_config.yaml"]
    proc = run_fetch(tmp_path / "w", "--expect", str(expect), base_url=server.url)
    assert error_line(proc) == f"detectron_config.yaml: got {len(body)} bytes, expected 5; the file was not installed"
    assert not list((tmp_path / "w").glob("detectron_config.yaml*"))


def test_not_enough_disk_space_is_said_before_downloading(server, tmp_path, monkeypatch):
    """A full disk cannot be made here: the free-space reading is replaced."""
    import models.fetch as fetch

    monkeypatch.setattr(fetch.shutil, "disk_usage", lambda path: shutil_usage(total=10 ** 6, used=10 ** 6 - 10, free=10))
    proc = run_fetch(tmp_path, base_url=server.url)
    size = len(server.files["multi_task_model.bin"])
    assert error_line(proc) == f"not enough disk space in {tmp_path}: need {size} bytes, 10 free"
    assert not (tmp_path / "multi_task_model.bin.part").exists()


def test_a_second_fetch_into_the_same_folder_is_refused(server, tmp_path):
    with open(tmp_path / ".fetch.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = run_fetch(tmp_path, base_url=server.url)
    assert error_line(proc) == f"another fetch is running in {tmp_path}"
    assert server.log == []
    assert run_fetch(tmp_path, "--skip-answers", base_url=server.url).returncode == 0  # released: runs


@pytest.mark.parametrize("content,reason", [
    ("not json", "Expecting value: line 1 column 1 (char 0)"),
    ('{"version": 1}', "'files'"),
    ('{"files": []}', "files is not an object"),
])
def test_a_damaged_manifest_is_named_with_what_to_do(tmp_path, content, reason):
    (tmp_path / "manifest.json").write_text(content)
    proc = run_fetch(tmp_path, base_url="http://127.0.0.1:9/")
    assert error_line(proc) == (f"{tmp_path / 'manifest.json'} is not a valid manifest ({reason}); move it away to "
                                "start afresh")


def test_a_bad_expect_file_is_named(tmp_path):
    proc = run_fetch(tmp_path / "w", "--expect", str(tmp_path / "nope.json"), base_url="http://127.0.0.1:9/")
    assert error_line(proc) == (f"cannot read --expect {tmp_path / 'nope.json'}: [Errno 2] No such file or directory: "
                                f"'{tmp_path / 'nope.json'}'")
    (tmp_path / "list.json").write_text("[1, 2]")
    proc = run_fetch(tmp_path / "w", "--expect", str(tmp_path / "list.json"), base_url="http://127.0.0.1:9/")
    assert error_line(proc) == f"cannot read --expect {tmp_path / 'list.json'}: expected an object of file records"


def test_a_file_copied_in_by_hand_is_adopted_without_download(server, tmp_path):
    body = server.files["multi_task_model.bin"]
    (tmp_path / "multi_task_model.bin").write_bytes(body)
    proc = run_fetch(tmp_path, "--skip-answers", base_url=server.url, quiet=False)
    assert proc.returncode == 0, proc.stderr
    assert f"fetch: multi_task_model.bin: found, recorded sha256 {sha(body)[:12]}…" in log_lines(proc.stderr)
    assert server.requests_for("multi_task_model.bin") == []
    record = json.loads((tmp_path / "manifest.json").read_text())["files"]["multi_task_model.bin"]
    assert (record["source"], record["sha256"], record["size"]) == ("existing file", sha(body), len(body))


def test_a_touched_file_is_rehashed_and_its_record_updated(server, tmp_path):
    assert run_fetch(tmp_path, "--skip-answers", base_url=server.url).returncode == 0
    path = tmp_path / "detectron_config.yaml"
    os.utime(path, ns=(1, 1))  # same bytes, another mtime (a copy, a restore from backup)
    proc = run_fetch(tmp_path, "--skip-answers", base_url=server.url)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "manifest.json").read_text())["files"]["detectron_config.yaml"]
    assert record["mtime_ns"] == 1 and record["source"] == f"{server.url}detectron_config.yaml"
    assert server.requests_for("detectron_config.yaml") == [None]  # not downloaded again


def test_skip_answers_leaves_out_the_archive(server, tmp_path):
    proc = run_fetch(tmp_path, "--skip-answers", base_url=server.url)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "vqa_answers.json").exists() and server.requests_for("datasets.tar.gz") == []
    assert (tmp_path / "vocab.txt").exists() and (tmp_path / CATEGORIES).exists()


def test_an_archive_stream_that_cannot_resume_or_keeps_failing_is_named(server, tmp_path):
    url = server.url + "datasets.tar.gz"
    server.cuts["datasets.tar.gz"] = [5000]
    server.no_range.add("datasets.tar.gz")
    proc = run_fetch(tmp_path / "a", base_url=server.url)
    assert error_line(proc) == f"{url}: the server cannot resume (no Range support); rerun to start over"
    server.no_range.clear()
    server.cuts["datasets.tar.gz"] = [100, 100, 100, 100]
    proc = run_fetch(tmp_path / "b", "--retries", "2", base_url=server.url)
    assert error_line(proc) == f"download of {url} kept failing at byte 300; rerun to retry"
    # the first run's reconnection was answered whole (refused); the second's three connections each broke
    assert server.requests_for("datasets.tar.gz") == [None, "bytes=5000-", None, "bytes=100-", "bytes=200-"]


@pytest.mark.parametrize("status,message", [
    (404, "{url} does not exist on the server (HTTP 404); check --base-url"),
    (403, "cannot download {url}: HTTP 403 Forbidden"),
])
def test_an_archive_the_server_will_not_give_is_named(server, tmp_path, status, message):
    server.statuses["datasets.tar.gz"] = [status]
    proc = run_fetch(tmp_path, base_url=server.url)
    assert error_line(proc) == message.format(url=server.url + "datasets.tar.gz")


def test_local_answer_lists_that_cannot_be_read_are_named(server, tmp_path):
    missing = tmp_path / "nope.pkl"
    proc = run_fetch(tmp_path / "a", "--vqa-label2ans", str(missing), base_url=server.url)
    assert error_line(proc) == f"cannot read {missing}: No such file or directory"
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"\x80\x04not a pickle")
    proc = run_fetch(tmp_path / "b", "--vqa-label2ans", str(garbage), base_url=server.url)
    line = error_line(proc)
    assert line.startswith(f"{garbage}: ") and "<bytes>" not in line
    proc = run_fetch(tmp_path / "c", "--archive", str(missing), base_url=server.url)
    assert error_line(proc) == f"cannot read --archive {missing}: No such file or directory"


def test_a_destination_that_is_a_file_is_named(tmp_path):
    (tmp_path / "taken").write_text("a file")
    proc = run_fetch(tmp_path / "taken", base_url="http://127.0.0.1:9/")
    assert error_line(proc) == f"File exists: {tmp_path / 'taken'}"


def test_an_interrupted_fetch_says_it_can_be_resumed(server, tmp_path, monkeypatch):
    """Ctrl-C cannot be pressed in a test: the fetch's first download raises it instead."""
    import models.fetch as fetch

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fetch.Http, "download", interrupted)
    proc = run_fetch(tmp_path, base_url=server.url)
    assert (proc.returncode, proc.stderr) == (130, "fetch: interrupted; rerun to resume\n")



# ------------------------------------------------------------------------------------------------------------
# The archive stream (ResumingStream) on its own


class RecordingHttp(Http):
    """The fetcher's Http, with its backoff waits recorded instead of slept and its log kept."""

    def __init__(self, retries: int = 3):
        super().__init__(timeout=10, retries=retries, backoff=1.0, quiet=True)
        self.waits: list[int] = []
        self.lines: list[str] = []
        self.log = self.lines.append

    def sleep(self, attempt: int) -> None:
        self.waits.append(attempt)


def read_all(stream: ResumingStream, size: int) -> bytes:
    blocks = []
    while block := stream.read(size):
        assert len(block) <= size
        blocks.append(block)
    return b"".join(blocks)


def test_the_stream_gives_at_most_what_is_asked_and_ends_with_nothing(server):
    body = server.files["datasets.tar.gz"]
    stream = ResumingStream(RecordingHttp(), server.url + "datasets.tar.gz", "archive")
    assert stream.total == len(body) and stream.bar.total == len(body)
    assert stream.read(1) == body[:1] and stream.read(7) == body[1:8]
    assert read_all(stream, 1000) == body[8:]
    assert stream.read(10) == b""  # at the end: no reconnection
    stream.close()
    assert server.requests_for("datasets.tar.gz") == [None]


def test_the_stream_never_reads_a_whole_body_at_once(server):
    """read() and read(0), which mean "everything" to a file, give one chunk: the real archive is GBs."""
    server.files["big.bin"] = os.urandom(3 * CHUNK)
    stream = ResumingStream(RecordingHttp(), server.url + "big.bin", "big")
    assert stream.read() == server.files["big.bin"][:CHUNK]
    assert stream.read(0) == server.files["big.bin"][CHUNK:2 * CHUNK]
    stream.close()


@pytest.mark.parametrize("length", [None, "many"])
def test_a_stream_without_a_usable_length_reads_to_the_close(server, length):
    body = server.files["datasets.tar.gz"]
    server.lengths["datasets.tar.gz"] = length
    stream = ResumingStream(RecordingHttp(), server.url + "datasets.tar.gz", "archive")
    assert stream.total is None
    assert read_all(stream, 4096) == body
    stream.close()


def test_a_dropped_stream_resumes_where_it_stopped_after_doubling_waits(server):
    body = server.files["datasets.tar.gz"]
    server.cuts["datasets.tar.gz"] = [1000, 1000]
    http = RecordingHttp()
    stream = ResumingStream(http, server.url + "datasets.tar.gz", "archive")
    assert read_all(stream, 300) == body
    stream.close()
    assert server.requests_for("datasets.tar.gz") == [None, "bytes=1000-", "bytes=2000-"]
    assert http.waits == [0, 1]  # backoff x 2**0, then x 2**1
    assert http.lines == ["datasets.tar.gz: connection dropped; resuming at byte 1000",
                          "datasets.tar.gz: connection dropped; resuming at byte 2000"]


def test_a_connection_closed_before_any_answer_is_retried(server, tmp_path):
    """The server hangs up without a status line (http.client's RemoteDisconnected, which has no `reason`)."""
    server.hangups["detectron_config.yaml"] = 1
    proc = run_fetch(tmp_path, "--skip-answers", base_url=server.url)
    assert proc.returncode == 0, proc.stderr
    assert server.requests_for("detectron_config.yaml") == [None, None]
    assert (tmp_path / "detectron_config.yaml").read_bytes() == server.files["detectron_config.yaml"]
