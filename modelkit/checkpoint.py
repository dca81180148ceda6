"""Reading a state dict from a checkpoint file, for both the ViLBERT and the detector loaders.

torch is imported inside the functions: importing modelkit must stay free of torch for the web tier."""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    import torch

MODULE_PREFIX = "module."  # what DataParallel / DistributedDataParallel put in front of every key


def read_tensor_dict(path: str | os.PathLike, what: str, containers: Sequence[str],
                     error: type[Exception]) -> "OrderedDict[str, torch.Tensor]":
    """The state dict in `path`, loaded with `weights_only=True` so that no code in the file runs.

    what: the name a missing file is reported under ("ViLBERT checkpoint"). containers: keys of a wrapping dict
    (a resume file's "model_state_dict", detectron's "model"); the first that holds a mapping is unwrapped.
    A `module.` prefix is stripped. Any unreadable or non-tensor content raises `error`."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise error(f"{path}: cannot be read as a PyTorch checkpoint with weights_only=True ({exc})") from exc
    if isinstance(loaded, Mapping):
        for container in containers:
            if isinstance(loaded.get(container), Mapping):
                loaded = loaded[container]
                break
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise error(f"{path}: expected a state dict (a mapping of parameter names to tensors)")
    return OrderedDict((k[len(MODULE_PREFIX):] if k.startswith(MODULE_PREFIX) else k, v) for k, v in loaded.items())


def describe_key_problems(groups: Iterable[tuple[str, Sequence[str]]], shown: int = 20) -> str:
    """One indented block per non-empty (title, keys) group, at most `shown` keys each ('' when all are empty)."""
    lines = []
    for title, keys in groups:
        if keys:
            more = f"\n    … and {len(keys) - shown} more" if len(keys) > shown else ""
            listed = "\n    ".join(keys[:shown]) + more
            lines.append(f"  {len(keys)} {title} key(s):\n    {listed}")
    return "\n".join(lines)
