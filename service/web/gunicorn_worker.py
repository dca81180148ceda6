"""gunicorn's worker with JSON error answers: what gunicorn itself refuses before the app sees a request (a request
line or header over its limits, a malformed request line, method, version, header or chunk) is answered in the
service's error shape, {"error": {"code", "message"}}, not gunicorn's HTML page. gunicorn.conf.py selects it.

Everything else (the request reached the app) is the app's answer already; an error gunicorn does not classify as
the client's stays gunicorn's own 500 handling.
"""

from __future__ import annotations

import json
from typing import Any

from gunicorn.http.errors import (InvalidChunkExtension, InvalidChunkSize, InvalidHeader, InvalidHeaderName,
                                  InvalidHTTPVersion, InvalidRequestLine, InvalidRequestMethod, LimitRequestHeaders,
                                  LimitRequestLine, ObsoleteFolding)
from gunicorn.workers.gthread import ThreadWorker

from ..contract import error_body

# gunicorn's exception -> (HTTP status, reason phrase, error code, message for the client)
CLIENT_ERRORS: tuple[tuple[type[Exception], int, str, str, str], ...] = (
    (LimitRequestLine, 414, "URI Too Long", "uri_too_long", "the request line is longer than the server accepts"),
    (LimitRequestHeaders, 431, "Request Header Fields Too Large", "request_header_too_large",
     "the request headers are larger or more numerous than the server accepts"),
    (InvalidRequestMethod, 400, "Bad Request", "bad_request", "the request method is not valid HTTP"),
    (InvalidHTTPVersion, 400, "Bad Request", "bad_request", "the HTTP version is not supported"),
    (InvalidRequestLine, 400, "Bad Request", "bad_request", "the request line is not valid HTTP"),
    ((InvalidHeader, InvalidHeaderName, ObsoleteFolding), 400, "Bad Request", "bad_request",
     "a request header is not valid HTTP"),
    ((InvalidChunkSize, InvalidChunkExtension), 400, "Bad Request", "bad_request",
     "the chunked request body is not valid HTTP"),
)


def json_error_response(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps({"error": error_body(code, message)}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nX-Content-Type-Options: nosniff\r\n\r\n")
    return head.encode("latin-1") + body


class JSONErrorThreadWorker(ThreadWorker):
    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        for kinds, status, reason, code, message in CLIENT_ERRORS:
            if isinstance(exc, kinds):
                self.log.warning("Invalid request from ip=%s: %s", (addr or ("",))[0], exc)
                try:
                    client.setblocking(True)
                    client.sendall(json_error_response(status, reason, code, message))
                except OSError:
                    self.log.debug("Failed to send error message.")
                return
        super().handle_error(req, client, addr, exc)
