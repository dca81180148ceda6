"""A worker started with PRECISION=bf16 on a CPU without native bf16 says so in its start-up log, with the measured
slowdown from docs/PERFORMANCE.md. The real `python worker.py` on a tiny bundle and a private server; the CPU
without native bf16 is emulated on any x86-64 machine by capping PyTorch and oneDNN at AVX2 (docs/TESTING.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from service.localstack import stop, wait_until
from vilbert.predictor import SLOW_CPU_PRECISION

ROOT = Path(__file__).resolve().parent.parent
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    subprocess.run([sys.executable, str(ROOT / "models" / "make_tiny.py"), "--out", str(out)], check=True,
                   capture_output=True, cwd=ROOT)
    return out


def worker_start_log(bundle: Path, redis_url: str, log: Path, **env: str) -> str:
    """Start `python worker.py`, wait until it is ready for jobs, stop it (SIGTERM) and return its log."""
    environment = dict(os.environ, MODEL_DIR=str(bundle), REDIS_URL=redis_url, DEVICE="cpu", PYTHONUNBUFFERED="1",
                       QUEUE_NAME=f"precision-{uuid.uuid4().hex[:8]}", OMP_NUM_THREADS="1", **env)
    with open(log, "wb") as out:
        worker = subprocess.Popen([sys.executable, str(ROOT / "worker.py")], cwd=ROOT, env=environment, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: worker.poll() is not None or "ready on queue" in log.read_text(), 120, 0.2)
        assert worker.poll() is None, log.read_text()
    finally:
        worker.send_signal(signal.SIGTERM)
        stop(worker, timeout=30)
    return log.read_text()


def test_bf16_worker_on_a_cpu_without_native_bf16_warns_at_start_up(bundle, redis_url, tmp_path):
    text = worker_start_log(bundle, redis_url, tmp_path / "bf16.log", PRECISION="bf16", **AVX2_ONLY)
    warning = next(line for line in text.splitlines() if "runs slower than fp32" in line)
    assert "WARNING" in warning and "precision bf16 on this CPU" in warning
    assert SLOW_CPU_PRECISION["bf16"] in warning and "5-8x slower" in warning and "PRECISION=fp32" in warning
    # logged while starting, before the worker takes jobs
    assert text.index("runs slower than fp32") < text.index("ready on queue")


def test_fp32_worker_does_not_warn(bundle, redis_url, tmp_path):
    text = worker_start_log(bundle, redis_url, tmp_path / "fp32.log", PRECISION="fp32", **AVX2_ONLY)
    assert "ready on queue" in text and "runs slower" not in text
