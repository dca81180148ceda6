#!/usr/bin/env python3
"""Download the released 12-in-1 weights into the MODEL_DIR layout.

    python models/fetch.py [--dest DIR]

Fetches ``multi_task_model.bin``, ``detectron_model.pth`` and ``detectron_config.yaml`` from the
release host, ``visual_genome_categories.json`` (the detector's class names, for region labels) from the
same host's ``pythia/data/`` folder, copies the packaged bert-base-uncased ``vocab.txt``, and builds ``vqa_answers.json``
(3129 answers) and ``gqa_answers.json`` (1533) from the ``trainval_label2ans.pkl`` pickles that
exist only inside the multi-GB ``datasets.tar.gz``. The archive is streamed and only those two
members are read (the rest is never written to disk); ``--archive`` or ``--vqa-label2ans`` /
``--gqa-label2ans`` take local copies instead. The pickles are read with a reader that admits no
globals (``vilbert_train/safe_pickle.py``, stdlib only).

Every download goes to ``NAME.part`` first, resumes with HTTP Range requests (within a run and
across runs), is fsynced, checked for size and sha256, and only then renamed into place. The size
and sha256 of every installed file are recorded in ``DEST/manifest.json``; later runs verify
against that record (trust on first use) or against ``--expect MANIFEST`` when given.

Errors end the run with one line on stderr and exit status 1; rerunning picks up where it stopped.
The release host can be replaced with ``--base-url`` or ``VILBERT_WEIGHTS_URL`` (a mirror, or a
loopback server in the tests).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import errno
import fcntl
import hashlib
import http.client
import json
import os
import shutil
import socket
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Optional

if __package__ in (None, ""):  # run as `python models/fetch.py`: make the checkout's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from detector.categories import CATEGORIES_FILE, CategoriesError, CategoryNames  # noqa: E402
from vilbert_train.safe_pickle import MAX_PICKLE_BYTES, Label2AnsError, load_label2ans  # noqa: E402

DEFAULT_BASE_URL = "https://dl.fbaipublicfiles.com/vilbert-multi-task/"
BASE_URL_ENV = "VILBERT_WEIGHTS_URL"
WEIGHT_FILES = ("multi_task_model.bin", "detectron_model.pth", "detectron_config.yaml")
ARCHIVE_NAME = "datasets.tar.gz"
# The category file lies beside the release folder on the same host (…/pythia/data/), where the MMF and
# vilbert-multi-task feature scripts point; relative, so a mirror laid out like the host serves it too.
CATEGORIES_PATH = "../pythia/data/" + CATEGORIES_FILE
RELEASED_DETECTOR_CLASSES = 1601  # 1600 Visual Genome object classes + background
MANIFEST_NAME = "manifest.json"
VOCAB_NAME = "vocab.txt"
PACKAGED_VOCAB = Path(__file__).resolve().parent.parent / "vilbert" / "data" / "bert-base-uncased-vocab.txt"
USER_AGENT = "vilbert-serve-fetch/1"
CHUNK = 1 << 20


@dataclass(frozen=True)
class AnswerList:
    filename: str  # JSON file written into the bundle
    member: str  # path of the pickle inside datasets.tar.gz
    size: int  # fixed by the released classifier head


ANSWER_LISTS = (
    AnswerList("vqa_answers.json", "datasets/VQA/cache/trainval_label2ans.pkl", 3129),
    AnswerList("gqa_answers.json", "datasets/gqa/cache/trainval_label2ans.pkl", 1533),
)


class FetchError(Exception):
    """A failure the user can act on; printed as one line, no traceback."""


# --------------------------------------------------------------------------------------------
# Small file utilities


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)
    _fsync_dir(path.parent)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# --------------------------------------------------------------------------------------------
# Manifest: what was installed, with size and sha256


class Manifest:
    def __init__(self, path: Path):
        self.path = path
        self.files: dict[str, dict] = {}
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                files = data["files"]
                if not isinstance(files, dict):
                    raise TypeError("files is not an object")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise FetchError(f"{path} is not a valid manifest ({exc}); move it away to start afresh") from None
            self.files = files

    def record(self, name: str, path: Path, sha256: str, source: str) -> None:
        st = path.stat()
        self.files[name] = {
            "size": st.st_size,
            "sha256": sha256,
            "mtime_ns": st.st_mtime_ns,
            "source": source,
            "recorded_at": _now(),
        }
        self.save()

    def save(self) -> None:
        body = {"version": 1, "files": dict(sorted(self.files.items()))}
        atomic_write_bytes(self.path, (json.dumps(body, indent=2) + "\n").encode())


def load_expectations(path: Optional[Path]) -> dict[str, dict]:
    """Sizes and checksums pinned by the operator (e.g. the manifest.json of a host that already fetched)."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        files = data["files"] if isinstance(data, dict) and "files" in data else data
        if not isinstance(files, dict):
            raise TypeError("expected an object of file records")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FetchError(f"cannot read --expect {path}: {exc}") from None
    return files


