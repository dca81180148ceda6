"""OpenAPI 3.1 description of the HTTP API, served at /api/v1/openapi.json (a test keeps it equal to the routes)."""

from __future__ import annotations

from ..contract import COLLECTION_STAGES, STAGE_STARTING, STAGES
from ..settings import Settings
from .collections import SEARCH_DEFAULT_TOP_K, SEARCH_MAX_TOP_K, SEARCH_TASKS


def _error(description: str, retry_after: bool = False) -> dict:
    response = {"description": description,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    if retry_after:
        response["headers"] = {"Retry-After": {"required": True, "description": "seconds to wait before retrying",
                                               "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
    return response


def _json(description: str, schema: dict) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _submit_operation(summary: str, classic: bool, settings: Settings) -> dict:
    image_field = "fileupload" if classic else "image"
    text_field = "text_input" if classic else "text"
    return {
        "summary": summary,
        "operationId": "submitClassic" if classic else "submitJob",
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": [image_field, text_field],
            "properties": {
                image_field: {"type": "array", "items": {"type": "string", "format": "binary"},
                              "minItems": 1, "maxItems": settings.max_images,
                              "description": "one or more images (JPEG, PNG, GIF, BMP, TIFF, WEBP); "
                                             f"'{'image' if classic else 'fileupload'}' is accepted too"},
                text_field: {"type": "string", "minLength": 1, "maxLength": settings.max_text_chars,
                             "description": "question, caption, statement or referring expression (surrounding "
                                            "whitespace is stripped, then it must not be empty); "
                                            f"'{'text' if classic else 'text_input'}' is accepted too"},
                "tasks": {"type": "string", "description": "comma-separated task names (GET /api/v1/tasks); "
                                                           "default depends on the number of images"},
                "top_k": {"type": "integer", "minimum": 1, "maximum": settings.max_top_k,
                          "description": "answers/regions per task (default 3)"},
                "boxes": {"type": "string", "description": "JSON [[x1, y1, x2, y2], ...]: candidate boxes in pixels of "
                                                           "the first image, required by visual7w and guesswhat"},
                "features": {"type": "array", "items": {"type": "string", "format": "binary"},
                             "maxItems": settings.max_images,
                             "description": "instead of images: precomputed region features, one file per image, "
                                            "as a feature-store record (detector.store.encode_record) or an .npz "
                                            "with boxes [N,4], features [N,D], image_width, image_height "
                                            "(docs/OPERATIONS.md)"},
            },
        }}}},
        "responses": {
            "202": {"description": "queued", "headers": {"Location": {"required": True, "schema": {"type": "string"},
                                                                      "description": "the job's URL to poll"}},
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}},
                    "links": {"job": {"operationId": "getJob", "parameters": {"job_id": "$response.body#/id"},
                                      "description": "poll the job"}}},
            "400": _error("bad input: missing or empty text, not an image, unknown task, wrong image count, bad boxes, "
                          "bad top_k, a file field sent as text"),
            "413": _error("upload over the size limit, or an image over the pixel limit"),
            "503": _error("Redis unavailable or the queue is full", retry_after=True),
        },
    }


def _param(name: str, description: str) -> dict:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": {"type": "string"}}


NAME_PARAM = _param("name", "the collection: 1 to 63 lower-case letters, digits, '-' and '_', starting with a letter "
                            "or digit (else 400 invalid_collection)")
IMAGE_ID_PARAM = _param("image_id", "an image id as the add answered it (32 hex digits)")


def _collection_queued(operation_id: str, summary: str, body: dict, bad: str, settings: Settings,
                       extra: dict | None = None) -> dict:
    """A collection operation that queues a job (202, Location)."""
    return {
        "summary": summary, "operationId": operation_id, "parameters": [NAME_PARAM],
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": body}}},
        "responses": {
            "202": {"description": "queued", "headers": {"Location": {"required": True, "schema": {"type": "string"},
                                                                      "description": "the job's URL to poll"}},
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CollectionAccepted"}}},
                    "links": {"job": {"operationId": "getJob", "parameters": {"job_id": "$response.body#/id"},
                                      "description": "poll the job"}}},
            "400": _error(bad),
            **(extra or {}),
            "413": _error("request body over the size limit, or an image over the pixel limit"),
            "503": _error("Redis unavailable or the queue is full", retry_after=True),
        },
    }


