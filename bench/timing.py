"""Wall-clock timing shared by the bench scripts: the device's queued work is finished on both sides."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch


def timed(fn: Callable[[], Any], device: str | torch.device = "cpu") -> tuple[float, Any]:
    """(seconds, result) of fn(); on CUDA the device is synchronised before and after."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out