# --------------------------------------------------------------------------------------------
# HTTP


def _progress(total: Optional[int], initial: int, desc: str, quiet: bool):
    from tqdm import tqdm  # imported here so `--help` and the unpickler work without it

    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=quiet, mininterval=1.0, file=sys.stderr, leave=False)


def _reason(exc: Optional[BaseException]) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return "host name does not resolve (offline?)"
    if isinstance(reason, TimeoutError):
        return "timed out"
    return str(reason) or type(reason).__name__


def _describe_network_error(url: str, exc: BaseException) -> str:
    return f"cannot download {url}: {_reason(exc)}. Check the network, or pass local copies (see --help)"


def _permanent(exc: BaseException) -> bool:
    """Errors not worth retrying: the host cannot be reached at all."""
    reason = getattr(exc, "reason", exc)
    return isinstance(reason, (ConnectionRefusedError, socket.gaierror)) or (
        isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH))


# Network failures only: a local OSError (disk full, permissions) must not be retried as if transient.
_TRANSIENT = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


@dataclass
class Http:
    timeout: float = 30.0
    retries: int = 3
    backoff: float = 1.0
    quiet: bool = False
    log: Callable[[str], None] = lambda msg: None

    def open(self, url: str, offset: int = 0):
        headers = {"User-Agent": USER_AGENT}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(url, headers=headers)
        return urllib.request.urlopen(request, timeout=self.timeout)  # noqa: S310 - http(s) only, checked in main

    def sleep(self, attempt: int) -> None:
        time.sleep(self.backoff * (2 ** attempt))

    def download(self, url: str, part: Path, desc: str, expected_size: Optional[int] = None) -> int:
        """Fill ``part`` with the body of ``url``, resuming from what is already there. Returns the size."""
        last_error: Optional[BaseException] = None
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(attempt - 1)
            offset = part.stat().st_size if part.exists() else 0
            if attempt:
                self.log(f"{desc}: {_reason(last_error)}; resuming at byte {offset} "
                         f"(attempt {attempt + 1} of {self.retries + 1})")
            if expected_size is not None and offset > expected_size:
                part.unlink()
                offset = 0
            try:
                total = self._download_once(url, part, offset, desc)
            except urllib.error.HTTPError as exc:
                if exc.code == 416 and offset:
                    # Nothing left to send after `offset`: either complete, or a different file now.
                    total = _content_range_total(exc.headers.get("Content-Range"))
                    if total == offset:
                        return total
                    part.unlink()
                    last_error = exc
                    continue
                if exc.code == 404:
                    raise FetchError(f"{url} does not exist on the server (HTTP 404); check --base-url") from None
                if 500 <= exc.code < 600:
                    last_error = exc
                    continue
                raise FetchError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
            except FetchError:
                raise
            except _TRANSIENT as exc:
                if _permanent(exc):
                    raise FetchError(_describe_network_error(url, exc)) from None
                last_error = exc
                continue
            if total is None or part.stat().st_size == total:
                return part.stat().st_size
            last_error = ConnectionError(f"connection closed after {part.stat().st_size} of {total} bytes")
        kept = part.stat().st_size if part.exists() else 0
        raise FetchError(f"download of {url} failed after {self.retries + 1} attempt(s) ({_reason(last_error)}); "
                         f"{kept} bytes kept in {part}, rerun to resume")

    def _download_once(self, url: str, part: Path, offset: int, desc: str) -> Optional[int]:
        with self.open(url, offset) as response:
            status = getattr(response, "status", 200)
            length = response.headers.get("Content-Length")
            length = int(length) if length is not None and length.isdigit() else None
            if offset and status == 206:
                start = _content_range_start(response.headers.get("Content-Range"))
                if start != offset:
                    raise FetchError(f"{url}: server resumed at byte {start}, asked for {offset}")
                total = _content_range_total(response.headers.get("Content-Range"))
                mode = "ab"
            else:  # 200: the server ignored Range (or none was sent); start over
                offset = 0
                total = length
                mode = "wb"
            _check_free_space(part.parent, (total or 0) - offset)
            with open(part, mode) as f, _progress(total, offset, desc, self.quiet) as bar:
                while True:
                    block = response.read(CHUNK)
                    if not block:
                        break
                    f.write(block)
                    bar.update(len(block))
                f.flush()
                os.fsync(f.fileno())
            return total


