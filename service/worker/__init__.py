"""The model worker: `main` (python worker.py) loads the models once and runs queued jobs in batches.

Imports nothing from service.web; it talks to the web tier only through Redis, in the terms of service.contract.
Only this package imports torch (service.worker.pipeline)."""
