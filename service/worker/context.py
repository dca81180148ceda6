"""What a worker process runs with, made once by service.worker.main and passed to everything that needs it."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from redis import Redis

from ..settings import Settings
from .metrics import WorkerMetrics
from .pipeline import Pipeline


@dataclass
class WorkerContext:
    settings: Settings
    pipeline: Pipeline  # models loaded once; its feature cache (if any) is set up with it
    metrics: WorkerMetrics
    connection: Redis  # the worker's connection (long socket timeout: RQ blocks in BLPOP)
    # Set by the first SIGTERM/SIGINT (RQ's warm shutdown): the outer loop does not restart the worker then.
    stop: threading.Event = field(default_factory=threading.Event)
