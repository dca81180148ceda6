#!/usr/bin/env python3
"""The worker's whole pipeline (decode, X-152 detector, region selection, ViLBERT, answers) at the official sizes,
in one process on one device: what docs/OPERATIONS.md needs to size GPU hosts.

    python bench/bench_pipeline.py [--device cuda] [--precision fp32] [--jobs 40] [--json out.json]
    python bench/bench_pipeline.py --tiny --device cpu --jobs 2      # the script's own check, in seconds (tests)

The bundle has the released files' shapes and formats with random weights: the X-152-32x8d-FPN detector of
config/detectron_config_x152.yaml and the 12-in-1 ViLBERT of config/bert_base_6layer_6conect.json. A random
detector scores all 1600 classes almost alike, which defeats the top-100 shortcut of region selection and makes
it far slower than with trained weights (bench_detector.py shows both). Its class layer is therefore scaled so
that each proposal's class probabilities are as peaked as a trained detector's (`--class-scale`, 0 to keep the
raw random layer). Answers are meaningless; the work done is the real work.

Measured in one run:
- GPU memory: weights after loading; allocated and reserved when idle after warm-up; peak during one request of
  every task on a large photograph (NLVR2 on two, the pointing tasks with 30 candidate boxes).
- one image, VQA: sequential requests per second (each `Pipeline.run`), and eight requests per call of
  `Pipeline.run_many` (what the batch worker does), with the per-stage medians.
- the FLOP floor: ViLBERT + detector FLOPs of one VQA request against a large matmul in the same process.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from timing import timed  # noqa: E402

from detector.config import load_config  # noqa: E402
from detector.model import RegionDetector  # noqa: E402
from service.bundle import write_tiny_bundle  # noqa: E402
from service.worker.pipeline import InferenceRequest, Pipeline  # noqa: E402
from vilbert.checkpoint import save_checkpoint  # noqa: E402
from vilbert.configuration import ViLBertConfig  # noqa: E402
from vilbert.modeling import ViLBertForVLTasks  # noqa: E402
from vilbert.predictor import CHECKPOINT_FILE, CONFIG_FILE, PACKAGED_CONFIG  # noqa: E402

MATMUL = 8192
QUESTION = "what is the man holding in his left hand?"


def write_official_size_bundle(out: Path, class_scale: float) -> Path:
    """The tiny bundle's vocabulary and answer lists, with official-size random-weight models in their place."""
    write_tiny_bundle(out)
    (out / "detectron_config.yaml").write_text((ROOT / "config" / "detectron_config_x152.yaml").read_text())
    torch.manual_seed(0)
    detector = RegionDetector(load_config(out / "detectron_config.yaml"))
    if class_scale:
        with torch.no_grad():
            detector.roi_heads.box.predictor.cls_score.weight.mul_(class_scale)
    torch.save({"model": detector.state_dict(), "iteration": 0}, out / "detectron_model.pth")
    config = ViLBertConfig.from_json_file(PACKAGED_CONFIG)
    config.to_json_file(out / CONFIG_FILE)
    save_checkpoint(ViLBertForVLTasks(config), out / CHECKPOINT_FILE)
    return out


