"""Errors with a stable machine-readable code, shared by request parsing, the pipeline and the API.

One conversion path: a client error found while running a job becomes a PipelineError through
`PipelineError.at`, and every error becomes the client's error object through `to_dict` (service.contract's shape).
"""

from __future__ import annotations

from .contract import error_body


class ServiceError(Exception):
    """A failure a client can act on. `status` is the HTTP status the API answers with."""

    status = 400

    def __init__(self, code: str, message: str, status: int | None = None):
        self.code = code
        self.message = message
        if status is not None:
            self.status = status
        super().__init__(message)

    def to_dict(self) -> dict:
        return error_body(self.code, self.message)


class BadRequest(ServiceError):
    status = 400


class NotFound(ServiceError):
    status = 404


class Unavailable(ServiceError):
    status = 503


class PipelineError(ServiceError):
    """A request the pipeline could not answer (undecodable image, bad boxes, …). `stage` says where."""

    def __init__(self, code: str, message: str, stage: str):
        super().__init__(code, message, status=422)
        self.stage = stage

    @classmethod
    def at(cls, stage: str, error: ServiceError, prefix: str = "") -> "PipelineError":
        """`error` (found by a check shared with the web tier) as the failure of a job at `stage`."""
        return cls(error.code, prefix + error.message, stage)

    def to_dict(self) -> dict:
        return error_body(self.code, self.message, self.stage)