def _content_range_start(value: Optional[str]) -> Optional[int]:
    # "bytes 100-199/200"
    try:
        return int(value.split()[1].split("-")[0])
    except (AttributeError, IndexError, ValueError):
        return None


def _content_range_total(value: Optional[str]) -> Optional[int]:
    # "bytes 100-199/200"; None for "bytes */*" (size unknown), a malformed value or none
    try:
        return int(value.rsplit("/", 1)[1])
    except (AttributeError, IndexError, ValueError):
        return None


def _check_free_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise FetchError(f"not enough disk space in {directory}: need {needed} bytes, {free} free")


class ResumingStream:
    """A read-only file object over an HTTP body that reconnects with Range after a dropped connection.

    Lets ``tarfile`` stream a multi-GB archive through one decompressor even if the link drops.
    """

    def __init__(self, http: Http, url: str, desc: str):
        self.http, self.url = http, url
        self.pos = 0
        self.failures = 0
        self.response = self._connect()
        length = self.response.headers.get("Content-Length")
        self.total = int(length) if length and length.isdigit() else None
        self.bar = _progress(self.total, 0, desc, http.quiet)

    def _connect(self):
        try:
            response = self.http.open(self.url, self.pos)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise FetchError(f"{self.url} does not exist on the server (HTTP 404); check --base-url") from None
            raise FetchError(f"cannot download {self.url}: HTTP {exc.code} {exc.reason}") from None
        except _TRANSIENT as exc:
            raise FetchError(_describe_network_error(self.url, exc)) from None
        if self.pos and getattr(response, "status", 200) != 206:
            response.close()
            raise FetchError(f"{self.url}: the server cannot resume (no Range support); rerun to start over")
        return response

    def read(self, n: int = -1) -> bytes:
        while True:
            try:
                block = self.response.read(n if n > 0 else CHUNK)  # never "all of it": the archive is GBs
            except _TRANSIENT:
                block = None
            if block:
                self.pos += len(block)
                self.bar.update(len(block))
                return block
            if self.total is None or self.pos >= self.total:
                return b""
            # Short body: reconnect where we stopped.
            self.failures += 1
            if self.failures > self.http.retries:
                raise FetchError(f"download of {self.url} kept failing at byte {self.pos}; rerun to retry")
            self.response.close()
            self.http.sleep(self.failures - 1)
            self.http.log(f"{ARCHIVE_NAME}: connection dropped; resuming at byte {self.pos}")
            self.response = self._connect()

    def close(self) -> None:
        self.response.close()
        self.bar.close()


# --------------------------------------------------------------------------------------------
# datasets.tar.gz: pull out the two answer pickles


def _strip_dot(name: str) -> str:
    return name[2:] if name.startswith("./") else name


