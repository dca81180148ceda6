#!/usr/bin/env python3
"""The model worker: `python worker.py`. See service/worker.py."""

import sys

from service.worker import main

if __name__ == "__main__":
    sys.exit(main())
