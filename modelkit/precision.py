"""The precisions the model, the detector and the trainer run in, and the one way each enters autocast.

PRECISIONS (the names) imports no torch, so the service's settings can validate PRECISION without it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "bf16", "fp16")


def precision_dtype(precision: str) -> "torch.dtype | None":
    """The autocast dtype of a precision name; None for fp32 (no autocast)."""
    import torch

    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return dtypes[precision]


def check_precision(precision: str) -> str:
    """`precision` itself when it is a known name; a ValueError naming the known ones otherwise."""
    precision_dtype(precision)
    return precision


def precision_autocast(device_type: str, precision: str) -> "torch.autocast":
    """Autocast to the precision's dtype on `device_type`; for fp32 autocast explicitly off, so that an outer
    autocast cannot leak in (fp32 means fp32, e.g. in the detector's region selection)."""
    import torch

    dtype = precision_dtype(precision)
    if dtype is not None:
        return torch.autocast(device_type=device_type, dtype=dtype)
    return torch.autocast(device_type, enabled=False)
