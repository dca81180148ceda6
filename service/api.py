"""The HTTP API: a Flask application factory with thin routes; the work is in service.inputs and service.jobs."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, request, url_for
from redis import Redis
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from vilbert.tasks import TaskRegistry

from . import jobs
from .errors import BadRequest, ServiceError
from .inputs import IMAGE_FIELDS, parse_submission, parse_tasks
from .openapi import openapi_spec
from .settings import Settings, load_settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or load_settings()
    app = Flask(__name__)
    # Werkzeug refuses bigger bodies with 413 before reading them into memory.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    app.json.sort_keys = False
    registry = TaskRegistry.from_file()
    connection: Redis = jobs.connect(settings)
    app.extensions["vilbert"] = {"settings": settings, "registry": registry, "redis": connection}

    def submit() -> tuple[Response, int, dict]:
        images = []
        for field in IMAGE_FIELDS:
            for upload in request.files.getlist(field):
                data = upload.read()  # the client's filename is never used, not even for logging
                if data or upload.filename:
                    images.append(data)
        job_request = parse_submission(request.form, images, settings, registry)
        job = jobs.submit(connection, settings, job_request, images)
        location = url_for("get_job", job_id=job.id)
        body = {"id": job.id, "status": "queued", "url": location, "tasks": job_request.tasks}
        return jsonify(body), 202, {"Location": location}

    @app.post("/")
    def classic_submit():
        """The classic demo's form: curl --form fileupload=@img.jpg --form text_input="..." http://host:5000/"""
        return submit()

    @app.get("/")
    def index():
        # Browsers (Accept: text/html) get the web page, service/static/index.html; API clients the JSON index.
        if request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html":
            page = app.send_static_file("index.html")
            page.vary.add("Accept")
            return page
        return jsonify({
            "service": "12-in-1 ViLBERT",
            "submit": url_for("create_job"), "tasks": url_for("list_tasks"), "openapi": url_for("openapi"),
            "health": url_for("healthz"), "ready": url_for("readyz"),
        })

    @app.post("/api/v1/jobs")
    def create_job():
        return submit()

    @app.get("/api/v1/jobs/<job_id>")
    def get_job(job_id: str):
        return jsonify(jobs.job_status(connection, settings, job_id))

    @app.get("/api/v1/tasks")
    def list_tasks():
        return jsonify({"tasks": [task.describe() for task in registry], "default": parse_default_tasks()})

    @app.get("/api/v1/openapi.json")
    def openapi():
        return jsonify(openapi_spec(settings))

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz():
        try:
            connection.ping()
            workers = jobs.live_workers(connection)
        except RedisError as exc:
            return jsonify({"status": "not_ready", "redis": f"unreachable: {type(exc).__name__}", "workers": []}), 503
        ready = bool(workers)
        body = {"status": "ready" if ready else "not_ready", "redis": "ok", "workers": workers}
        if not ready:
            body["reason"] = "no worker with models loaded and a fresh heartbeat"
        return jsonify(body), 200 if ready else 503

    def parse_default_tasks() -> dict:
        return {str(n): parse_tasks(None, registry, n) for n in (1, 2, 3)}

    @app.errorhandler(ServiceError)
    def service_error(exc: ServiceError):
        response = jsonify({"error": exc.to_dict()})
        if exc.status == 503:
            response.headers["Retry-After"] = "5"
        return response, exc.status

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(exc: RequestEntityTooLarge):
        return service_error(BadRequest("payload_too_large", f"the request is larger than the limit of "
                                        f"{settings.max_upload_bytes} bytes", status=413))

    @app.errorhandler(RedisError)
    def redis_down(exc: RedisError):
        log.warning("redis unavailable: %s", exc)
        return service_error(ServiceError("redis_unavailable", "the job store (Redis) is unavailable; retry shortly",
                                          status=503))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        return jsonify({"error": {"code": code, "message": exc.description}}), exc.code

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error")
        return jsonify({"error": {"code": "internal_error", "message": "internal error; see the server log"}}), 500

    return app
