"""The two compiled kernels the detector runs from torchvision, NMS and RoIAlign, loaded without importing the
torchvision package.

`import torchvision` imports all of torchvision.models and, through torchvision.ops, torch._dynamo: about 3 s of
every worker's and tool's start-up on a 2 GHz core (8 s with torch), and ten times that under CPU emulation, for
two functions. Their Python wrappers in torchvision.ops only check arguments and call the kernels below with the
same arguments (on CUDA with deterministic algorithms enabled they would fall back to a Python RoIAlign; nothing
here enables that). torchvision registers its autocast rule for them from Python, so it is applied here: under
autocast both run in float32 and RoIAlign's output is cast back to its input's dtype (the bf16 and fp16 modes).
The results are identical to torchvision.ops' to the last bit (tests/test_detector_kernels.py).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util

import torch

# torchvision 0.29 ships its kernels as _C_stable; earlier releases as _C.
_LIBRARY_NAMES = ("_C_stable", "_C")


def _library_path() -> str:
    """The shared library of torchvision's kernels, found where its package is installed (not imported)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("torchvision is not installed (pip install -r requirements.txt)")
    folder = list(spec.submodule_search_locations)[0]
    finder = importlib.machinery.FileFinder(
        folder, (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES))
    for name in _LIBRARY_NAMES:
        found = finder.find_spec(name)
        if found is not None and found.origin:
            return found.origin
    raise ImportError(f"torchvision's kernels ({' or '.join(_LIBRARY_NAMES)}) are not in {folder}")


def _kernels_loaded() -> bool:
    try:
        return torch.ops.torchvision.nms is not None and torch.ops.torchvision.roi_align is not None
    except (AttributeError, RuntimeError):
        return False


def _load() -> None:
    if _kernels_loaded():  # torchvision imported already, or loaded before
        return
    try:
        torch.ops.load_library(_library_path())
    except (ImportError, OSError):
        # torchvision's own loader (it also sets up DLL folders on Windows) and its error if that fails too
        import torchvision  # noqa: F401


_load()


def _under_autocast(tensor: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(tensor.device.type)


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    """torchvision's autocast cast: reduced-precision floats to float32; float64 and integers as they are."""
    return tensor.float() if tensor.is_floating_point() and tensor.dtype != torch.float64 else tensor


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision.ops.nms: boxes [N, 4] (x1, y1, x2, y2), scores [N] -> indices kept [K] (int64), by decreasing
    score; a box is dropped when its IoU with a kept box is above iou_threshold."""
    if _under_autocast(boxes):
        boxes, scores = _float32(boxes), _float32(scores)
    return torch.ops.torchvision.nms(boxes, scores, iou_threshold)


def roi_align(features: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float,
              sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """torchvision.ops.roi_align with a square output: features [B, C, H, W], rois [K, 5] (batch index, x1, y1,
    x2, y2; same dtype as features) -> [K, C, output_size, output_size]."""
    if _under_autocast(features):
        pooled = torch.ops.torchvision.roi_align(_float32(features), _float32(rois), spatial_scale, output_size,
                                                 output_size, sampling_ratio, aligned)
        return pooled.to(features.dtype)
    return torch.ops.torchvision.roi_align(features, rois, spatial_scale, output_size, output_size, sampling_ratio,
                                           aligned)
