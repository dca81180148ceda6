"""The memory failures of issue 13 against the live stack: a 16-bit PNG of a few kB under the pixel limit, whose
decode costs more than the limit allows, and a compressed .npz that inflates to 160 MB once grew a gunicorn worker
by hundreds of MB (the web tier decoded and inflated them). Now both are refused from their headers, and the peak
RSS (VmHWM) of every gunicorn worker stays put. (The stack's MAX_IMAGE_PIXELS is 4 MP: the PNG has 3.6 MP.)"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def gunicorn_workers(master_pid: int) -> list[int]:
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()
    return [int(pid) for pid in children]


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


def test_hostile_uploads_do_not_grow_the_web_workers(stack):
    workers = gunicorn_workers(stack.web.pid)
    assert len(workers) == 2
    for _ in range(4):  # warm both workers up on ordinary requests first: their peak then reflects normal work
        assert stack.get("/healthz")[0] == 200
    before = {pid: peak_rss_kb(pid) for pid in workers}

    buffer = io.BytesIO()
    Image.new("I;16", (2000, 1800), 4000).save(buffer, "PNG")  # 3.6 MP of 16-bit: 43 MB to decode, over 40 MB
    png = buffer.getvalue()
    buffer = io.BytesIO()
    np.savez_compressed(buffer, boxes=np.zeros((1, 4)), features=np.zeros((20_000, 1000)), image_width=5,
                        image_height=5)  # 160 MB of zeros in about 150 kB
    bomb = buffer.getvalue()
    for _ in range(3):  # each gunicorn worker sees some of them
        status, body, _ = stack.post(fields={"text": "hi"}, files=[("image", png)])
        assert (status, body["error"]["code"]) == (413, "image_too_large"), body
        status, body, _ = stack.post(fields={"text": "hi"}, files=[("features", bomb, "f.npz")])
        assert (status, body["error"]["code"]) == (400, "invalid_features"), body
        assert body["error"]["message"].startswith("features 0: features inflates to 160000128 bytes")

    grown = {pid: (peak_rss_kb(pid) - before[pid]) / 1024 for pid in workers}
    assert all(growth < 40 for growth in grown.values()), f"gunicorn workers' peak RSS grew (MB): {grown}"


def test_a_worker_batch_stops_at_its_decoded_byte_budget(stack):
    """Six waiting jobs of one 640x480 image each (921,600 decoded bytes): with MAX_DECODED_BYTES_PER_BATCH at two
    and a half images' worth the worker takes them three at a time (it stops once the batch reaches the budget),
    not all six at once; every job still finishes."""
    import signal

    from service.localstack import wait_until

    stack.worker.terminate()
    stack.worker.wait(30)
    stack.start_worker(MAX_DECODED_BYTES_PER_BATCH=str(int(2.5 * 640 * 480 * 3)), BATCH_MAX_JOBS="8",
                       BATCH_MAX_WAIT_MS="200")
    assert stack.wait_ready(90), stack.tail("worker")
    images = []
    for shade in range(6):
        buffer = io.BytesIO()
        Image.new("RGB", (640, 480), (40 * shade, 90, 200 - 30 * shade)).save(buffer, "JPEG")
        images.append(buffer.getvalue())
    stack.worker.send_signal(signal.SIGSTOP)  # idle in its dequeue: the jobs below wait in the queue together
    try:
        ids = [stack.submit("what colour is it?", [image], tasks="vqa") for image in images]
        queue_key = f"rq:queue:{stack.settings.queue_name}"
        connection = stack.connection()
        assert wait_until(lambda: connection.llen(queue_key) >= 5, 30)
    finally:
        stack.worker.send_signal(signal.SIGCONT)
    jobs = [stack.wait(job_id, 120) for job_id in ids]
    assert all(job["status"] == "finished" for job in jobs), jobs
    sizes = [job["result"]["batch_size"] for job in jobs]
    assert 2 <= max(sizes) <= 3, sizes  # still batched, never more than the budget allows (before: all six at once)
