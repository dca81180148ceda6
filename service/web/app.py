"""The HTTP API's application factory: settings, task registry and Redis connection made here and passed to the
routes (service.web.routes), the metrics and the error handlers. gunicorn serves `app:app` (app.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from typing import Any

from flask import Flask, Response, jsonify, request
from flask.json.provider import DefaultJSONProvider
from redis import Redis
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException, InternalServerError, RequestEntityTooLarge

from vilbert.tasks import TaskRegistry

from ..contract import INTERNAL_ERROR, error_body
from ..errors import BadRequest, ServiceError
from ..queue import connect
from ..settings import Settings, load_settings
from . import metrics
from .collections import collections_blueprint
from .routes import api_blueprint

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"  # the web page, packaged with `service`


# Sent with every answer, for `make serve` without the proxy; behind nginx the proxy sets the same ones
# (deploy/nginx/nginx.conf.template; tests/test_slow_clients.py checks they agree). The page loads its script and
# style from this origin, calls the API with fetch() here and shows images through blob: and data: URLs.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


# An over-limit body is refused before it is read; closing the connection on a client still sending makes its
# send fail (a broken pipe) before it can read the 413. So up to this many times the upload limit is read and
# dropped first, as nginx's lingering close does; a body bigger still gets the connection closed on it.
DRAIN_FACTOR = 4
DRAIN_CHUNK = 1 << 16


def drain_request_body(environ: dict, limit: int) -> None:
    """Read and discard the rest of the request body, when its declared length is at most `limit` bytes."""
    stream, length = environ.get("wsgi.input"), environ.get("CONTENT_LENGTH")
    try:
        remaining = int(length) if length else -1
    except ValueError:
        return
    if stream is None or not 0 < remaining <= limit:
        return
    try:
        while stream.read(DRAIN_CHUNK):
            pass
    except OSError:  # the client went away meanwhile
        pass


class StrictJSONProvider(DefaultJSONProvider):
    """Every response is strict JSON: a NaN or infinity raises (then the client gets a 500, logged) instead of
    going out as a bare `NaN` that JSON.parse and most clients refuse."""

    sort_keys = False

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        kwargs.setdefault("allow_nan", False)
        return super().dumps(obj, **kwargs)


class ServiceApp(Flask):
    json_provider_class = StrictJSONProvider


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or load_settings()
    app = ServiceApp(__name__, static_folder=str(STATIC_DIR))
    # Werkzeug refuses bigger bodies with 413 before reading them into memory.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    registry = TaskRegistry.from_file()
    connection: Redis = connect(settings)
    metrics.install(app, connection, settings)  # GET /metrics, request counters
    app.register_blueprint(api_blueprint(settings, registry, connection))
    app.register_blueprint(collections_blueprint(settings, connection))
    install_error_handlers(app, settings)

    @app.after_request
    def security_headers(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    return app


def install_error_handlers(app: Flask, settings: Settings) -> None:
    """Every error answers {"error": {"code", "message"}} (service.contract's shape)."""

    @app.errorhandler(ServiceError)
    def service_error(exc: ServiceError):
        response = jsonify({"error": exc.to_dict()})
        if exc.status == 503:
            response.headers["Retry-After"] = "5"
        return response, exc.status

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(exc: RequestEntityTooLarge):
        drain_request_body(request.environ, settings.max_upload_bytes * DRAIN_FACTOR)
        if (request.content_length or 0) > settings.max_upload_bytes or request.content_length is None:
            message = f"the request is larger than the limit of {settings.max_upload_bytes} bytes"
        else:  # within the upload limit: one of the form parser's own limits was hit
            message = (f"a text field of the form is larger than {request.max_form_memory_size} bytes, or the form has "
                       f"more than {request.max_form_parts} parts")
        return service_error(BadRequest("payload_too_large", message, status=413))

    @app.errorhandler(RedisError)
    def redis_down(exc: RedisError):
        log.warning("redis unavailable: %s", exc)
        return service_error(ServiceError("redis_unavailable", "the job store (Redis) is unavailable; retry shortly",
                                          status=503))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        response = jsonify({"error": error_body(code, exc.description)})
        # The exception's own headers, such as a 405's Allow (RFC 9110 requires it), but not its HTML content type.
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response, exc.code

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error")
        return internal_error(exc)

    @app.errorhandler(InternalServerError)
    def internal_error(exc: Exception):
        # Also what Flask hands over for an exception it caught outside the view (making the response, e.g. a
        # non-finite number under strict JSON), having logged it: the same answer as any other bug.
        return jsonify({"error": error_body(INTERNAL_ERROR, "internal error; see the server log")}), 500
