#!/usr/bin/env python3
"""The model worker: `python worker.py`. See service/worker/main.py."""

import sys

from service.worker.main import main

if __name__ == "__main__":
    sys.exit(main())