def read_tar_members(fileobj: BinaryIO, wanted: Iterable[str], label: str = ARCHIVE_NAME) -> dict[str, bytes]:
    """Stream a .tar.gz and return the bytes of the ``wanted`` members, stopping once all are found.

    Nothing is extracted to disk; links, directories and oversized members are refused.
    """
    wanted = {_strip_dot(name) for name in wanted}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r|gz") as archive:
            for member in archive:
                name = _strip_dot(member.name)
                if name not in wanted or name in found:
                    continue
                if not member.isfile():
                    raise FetchError(f"{label}: {name} is not a regular file")
                if member.size > MAX_PICKLE_BYTES:
                    raise FetchError(f"{label}: {name} is {member.size} bytes, too large for an answer list")
                extracted = archive.extractfile(member)
                found[name] = extracted.read() if extracted is not None else b""
                if len(found) == len(wanted):
                    break  # stop reading the rest of the archive
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise FetchError(f"{label} is not a readable .tar.gz ({type(exc).__name__}: {exc})") from None
    missing = sorted(wanted - set(found))
    if missing:
        raise FetchError(f"{label} has no member {', '.join(missing)}")
    return found


# --------------------------------------------------------------------------------------------
# The fetch itself


@dataclass
class Options:
    dest: Path
    base_url: str
    archive: Optional[Path] = None
    label2ans: Optional[dict[str, Path]] = None  # AnswerList.filename -> local .pkl
    expect: Optional[Path] = None
    verify: bool = False
    refresh: bool = False
    skip_answers: bool = False
    quiet: bool = False
    categories_url: Optional[str] = None  # default: CATEGORIES_PATH on the release host


