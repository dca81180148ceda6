"""The web tier: the Flask API (application factory `create_app`), its input checks, metrics and OpenAPI
description. Imports no torch and nothing from service.worker; it talks to workers only through Redis, in the
terms of service.contract."""

from .app import create_app

__all__ = ["create_app"]
