"""Images cost what their pixels cost, once: the web tier reads headers only (detector.images.probe_image) and prices
the decode by mode (bit depth, alpha), the worker decodes once, and the decoded bytes per request and per batch are
bounded."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from detector.images import (DECODE_BYTES_PER_PIXEL, ImageDecodeError, decode_budget, load_image, probe_image)
from service.contract import ImageInfo, JobRequest
from service.errors import BadRequest
from service.settings import load_settings
from service.web.inputs import check_image
from service.worker.context import WorkerContext
from service.worker.metrics import WorkerMetrics
from service.worker.rq_batch import BatchWorker, decoded_bytes

ROOT = Path(__file__).resolve().parent.parent


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def sixteen_bit_png(width: int, height: int) -> bytes:
    """A flat 16-bit greyscale PNG: tiny on the wire, width*height*2 bytes once decoded."""
    return encode(Image.new("I;16", (width, height), 4000), "PNG")


def test_headers_give_size_mode_and_the_displayed_orientation():
    header = probe_image(encode(Image.new("RGB", (40, 30)), "JPEG"))
    assert (header.format, header.mode, header.width, header.height, header.frames, header.rotated) == (
        "JPEG", "RGB", 40, 30, 1, False)
    assert header.rgb_bytes == 40 * 30 * 3 and header.decode_bytes == 40 * 30 * DECODE_BYTES_PER_PIXEL["rgb"]
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned a quarter: 30 wide, 40 high, as load_image returns it
    turned = encode(Image.new("RGB", (40, 30)), "JPEG", exif=exif)
    header = probe_image(turned)
    assert (header.width, header.height, header.rotated) == (30, 40, True) and load_image(turned).shape == (40, 30, 3)
    assert probe_image(encode(Image.new("RGBA", (10, 10)), "PNG")).decode_bytes == 100 * DECODE_BYTES_PER_PIXEL["alpha"]
    assert probe_image(sixteen_bit_png(10, 10)).decode_bytes == 100 * DECODE_BYTES_PER_PIXEL["16bit"]
    frames = [Image.new("RGB", (8, 8), (40 * i, 0, 255 - 40 * i)) for i in range(5)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert probe_image(gif).frames == 5 and load_image(gif).shape == (8, 8, 3)  # the first frame only


def test_the_budget_is_in_decode_bytes_so_16_bit_and_alpha_images_get_fewer_pixels():
    limit = 10_000
    assert probe_image(encode(Image.new("RGB", (100, 100)), "PNG"), limit).pixels == limit  # 8-bit RGB: the limit
    with pytest.raises(ImageDecodeError) as caught:
        probe_image(encode(Image.new("RGB", (101, 100)), "PNG"), limit)
    assert caught.value.message == f"image has 101x100 pixels, more than the limit of {limit}"
    with pytest.raises(ImageDecodeError) as caught:
        probe_image(sixteen_bit_png(100, 100), limit)
    assert (caught.value.code, caught.value.message) == (
        "image_too_large", f"decoding this I;16 image of 100x100 pixels needs about {limit * 12} bytes, more than the "
                           f"{decode_budget(limit)} an 8-bit RGB image at the pixel limit needs")
    assert probe_image(sixteen_bit_png(80, 100), limit).pixels == 8000  # 96,000 bytes: within 100,000
    with pytest.raises(ImageDecodeError) as caught:
        probe_image(encode(Image.new("RGBA", (60, 100)), "PNG"), limit)  # 6000 px x 20 B > 100,000
    assert caught.value.code == "image_too_large"
    with pytest.raises(ImageDecodeError):  # the worker's decoder applies the same budget before decoding
        load_image(sixteen_bit_png(100, 100), limit)


def peak_rss_growth_mb(setup: str, code: str) -> float:
    """Peak RSS growth of running `code` in a fresh process: VmHWM after it minus VmRSS before, the peak reset
    first (so what the imports touched does not hide it)."""
    script = (setup + "\ndef status(field):\n    for line in open('/proc/self/status'):\n"
              "        if line.startswith(field + ':'):\n            return int(line.split()[1])\n"
              "before = status('VmRSS')\nopen('/proc/self/clear_refs', 'w').write('5')\n" + code +
              "\nprint((status('VmHWM') - before) / 1024)")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def test_the_web_tier_refuses_a_36_megapixel_16_bit_png_from_its_headers_without_decoding_it(tmp_path):
    data = sixteen_bit_png(7200, 5000)  # 36 MP: under the default 40 MP pixel limit, 72 MB decoded as 16-bit
    assert len(data) < 200_000
    with pytest.raises(BadRequest) as caught:
        check_image(data, 40_000_000)
    assert (caught.value.code, caught.value.status) == ("image_too_large", 413)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    setup = ("from service.web.inputs import check_image\nfrom service.errors import BadRequest\n"
             f"data = open({str(path)!r}, 'rb').read()\n")
    growth = peak_rss_growth_mb(setup, "try:\n    check_image(data, 40_000_000)\nexcept BadRequest:\n    pass")
    assert growth < 10, f"probing grew the process by {growth:.0f} MB"
    # An image within the budget is probed without decoding it either (a decode would take 48 MB here).
    small = tmp_path / "ok.png"
    small.write_bytes(sixteen_bit_png(4000, 2000))
    growth = peak_rss_growth_mb(setup.replace(str(path), str(small)), "check_image(data, 40_000_000)")
    assert growth < 10, f"probing grew the process by {growth:.0f} MB"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP"])
def test_an_upload_cut_short_is_refused_from_its_last_bytes(fmt):
    image = Image.effect_noise((64, 48), 60).convert("RGB" if fmt != "GIF" else "P")
    whole = encode(image, fmt)
    assert probe_image(whole).format == fmt
    with pytest.raises(ImageDecodeError) as caught:
        probe_image(whole[: len(whole) * 2 // 3])
    # Some formats' headers already fail to parse when cut short (PIL reads PNG's chunks, WebP's container).
    assert caught.value.code == "invalid_image"
    if fmt in ("JPEG", "GIF"):
        assert caught.value.message == f"the {fmt} image is truncated (its data ends early)"


def test_a_decoded_image_passed_on_is_not_copied_again():
    rgb = load_image(encode(Image.new("RGB", (20, 10), (1, 2, 3)), "PNG"))
    assert load_image(rgb) is rgb  # the extractor gets the worker's decoded array itself: one decode in all
    gray = np.zeros((10, 20), np.uint8)
    assert load_image(gray).shape == (10, 20, 3)


def test_a_worker_stops_taking_partners_once_the_batch_reaches_its_decoded_budget(redis_url):
    settings = load_settings({"REDIS_URL": redis_url, "QUEUE_NAME": f"decoded-{uuid.uuid4().hex[:8]}",
                              "BATCH_MAX_JOBS": "8", "MAX_DECODED_BYTES_PER_BATCH": "250000"})
    connection = Redis.from_url(redis_url)
    queue = Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)
    for _ in range(6):
        request = JobRequest("hi", ["vqa"], images=[ImageInfo(200, 200, 10, decoded_bytes=120_000)])
        queue.enqueue("service.worker.rq_batch.batched_only", kwargs={"request": json.loads(json.dumps(
            request.to_json()))}, job_id=uuid.uuid4().hex)
    context = WorkerContext(settings=settings, pipeline=None, metrics=WorkerMetrics(), connection=connection)
    worker = BatchWorker([queue], context, name=f"w-{uuid.uuid4().hex[:6]}")
    first = Queue.dequeue_any([queue], None, connection=worker.connection, job_class=worker.job_class,
                              serializer=worker.serializer)
    assert decoded_bytes(first[0]) == 120_000
    batch = worker.take_partners(first)
    assert len(batch) == 3  # 120 kB, 240 kB (< 250 kB: one more), 360 kB: stop
    assert queue.count == 3
