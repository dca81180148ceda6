"""Region-feature detector: the Visual Genome Faster R-CNN X-152-32x8d-FPN of the 12-in-1 release, in plain
PyTorch + torchvision, loading the released `detectron_model.pth`.

Exports load lazily, so `detector.images` can be used without importing torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "RegionFeatureExtractor": "extractor",
    "RegionFeatures": "regions",
    "DetectorConfig": "config",
    "load_config": "config",
    "RegionDetector": "model",
    "ImageDecodeError": "images",
    "load_image": "images",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'detector' has no attribute {name!r}")
