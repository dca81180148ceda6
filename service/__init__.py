"""The inference service, split along its process boundary:

- service.web: the HTTP API (Flask), which validates submissions and queues jobs; no torch;
- service.worker: the model worker, which runs queued jobs in batches; the only part that imports torch;
- below both: service.contract (the job payload, Redis keys, error shape, stage and timing names), and the shared
  service.settings, service.errors, service.queue, service.features, service.boxes, service.bundle.
"""
