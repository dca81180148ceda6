"""Turning a client's submission into a validated job request, as plain functions (no Flask, no Redis).

The API calls `parse_submission` with the form fields and uploaded files; everything a client can get wrong is
reported as a BadRequest with a stable code, before anything is queued.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

from detector.images import ImageDecodeError, load_image
from vilbert.tasks import TaskRegistry, UnknownTaskError

from .errors import BadRequest
from .settings import DEFAULT_TASKS, Settings

# Form field names; the second of each pair is the classic demo's name (curl --form fileupload=@… text_input=…).
IMAGE_FIELDS = ("image", "fileupload")
TEXT_FIELDS = ("text", "text_input")


@dataclass
class ImageInfo:
    width: int
    height: int
    bytes: int


@dataclass
class JobRequest:
    """What the worker needs besides the image bytes (which travel separately, in Redis)."""

    text: str
    tasks: list[str]
    top_k: int = 3
    boxes: list[list[float]] | None = None  # candidate boxes on the first image (pointing tasks)
    images: list[ImageInfo] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> "JobRequest":
        images = [ImageInfo(**info) for info in data.get("images", [])]
        return cls(text=data["text"], tasks=list(data["tasks"]), top_k=int(data.get("top_k", 3)),
                   boxes=data.get("boxes"), images=images)


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
    try:
        value = int(raw.strip())
    except ValueError:
        raise BadRequest("invalid_top_k", f"top_k must be an integer, got {raw!r}") from None
    if not 1 <= value <= max_top_k:
        raise BadRequest("invalid_top_k", f"top_k must be between 1 and {max_top_k}, got {value}")
    return value


def parse_boxes(raw: str | None) -> list[list[float]] | None:
    """Candidate boxes as JSON: [[x1, y1, x2, y2], ...] in pixels of the first image."""
    if raw is None or not raw.strip():
        return None
    try:
        boxes = json.loads(raw)
    except json.JSONDecodeError:
        raise BadRequest("invalid_boxes", "boxes must be JSON: [[x1, y1, x2, y2], ...]") from None
    if not isinstance(boxes, list) or not boxes:
        raise BadRequest("invalid_boxes", "boxes must be a non-empty JSON list of [x1, y1, x2, y2]")
    parsed = []
    for index, box in enumerate(boxes):
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            raise BadRequest("invalid_boxes", f"box {index} must be a list of four numbers [x1, y1, x2, y2]")
        parsed.append([float(v) for v in box])
    return parsed


def check_boxes(boxes: Sequence[Sequence[float]], width: int, height: int) -> None:
    """Boxes must be finite, non-empty and inside the image (the detector pools features from these pixels)."""
    for index, (x1, y1, x2, y2) in enumerate(boxes):
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            raise BadRequest("invalid_boxes", f"box {index} has a non-finite coordinate")
        if not (x2 > x1 and y2 > y1):
            raise BadRequest("invalid_boxes", f"box {index} must have x2 > x1 and y2 > y1")
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise BadRequest("invalid_boxes", f"box {index} {[x1, y1, x2, y2]} lies outside the {width}x{height} image")


def check_image(data: bytes, max_pixels: int) -> ImageInfo:
    """Decode the upload once to prove it is an image we accept (format, pixel limit, not truncated)."""
    try:
        rgb = load_image(data, max_pixels)
    except ImageDecodeError as exc:
        status = 413 if exc.code == "image_too_large" else 400
        raise BadRequest(exc.code, exc.message, status=status) from None
    return ImageInfo(width=int(rgb.shape[1]), height=int(rgb.shape[0]), bytes=len(data))


def check_request(request: JobRequest, registry: TaskRegistry, image_count: int) -> None:
    """Image counts and candidate boxes against what the requested tasks need."""
    for name in request.tasks:
        task = registry.get(name)
        if task.max_images != 1 and not task.accepts_image_count(image_count):
            raise BadRequest("image_count", f"task {task.name} needs {task.images} images, got {image_count}")
        if task.needs_candidates:
            if not request.boxes:
                raise BadRequest("missing_boxes", f"task {task.name} needs candidate boxes in the 'boxes' field")
            limit = task.max_region_num - 101  # rows left after the global region and 100 detected regions
            if len(request.boxes) > limit:
                raise BadRequest("too_many_boxes", f"task {task.name} takes at most {limit} candidate boxes")
    if request.boxes and request.images:
        check_boxes(request.boxes, request.images[0].width, request.images[0].height)


def parse_submission(form: Mapping[str, str], images: Sequence[bytes], settings: Settings,
                     registry: TaskRegistry) -> JobRequest:
    """Validate a submission (form fields + raw image uploads) into a JobRequest, or raise BadRequest."""
    if not images:
        raise BadRequest("missing_image", "at least one image file is required (form field 'image' or 'fileupload')")
    if len(images) > settings.max_images:
        raise BadRequest("too_many_images", f"{len(images)} images sent, the limit is {settings.max_images}")
    text = parse_text(_first(form, TEXT_FIELDS), settings.max_text_chars)
    tasks = parse_tasks(form.get("tasks"), registry, len(images))
    top_k = parse_top_k(form.get("top_k"), settings.max_top_k)
    boxes = parse_boxes(form.get("boxes"))
    infos = []
    for index, data in enumerate(images):
        try:
            infos.append(check_image(data, settings.max_image_pixels))
        except BadRequest as exc:
            raise BadRequest(exc.code, f"image {index}: {exc.message}", status=exc.status) from None
    request = JobRequest(text=text, tasks=tasks, top_k=top_k, boxes=boxes, images=infos)
    check_request(request, registry, len(images))
    return request


def _first(form: Mapping[str, str], names: Sequence[str]) -> str | None:
    for name in names:
        if form.get(name) is not None:
            return form.get(name)
    return None
