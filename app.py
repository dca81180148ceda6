"""WSGI entry point for gunicorn: `gunicorn app:app`. Settings come from the environment (service/settings.py)."""

import sys

from service.web import create_app
from service.settings import SettingsError

try:
    app = create_app()
except SettingsError as exc:  # one line per bad variable, not a traceback
    print(f"app: {exc}", file=sys.stderr)
    raise SystemExit(2) from None
