"""detector/kernels.py: torchvision's NMS and RoIAlign kernels, loaded without importing torchvision, give exactly
what torchvision.ops gives, and importing the detector leaves torchvision and torch._dynamo unimported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detector import kernels


@pytest.fixture(scope="module")
def ops():
    """torchvision.ops, imported here rather than at collection: its import pulls in torch._dynamo (seconds), and
    pytest imports every test module in every process it starts."""
    import torchvision.ops

    return torchvision.ops

ROOT = Path(__file__).resolve().parent.parent


def random_boxes(generator: torch.Generator, count: int, size: float = 100.0) -> torch.Tensor:
    corner = torch.rand(count, 2, generator=generator) * size
    extent = torch.rand(count, 2, generator=generator) * size / 3 + 0.5
    return torch.cat([corner, corner + extent], dim=1)


@pytest.mark.parametrize("count", [0, 1, 7, 300])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_keeps_what_torchvision_keeps(count, threshold, ops):
    generator = torch.Generator().manual_seed(count * 10 + int(threshold * 10))
    boxes = random_boxes(generator, count)
    scores = torch.rand(count, generator=generator)
    if count > 4:
        scores[1] = scores[3]  # a tie
    kept = kernels.nms(boxes, scores, threshold)
    assert kept.dtype == torch.int64
    assert torch.equal(kept, ops.nms(boxes, scores, threshold))


def test_nms_drops_overlapping_boxes_by_score():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 9.0]])
    scores = torch.tensor([0.5, 0.9, 0.3, 0.8])
    assert kernels.nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert kernels.nms(boxes, scores, 0.95).tolist() == [1, 3, 0, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # torchvision has no bf16 CPU kernel
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align_pools_what_torchvision_pools(dtype, aligned, sampling_ratio, ops):
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(2, 5, 24, 32, generator=generator).to(dtype)
    boxes = random_boxes(generator, 9, size=120.0)
    rois = torch.cat([torch.randint(0, 2, (9, 1), generator=generator).float(), boxes], dim=1).to(dtype)
    pooled = kernels.roi_align(features, rois, 7, 0.25, sampling_ratio, aligned)
    expected = ops.roi_align(features, rois, 7, spatial_scale=0.25, sampling_ratio=sampling_ratio,
                                         aligned=aligned)
    assert pooled.shape == (9, 5, 7, 7) and pooled.dtype == dtype
    assert torch.equal(pooled, expected)
    assert pooled.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_under_autocast_both_run_in_float32_as_torchvision_registers_it(dtype, ops):
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(1, 4, 16, 16, generator=generator).to(dtype)
    boxes = random_boxes(generator, 40, size=60.0)
    rois = torch.cat([torch.zeros(40, 1), boxes], dim=1).to(dtype)
    scores = torch.rand(40, generator=generator).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = kernels.roi_align(features, rois, 5, 0.5, 2, False)
        expected = ops.roi_align(features, rois, 5, spatial_scale=0.5, sampling_ratio=2, aligned=False)
        kept = kernels.nms(boxes.to(dtype), scores, 0.4)
        expected_kept = ops.nms(boxes.to(dtype), scores, 0.4)
    assert pooled.dtype == dtype and torch.equal(pooled, expected)
    assert torch.equal(kept, expected_kept)
    # reduced precision is computed in float32 and rounded once; float64 stays float64
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert torch.equal(pooled, kernels.roi_align(features.to(compute), rois.to(compute), 5, 0.5, 2, False).to(dtype))


def test_without_autocast_reduced_precision_is_refused_as_torchvision_refuses_it():
    features = torch.randn(1, 2, 8, 8).to(torch.bfloat16)
    rois = torch.tensor([[0, 1, 1, 6, 6]], dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="not implemented for 'BFloat16'"):
        kernels.roi_align(features, rois, 3, 1.0, 2, False)


def test_the_library_is_torchvisions_own(ops):
    import torchvision

    path = Path(kernels._library_path())
    assert path.is_file() and path.parent == Path(torchvision.__file__).parent
    assert path.name.startswith(kernels._LIBRARY_NAMES)


def test_the_detector_imports_without_torchvision_or_dynamo():
    code = ("import sys, json, torch; import detector.extractor, service.worker.pipeline; "
            "print(json.dumps({'torchvision': 'torchvision' in sys.modules, 'dynamo': 'torch._dynamo' in sys.modules, "
            "'nms': str(torch.ops.torchvision.nms)}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == {"torchvision": False, "dynamo": False, "nms": "torchvision.nms"}