def photo(width: int, height: int, seed: int) -> bytes:
    """A smooth random JPEG (photograph-like compression and decode cost)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--jobs", type=int, default=40, help="VQA requests timed each way (default 40)")
    parser.add_argument("--class-scale", type=float, default=30.0,
                        help="factor on the random detector's class layer (0: leave it as drawn)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny random bundle and a small matmul instead of the official sizes (a quick check)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    print(f"# Pipeline benchmark — {time.strftime('%Y-%m-%d')} — {platform.machine()}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name(device) if cuda else f'{torch.get_num_threads()} threads'}, {args.precision}")

    with tempfile.TemporaryDirectory() as work:
        started = time.perf_counter()
        if args.tiny:
            bundle = write_tiny_bundle(Path(work) / "bundle")
        else:
            bundle = write_official_size_bundle(Path(work) / "bundle", args.class_scale)
        print(f"  {'tiny' if args.tiny else 'official-size'} random bundle written in {time.perf_counter() - started:.1f} s")
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        pipeline = Pipeline.from_dir(bundle, device=str(device), precision=args.precision)
    report: dict = {"date": time.strftime("%Y-%m-%d"), "device": str(device), "precision": args.precision,
                    "torch": torch.__version__, "class_scale": args.class_scale, "tiny": args.tiny}
    if cuda:
        report["gpu"] = torch.cuda.get_device_name(device)
        report["weights_gb"] = torch.cuda.memory_allocated(device) / 1e9

    one = photo(640, 480, 0)
    large = [photo(2048, 1536, 1), photo(1600, 1200, 2)]
    for _ in range(3):  # warm-up: kernels, allocator, autotuning
        pipeline.run(InferenceRequest([one], QUESTION, ["vqa"], top_k=3))
    if cuda:
        torch.cuda.synchronize(device)
        report["idle_allocated_gb"] = torch.cuda.memory_allocated(device) / 1e9
        report["idle_reserved_gb"] = torch.cuda.memory_reserved(device) / 1e9
        torch.cuda.reset_peak_memory_stats(device)

    single = [t.name for t in pipeline.predictor.tasks if t.images in (1, "1+") and not t.needs_candidates]
    pointing = [t.name for t in pipeline.predictor.tasks if t.needs_candidates]
    rng = np.random.default_rng(3)
    corners = rng.uniform(0, 1200, (30, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(40, 300, (30, 2))], 1).round(1).tolist()
    every_task = [InferenceRequest(large[:1], QUESTION, single, top_k=3),
                  InferenceRequest(large[:1], QUESTION, pointing, top_k=3, boxes=boxes),
                  InferenceRequest(large, "the left image shows more dogs than the right one", ["nlvr2"])]
    outcomes = pipeline.run_many(every_task)
    failed = [o for o in outcomes if not isinstance(o, dict)]
    if failed:
        raise SystemExit(f"requests failed: {failed}")
    if cuda:
        torch.cuda.synchronize(device)
        report["peak_every_task_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        report["reserved_after_every_task_gb"] = torch.cuda.memory_reserved(device) / 1e9
    report["every_task_regions"] = [o["images"][0]["regions"] for o in outcomes]

    def vqa(index: int) -> InferenceRequest:
        return InferenceRequest([photo(640, 480, 100 + index)], QUESTION, ["vqa"], top_k=3)

    # distinct photos, decoded in advance of the clock: the feature cache is not involved in-process
    requests = [vqa(i) for i in range(args.jobs)]
    stage_times: dict[str, list[float]] = {}
    seconds, results = timed(lambda: [pipeline.run(r) for r in requests], device)
    for result in results:
        for name, value in result["timings"].items():
            stage_times.setdefault(name, []).append(value)
    report["sequential_jobs_per_s"] = args.jobs / seconds
    report["stage_median_ms"] = {k: statistics.median(v) * 1e3 for k, v in stage_times.items()}
    batches = [requests[i:i + 8] for i in range(0, len(requests), 8)]
    seconds, _ = timed(lambda: [pipeline.run_many(b) for b in batches], device)
    report["batched8_jobs_per_s"] = args.jobs / seconds

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        pipeline.run(requests[0])
    size = 1024 if args.tiny else MATMUL
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.mm(a, b)
    matmul_s = statistics.median(timed(lambda: torch.mm(a, b), device)[0] for _ in range(5))
    report["gflop_per_vqa_job"] = counter.get_total_flops() / 1e9
    report["matmul_gflops"] = 2 * size**3 / matmul_s / 1e9
    report["sequential_ratio_to_floor"] = (1 / report["sequential_jobs_per_s"]) / (
        report["gflop_per_vqa_job"] / report["matmul_gflops"])

    for key, value in report.items():
        print(f"  {key:<28s} {value:.3f}" if isinstance(value, float) else f"  {key:<28s} {value}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