class Fetcher:
    def __init__(self, opts: Options, http: Http, log: Callable[[str], None]):
        self.opts, self.http, self.log = opts, http, log
        self.manifest = Manifest(opts.dest / MANIFEST_NAME)
        self.expected = load_expectations(opts.expect)

    def _pinned(self, name: str) -> Optional[dict]:
        """The size/sha256 a file must have: --expect first, then the record of the first download."""
        if name in self.expected:
            return self.expected[name]
        if self.opts.refresh:
            return None
        return self.manifest.files.get(name)

    def _installed_ok(self, name: str) -> bool:
        """True if DEST/name is present and matches its record (hashing it only with --verify)."""
        path = self.opts.dest / name
        if not path.is_file():
            return False
        if self.opts.refresh and name not in self.expected:
            return False
        record = self.manifest.files.get(name)
        pinned = self._pinned(name)
        st = path.stat()
        unchanged = record is not None and record.get("size") == st.st_size and record.get("mtime_ns") == st.st_mtime_ns
        if unchanged and not self.opts.verify and pinned.get("sha256") == record.get("sha256"):
            return True  # trusted without re-hashing a multi-GB file; --verify forces it
        digest = sha256_file(path)
        if pinned is None:
            # Present but never recorded (copied in by hand): adopt it.
            self.manifest.record(name, path, digest, "existing file")
            self.log(f"{name}: found, recorded sha256 {digest[:12]}…")
            return True
        if pinned.get("size") not in (None, st.st_size) or pinned.get("sha256") not in (None, digest):
            self.log(f"{name}: does not match its recorded checksum; fetching it again")
            path.unlink()
            return False
        if record is None or record.get("mtime_ns") != st.st_mtime_ns:
            self.manifest.record(name, path, digest, (record or {}).get("source", "existing file"))
        return True

    def fetch_file(self, name: str) -> None:
        if self._installed_ok(name):
            self.log(f"{name}: ok")
            return
        url = urllib.parse.urljoin(self.opts.base_url, name)
        path = self.opts.dest / name
        part = path.with_name(name + ".part")
        pinned = self._pinned(name) or {}
        self.log(f"{name}: downloading {url}")
        size = self.http.download(url, part, name, expected_size=pinned.get("size"))
        self._install(part, path, name, url, pinned, size)

    def _install(self, part: Path, path: Path, name: str, source: str, pinned: dict, size: int) -> None:
        if pinned.get("size") is not None and size != pinned["size"]:
            part.unlink()
            raise FetchError(f"{name}: got {size} bytes, expected {pinned['size']}; the file was not installed")
        digest = sha256_file(part)
        if pinned.get("sha256") and digest != pinned["sha256"]:
            part.unlink()
            raise FetchError(f"{name}: sha256 mismatch (expected {pinned['sha256']}, got {digest}); "
                             "the file was not installed")
        os.replace(part, path)
        _fsync_dir(path.parent)
        self.manifest.record(name, path, digest, source)
        self.log(f"{name}: installed ({size} bytes, sha256 {digest[:12]}…)")

    def fetch_categories(self) -> None:
        """The detector's class names: downloaded like the weights, and installed only if they fit the released
        detector (1600 names), since a wrong list would label every region wrongly."""
        if self._installed_ok(CATEGORIES_FILE):
            self.log(f"{CATEGORIES_FILE}: ok")
            return
        url = self.opts.categories_url or urllib.parse.urljoin(self.opts.base_url, CATEGORIES_PATH)
        path = self.opts.dest / CATEGORIES_FILE
        part = path.with_name(CATEGORIES_FILE + ".part")
        pinned = self._pinned(CATEGORIES_FILE) or {}
        self.log(f"{CATEGORIES_FILE}: downloading {url}")
        size = self.http.download(url, part, CATEGORIES_FILE, expected_size=pinned.get("size"))
        try:
            CategoryNames.from_json(part.read_bytes(), RELEASED_DETECTOR_CLASSES, url)
        except CategoriesError as exc:
            part.unlink()
            raise FetchError(f"{exc}; the file was not installed") from None
        self._install(part, path, CATEGORIES_FILE, url, pinned, size)

    def install_vocab(self) -> None:
        if self._installed_ok(VOCAB_NAME):
            self.log(f"{VOCAB_NAME}: ok")
            return
        if not PACKAGED_VOCAB.is_file():
            raise FetchError(f"packaged vocabulary {PACKAGED_VOCAB} is missing; is this a complete checkout?")
        part = self.opts.dest / (VOCAB_NAME + ".part")
        shutil.copyfile(PACKAGED_VOCAB, part)
        with open(part, "rb+") as f:
            os.fsync(f.fileno())
        self._install(part, self.opts.dest / VOCAB_NAME, VOCAB_NAME, "packaged bert-base-uncased vocabulary",
                      self._pinned(VOCAB_NAME) or {}, part.stat().st_size)

    def install_answers(self) -> None:
        todo = [a for a in ANSWER_LISTS if not self._installed_ok(a.filename)]
        for a in ANSWER_LISTS:
            if a not in todo:
                self.log(f"{a.filename}: ok")
        if not todo:
            return
        local = self.opts.label2ans or {}
        pickles: dict[str, tuple[bytes, str]] = {}
        for a in todo:
            if a.filename in local:
                try:
                    pickles[a.filename] = (Path(local[a.filename]).read_bytes(), str(local[a.filename]))
                except OSError as exc:
                    raise FetchError(f"cannot read {local[a.filename]}: {exc.strerror or exc}") from None
        from_archive = [a for a in todo if a.filename not in pickles]
        if from_archive:
            members = self._read_archive([a.member for a in from_archive])
            for a in from_archive:
                pickles[a.filename] = (members[a.member], f"{self._archive_label()}:{a.member}")
        for a in todo:
            data, source = pickles[a.filename]
            try:
                answers = load_label2ans(data)
            except Label2AnsError as exc:
                raise FetchError(f"{source}: {exc}".replace("<bytes>: ", "")) from None
            if len(answers) != a.size:
                raise FetchError(f"{source} has {len(answers)} answers; the released model's head has {a.size}")
            path = self.opts.dest / a.filename
            part = path.with_name(a.filename + ".part")
            atomic_write_bytes(part, (json.dumps(answers, ensure_ascii=False) + "\n").encode("utf-8"))
            self._install(part, path, a.filename, source, self._pinned(a.filename) or {}, part.stat().st_size)

    def _archive_label(self) -> str:
        if self.opts.archive is not None:
            return str(self.opts.archive)
        return urllib.parse.urljoin(self.opts.base_url, ARCHIVE_NAME)

    def _read_archive(self, members: list[str]) -> dict[str, bytes]:
        label = self._archive_label()
        if self.opts.archive is not None:
            try:
                f = open(self.opts.archive, "rb")
            except OSError as exc:
                raise FetchError(f"cannot read --archive {self.opts.archive}: {exc.strerror or exc}") from None
            with f:
                return read_tar_members(f, members, label)
        self.log(f"{ARCHIVE_NAME}: streaming {label} for {len(members)} answer list(s) (stops once found)")
        stream = ResumingStream(self.http, label, ARCHIVE_NAME)
        try:
            return read_tar_members(stream, members, label)
        finally:
            stream.close()

    def run(self) -> None:
        for name in WEIGHT_FILES:
            self.fetch_file(name)
        self.fetch_categories()
        self.install_vocab()
        if not self.opts.skip_answers:
            self.install_answers()


