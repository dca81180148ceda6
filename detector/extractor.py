"""RegionFeatureExtractor: images in, the 100 regions ViLBERT was trained on out (boxes + fc6 features).

Preprocessing is the reference extraction script's: RGB -> BGR float32, minus the BGR pixel means, one scale so
the short side is `min_size` unless the long side would pass `max_size`, `cv2.resize` (bilinear), zero padding
to a multiple of 32.

Batches: the fork clips each image's proposals to the padded *batch* canvas, so an image's regions depend on its
batch partners. Here every image is padded and clipped on its own canvas (its size rounded up to 32), which is
exactly the reference at batch size 1, and the result never depends on the batch.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch

from modelkit.precision import check_precision, precision_autocast
from modelkit.regions import REGIONS_PER_IMAGE

from .config import DetectorConfig, load_config
from .fusion import fold_frozen_batchnorm
from .images import DEFAULT_MAX_PIXELS, load_image
from .model import RegionDetector, load_detector_state, read_checkpoint
from .regions import RegionFeatures
from .selection import select_regions

# float64, as in the reference: its float32 image minus these is computed in float64 and rounded once.
PIXEL_MEANS_BGR = np.array([102.9801, 115.9465, 122.7717], dtype=np.float64)
SIZE_DIVISIBLE = 32


def preprocess(image_rgb: np.ndarray, min_size: int = 800, max_size: int = 1333) -> tuple[np.ndarray, float]:
    """HxWx3 uint8 RGB -> (resized mean-subtracted BGR float32 HxWx3, scale)."""
    bgr = image_rgb[:, :, ::-1].astype(np.float32)
    bgr -= PIXEL_MEANS_BGR  # in place: stays float32, subtraction in float64 (the reference's arithmetic)
    height, width = bgr.shape[:2]
    scale = min_size / min(height, width)
    if round(scale * max(height, width)) > max_size:
        scale = max_size / max(height, width)
    resized = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    return resized, scale


def pad_to_multiple(image: np.ndarray, multiple: int = SIZE_DIVISIBLE) -> np.ndarray:
    """HxWxC -> CxH'xW' float32 with H', W' rounded up to `multiple`, zero-padded bottom/right."""
    height, width = image.shape[:2]
    padded = np.zeros((image.shape[2], -(-height // multiple) * multiple, -(-width // multiple) * multiple), np.float32)
    padded[:, :height, :width] = image.transpose(2, 0, 1)
    return padded


def _fingerprint(config_path: Path, checkpoint_path: Path, extra: str) -> str:
    digest = hashlib.sha256(config_path.read_bytes())
    stat = checkpoint_path.stat()
    # Hashing a 0.8 GB checkpoint at every start is slow; size + mtime + the first and last MiB identify it.
    with open(checkpoint_path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, stat.st_size - (1 << 20)))
        digest.update(f.read())
    digest.update(f"{stat.st_size}:{extra}".encode())
    return digest.hexdigest()[:16]


class RegionFeatureExtractor:
    def __init__(self, model: RegionDetector, device: str | torch.device = "cpu", min_size: int = 800,
                 max_size: int = 1333, num_regions: int = REGIONS_PER_IMAGE, max_pixels: int = DEFAULT_MAX_PIXELS,
                 identity: str = "", channels_last: bool | None = None, precision: str = "fp32",
                 fold_batchnorm: bool = True):
        """channels_last: None = on CPU only, where the grouped convolutions of the X-152 run ~1.4x faster in that
        layout (bench/bench_detector.py); it changes only the summation order (fc6 relative error ~1e-6).
        fold_batchnorm: fold the frozen batch norms into the convolutions (detector/fusion.py): the same result up
        to rounding, faster; the model then no longer has the checkpoint's keys."""
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if fold_batchnorm:
            fold_frozen_batchnorm(self.model)
        if channels_last is None:
            channels_last = self.device.type == "cpu"
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self.precision = check_precision(precision)
        self.min_size, self.max_size, self.num_regions = min_size, max_size, num_regions
        self.max_pixels = max_pixels
        self.identity = identity or f"unsaved-{id(model)}"

    @classmethod
    def from_files(cls, config_path: str | os.PathLike, checkpoint_path: str | os.PathLike, device: str = "cpu",
                   min_size: int = 800, max_size: int = 1333, num_regions: int = REGIONS_PER_IMAGE,
                   **options: Any) -> "RegionFeatureExtractor":
        config_path, checkpoint_path = Path(config_path), Path(checkpoint_path)
        config = load_config(config_path)
        model = RegionDetector(config)
        load_detector_state(model, read_checkpoint(checkpoint_path))
        # Reduced precision changes the features, so it is part of what a cached feature was made with;
        # channels-last only changes the summation order (relative error ~1e-6) and is not.
        precision = options.get("precision", "fp32")
        identity = _fingerprint(config_path, checkpoint_path, f"{min_size}:{max_size}:{num_regions}:{precision}")
        return cls(model, device, min_size, max_size, num_regions, identity=identity, **options)

    @property
    def config(self) -> DetectorConfig:
        return self.model.config

    @property
    def feature_dim(self) -> int:
        return self.config.mlp_head_dim

    def _prepare(self, image: Any) -> tuple[torch.Tensor, float, int, int]:
        rgb = load_image(image, self.max_pixels)
        resized, scale = preprocess(rgb, self.min_size, self.max_size)
        tensor = torch.from_numpy(pad_to_multiple(resized))[None].to(self.device)
        if self.channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor, scale, rgb.shape[1], rgb.shape[0]

    def _run(self, tensor: torch.Tensor, boxes: torch.Tensor | None = None):
        size = [(tensor.shape[2], tensor.shape[3])]
        with torch.inference_mode(), precision_autocast(self.device.type, self.precision):
            features = self.model.backbone(tensor)
            proposals = [boxes] if boxes is not None else self.model.rpn(features, size)
            fc6, logits = self.model.roi_heads(features, proposals)
        return proposals[0].float(), fc6[0].float(), logits[0].float()

    def extract(self, images: Sequence[Any]) -> list[RegionFeatures]:
        """One result per image: the `num_regions` selected proposals and their fc6 features."""
        return [self._extract_one(image) for image in images]

    def _extract_one(self, image: Any) -> RegionFeatures:
        tensor, scale, width, height = self._prepare(image)
        proposals, fc6, logits = self._run(tensor)
        probs = torch.softmax(logits, dim=1)
        boxes = proposals / scale
        keep, confidence = select_regions(boxes, probs, self.num_regions)
        class_ids = probs[keep, 1:].argmax(1) + 1
        return RegionFeatures(
            boxes=boxes[keep].cpu().numpy().astype(np.float32),
            features=fc6[keep].cpu().numpy().astype(np.float32),
            scores=confidence.cpu().numpy().astype(np.float32),
            class_ids=class_ids.cpu().numpy().astype(np.int64),
            num_boxes=int((confidence > 0).sum()),
            image_width=width,
            image_height=height,
        )

    def extract_boxes(self, image: Any, boxes: np.ndarray | Sequence[Sequence[float]]) -> RegionFeatures:
        """fc6 features of caller-given boxes ([M, 4] x1 y1 x2 y2, original pixels), as the reference's
        extraction from ground-truth boxes does (no selection)."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        tensor, scale, width, height = self._prepare(image)
        given = torch.from_numpy(boxes * scale).to(self.device)
        _, fc6, logits = self._run(tensor, given)
        probs = torch.softmax(logits, dim=1)
        return RegionFeatures(
            boxes=boxes.copy(), features=fc6.cpu().numpy().astype(np.float32),
            scores=probs[:, 1:].max(1).values.cpu().numpy().astype(np.float32),
            class_ids=(probs[:, 1:].argmax(1) + 1).cpu().numpy().astype(np.int64),
            num_boxes=len(boxes), image_width=width, image_height=height,
        )
