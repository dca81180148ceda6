"""The HTTP API of collections (issue 14): add images, look a collection up, search it by caption, delete.

Adding and searching are jobs on the same queue as inference jobs (JobRequest.kind "collection_add" /
"collection_search"); the batch worker runs them one at a time with its models (service.worker.rq_batch). The
plain functions below do the checks and the Redis work; `collections_blueprint`'s routes only parse the request
and answer JSON.
"""

from __future__ import annotations

import uuid
from typing import Mapping, NamedTuple, Sequence

from flask import Blueprint, Response, jsonify, request, url_for
from redis import Redis
from rq.job import Job

from ..collections import IMAGE_ID, CollectionStore, image_id_of
from ..contract import ImageInfo, JobRequest
from ..errors import BadRequest, NotFound, ServiceError
from ..settings import Settings
from .inputs import check_image, parse_text, parse_top_k
from .jobs import submit

SEARCH_TASKS = ("retrieval_coco", "retrieval_flickr30k")  # as service.worker.collections (which imports torch)
SEARCH_DEFAULT_TOP_K = 10
SEARCH_MAX_TOP_K = 100
IMAGE_FIELD = "image"


class Conflict(ServiceError):
    """A request the collection's state refuses (a limit reached)."""

    status = 409


# ------------------------------------------------------------------------------------------------ adding


def check_uploads(images: Sequence[bytes], settings: Settings) -> list[ImageInfo]:
    """The images of one add request: at least one, at most MAX_COLLECTION_UPLOAD_IMAGES, each an image we
    accept (headers only: check_image)."""
    if not images:
        raise BadRequest("missing_image", f"at least one image file is required (form field '{IMAGE_FIELD}')")
    if len(images) > settings.max_collection_upload_images:
        raise BadRequest("too_many_uploads", f"{len(images)} images sent, the limit per request is "
                                             f"{settings.max_collection_upload_images}")
    infos = []
    for index, data in enumerate(images):
        try:
            infos.append(check_image(data, settings.max_image_pixels))
        except BadRequest as exc:
            raise BadRequest(exc.code, f"image {index}: {exc.message}", status=exc.status) from None
    return infos


def admit(store: CollectionStore, settings: Settings, image_ids: Sequence[str], job_id: str) -> list[str]:
    """Admit an add of `image_ids` for the job `job_id` once the collection's limits allow it: MAX_COLLECTIONS for a
    new collection, MAX_COLLECTION_BYTES, MAX_COLLECTION_IMAGES (stored, pending and new). Returns the ids that are
    new (neither stored nor pending), now pending for the job, and the collection counted. Checked and written in
    one atomic step in Redis (CollectionStore.admit), so concurrent adds cannot pass the limits together."""
    admission = store.admit(image_ids, job_id, settings.upload_ttl, settings.max_collections,
                            settings.max_collection_bytes, settings.max_collection_images)
    if admission.refused is not None:
        reasons = {  # ADMIT's refusal codes; another code would be a bug (a KeyError: 500)
            "too_many_collections": f"there are {settings.max_collections} collections, the limit; delete one first",
            "collection_too_large": f"collection {store.name} stores {admission.count} bytes, the limit is "
                                    f"{settings.max_collection_bytes}",
            "collection_full": f"collection {store.name} would hold {admission.count} images, the limit is "
                               f"{settings.max_collection_images}",
        }
        raise Conflict(admission.refused, reasons[admission.refused])
    return admission.new


def submit_add(connection: Redis, settings: Settings, name: str, images: Sequence[bytes]) -> tuple[Job, list[str]]:
    """Check and queue an add job; returns it and the image ids, one per image in upload order."""
    store = CollectionStore(connection, name)
    infos = check_uploads(images, settings)
    image_ids = [image_id_of(data) for data in images]
    job_id = uuid.uuid4().hex
    admit(store, settings, image_ids, job_id)  # pending before queueing: the worker clears them when done
    request_ = JobRequest(text="", tasks=[], top_k=0, images=infos, kind="collection_add", collection=store.name)
    try:
        job = submit(connection, settings, request_, list(images), job_id=job_id)
    except BaseException:
        store.clear_pending(job_id)
        store.forget_if_empty()
        raise
    return job, image_ids


# ----------------------------------------------------------------------------------------- info, deleting


def collection_info(connection: Redis, name: str) -> dict:
    """{"name", "images", "pending", "bytes"}; a collection with no image and nothing pending is unknown."""
    store = CollectionStore(connection, name)
    info = store.info()
    stored = set(store.ids())
    pending = len(set(store.pending()) - stored)
    if not info.images and not pending:
        raise NotFound("unknown_collection", f"no collection {name} (or it has no image)")
    return {"name": store.name, "images": info.images, "pending": pending, "bytes": info.bytes}


def thumbnail(connection: Redis, name: str, image_id: str) -> bytes:
    return CollectionStore(connection, name).thumbnail(image_id)


def delete_image(connection: Redis, name: str, image_id: str) -> dict:
    store = CollectionStore(connection, name)
    if not IMAGE_ID.fullmatch(image_id) or not store.remove(image_id):
        raise NotFound("unknown_image", f"no image {image_id!r} in collection {store.name}")
    store.forget_if_empty()
    return {"deleted": image_id}


