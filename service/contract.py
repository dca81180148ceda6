"""The contract between the web tier and the model worker: what one writes to Redis and the other reads.

Both processes import this module and neither owns it; it imports nothing from either side (and no torch, no
Flask, no RQ), so the arrows of the import picture point into it from both.

- `JobRequest`: the job payload, queued as JSON in the RQ job's kwargs; `to_json`/`from_json` round-trip it.
  Whether the uploads are images or feature records is its `inputs` field.
- Redis keys besides RQ's own: the uploads of a job, the liveness key of a worker, the feature cache's prefix.
- The error shape a client sees (`{"code", "message"[, "stage"]}`) and the codes the two processes agree on.
- Stage names (job progress) and timing names (a result's `timings`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping, get_args

# ------------------------------------------------------------------------------------------------ job payload

Inputs = Literal["images", "features"]
INPUTS: tuple[str, ...] = get_args(Inputs)
# What a job does: run the tasks on its uploads ("inference"), index its uploads into a collection, or search a
# collection by its text (service.worker.collections; the collection is named in `collection`).
Kind = Literal["inference", "collection_add", "collection_search"]
KINDS: tuple[str, ...] = get_args(Kind)


@dataclass
class ImageInfo:
    """What the web tier learnt about one upload: the image's size, the upload's length and the size of the
    decoded uint8 RGB array the worker will hold for it (0 for precomputed features)."""

    width: int
    height: int
    bytes: int
    decoded_bytes: int = 0


@dataclass
class JobRequest:
    """What the worker needs besides the uploads (which travel separately, in the job's upload hash)."""

    text: str
    tasks: list[str]
    top_k: int = 3
    boxes: list[list[float]] | None = None  # candidate boxes on the first image (pointing tasks)
    images: list[ImageInfo] = field(default_factory=list)  # one per upload, in upload order
    inputs: Inputs = "images"  # "features": the uploads are validated region-feature files (.npz), not images
    kind: Kind = "inference"
    collection: str | None = None  # the collection of a collection_add or collection_search job
    ground: bool = True  # collection_search: give each hit the top refcoco region for the text
    # collection_search: the lexical first stage runs above this many images (None: never) and passes on
    # rerank_top images to ViLBERT (the web tier resolves them from the settings and the request's first_stage)
    first_stage_above: int | None = None
    rerank_top: int = 200

    def __post_init__(self) -> None:
        if self.inputs not in INPUTS:
            raise ValueError(f"inputs must be one of {INPUTS}, got {self.inputs!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "JobRequest":
        return cls(text=data["text"], tasks=list(data["tasks"]), top_k=int(data.get("top_k", 3)),
                   boxes=data.get("boxes"), images=[ImageInfo(**info) for info in data.get("images", [])],
                   inputs=data.get("inputs", "images"), kind=data.get("kind", "inference"),
                   collection=data.get("collection"), ground=bool(data.get("ground", True)),
                   first_stage_above=data.get("first_stage_above"), rerank_top=int(data.get("rerank_top", 200)))


# ------------------------------------------------------------------------------------------------- Redis keys

UPLOAD_PREFIX = "vilbert:upload:"  # + job id: hash of upload index -> bytes, expires after UPLOAD_TTL
# + queue name: the byte budget's ledger of stored uploads (service.queue.admit_uploads): a sorted set of job id
# by expiry time, and a hash of job id -> upload bytes.
UPLOAD_LEDGER_PREFIX = "vilbert:upload-ledger:"
ALIVE_PREFIX = "vilbert:worker-alive:"  # + RQ worker name: JSON about a worker with its models loaded
FEATURE_CACHE_PREFIX = "vilbert:feat:"  # the worker's region-feature cache (service.worker.cache)
COLLECTION_PREFIX = "vilbert:coll:"  # + name + ":regions" / ":meta" / ":thumbs" / ":pending": a collection
# (service.collections); the set of every collection's name (for MAX_COLLECTIONS). No name starts with "_".
COLLECTION_NAMES_KEY = COLLECTION_PREFIX + "_names"

# The function name the web tier enqueues jobs under. The batch worker never calls it: it computes every job's
# outcome itself (service.worker.rq_batch); the function raises if anything else ever runs a job.
JOB_FUNCTION = "service.worker.rq_batch.batched_only"


def upload_key(job_id: str) -> str:
    return UPLOAD_PREFIX + job_id


def upload_ledger_keys(queue_name: str) -> tuple[str, str]:
    """(expiry sorted set, sizes hash) of the byte budget's ledger for one queue."""
    return UPLOAD_LEDGER_PREFIX + queue_name + ":expiry", UPLOAD_LEDGER_PREFIX + queue_name + ":bytes"


def alive_key(worker_name: str) -> str:
    return ALIVE_PREFIX + worker_name


# ------------------------------------------------------------------------------------------------------ errors


def error_body(code: str, message: str, stage: str | None = None) -> dict[str, str]:
    """The error object of a failed job or an error response: {"code", "message"} and, from the worker, "stage"."""
    body = {"code": code, "message": message}
    if stage is not None:
        body["stage"] = stage
    return body


# Codes both processes write or read (the web tier's input codes are in service.web.inputs).
UPLOAD_EXPIRED = "upload_expired"
TIMEOUT = "timeout"
WORKER_LOST = "worker_lost"
CANCELED = "canceled"
INTERNAL_ERROR = "internal_error"
NON_FINITE_OUTPUT = "non_finite_output"  # the model produced NaN or infinity: no strict-JSON result exists

# ------------------------------------------------------------------------------------------- stages, timings

# The pipeline's stages, in order: a running job's `stage`, and (with "_s") its result's timings.
DECODE, DETECTOR, VILBERT = "decode", "detector", "vilbert"
# A job's `stage`: "queued" until a worker takes it, "starting" (the web tier's word until the worker's first
# update), then the pipeline's stages; "failed" is recorded with an error.
STAGE_QUEUED, STAGE_STARTING, STAGE_FAILED = "queued", "starting", "failed"
STAGES = (DECODE, DETECTOR, VILBERT, "done")
# A collection job's stages: "indexing" (stage_detail "done/total" images) and "searching".
INDEXING, SEARCHING = "indexing", "searching"
COLLECTION_STAGES = (INDEXING, SEARCHING)
# Where an error can happen besides the pipeline's stages (an error's `stage`): reading the job's inputs in the
# worker, and the batch as a whole (an unexpected failure of the batch loop).
ERROR_AT_LOAD, ERROR_AT_BATCH = "load", "batch"

# The names in a result's `timings` (seconds, each with "_s"); the worker metrics add a "total" per job.
TIMINGS = ("queue_wait", DECODE, DETECTOR, VILBERT, "run")


def timing_key(name: str) -> str:
    return f"{name}_s"


# The buckets of every latency histogram, web and worker alike, so their dashboards line up.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