def _lock(dest: Path):
    """Exclusive lock on DEST so two fetchers (e.g. two hosts on a shared volume) do not interleave."""
    handle = open(dest / ".fetch.lock", "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise FetchError(f"another fetch is running in {dest}") from None
    return handle


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fetch.py", description=__doc__.split("\n\n")[0],
        epilog="Offline? Copy the files into DEST by hand (they are adopted and recorded), and give the "
               "answer lists with --archive or --vqa-label2ans/--gqa-label2ans.")
    parser.add_argument("--dest", type=Path, default=None,
                        help="weights directory (default: $MODEL_DIR, else models/weights)")
    parser.add_argument("--base-url", default=None,
                        help=f"release host (default: ${BASE_URL_ENV}, else {DEFAULT_BASE_URL})")
    parser.add_argument("--categories-url", default=None,
                        help=f"where {CATEGORIES_FILE} is (default: {CATEGORIES_PATH} relative to the release host)")
    parser.add_argument("--archive", type=Path, help=f"local copy of {ARCHIVE_NAME} to read the answer lists from")
    parser.add_argument("--vqa-label2ans", type=Path, help="local datasets/VQA/cache/trainval_label2ans.pkl")
    parser.add_argument("--gqa-label2ans", type=Path, help="local datasets/gqa/cache/trainval_label2ans.pkl")
    parser.add_argument("--expect", type=Path,
                        help="manifest.json whose sizes and sha256 every file must match (e.g. from another host)")
    parser.add_argument("--verify", action="store_true", help="re-hash installed files instead of trusting size+mtime")
    parser.add_argument("--refresh", action="store_true",
                        help="download everything again and record the new checksums (a new release)")
    parser.add_argument("--skip-answers", action="store_true", help="do not build the VQA/GQA answer lists")
    parser.add_argument("--retries", type=int, default=3, help="retries per file after a dropped connection")
    parser.add_argument("--retry-wait", type=float, default=1.0,
                        help="seconds before the first retry (doubling after each further failure)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds without data before a retry")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    dest = args.dest or Path(os.environ.get("MODEL_DIR") or Path(__file__).resolve().parent / "weights")
    base_url = args.base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
        print(f"fetch: error: --base-url must be an http(s) URL, got {base_url!r}", file=sys.stderr)
        return 2
    if not base_url.endswith("/"):
        base_url += "/"
    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"fetch: {msg}", file=sys.stderr, flush=True))
    try:
        dest.mkdir(parents=True, exist_ok=True)
        opts = Options(
            dest=dest, base_url=base_url, archive=args.archive,
            label2ans={k: v for k, v in (("vqa_answers.json", args.vqa_label2ans),
                                         ("gqa_answers.json", args.gqa_label2ans)) if v is not None},
            expect=args.expect, verify=args.verify, refresh=args.refresh, skip_answers=args.skip_answers,
            quiet=args.quiet, categories_url=args.categories_url)
        with _lock(dest):
            http = Http(timeout=args.timeout, retries=max(0, args.retries), backoff=max(0.0, args.retry_wait),
                        quiet=args.quiet, log=log)
            Fetcher(opts, http, log).run()
    except FetchError as exc:
        print(f"fetch: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, permission denied, ...
        print(f"fetch: error: {exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fetch: interrupted; rerun to resume", file=sys.stderr)
        return 130
    log(f"done: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
