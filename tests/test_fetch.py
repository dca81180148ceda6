"""models/fetch.py against a real HTTP server on loopback serving generated release files.

The server speaks HTTP/1.1 with Range support and can drop the connection part-way through a
body, which is how an interrupted download really looks to the client. The fetcher runs as a
subprocess, exactly as `python models/fetch.py` runs in the compose stack, so exit codes and
stderr are the real ones.
"""
from __future__ import annotations

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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from models.fetch import ANSWER_LISTS, read_tar_members, FetchError

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
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(body) and rng:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
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
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def requests_for(self, name: str) -> list[str | None]:
        return [rng for n, rng in self.log if n == name]


@pytest.fixture
def server():
    srv = ReleaseServer(release_files())
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def run_fetch(dest: Path, *args: str, base_url: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_DIR", "VILBERT_WEIGHTS_URL")}
    if base_url:
        env["VILBERT_WEIGHTS_URL"] = base_url  # the env route; --base-url is exercised below
    cmd = [sys.executable, str(FETCH), "--dest", str(dest), "--quiet", "--retry-wait", "0.05", "--timeout", "10", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


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
    proc = run_fetch(dest, base_url=server.url)
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
    proc = run_fetch(tmp_path, base_url=f"http://127.0.0.1:{port}/")
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
