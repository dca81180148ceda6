"""Turning a client's submission into a validated job request, as plain functions (no Flask).

The routes call `parse_submission` (images) or `parse_feature_submission` (precomputed region features) with the
form fields and uploaded files; everything a client can get wrong is reported as a BadRequest with a stable code,
before anything is queued.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence, TypeVar

from detector.images import ImageDecodeError, probe_image
from modelkit.boundedjson import JsonBudgetError, JsonSyntaxError, loads_bounded
from modelkit.regions import VISUAL_ROWS_PER_IMAGE
from vilbert.tasks import TaskRegistry, UnknownTaskError

from ..boxes import check_boxes
from ..contract import ImageInfo, JobRequest
from ..errors import BadRequest
from ..features import parse_features, to_npz
from ..queue import live_workers
from ..settings import DEFAULT_TASKS, Settings

# Form field names; the second of each pair is the classic demo's name (curl --form fileupload=@… text_input=…).
IMAGE_FIELDS = ("image", "fileupload")
TEXT_FIELDS = ("text", "text_input")
T = TypeVar("T")
# Budgets of the small fields, checked before they are parsed. The task names of a request are at most all of
# them (about 20, each under 30 characters); boxes are at most as many as any pointing task takes, each four
# numbers of at most about 24 characters.
MAX_TASKS_CHARS = 1000
MAX_TOP_K_CHARS = 8
MAX_BOXES = 256
ASCII_INTEGER = re.compile(r"[+-]?[0-9]+")
MAX_BOXES_CHARS = MAX_BOXES * 4 * 32


def parse_text(raw: str | None, max_chars: int) -> str:
    if raw is None:
        raise BadRequest("missing_text", "the form field 'text' (or 'text_input') is required")
    text = raw.strip()
    if not text:
        raise BadRequest("empty_text", "the text is empty")
    if len(text) > max_chars:
        raise BadRequest("text_too_long", f"the text has {len(text)} characters, the limit is {max_chars}")
    return text


def parse_tasks(raw: str | None, registry: TaskRegistry, image_count: int) -> list[str]:
    """Comma-separated task names; none given -> a default set that fits the number of images."""
    if raw is None or not raw.strip():
        if image_count == 2:
            return ["nlvr2", "retrieval_coco"]
        if image_count > 2:
            return ["retrieval_coco"]
        return list(DEFAULT_TASKS)
    if len(raw) > MAX_TASKS_CHARS:
        raise BadRequest("unknown_task", f"'tasks' is {len(raw)} characters long, the limit is {MAX_TASKS_CHARS}")
    names = [name.strip() for name in raw.split(",") if name.strip()]
    if not names:
        raise BadRequest("no_tasks", "no task named in 'tasks'")
    try:
        return [task.name for task in registry.resolve(names)]
    except UnknownTaskError as exc:
        raise BadRequest("unknown_task", str(exc)) from None


def parse_top_k(raw: str | None, max_top_k: int) -> int:
    if raw is None or not raw.strip():
        return 3
    if len(raw.strip()) > MAX_TOP_K_CHARS:
        raise BadRequest("invalid_top_k", f"top_k must be between 1 and {max_top_k}")
    if not ASCII_INTEGER.fullmatch(raw.strip()):  # int() would also take "1_0" and non-ASCII digits
        raise BadRequest("invalid_top_k", f"top_k must be an integer, got {raw!r}")
    value = int(raw.strip())
    if not 1 <= value <= max_top_k:
        raise BadRequest("invalid_top_k", f"top_k must be between 1 and {max_top_k}, got {value}")
    return value


def parse_boxes(raw: str | None) -> list[list[float]] | None:
    """Candidate boxes as JSON: [[x1, y1, x2, y2], ...] in pixels of the first image. The text is parsed within a
    budget (length, two levels of nesting, finite numbers of bounded size: modelkit.boundedjson)."""
    if raw is None or not raw.strip():
        return None
    try:
        boxes = loads_bounded(raw, MAX_BOXES_CHARS, max_depth=2)
    except JsonSyntaxError:
        raise BadRequest("invalid_boxes", "boxes must be JSON: [[x1, y1, x2, y2], ...]") from None
    except JsonBudgetError as exc:
        raise BadRequest("invalid_boxes", f"boxes refused: {exc}") from None
    if not isinstance(boxes, list) or not boxes:
        raise BadRequest("invalid_boxes", "boxes must be a non-empty JSON list of [x1, y1, x2, y2]")
    if len(boxes) > MAX_BOXES:
        raise BadRequest("too_many_boxes", f"{len(boxes)} boxes sent, the limit is {MAX_BOXES}")
    parsed = []
    for index, box in enumerate(boxes):
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            raise BadRequest("invalid_boxes", f"box {index} must be a list of four numbers [x1, y1, x2, y2]")
        parsed.append([float(v) for v in box])
    return parsed


def check_image(data: bytes, max_pixels: int) -> ImageInfo:
    """Prove from its headers alone that the upload is an image we accept: format, size and decode cost within the
    pixel budget, not cut short (detector.images.probe_image). Nothing is decoded here: the worker decodes once."""
    try:
        header = probe_image(data, max_pixels)
    except ImageDecodeError as exc:
        status = 413 if exc.code == "image_too_large" else 400
        raise BadRequest(exc.code, exc.message, status=status) from None
    return ImageInfo(width=header.width, height=header.height, bytes=len(data), decoded_bytes=header.rgb_bytes)


def check_request(request: JobRequest, registry: TaskRegistry, image_count: int) -> None:
    """Image counts and candidate boxes against what the requested tasks need."""
    for name in request.tasks:
        task = registry.get(name)
        if task.max_images != 1 and not task.accepts_image_count(image_count):
            raise BadRequest("image_count", f"task {task.name} needs {task.images} images, got {image_count}")
        if task.needs_candidates:
            if not request.boxes:
                raise BadRequest("missing_boxes", f"task {task.name} needs candidate boxes in the 'boxes' field")
            limit = task.max_region_num - VISUAL_ROWS_PER_IMAGE  # rows left after the image's own rows
            if len(request.boxes) > limit:
                raise BadRequest("too_many_boxes", f"task {task.name} takes at most {limit} candidate boxes")
    if request.boxes and request.images:
        check_boxes(request.boxes, request.images[0].width, request.images[0].height)


def parse_submission(form: Mapping[str, str], images: Sequence[bytes], settings: Settings,
                     registry: TaskRegistry) -> JobRequest:
    """Validate a submission (form fields + raw image uploads) into a JobRequest, or raise BadRequest."""
    if not images:
        raise BadRequest("missing_image", "at least one image file is required (form field 'image' or 'fileupload')")
    text, tasks, top_k = _common_fields(form, len(images), "images", settings, registry)
    boxes = parse_boxes(form.get("boxes"))
    infos = _each(images, "image", lambda data: check_image(data, settings.max_image_pixels))
    decoded = sum(info.decoded_bytes for info in infos)
    if decoded > settings.max_decoded_bytes_per_request:
        raise BadRequest("images_too_large", f"the images decode to {decoded} bytes together, the limit per request "
                                             f"is {settings.max_decoded_bytes_per_request}", status=413)
    request = JobRequest(text=text, tasks=tasks, top_k=top_k, boxes=boxes, images=infos)
    check_request(request, registry, len(images))
    return request


def _common_fields(form: Mapping[str, str], count: int, noun: str, settings: Settings,
                   registry: TaskRegistry) -> tuple[str, list[str], int]:
    """The upload count, text, tasks and top_k of either kind of submission, checked in this order."""
    if count > settings.max_images:
        raise BadRequest("too_many_images", f"{count} {noun} sent, the limit is {settings.max_images}")
    text = parse_text(_first(form, TEXT_FIELDS), settings.max_text_chars)
    return text, parse_tasks(form.get("tasks"), registry, count), parse_top_k(form.get("top_k"), settings.max_top_k)


def _each(uploads: Sequence[bytes], label: str, check: Callable[[bytes], T]) -> list[T]:
    """check(upload) for every upload; a failure says which upload it was."""
    checked = []
    for index, data in enumerate(uploads):
        try:
            checked.append(check(data))
        except BadRequest as exc:
            raise BadRequest(exc.code, f"{label} {index}: {exc.message}", status=exc.status) from None
    return checked


def _first(form: Mapping[str, str], names: Sequence[str]) -> str | None:
    for name in names:
        if form.get(name) is not None:
            return form.get(name)
    return None


def model_feature_dim(connection: Any) -> int | None:
    """The feature width of the ready workers' model, when they agree on one (else the worker checks)."""
    dims = {w.get("feature_dim") for w in live_workers(connection)}
    return dims.pop() if len(dims) == 1 and None not in dims else None


def parse_feature_submission(form: Mapping[str, str], files: Sequence[bytes], images: Sequence[bytes],
                             settings: Settings, registry: TaskRegistry,
                             expected_dim: int | None) -> tuple[JobRequest, list[bytes]]:
    """Validate a submission of precomputed features (form field `features`, one file per image) into a job
    request and the files to store with it (re-encoded as .npz after validation; service.features)."""
    if images:
        raise BadRequest("mixed_inputs", "send either images or precomputed features, not both")
    text, tasks, top_k = _common_fields(form, len(files), "feature files", settings, registry)
    if form.get("boxes"):
        raise BadRequest("boxes_need_image", "candidate boxes need the image itself, not precomputed features")
    regions = _each(files, "features", lambda data: parse_features(data, expected_dim))
    infos = [ImageInfo(width=r.image_width, height=r.image_height, bytes=len(d)) for r, d in zip(regions, files)]
    request = JobRequest(text=text, tasks=tasks, top_k=top_k, boxes=None, images=infos, inputs="features")
    check_request(request, registry, len(files))
    return request, [to_npz(r) for r in regions]
