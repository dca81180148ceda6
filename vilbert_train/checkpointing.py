"""The resume file `pytorch_ckpt_latest.tar`: model, optimiser, scheduler, RNG states and data positions.

It holds only tensors and plain containers, so it loads with `torch.load(weights_only=True)`. The model part is
a state dict with the official key names (no `module.` prefix), so the file is also accepted by
`vilbert.checkpoint.read_state_dict` (its `model_state_dict` container) and by `--from_pretrained`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

RESUME_FILE = "pytorch_ckpt_latest.tar"


class ResumeError(ValueError):
    """The file is not a resume file of this trainer, or belongs to a run of other tasks."""


def save_resume(path: str | os.PathLike, state: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated resume file


def load_resume(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resume file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in ("model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "iteration",
                           "streams", "rng", "task_ids") if k not in state]
    if missing:
        raise ResumeError(f"{path}: not a resume file of this trainer (missing {', '.join(missing)})")
    return state
