"""Where the project's shipped configuration files are: `config/` of a source checkout (or an editable install),
else the copy a wheel installs under `<prefix>/share/vilbert-serve/config` (pyproject's data-files)."""

from __future__ import annotations

import sys
from pathlib import Path

_CHECKOUT_CONFIG = Path(__file__).resolve().parent.parent / "config"
_INSTALLED_CONFIG = Path(sys.prefix) / "share" / "vilbert-serve" / "config"


def config_file(name: str) -> Path:
    """Path of a shipped config file (e.g. "tasks.json"); the checkout's copy wins."""
    for folder in (_CHECKOUT_CONFIG, _INSTALLED_CONFIG):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{name} is in neither {_CHECKOUT_CONFIG} nor {_INSTALLED_CONFIG}: is the package "
                            "installed completely?")
