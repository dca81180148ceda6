"""The HTTP API's routes, thin: parse (service.web.inputs), queue or look up (service.web.jobs), answer JSON.

`api_blueprint` gets what the routes use passed in (settings, task registry, Redis connection) and closes over
it, so nothing is read from module globals.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request, url_for
from redis import Redis
from redis.exceptions import RedisError

from vilbert.tasks import TaskRegistry

from ..errors import BadRequest
from ..queue import live_workers
from ..settings import Settings
from .inputs import IMAGE_FIELDS, model_feature_dim, parse_feature_submission, parse_submission, parse_tasks
from .jobs import job_status, submit
from .openapi import openapi_spec


def api_blueprint(settings: Settings, registry: TaskRegistry, connection: Redis) -> Blueprint:
    api = Blueprint("api", __name__)

    def submit_form() -> tuple[Response, int, dict]:
        for field in (*IMAGE_FIELDS, "features"):
            if field in request.form:  # a text value where a file belongs would otherwise be ignored silently
                raise BadRequest("not_a_file", f"the form field '{field}' must be a file upload "
                                               f"(curl --form {field}=@path), not a text value")
        images = []
        for field in IMAGE_FIELDS:
            for upload in request.files.getlist(field):
                data = upload.read()  # the client's filename is never used, not even for logging
                if data or upload.filename:
                    images.append(data)
        features = [upload.read() for upload in request.files.getlist("features")]
        if features:  # precomputed region features instead of images (service/features.py)
            job_request, uploads = parse_feature_submission(request.form, features, images, settings, registry,
                                                            model_feature_dim(connection))
        else:
            job_request, uploads = parse_submission(request.form, images, settings, registry), images
        job = submit(connection, settings, job_request, uploads)
        location = url_for(".get_job", job_id=job.id)
        body = {"id": job.id, "status": "queued", "url": location, "tasks": job_request.tasks}
        return jsonify(body), 202, {"Location": location}

    @api.post("/")
    def classic_submit():
        """The classic demo's form: curl --form fileupload=@img.jpg --form text_input="..." http://host:5000/"""
        return submit_form()

    @api.get("/")
    def index():
        # Browsers (Accept: text/html) get the web page, service/static/index.html; API clients the JSON index.
        if request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html":
            page = current_app.send_static_file("index.html")
            page.vary.add("Accept")
            return page
        return jsonify({
            "service": "12-in-1 ViLBERT",
            "submit": url_for(".create_job"), "tasks": url_for(".list_tasks"), "openapi": url_for(".openapi"),
            "health": url_for(".healthz"), "ready": url_for(".readyz"),
        })

    @api.post("/api/v1/jobs")
    def create_job():
        return submit_form()

    @api.get("/api/v1/jobs/<job_id>")
    def get_job(job_id: str):
        return jsonify(job_status(connection, settings, job_id))

    @api.get("/api/v1/tasks")
    def list_tasks():
        defaults = {str(n): parse_tasks(None, registry, n) for n in (1, 2, 3)}
        return jsonify({"tasks": [task.describe() for task in registry], "default": defaults})

    @api.get("/api/v1/openapi.json")
    def openapi():
        return jsonify(openapi_spec(settings))

    @api.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    @api.get("/readyz")
    def readyz():
        try:
            connection.ping()
            workers = live_workers(connection)
        except RedisError as exc:
            return jsonify({"status": "not_ready", "redis": f"unreachable: {type(exc).__name__}", "workers": []}), 503
        ready = bool(workers)
        body = {"status": "ready" if ready else "not_ready", "redis": "ok", "workers": workers}
        if not ready:
            body["reason"] = "no worker with models loaded and a fresh heartbeat"
        return jsonify(body), 200 if ready else 503

    return api
