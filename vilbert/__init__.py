"""12-in-1 multi-task ViLBERT: configuration, model, checkpoint loading, tokenizer, task registry, predictor.

Heavy modules (torch) load lazily, so `vilbert.tasks` can be imported by processes that never run the model.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ViLBertConfig": "configuration",
    "ViLBertForVLTasks": "modeling",
    "ViLBertOutput": "modeling",
    "load_model": "checkpoint",
    "read_state_dict": "checkpoint",
    "save_checkpoint": "checkpoint",
    "CheckpointError": "checkpoint",
    "Tokenizer": "tokenization",
    "TaskRegistry": "tasks",
    "Task": "tasks",
    "Predictor": "predictor",
    "ImageRegions": "predictor",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'vilbert' has no attribute {name!r}")
