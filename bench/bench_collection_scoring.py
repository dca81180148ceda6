"""Collection-search scoring speed: images scored per second by Predictor.score_images (one text against many
images, the text side computed once and broadcast) against full forwards that recompute the text for every
image (what a `retrieval_coco` job over the same images does), for 1 to 64 images per forward.

Full official ViLBERT config (bert_base_6layer_6conect + task tokens), random weights, 100 detected regions per
image (101 rows with the global one), a 12-word caption. Per precision: fp32 (oneDNN-packed weights where the CPU
has them) and bf16 with packed weights where the CPU has native bf16 (AVX512-BF16/AMX), as PRECISION=bf16 serves
it. Also the largest difference between the two ways' scores (the equal-results contract at full size), and the
score drift of storing a collection's features in float16 instead of float32 (half the Redis memory), and the
share of the scoring time spent in the visual embedding, the one step that depends on the image alone (what
keeping each image's embedding with its regions could save at most, docs/SCALE.md). Ratios are what to read on a
shared machine; each is measured in one process, timings interleaved.

    python bench/bench_collection_scoring.py [--images 32] [--batches 1,4,16,64] [--repeats 3] [--device cuda]
                                             [--json out.json]

On a GPU (`--device cuda`) the precisions are fp32 and bf16 autocast, and timings wait for the GPU to finish.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from timing import emit_report, machine_name, settle, timed  # noqa: E402  (bench/, this script's folder)
from vilbert.configuration import ViLBertConfig  # noqa: E402
from vilbert.cpu_inference import native_bf16_linear_available  # noqa: E402
from vilbert.modeling import ViLBertForVLTasks  # noqa: E402
from vilbert.predictor import ImageRegions, Predictor  # noqa: E402
from vilbert.tokenization import PACKAGED_VOCAB, Tokenizer  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "config" / "bert_base_6layer_6conect.json"
CAPTION = "a brown dog catching a red frisbee in a green park on a sunny day"


def images(count: int, feature_dim: int) -> list[ImageRegions]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        corners = rng.uniform(0, 300, (100, 2)).astype(np.float32)
        boxes = np.concatenate([corners, corners + rng.uniform(10, 300, (100, 2)).astype(np.float32)], axis=1)
        out.append(ImageRegions(boxes=boxes, features=rng.uniform(0, 4, (100, feature_dim)).astype(np.float32),
                                image_width=640, image_height=640))
    return out


def full_forward_scores(predictor: Predictor, text: str, batch: list[ImageRegions]) -> np.ndarray:
    """Scores through full forwards, the text recomputed in every row (a retrieval job over these images)."""
    rows = predictor._plan(batch, text, ["retrieval_coco"], None)[1]
    return np.array([float(out["vil_logit"]) for out in predictor._run(rows)], np.float32)


def interleaved_medians(first, second, repeats: int, device: str = "cpu") -> tuple[float, float]:
    """Median seconds of two calls timed alternately (after a warm-up of each), so that a load that comes and
    goes on a shared machine weighs on both alike."""
    first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((first, times[0]), (second, times[1])):
            out.append(timed(fn, device)[0])
    return statistics.median(times[0]), statistics.median(times[1])


def visual_embedding_share(predictor: Predictor, gallery: list[ImageRegions], batch: int, repeats: int,
                           device: str = "cpu") -> float:
    """Median share of score_images' time spent in the visual embedding (region features and boxes -> the visual
    width, BertImageEmbeddings), timed inside the real scoring path by hooks on that module."""
    module = predictor.model.bert.v_embeddings
    inside: list[float] = []
    started: list[float] = []

    def before(_module, _inputs) -> None:
        settle(device)
        started.append(time.perf_counter())

    def after(_module, _inputs, _output) -> None:
        settle(device)
        inside.append(time.perf_counter() - started.pop())

    handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        predictor.score_images(CAPTION, gallery, batch_size=batch)  # warm-up
        shares = []
        for _ in range(repeats):
            inside.clear()
            total = timed(lambda: predictor.score_images(CAPTION, gallery, batch_size=batch), device)[0]
            shares.append(sum(inside) / total)
    finally:
        for handle in handles:
            handle.remove()
    return statistics.median(shares)


def measure(precision: str, gallery: list[ImageRegions], batches: list[int], repeats: int,
            device: str = "cpu") -> dict:
    config = ViLBertConfig.from_dict({**ViLBertConfig.from_json_file(CONFIG).to_dict(), "task_specific_tokens": True})
    torch.manual_seed(0)
    model = ViLBertForVLTasks(config).eval()
    predictor = Predictor(model, Tokenizer(PACKAGED_VOCAB), answers={}, precision=precision, device=device)
    rows = []
    for batch in batches:
        shared, full = interleaved_medians(
            lambda: predictor.score_images(CAPTION, gallery, batch_size=batch),
            lambda: [full_forward_scores(predictor, CAPTION, gallery[i:i + batch]) for i in range(0, len(gallery), batch)],
            repeats, device)
        rows.append({"images_per_forward": batch, "shared_text_images_per_s": round(len(gallery) / shared, 2),
                     "full_forward_images_per_s": round(len(gallery) / full, 2),
                     "saving": round(1 - shared / full, 3)})
    shared_scores = predictor.score_images(CAPTION, gallery, batch_size=max(batches))
    job_scores = np.concatenate([full_forward_scores(predictor, CAPTION, [image]) for image in gallery])
    # Storage in float16 instead of float32 halves a collection's Redis memory: the drift it costs.
    half = [ImageRegions(image.boxes, image.features.astype(np.float16).astype(np.float32), image.image_width,
                         image.image_height) for image in gallery]
    half_scores = predictor.score_images(CAPTION, half, batch_size=max(batches))
    return {"precision": precision, "packed_weights": predictor.packed_weights, "rows": rows,
            "visual_embedding_share": round(visual_embedding_share(predictor, gallery, max(batches), repeats,
                                                                   device), 4),
            "max_score_difference_vs_jobs": float(np.abs(shared_scores - job_scores).max()),
            "score_spread": float(job_scores.max() - job_scores.min()),
            "float16_storage_max_score_drift": float(np.abs(half_scores - shared_scores).max()),
            "float16_storage_ranking_unchanged": bool((np.argsort(-half_scores, kind="stable")
                                                       == np.argsort(-shared_scores, kind="stable")).all())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    gallery = images(args.images, 2048)
    on_gpu = args.device.startswith("cuda")
    precisions = ["fp32"] + (["bf16"] if on_gpu or native_bf16_linear_available() else [])
    report = {"machine": machine_name(args.device), "device": args.device, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "images": args.images,
              "results": [measure(p, gallery, batches, args.repeats, args.device) for p in precisions]}
    if "bf16" not in precisions:
        report["bf16"] = "skipped: this CPU has no native bf16 instructions (emulated bf16 is slower than fp32)"
    emit_report(report, args.json)


if __name__ == "__main__":
    main()
