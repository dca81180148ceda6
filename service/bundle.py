"""The weights bundle in MODEL_DIR: which files it needs, whether it is complete, and the tiny test bundle."""

from __future__ import annotations

import os
from pathlib import Path

# The files the worker cannot start without (vilbert_config.json and vocab.txt are optional: packaged defaults).
REQUIRED_FILES = (
    "multi_task_model.bin",
    "detectron_model.pth",
    "detectron_config.yaml",
    "vqa_answers.json",
    "gqa_answers.json",
)
TINY_MARKER = "TINY_RANDOM_WEIGHTS.txt"
TINY_NOTICE = (
    "This is a TINY RANDOM-WEIGHT bundle for tests and offline smoke runs: every answer, label, score and box it "
    "produces is meaningless. For the real model run `python models/fetch.py` (see docs/WEIGHTS.md)."
)


def missing_files(model_dir: str | os.PathLike) -> list[str]:
    """Required bundle files absent from model_dir (all of them when the directory does not exist)."""
    model_dir = Path(model_dir)
    return [name for name in REQUIRED_FILES if not (model_dir / name).is_file()]


def is_tiny(model_dir: str | os.PathLike) -> bool:
    return (Path(model_dir) / TINY_MARKER).is_file()


def write_tiny_bundle(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A complete random-weight bundle in the official formats: the tiny detector and a tiny ViLBERT whose
    visual input width equals the detector's fc6 width, plus a marker file saying the outputs are meaningless.
    The marker is written last, so a bundle interrupted half-way is not taken for complete."""
    from detector.categories import CATEGORIES_FILE, synthetic_categories
    from detector.tiny import tiny_detector_config, write_tiny_detector
    from vilbert.tiny import write_tiny_vilbert

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / TINY_MARKER).unlink(missing_ok=True)
    write_tiny_detector(out_dir, seed=seed)
    write_tiny_vilbert(out_dir, feature_dim=tiny_detector_config().mlp_head_dim, seed=seed)
    (out_dir / CATEGORIES_FILE).write_bytes(synthetic_categories(tiny_detector_config().num_classes))
    (out_dir / "README.txt").write_text(TINY_NOTICE + "\n", encoding="utf-8")
    (out_dir / TINY_MARKER).write_text(TINY_NOTICE + "\n", encoding="utf-8")
    return out_dir


def tiny_bundle_complete(model_dir: str | os.PathLike) -> bool:
    return is_tiny(model_dir) and not missing_files(model_dir)