def delete_collection(connection: Redis, name: str) -> dict:
    store = CollectionStore(connection, name)
    if not store.image_count() and not store.pending():
        store.drop()  # a registered but empty collection is forgotten too
        raise NotFound("unknown_collection", f"no collection {name} (or it has no image)")
    return {"deleted": store.drop()}


# ---------------------------------------------------------------------------------------------- searching


class SearchFields(NamedTuple):
    text: str
    top_k: int
    task: str
    ground: bool
    first_stage_above: int | None  # resolved from the first_stage field and COLLECTION_FIRST_STAGE_ABOVE


def parse_search(form: Mapping[str, str], settings: Settings) -> SearchFields:
    """The fields of a search: text required, top_k 1..SEARCH_MAX_TOP_K (default 10), task one of SEARCH_TASKS
    (default retrieval_coco), ground a flag (default on), first_stage auto (default: above
    COLLECTION_FIRST_STAGE_ABOVE images), on (always) or off (never: every image scored by ViLBERT)."""
    text = parse_text(form.get("text"), settings.max_text_chars)
    raw_top_k = form.get("top_k")
    top_k = SEARCH_DEFAULT_TOP_K if raw_top_k is None or not raw_top_k.strip() else \
        parse_top_k(raw_top_k, SEARCH_MAX_TOP_K)
    task = (form.get("task") or "").strip() or SEARCH_TASKS[0]
    if task not in SEARCH_TASKS:
        raise BadRequest("unknown_task", f"task must be one of {', '.join(SEARCH_TASKS)}, got {task[:40]!r}")
    raw_stage = form.get("first_stage") or "auto"
    if raw_stage not in FIRST_STAGE_VALUES:
        raise BadRequest("invalid_flag", f"first_stage must be auto, on or off; got {raw_stage[:20]!r}")
    first_stage_above = FIRST_STAGE_VALUES[raw_stage] if raw_stage != "auto" else settings.collection_first_stage_above
    return SearchFields(text, top_k, task, parse_flag(form.get("ground"), "ground", default=True), first_stage_above)


# Exactly these spellings (the OpenAPI description lists them; anything else is refused, not guessed at).
FLAG_VALUES = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False, "no": False}
FIRST_STAGE_VALUES: dict[str, int | None] = {"on": 0, "off": None, "auto": None}  # auto: from the settings


def parse_flag(raw: str | None, field: str, default: bool) -> bool:
    """A yes/no form field: 1/true/on/yes or 0/false/off/no; absent or empty is the default."""
    if not raw:
        return default
    value = FLAG_VALUES.get(raw)
    if value is None:
        raise BadRequest("invalid_flag", f"{field} must be one of true/false, 1/0, on/off, yes/no; got {raw[:20]!r}")
    return value


def submit_search(connection: Redis, settings: Settings, name: str, form: Mapping[str, str]) -> Job:
    store = CollectionStore(connection, name)
    fields = parse_search(form, settings)
    if not store.image_count():
        raise NotFound("unknown_collection", f"no collection {name} (or it has no indexed image)")
    request_ = JobRequest(text=fields.text, tasks=[fields.task], top_k=fields.top_k, kind="collection_search",
                          collection=store.name, ground=fields.ground, first_stage_above=fields.first_stage_above,
                          rerank_top=settings.collection_rerank_top)
    return submit(connection, settings, request_, [])


# -------------------------------------------------------------------------------------------------- routes


def collections_blueprint(settings: Settings, connection: Redis) -> Blueprint:
    api = Blueprint("collections", __name__)

    def accepted(job: Job, name: str, **extra) -> tuple[Response, int, dict]:
        location = url_for("api.get_job", job_id=job.id)
        body = {"id": job.id, "status": "queued", "url": location, "collection": name, **extra}
        return jsonify(body), 202, {"Location": location}

    @api.post("/api/v1/collections/<name>/images")
    def add_images(name: str):
        CollectionStore(connection, name)  # the name first
        if IMAGE_FIELD in request.form:
            raise BadRequest("not_a_file", f"the form field '{IMAGE_FIELD}' must be a file upload "
                                           f"(curl --form {IMAGE_FIELD}=@path), not a text value")
        images = [data for upload in request.files.getlist(IMAGE_FIELD)
                  if (data := upload.read()) or upload.filename]
        job, image_ids = submit_add(connection, settings, name, images)
        return accepted(job, name, image_ids=image_ids)

    @api.get("/api/v1/collections/<name>")
    def get_collection(name: str):
        return jsonify(collection_info(connection, name))

    @api.get("/api/v1/collections/<name>/images/<image_id>/thumbnail")
    def get_thumbnail(name: str, image_id: str):
        return Response(thumbnail(connection, name, image_id), mimetype="image/jpeg")

    @api.delete("/api/v1/collections/<name>/images/<image_id>")
    def remove_image(name: str, image_id: str):
        return jsonify(delete_image(connection, name, image_id))

    @api.delete("/api/v1/collections/<name>")
    def remove_collection(name: str):
        return jsonify(delete_collection(connection, name))

    @api.post("/api/v1/collections/<name>/search")
    def search_collection(name: str):
        return accepted(submit_search(connection, settings, name, request.form), name)

    return api
