"""The inference service: settings, the in-process pipeline, the RQ job layer, the Flask API.

Only `service.pipeline` imports torch; the web tier (`service.api`) stays light.
"""
