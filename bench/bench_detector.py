"""Detector speed per stage against the machine's own matmul speed, measured in one process.

Builds the X-152-32x8d-FPN from config/detectron_config_x152.yaml with random weights and runs one image
preprocessed to the real 800 x 1333 size. Per stage it prints the median time; FLOPs of the convolution and
linear work are counted with torch.utils.flop_counter, and the FLOP floor is those FLOPs divided by the GFLOP/s
of a large fp32 matmul measured in the same run. It also times region selection: the reference's one-NMS-per-class
loop against the vectorised selection, on 1000 proposals x 1601 classes.

    python bench/bench_detector.py [--repeats 2] [--size 800x1333] [--resize 800x1333] [--channels-last]
                                   [--fold-batchnorm] [--device cuda] [--precision bf16] [--json out.json]

On a GPU (--device cuda) the stages are timed with the device synchronised around each, the matmul is the
device's, and --precision bf16/fp16 runs the network under autocast as the extractor does.

The served configuration on CPU is --channels-last --fold-batchnorm (RegionFeatureExtractor's defaults there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from detector.config import DetectorConfig, load_config  # noqa: E402
from modelkit.precision import PRECISIONS, precision_autocast  # noqa: E402
from modelkit.regions import REGIONS_PER_IMAGE  # noqa: E402
from detector.extractor import pad_to_multiple, preprocess  # noqa: E402
from detector.fusion import fold_frozen_batchnorm  # noqa: E402
from detector.model import RegionDetector  # noqa: E402
from detector.selection import max_confidence_loop, select_regions  # noqa: E402
from timing import timed  # noqa: E402  (bench/, this script's folder)

MATMUL = 2048


def init_random(model: torch.nn.Module) -> None:
    """Random weights with well-scaled activations (identity batch norm, fan-in scaled convolutions)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "anchor" in name:
                continue
            if name.endswith("running_var") or (name.endswith("weight") and tensor.dim() == 1):
                tensor.fill_(1.0)
            elif name.endswith(("running_mean", "bias")):
                tensor.zero_()
            else:
                tensor.normal_(0, (1.0 / tensor[0].numel()) ** 0.5)
                if "rpn.head.bbox_pred" in name or "cls_score" in name:
                    tensor.mul_(0.01)


