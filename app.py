"""WSGI entry point for gunicorn: `gunicorn app:app`. Settings come from the environment (service/settings.py)."""

from service.api import create_app

app = create_app()
