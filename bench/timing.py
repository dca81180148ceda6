"""Shared by the bench scripts: wall-clock timing (the device's queued work finished on both sides), the name of
the machine a figure comes from, and writing a report."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch


def machine_name(device: str = "cpu") -> str:
    """The GPU's name on CUDA, else the CPU's (as the platform reports it)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def emit_report(report: dict, path: Path | None = None) -> None:
    """Print the report as JSON, and write it to `path` too when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        path.write_text(text)


def settle(device: str | torch.device = "cpu") -> None:
    """Wait until the device has finished the work queued on it (CUDA runs asynchronously; a CPU has nothing to
    wait for)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: str | torch.device = "cpu") -> tuple[float, Any]:
    """(seconds, result) of fn(); on CUDA the device is synchronised before and after."""
    settle(device)
    start = time.perf_counter()
    out = fn()
    settle(device)
    return time.perf_counter() - start, out
