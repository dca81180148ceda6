"""What the CPU this process runs on makes of the service's models. tests/test_avx2_cpu.py runs it natively and on
QEMU's AVX2-only Zen 3 (.ci/on_zen3.sh) and compares the two. Prints one JSON object:

- what PyTorch and our probes see: kernel capability, AVX-512 / AVX512-BF16 / AMX, native bf16 linears;
- whether a bf16 predictor logs the slow-precision warning (what the worker prints at start-up);
- region features of fixed boxes on a fixed photo (the detector without its selection step, so that no near-tie
  in the selection can change which regions follow) and ViLBERT's answers on them, fp32;
- the tasks a full pipeline run (detector with selection, then ViLBERT) answered.

    python tests/cpu_probe.py BUNDLE
"""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.worker.pipeline import InferenceRequest, Pipeline  # noqa: E402
from vilbert.cpu_inference import native_bf16_linear_available  # noqa: E402
from vilbert.predictor import ImageRegions, Predictor  # noqa: E402

TASKS = ["vqa", "refcoco", "retrieval_coco", "snli_ve"]
TEXT = "a red block on the left"
BOXES = np.array([[4, 4, 60, 50], [40, 10, 150, 110], [0, 0, 160, 120], [90, 60, 150, 118]], np.float32)


def photo() -> bytes:
    """A 160x120 picture with a few coloured blocks: the same bytes on every machine (no codec in between)."""
    pixels = np.full((120, 160, 3), 235, np.uint8)
    pixels[8:48, 6:58] = (200, 30, 30)
    pixels[20:100, 50:140] = (30, 90, 200)
    pixels[64:116, 96:148] = (40, 160, 60)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def bf16_warning(bundle: Path) -> bool:
    """True when a bf16 predictor on this CPU warns that it runs slower than fp32."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("vilbert.predictor")
    logger.addHandler(handler)
    try:
        Predictor.from_dir(bundle, device="cpu", precision="bf16")
    finally:
        logger.removeHandler(handler)
    return any("runs slower than fp32" in record.getMessage() for record in records)


def main(bundle: Path) -> dict:
    torch.manual_seed(0)
    pipeline = Pipeline.from_dir(bundle, device="cpu", min_size=96, max_size=160)
    data = photo()
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    regions = pipeline.extractor.extract_boxes(rgb, BOXES)
    image = ImageRegions(regions.boxes, regions.features, regions.image_width, regions.image_height)
    answers = pipeline.predictor.predict([image], TEXT, TASKS, top_k=3)
    full = pipeline.run(InferenceRequest([data], TEXT, TASKS))
    cpu = torch.cpu
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "avx2": cpu._is_avx2_supported(),
        "avx512": cpu._is_avx512_supported(),
        "avx512_bf16": cpu._is_avx512_bf16_supported(),
        "amx": cpu._is_amx_tile_supported(),
        "native_bf16_linear": native_bf16_linear_available(),
        "bf16_warning": bf16_warning(bundle),
        "features": regions.features.tolist(),
        "answers": answers,
        "pipeline_tasks": sorted(full["tasks"]),
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
