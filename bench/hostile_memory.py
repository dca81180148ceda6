"""Memory under the worst inputs the service accepts, and Redis memory at the queue's byte budget.

Three measurements, each in a fresh process (peak RSS growth: VmHWM after the work minus VmRSS before it, with the
peak reset first) or a private Redis server:

1. web tier: parsing one submission of the worst accepted kind for each input type: 8 images at the decode budget
   (16-bit greyscale, each just under MAX_IMAGE_PIXELS' decode cost), and 8 feature files at the .npz member
   budget (float64 features of 100 x 4096);
2. model worker: one batch through the real pipeline (tiny bundle, official detector sizes) holding the most
   decoded bytes one request may carry (MAX_DECODED_BYTES_PER_REQUEST), in 40 MP RGB images;
3. Redis: uploads stored up to MAX_QUEUED_BYTES through the web tier's own admission, then INFO used_memory.

Ratios are what to read: RSS growth against the decoded bytes of the inputs, Redis memory against the budget.

    python bench/hostile_memory.py [--max-image-pixels N] [--budget-mb N]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Peak RSS growth: the process's peak (VmHWM) after the work minus its resident size (VmRSS) just before it, so
# that what imports and setup touched earlier does not hide the work's own peak.
PROBE = """
import json, sys
sys.path.insert(0, {root!r})
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
import gc; gc.collect()
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
{body}
print(json.dumps({{"rss_growth_mb": (status("VmHWM") - before) / 1024}}))
"""


def in_fresh_process(setup: str, body: str) -> float:
    code = setup + PROBE.format(root=str(ROOT), body=body)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_growth_mb"]


def web_tier(max_pixels: int, workdir: Path) -> dict:
    from PIL import Image
    import numpy as np

    from detector.images import DECODE_BYTES_PER_PIXEL

    # the largest 16-bit image the decode budget admits: pixels * 12 <= max_pixels * 10
    pixels = max_pixels * DECODE_BYTES_PER_PIXEL["rgb"] // DECODE_BYTES_PER_PIXEL["16bit"]
    width = int(pixels ** 0.5)
    image = Image.new("I;16", (width, pixels // width), 4000)
    path = workdir / "wide16.png"
    image.save(path, "PNG")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, boxes=np.tile([[0, 0, 1, 1]], (100, 1)), features=np.ones((100, 4096)),
                        image_width=10, image_height=10)
    (workdir / "features.npz").write_bytes(buffer.getvalue())
    setup = ("from service.settings import Settings\nfrom vilbert.tasks import TaskRegistry\n"
             "from service.web.inputs import parse_submission, parse_feature_submission\n"
             f"settings = Settings(max_image_pixels={max_pixels}, max_decoded_bytes_per_request=10**12)\n"
             "registry = TaskRegistry.from_file()\n")
    images = in_fresh_process(setup + f"data = open({str(path)!r}, 'rb').read()\n",
                              "parse_submission({'text': 'hi', 'tasks': 'retrieval_coco'}, [data] * 8, settings, registry)")
    features = in_fresh_process(setup + f"data = open({str(workdir / 'features.npz')!r}, 'rb').read()\n",
                                "parse_feature_submission({'text': 'hi', 'tasks': 'retrieval_coco'}, [data] * 8, [], "
                                "settings, registry, None)")
    return {"images_16bit": {"count": 8, "width": width, "height": pixels // width, "upload_bytes": path.stat().st_size,
                             "rss_growth_mb": round(images, 1)},
            "features_npz": {"count": 8, "upload_bytes": len(buffer.getvalue()), "inflated_bytes_each": 100 * 4096 * 8,
                             "rss_growth_mb": round(features, 1)}}


def model_worker(max_pixels: int, per_request: int, workdir: Path) -> dict:
    from PIL import Image

    bundle = workdir / "bundle"
    subprocess.run([sys.executable, str(ROOT / "models" / "make_tiny.py"), "--out", str(bundle)], check=True,
                   capture_output=True, cwd=ROOT)
    count = max(1, per_request // (max_pixels * 3))
    width = int(max_pixels ** 0.5)
    path = workdir / "big.jpg"
    Image.linear_gradient("L").resize((width, max_pixels // width)).convert("RGB").save(path, "JPEG", quality=80)
    setup = ("from service.worker.pipeline import Pipeline, InferenceRequest\n"
             f"pipeline = Pipeline.from_dir({str(bundle)!r}, device='cpu', max_image_pixels={max_pixels})\n"
             f"data = open({str(path)!r}, 'rb').read()\n")
    growth = in_fresh_process(setup, f"pipeline.run(InferenceRequest(images=[data] * {count}, text='hi', "
                                     "tasks=['retrieval_coco']))")
    decoded = count * (max_pixels // width) * width * 3
    return {"images": count, "pixels_each": (max_pixels // width) * width, "decoded_mb": round(decoded / 2**20, 1),
            "rss_growth_mb": round(growth, 1), "rss_per_decoded_byte": round(growth * 2**20 / decoded, 2)}


def redis_at_budget(budget: int, workdir: Path) -> dict:
    import uuid

    from PIL import Image
    from redis import Redis

    from service.localstack import free_port, start_redis, stop
    from service.settings import load_settings
    from service.web import create_app

    port = free_port()
    server = start_redis(port, workdir, workdir / "redis.log")
    try:
        url = f"redis://127.0.0.1:{port}/0"
        settings = load_settings({"REDIS_URL": url, "QUEUE_NAME": "budget", "MAX_QUEUED_BYTES": str(budget),
                                  "MAX_QUEUED_JOBS": "100000"})
        client = create_app(settings).test_client()
        connection = Redis.from_url(url)
        baseline = connection.info("memory")["used_memory"]
        buffer = io.BytesIO()
        Image.effect_noise((1200, 900), 60).convert("RGB").save(buffer, "JPEG", quality=95)
        image = buffer.getvalue()
        accepted = refused = 0
        while True:
            response = client.post("/api/v1/jobs", data={"text": "hi", "tasks": "vqa",
                                                         "image": (io.BytesIO(image), f"{uuid.uuid4().hex}.jpg")})
            if response.status_code != 202:
                refused += 1
                break
            accepted += 1
        used = connection.info("memory")["used_memory"] - baseline
        return {"budget_mb": round(budget / 2**20, 1), "jobs_admitted": accepted, "upload_bytes_each": len(image),
                "uploads_mb": round(accepted * len(image) / 2**20, 1), "redis_used_mb": round(used / 2**20, 1),
                "redis_per_budget_byte": round(used / budget, 3), "next_submission": "503 queue_full" if refused else "?"}
    finally:
        stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-image-pixels", type=int, default=40_000_000)
    parser.add_argument("--per-request-mb", type=int, default=400, help="MAX_DECODED_BYTES_PER_REQUEST in MB")
    parser.add_argument("--budget-mb", type=int, default=64, help="MAX_QUEUED_BYTES for the Redis measurement")
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        report = {
            "web_tier": web_tier(args.max_image_pixels, workdir),
            "model_worker": model_worker(args.max_image_pixels, args.per_request_mb * 1_000_000, workdir),
            "redis": redis_at_budget(args.budget_mb * 2**20, workdir),
        }
    report["seconds"] = round(time.time() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
