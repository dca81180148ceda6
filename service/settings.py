"""The one settings module: every knob of the web tier, the worker and `serve.py`, read from environment
variables and validated together, so a typo fails at start with every problem listed, not at the first job.

Importing this module imports neither torch nor redis.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from modelkit.regions import REGIONS_PER_IMAGE

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "weights"
from modelkit.precision import PRECISIONS  # noqa: E402  (the one table of precision names)
# Task set for a request that names none: one answer head of each family that reads one image.
DEFAULT_TASKS = ("vqa", "gqa", "snli_ve", "refcoco", "retrieval_coco")


class SettingsError(ValueError):
    """One or more environment variables are invalid; `problems` lists each one."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid settings:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    queue_name: str = "vilbert"
    model_dir: Path = DEFAULT_MODEL_DIR
    device: str = "auto"  # auto = cuda when available, else cpu (resolved by the worker)
    precision: str = "fp32"
    detector_min_size: int = 800
    detector_max_size: int = 1333
    detector_num_regions: int = REGIONS_PER_IMAGE
    # Queue and storage lifetimes, in seconds.
    job_timeout: int = 300  # a started job is killed after this long
    upload_ttl: int = 3600  # uploaded images (and the queued job) are dropped if not started within this
    result_ttl: int = 3600  # finished results are kept this long
    failure_ttl: int = 86400  # failed jobs are kept this long
    # A worker refreshes its liveness key every heartbeat_ttl/3 s; a started job whose worker's key is gone
    # is failed as "worker_lost", so a killed worker is noticed within about heartbeat_ttl seconds.
    worker_heartbeat_ttl: int = 15
    # Request limits.
    max_upload_bytes: int = 20 * 1024 * 1024
    max_images: int = 8
    max_text_chars: int = 1000
    max_image_pixels: int = 40_000_000
    max_top_k: int = 20
    max_queued_jobs: int = 1000
    # Bytes of uploads that may wait in Redis at once (queued and running jobs); past it a submission gets 503
    # queue_full. Redis's maxmemory must exceed this plus the feature cache (docs/OPERATIONS.md, sizing).
    max_queued_bytes: int = 1 << 30
    # Decoded images (uint8 RGB, 3 bytes a pixel) a worker holds at once: per request (checked at submission)
    # and per batch (a worker stops taking partners once its batch reaches it). docs/OPERATIONS.md, memory sizing.
    max_decoded_bytes_per_request: int = 400_000_000
    max_decoded_bytes_per_batch: int = 800_000_000
    redis_timeout: float = 5.0
    log_level: str = "INFO"
    # Scale (service/worker/cache.py, service/worker/rq_batch.py, service/*/metrics.py; docs/OPERATIONS.md).
    feature_cache_ttl: int = 86400  # seconds a cached image's region features live unused; 0 = no cache
    feature_cache_max_entries: int = 2000
    feature_cache_max_bytes: int = 1 << 30
    batch_max_jobs: int = 8  # a worker runs up to this many waiting jobs as one batch; 1 = no batching
    batch_max_wait_ms: int = 2  # how long a worker waits for partners once it has a job (under load they are
    # already queued when it finishes a batch; the wait only matters for near-simultaneous arrivals)
    worker_metrics_port: int = 0  # the worker's Prometheus /metrics port; 0 = off
    # Collections (service/web/collections.py, docs/API.md "Collections").
    max_collection_upload_images: int = 16  # per add request: one job, within JOB_TIMEOUT even on a CPU (~13 s each)
    max_collection_images: int = 10_000  # images per collection (stored and pending)
    max_collection_bytes: int = 4 << 30  # stored bytes (region records and thumbnails) per collection
    max_collections: int = 100
    # A search of a collection with more images than this ranks them by the words of their region names first
    # (BM25) and scores only the best COLLECTION_RERANK_TOP with ViLBERT (docs/SCALE.md: 1,000 images take about
    # 70 s on a 2-core CPU in fp32, about 1 s on an H200; raise it on a GPU).
    collection_first_stage_above: int = 1000
    collection_rerank_top: int = 200

    @property
    def heartbeat_interval(self) -> float:
        return self.worker_heartbeat_ttl / 3.0


