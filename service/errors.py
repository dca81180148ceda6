"""Errors with a stable machine-readable code, shared by request parsing, the pipeline and the API."""

from __future__ import annotations


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
        return {"code": self.code, "message": self.message}


class BadRequest(ServiceError):
    status = 400


class NotFound(ServiceError):
    status = 404


class Unavailable(ServiceError):
    status = 503


class PipelineError(ServiceError):
    """A request the pipeline could not answer (undecodable image, bad boxes, …). `stage` says where."""

    def __init__(self, code: str, message: str, stage: str = ""):
        super().__init__(code, message, status=422)
        self.stage = stage

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "stage": self.stage}