def _collection_paths(settings: Settings) -> dict:
    add_body = {"type": "object", "required": ["image"], "properties": {"image": {
        "type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
        "maxItems": settings.max_collection_upload_images,
        "description": "the images to add (JPEG, PNG, GIF, BMP, TIFF, WEBP), the field repeated"}}}
    search_body = {"type": "object", "required": ["text"], "properties": {
        "text": {"type": "string", "minLength": 1, "maxLength": settings.max_text_chars,
                 "description": "the caption to rank the collection's images by"},
        "top_k": {"type": "integer", "minimum": 1, "maximum": SEARCH_MAX_TOP_K,
                  "description": f"hits to return (default {SEARCH_DEFAULT_TOP_K})"},
        "task": {"enum": list(SEARCH_TASKS), "description": f"the retrieval head (default {SEARCH_TASKS[0]})"},
        "ground": {"enum": ["true", "false", "1", "0", "on", "off", "yes", "no"],
                   "description": "give each hit the top refcoco region for the text (default true)"},
        "first_stage": {"enum": ["auto", "on", "off"],
                        "description": "rank by region names first and re-rank the best with ViLBERT: auto (default: "
                                       f"above {settings.collection_first_stage_above} images), on, off"}}}
    return {
        "/api/v1/collections/{name}": {
            "get": {"summary": "A collection: image count, images pending (uploaded, not indexed yet), stored bytes",
                    "operationId": "getCollection", "parameters": [NAME_PARAM],
                    "responses": {"200": _json("the collection", {"$ref": "#/components/schemas/Collection"}),
                                  "400": _error("invalid collection name"),
                                  "404": _error("unknown collection (no image, none pending)")}},
            "delete": {"summary": "Delete a collection and every image in it", "operationId": "deleteCollection",
                       "parameters": [NAME_PARAM],
                       "responses": {"200": _json("deleted; how many images it held", {
                           "type": "object", "required": ["deleted"],
                           "properties": {"deleted": {"type": "integer", "minimum": 0}}}),
                           "400": _error("invalid collection name"),
                           "404": _error("unknown collection")}},
        },
        "/api/v1/collections/{name}/images": {"post": _collection_queued(
            "addImages", "Add images to a collection (created on first use): a job that indexes them", add_body,
            "invalid collection name, no image, a file field sent as text, more images than "
            "MAX_COLLECTION_UPLOAD_IMAGES, not an image", settings,
            {"409": _error("a limit of the collections reached: MAX_COLLECTIONS, MAX_COLLECTION_IMAGES, "
                           "MAX_COLLECTION_BYTES")})},
        "/api/v1/collections/{name}/images/{image_id}": {"delete": {
            "summary": "Delete one image of a collection", "operationId": "deleteImage",
            "parameters": [NAME_PARAM, IMAGE_ID_PARAM],
            "responses": {"200": _json("deleted", {"type": "object", "required": ["deleted"],
                                                   "properties": {"deleted": {"type": "string"}}}),
                          "400": _error("invalid collection name"),
                          "404": _error("no such image in the collection")}}},
        "/api/v1/collections/{name}/images/{image_id}/thumbnail": {"get": {
            "summary": "An image's thumbnail (JPEG, at most 256 px on its long side)", "operationId": "getThumbnail",
            "parameters": [NAME_PARAM, IMAGE_ID_PARAM],
            "responses": {"200": {"description": "the thumbnail", "content": {
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
                "400": _error("invalid collection name"),
                "404": _error("no such image in the collection (unknown_image), or an image indexed from a feature "
                              "store without its image file (no_thumbnail)")}}},
        "/api/v1/collections/{name}/search": {"post": _collection_queued(
            "searchCollection", "Rank a collection's images by a caption: a job", search_body,
            "invalid collection name, missing or empty text, bad top_k, unknown task, bad ground flag", settings,
            {"404": _error("unknown or empty collection")})},
    }


def openapi_spec(settings: Settings) -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "12-in-1 ViLBERT inference service", "version": "1.0.0",
                 "description": "Upload images and a text, get a job id, poll for every task's answer. "
                                f"Limits: {settings.max_upload_bytes} bytes per request, {settings.max_images} images, "
                                f"{settings.max_text_chars} characters of text, {settings.max_image_pixels} pixels per image."},
        "paths": {
            "/": {
                "get": {"summary": "The web page for browsers (Accept: text/html), else an index of the API's URLs",
                        "responses": {"200": {"description": "the page, or links", "content": {
                            "text/html": {"schema": {"type": "string"}}, "application/json": {"schema": {"type": "object"}}}}}},
                "post": _submit_operation("Submit a job with the classic demo's form fields", True, settings),
            },
            "/api/v1/jobs": {"post": _submit_operation("Submit a job", False, settings)},
            "/api/v1/jobs/{job_id}": {"get": {
                "summary": "Status of a job, and its result once finished",
                "operationId": "getJob",
                "parameters": [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "the job", "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/Job"}}}},
                    "404": _error("unknown or expired job id"),
                    "503": _error("Redis unavailable", retry_after=True),
                },
            }},
            "/api/v1/tasks": {"get": {"summary": "The tasks, what they answer and how many images they take",
                                      "responses": {"200": _json("task list",
                                                                 {"$ref": "#/components/schemas/Tasks"})}}},
            "/api/v1/openapi.json": {"get": {"summary": "This description", "responses": {"200": _json(
                "OpenAPI 3.1", {"type": "object", "required": ["openapi", "info", "paths"]})}}},
            "/healthz": {"get": {"summary": "Liveness: the API process answers", "responses": {"200": _json(
                "alive", {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}})}}},
            "/metrics": {"get": {"summary": "Prometheus metrics of the web tier (requests, errors, queue depth)",
                                 "responses": {"200": {"description": "Prometheus text format", "content": {
                                     "text/plain": {"schema": {"type": "string"}}}}}}},
            "/readyz": {"get": {"summary": "Readiness: Redis reachable and at least one worker with models loaded",
                                "responses": {"200": _json("ready", {"$ref": "#/components/schemas/Readiness"}),
                                              "503": _json("not ready: Redis unreachable or no live worker",
                                                           {"$ref": "#/components/schemas/Readiness"})}}},
            **_collection_paths(settings),
        },
        "components": {"schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
            "Accepted": {"type": "object", "required": ["id", "status", "url"], "properties": {
                "id": {"type": "string"}, "status": {"const": "queued"}, "url": {"type": "string"},
                "tasks": {"type": "array", "items": {"type": "string"}}}},
            "CollectionAccepted": {"type": "object", "required": ["id", "status", "url", "collection"], "properties": {
                "id": {"type": "string"}, "status": {"const": "queued"}, "url": {"type": "string"},
                "collection": {"type": "string"},
                "image_ids": {"type": "array", "items": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                              "description": "(add) one content-derived id per image, in upload order"}}},
            "Collection": {"type": "object", "required": ["name", "images", "pending", "bytes"], "properties": {
                "name": {"type": "string"}, "images": {"type": "integer", "minimum": 0},
                "pending": {"type": "integer", "minimum": 0, "description": "uploaded, not indexed yet"},
                "bytes": {"type": "integer", "minimum": 0, "description": "stored: region records and thumbnails"}}},
            "Job": {"type": "object", "required": ["id", "status"], "properties": {
                "id": {"type": "string"},
                "status": {"enum": ["queued", "started", "finished", "failed"]},
                "tasks": {"type": "array", "items": {"type": "string"}},
                "queue_position": {"type": ["integer", "null"], "description": "jobs ahead of this one (queued)"},
                "stage": {"enum": [STAGE_STARTING, *STAGES, *COLLECTION_STAGES], "description": "while started"},
                "stage_detail": {"type": "string", "description": "while started, when the stage has one"},
                "result": {"type": "object", "description": "when finished: tasks (one entry per task), images "
                                                            "(width, height, regions), timings, model; a collection "
                                                            "add: collection, image_ids, added, images; a search: "
                                                            "collection, hits, images, scored, task, grounded, first_stage, timings"},
                "error": {"type": "object", "properties": {"code": {"type": "string"}, "message": {"type": "string"}}},
                "created_at": {"type": "string"}, "enqueued_at": {"type": "string"},
                "started_at": {"type": "string"}, "ended_at": {"type": "string"},
            }},
            "Tasks": {"type": "object", "required": ["tasks", "default"], "properties": {
                "tasks": {"type": "array", "items": {"type": "object", "required": [
                    "name", "task_id", "title", "kind", "answers", "images", "needs_candidate_boxes",
                    "max_text_tokens", "description"], "properties": {
                    "name": {"type": "string"}, "task_id": {"type": "integer"}, "title": {"type": "string"},
                    "kind": {"type": "string"}, "answers": {"type": "string"},
                    "images": {"anyOf": [{"type": "integer", "minimum": 1}, {"const": "1+"}]},
                    "needs_candidate_boxes": {"type": "boolean"}, "max_text_tokens": {"type": "integer"},
                    "description": {"type": "string"}}}},
                "default": {"type": "object", "description": "the default tasks for 1, 2 and 3 or more images",
                            "additionalProperties": {"type": "array", "items": {"type": "string"}}}}},
            "Readiness": {"type": "object", "required": ["status", "redis", "workers"], "properties": {
                "status": {"enum": ["ready", "not_ready"]},
                "redis": {"type": "string", "description": "'ok', or 'unreachable: ' and the error's type"},
                "workers": {"type": "array", "items": {"type": "object"},
                            "description": "live workers: host, pid, queue, device, precision, ..."},
                "reason": {"type": "string", "description": "why not ready, when Redis is up"}}},
        }},
    }