def with_proposals(config: DetectorConfig, proposals: int) -> DetectorConfig:
    """config with `proposals` RPN proposals per image before and after NMS (0: unchanged)."""
    if not proposals:
        return config
    return dataclasses.replace(config, pre_nms_top_n_test=proposals, post_nms_top_n_test=proposals,
                               fpn_post_nms_top_n_test=proposals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--size", default="800x1333", help="input height x width before preprocessing")
    parser.add_argument("--channels-last", action="store_true", help="run the convolutions in channels-last layout")
    parser.add_argument("--fold-batchnorm", action="store_true", help="fold the frozen batch norms into the convolutions")
    parser.add_argument("--resize", default="800x1333",
                        help="preprocessing's min_size x max_size (the released model's is 800x1333)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS),
                        help="autocast dtype of the network (selection always runs in fp32)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--proposals", type=int, default=0,
                        help="RPN proposals per image instead of the config's (0: the config's, 1000); fewer make a "
                             "quick check of this script (bench/gpu_checks.sh BENCH_QUICK=1)")
    parser.add_argument("--selection-boxes", type=int, default=1000,
                        help="boxes of the reference-loop vs vectorised selection comparison")
    args = parser.parse_args()
    height, width = (int(x) for x in args.size.split("x"))
    min_size, max_size = (int(x) for x in args.resize.split("x"))
    device = torch.device(args.device)

    config = with_proposals(load_config(ROOT / "config" / "detectron_config_x152.yaml"), args.proposals)
    model = RegionDetector(config).eval()
    init_random(model)
    model = model.to(device)
    if args.fold_batchnorm:
        fold_frozen_batchnorm(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    a, b = torch.randn(MATMUL, MATMUL, device=device), torch.randn(MATMUL, MATMUL, device=device)

    stages: dict[str, list[float]] = {k: [] for k in ("preprocess", "backbone_fpn", "rpn", "roi_head", "selection", "matmul")}
    flops: dict[str, int] = {}
    with torch.inference_mode(), precision_autocast(device.type, args.precision):
        for repeat in range(args.repeats + 1):  # the first round warms up and counts FLOPs
            t, (resized, scale) = timed(lambda: preprocess(image, min_size, max_size))
            tensor = torch.from_numpy(pad_to_multiple(resized))[None].to(device)
            if args.channels_last:
                tensor = tensor.contiguous(memory_format=torch.channels_last)
            stages["preprocess"].append(t)
            sizes = [(tensor.shape[2], tensor.shape[3])]
            counter = FlopCounterMode(display=False) if repeat == 0 else None
            with counter if counter else torch.inference_mode():
                t, features = timed(lambda: model.backbone(tensor), device)
            if counter:
                flops["backbone_fpn"] = counter.get_total_flops()
            stages["backbone_fpn"].append(t)
            counter = FlopCounterMode(display=False) if repeat == 0 else None
            with counter if counter else torch.inference_mode():
                t, proposals = timed(lambda: model.rpn(features, sizes), device)
            if counter:
                flops["rpn"] = counter.get_total_flops()
            stages["rpn"].append(t)
            counter = FlopCounterMode(display=False) if repeat == 0 else None
            with counter if counter else torch.inference_mode():
                t, (fc6, logits) = timed(lambda: model.roi_heads(features, proposals), device)
            if counter:
                flops["roi_head"] = counter.get_total_flops()
            stages["roi_head"].append(t)
            probs = torch.softmax(logits[0].float(), 1)
            t, _ = timed(lambda: select_regions(proposals[0].float() / scale, probs, REGIONS_PER_IMAGE), device)
            stages["selection"].append(t)
            with torch.autocast(device.type, enabled=False):
                stages["matmul"].append(timed(lambda: torch.mm(a, b), device)[0])
    median = {k: statistics.median(v[1:]) for k, v in stages.items()}
    matmul_gflops = 2 * MATMUL**3 / median["matmul"] / 1e9
    total_flops = sum(flops.values())
    total_s = sum(v for k, v in median.items() if k != "matmul")
    floor_s = total_flops / (matmul_gflops * 1e9)
    num_proposals = len(proposals[0])

    # selection: the reference loop vs the vectorised computation on 1000 proposals
    g = torch.Generator().manual_seed(1)
    n = args.selection_boxes
    corner = torch.rand(n, 2, generator=g) * 1000
    boxes = torch.cat([corner, corner + torch.rand(n, 2, generator=g) * 300 + 4], 1).to(device)
    sel_probs = torch.softmax(torch.randn(n, 1601, generator=g) * 3, 1).to(device)
    loop_s, loop_best = timed(lambda: max_confidence_loop(boxes, sel_probs), device)
    vec_s, (keep, conf) = timed(lambda: select_regions(boxes, sel_probs, REGIONS_PER_IMAGE), device)
    assert torch.equal(keep, loop_best.sort(descending=True, stable=True).indices[:100])

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"# Detector benchmark — {time.strftime('%Y-%m-%d')} — {platform.machine()}, torch {torch.__version__}, "
          f"{where}, {args.precision}; X-152-32x8d-FPN{' channels-last' if args.channels_last else ''}{' BN-folded' if args.fold_batchnorm else ''}, random weights, input {tensor.shape[2]}x{tensor.shape[3]}, "
          f"{num_proposals} proposals")
    for stage in ("preprocess", "backbone_fpn", "rpn", "roi_head", "selection"):
        extra = f", {flops[stage] / 1e9:.1f} GFLOP, {flops[stage] / median[stage] / 1e9:.1f} GFLOP/s" if stage in flops else ""
        print(f"  {stage:<13s} {median[stage] * 1e3:9.1f} ms{extra}")
    print(f"  total {total_s:.2f} s for {total_flops / 1e12:.3f} TFLOP; matmul {matmul_gflops:.1f} GFLOP/s -> floor "
          f"{floor_s:.2f} s, ratio {total_s / floor_s:.3f}x")
    print(f"  selection, {n} proposals x 1600 classes: loop {loop_s:.3f} s, vectorised {vec_s:.3f} s "
          f"({loop_s / vec_s:.1f}x faster, identical selection)")
    if args.json:
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "device": str(device), "precision": args.precision,
            "channels_last": args.channels_last, "fold_batchnorm": args.fold_batchnorm, "input": list(tensor.shape[2:]), "proposals": num_proposals,
            "median_s": median, "gflop": {k: v / 1e9 for k, v in flops.items()}, "matmul_gflops": matmul_gflops,
            "ratio_to_floor": total_s / floor_s, "selection_loop_s": loop_s, "selection_vectorised_s": vec_s,
            "cuda_peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        }, indent=2))


if __name__ == "__main__":
    main()