class Parser:
    """One setting's parser: `parse(raw)` returns the value or raises ValueError saying what is allowed, and
    `allowed` says it for the docs table and `python -m service.settings`."""

    allowed: str = ""

    def __call__(self, raw: str) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class IntRange(Parser):
    low: int
    high: int | None = None

    @property
    def allowed(self) -> str:  # type: ignore[override]
        return f"{self.low} … {self.high}" if self.high is not None else f">= {self.low}"

    def __call__(self, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError("must be an integer") from None
        if value < self.low or (self.high is not None and value > self.high):
            raise ValueError(f"must be between {self.low} and {self.high}" if self.high is not None
                             else f"must be >= {self.low}")
        return value


class PositiveFloat(Parser):
    allowed = "> 0"

    def __call__(self, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("must be a number") from None
        if not value > 0:
            raise ValueError("must be > 0")
        return value


@dataclass(frozen=True)
class Choice(Parser):
    options: tuple[str, ...]

    @property
    def allowed(self) -> str:  # type: ignore[override]
        return ", ".join(self.options)

    def __call__(self, raw: str) -> str:
        value = raw.strip().lower()
        if value not in self.options:
            raise ValueError(f"must be one of {self.allowed}")
        return value


@dataclass(frozen=True)
class Matching(Parser):
    """A string (stripped; lower-cased when `lower`) that `pattern` matches in full; `allowed` is the message."""

    pattern: str
    allowed: str  # type: ignore[misc]
    lower: bool = False

    def __call__(self, raw: str) -> str:
        value = raw.strip().lower() if self.lower else raw.strip()
        if not re.fullmatch(self.pattern, value):
            raise ValueError(f"must be {self.allowed}")
        return value


class RedisUrl(Parser):
    allowed = "a redis://, rediss:// or unix:// URL"

    def __call__(self, raw: str) -> str:
        value = raw.strip()
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value


class DirectoryPath(Parser):
    allowed = "a path (~ expanded)"

    def __call__(self, raw: str) -> Path:  # never empty: load_settings gives an empty variable its default
        return Path(raw.strip()).expanduser()


# field name -> (environment variable, parser)
_ENV: dict[str, tuple[str, Parser]] = {
    "redis_url": ("REDIS_URL", RedisUrl()),
    "queue_name": ("QUEUE_NAME", Matching(r"[A-Za-z0-9_.-]{1,64}", "1-64 letters, digits, '_', '.' or '-'")),
    "model_dir": ("MODEL_DIR", DirectoryPath()),
    "device": ("DEVICE", Matching(r"auto|cpu|cuda|cuda:\d+|mps", "auto, cpu, cuda, cuda:N or mps", lower=True)),
    "precision": ("PRECISION", Choice(PRECISIONS)),
    "detector_min_size": ("DETECTOR_MIN_SIZE", IntRange(32, 4000)),
    "detector_max_size": ("DETECTOR_MAX_SIZE", IntRange(32, 8000)),
    "detector_num_regions": ("DETECTOR_NUM_REGIONS", IntRange(1, REGIONS_PER_IMAGE)),
    "job_timeout": ("JOB_TIMEOUT", IntRange(1)),
    "upload_ttl": ("UPLOAD_TTL", IntRange(10)),
    "result_ttl": ("RESULT_TTL", IntRange(1)),
    "failure_ttl": ("FAILURE_TTL", IntRange(1)),
    "worker_heartbeat_ttl": ("WORKER_HEARTBEAT_TTL", IntRange(2, 3600)),
    "max_upload_bytes": ("MAX_UPLOAD_BYTES", IntRange(1024)),
    "max_images": ("MAX_IMAGES", IntRange(1, 64)),
    "max_text_chars": ("MAX_TEXT_CHARS", IntRange(1, 100_000)),
    "max_image_pixels": ("MAX_IMAGE_PIXELS", IntRange(1024)),
    "max_top_k": ("MAX_TOP_K", IntRange(1, 1000)),
    "max_queued_jobs": ("MAX_QUEUED_JOBS", IntRange(1)),
    "max_queued_bytes": ("MAX_QUEUED_BYTES", IntRange(1024)),
    "max_decoded_bytes_per_request": ("MAX_DECODED_BYTES_PER_REQUEST", IntRange(1024)),
    "max_decoded_bytes_per_batch": ("MAX_DECODED_BYTES_PER_BATCH", IntRange(1024)),
    "redis_timeout": ("REDIS_TIMEOUT", PositiveFloat()),
    "log_level": ("LOG_LEVEL", Choice(("debug", "info", "warning", "error"))),
    "feature_cache_ttl": ("FEATURE_CACHE_TTL", IntRange(0)),
    "feature_cache_max_entries": ("FEATURE_CACHE_MAX_ENTRIES", IntRange(1)),
    "feature_cache_max_bytes": ("FEATURE_CACHE_MAX_BYTES", IntRange(1024)),
    "batch_max_jobs": ("BATCH_MAX_JOBS", IntRange(1, 256)),
    "batch_max_wait_ms": ("BATCH_MAX_WAIT_MS", IntRange(0, 10_000)),
    "worker_metrics_port": ("WORKER_METRICS_PORT", IntRange(0, 65535)),
    "max_collection_upload_images": ("MAX_COLLECTION_UPLOAD_IMAGES", IntRange(1, 1000)),
    "max_collection_images": ("MAX_COLLECTION_IMAGES", IntRange(1)),
    "max_collection_bytes": ("MAX_COLLECTION_BYTES", IntRange(1024)),
    "max_collections": ("MAX_COLLECTIONS", IntRange(1)),
    "collection_first_stage_above": ("COLLECTION_FIRST_STAGE_ABOVE", IntRange(0)),
    "collection_rerank_top": ("COLLECTION_RERANK_TOP", IntRange(1, 100_000)),
}

ENV_VARIABLES = {name: env for name, (env, _) in _ENV.items()}


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from `environ` (default os.environ); unset or empty variables take the defaults.
    Raises SettingsError naming every invalid variable."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    problems: list[str] = []
    for name, (env, parse) in _ENV.items():
        raw = environ.get(env)
        if raw is None or raw.strip() == "":
            continue
        try:
            values[name] = parse(raw)
        except ValueError as exc:
            problems.append(f"{env}={raw!r}: {exc}")
    if "log_level" in values:
        values["log_level"] = values["log_level"].upper()
    settings = Settings(**values)
    if settings.detector_max_size < settings.detector_min_size:
        problems.append("DETECTOR_MAX_SIZE must be >= DETECTOR_MIN_SIZE")
    if problems:
        raise SettingsError(problems)
    return settings


@dataclass(frozen=True)
class SettingInfo:
    """One row of the settings table: the variable, its default as the docs write it, and what it accepts."""

    variable: str
    default: str
    allowed: str


def describe() -> list[SettingInfo]:
    """Every setting in field order, for docs/SERVICE.md (tests hold the table to this) and
    `python -m service.settings`."""
    defaults = Settings()
    rows = []
    for f in fields(Settings):
        variable, parser = _ENV[f.name]
        default = getattr(defaults, f.name)
        if isinstance(default, Path):  # MODEL_DIR's default, inside the checkout: written as the docs do
            default = default.relative_to(REPO_ROOT).as_posix() + "/"
        rows.append(SettingInfo(variable, str(default), parser.allowed))
    return rows


def main(argv: list[str] | None = None) -> int:
    """`python -m service.settings`: every setting with its default, what it accepts and the value this
    environment gives it; exit status 1 (with one line per problem) when the environment is invalid."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m service.settings", description=main.__doc__)
    parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 1
    given = {env: str(getattr(settings, name)) for name, (env, _) in _ENV.items() if os.environ.get(env, "").strip()}
    rows = [("variable", "default", "allowed", "this environment")]
    rows += [(row.variable, row.default, row.allowed, given.get(row.variable, "(default)")) for row in describe()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    return 0


if __name__ == "__main__":
    sys.exit(main())
