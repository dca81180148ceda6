"""Drift of the detector's speed options (channels-last memory format, bf16/fp16 autocast) against fp32.

Builds the X-152-32x8d-FPN from config/detectron_config_x152.yaml with random weights, extracts regions from
real photographs (scikit-image's samples) in fp32 and with each option, and reports per option:

- box overlap: the share of the fp32-selected boxes that the option also selects (same proposal, IoU >= 0.99);
- fc6 cosine and relative error: the fc6 features of the fp32-selected boxes recomputed under the option
  (features of the same boxes, so selection changes do not mix into the number), cosine min and mean over boxes,
  and the relative L2 error of the whole feature matrix;
- time relative to fp32, measured in the same run.

With random weights many RPN objectness scores are near-ties, so even a change of summation order (channels-last:
relative error ~1e-6) reorders some proposals and changes part of the selection; trained weights separate
objects more clearly. The box overlap here is therefore a pessimistic estimate; the fc6 numbers are not.

    python bench/drift_detector.py [--size 400x667] [--options channels_last,bf16] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_detector import init_random, with_proposals  # noqa: E402
from detector.config import load_config  # noqa: E402
from detector.extractor import RegionFeatureExtractor  # noqa: E402
from detector.model import RegionDetector  # noqa: E402
from detector.selection import legacy_iou  # noqa: E402

OPTIONS = {
    "channels_last": {"channels_last": True},
    "bf16": {"precision": "bf16", "channels_last": False},
    "fp16": {"precision": "fp16", "channels_last": False},
    "channels_last+bf16": {"channels_last": True, "precision": "bf16"},
    "channels_last+fp16": {"channels_last": True, "precision": "fp16"},
}


def photos() -> dict[str, np.ndarray]:
    from skimage import data

    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea()}


def box_overlap(reference: np.ndarray, other: np.ndarray, iou: float = 0.99) -> float:
    """Share of the reference boxes that have a box in `other` with IoU >= iou."""
    if len(reference) == 0:
        return 1.0
    both = torch.from_numpy(np.concatenate([reference, other]))
    ious = legacy_iou(both)[: len(reference), len(reference):]
    return float((ious.max(dim=1).values >= iou).float().mean())


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity over the rows where both vectors are non-zero. (A degenerate proposal, with a
    "+1" height or width at or just below zero, gets an all-zero feature in the reference as here; a rounding
    difference can move such a box across zero, which says nothing about the precision of the network.)"""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norm_a, norm_b = np.linalg.norm(a64, axis=1), np.linalg.norm(b64, axis=1)
    valid = (norm_a > 0) & (norm_b > 0)
    return (a64 * b64).sum(1)[valid] / (norm_a * norm_b)[valid]


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(a64), 1e-12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="400x667", help="min_size x max_size of the preprocessing")
    parser.add_argument("--options", default="channels_last,bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--proposals", type=int, default=0,
                        help="RPN proposals per image instead of the config's (0: the config's); for a quick check")
    parser.add_argument("--photos", type=int, default=3, help="how many of the three photographs (a quick check: 1)")
    args = parser.parse_args()
    min_size, max_size = (int(x) for x in args.size.split("x"))
    names = [n for n in args.options.split(",") if n]
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        parser.error(f"unknown options {unknown}; choose from {', '.join(OPTIONS)}")

    model = RegionDetector(with_proposals(load_config(ROOT / "config" / "detectron_config_x152.yaml"),
                                          args.proposals)).eval()
    init_random(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def extractor(**options) -> RegionFeatureExtractor:
        fresh = RegionDetector(model.config)
        fresh.load_state_dict(state)
        return RegionFeatureExtractor(fresh, args.device, min_size, max_size, **options)

    images = dict(list(photos().items())[: args.photos])
    baseline = extractor(channels_last=False)
    reference, reference_features, base_time = {}, {}, 0.0
    for name, image in images.items():
        start = time.perf_counter()
        reference[name] = baseline.extract([image])[0]
        base_time += time.perf_counter() - start
        # The same boxes through the same box path: pixel boxes map back to the resized image with a rounding
        # difference that can move a box across a pyramid-level boundary, so compare like with like.
        reference_features[name] = baseline.extract_boxes(image, reference[name].boxes).features

    results = {}
    for option in names:
        variant = extractor(**OPTIONS[option])
        overlaps, cos_min, cos_mean, rel_err, elapsed = [], [], [], [], 0.0
        for name, image in images.items():
            start = time.perf_counter()
            selected = variant.extract([image])[0]
            elapsed += time.perf_counter() - start
            overlaps.append(box_overlap(reference[name].boxes, selected.boxes))
            same_boxes = variant.extract_boxes(image, reference[name].boxes)
            sims = cosine(reference_features[name], same_boxes.features)
            cos_min.append(float(sims.min()))
            cos_mean.append(float(sims.mean()))
            rel_err.append(relative_error(reference_features[name], same_boxes.features))
        results[option] = {
            "box_overlap_mean": float(np.mean(overlaps)), "box_overlap_min": float(np.min(overlaps)),
            "fc6_cosine_min": float(np.min(cos_min)), "fc6_cosine_mean": float(np.mean(cos_mean)),
            "fc6_relative_error": float(np.max(rel_err)),
            "time_vs_fp32": elapsed / base_time,
        }

    print(f"# Detector drift — {time.strftime('%Y-%m-%d')} — {platform.machine()}, {args.device}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; X-152 random weights, {min_size}x{max_size}, "
          f"{len(images)} photos, fp32 {base_time / len(images):.2f} s/image")
    print(f"  {'option':<20s} {'boxes kept (mean/min)':>22s} {'fc6 cosine (min/mean)':>24s} {'fc6 rel. error':>15s} "
          f"{'time vs fp32':>13s}")
    for option, r in results.items():
        print(f"  {option:<20s} {r['box_overlap_mean']:>11.3f} / {r['box_overlap_min']:.3f} "
              f"{r['fc6_cosine_min']:>13.6f} / {r['fc6_cosine_mean']:.6f} {r['fc6_relative_error']:>15.2e} "
              f"{r['time_vs_fp32']:>12.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "device": args.device,
                                         "size": [min_size, max_size], "results": results}, indent=2))


if __name__ == "__main__":
    main()
