"""What the detector gives for one image. Imports no torch, so the feature store and the training readers can
use it without loading the detector's dependencies."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RegionFeatures:
    boxes: np.ndarray  # [N, 4] float32 x1 y1 x2 y2, original-image pixels
    features: np.ndarray  # [N, D] float32 fc6 (post-ReLU)
    scores: np.ndarray  # [N] float32 best surviving class probability
    class_ids: np.ndarray  # [N] int64 class of that probability (1..K-1)
    num_boxes: int
    image_width: int
    image_height: int
