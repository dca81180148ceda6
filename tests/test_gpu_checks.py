"""bench/gpu_checks.sh, the prepared run for a lent GPU, exercised on CPU in its quick mode so that it cannot
rot unseen between the rare sessions that have a GPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_checks(out: Path, timeout: float, **env: str) -> int:
    """bash bench/gpu_checks.sh OUT with `env` added; the whole process group is killed on a timeout, so that no
    benchmark outlives the test."""
    process = subprocess.Popen(["bash", "bench/gpu_checks.sh", str(out)], cwd=ROOT, env={**os.environ, **env},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.cpu_heavy
def test_gpu_checks_script_runs_every_step_and_writes_its_files(tmp_path):
    from vilbert.cpu_inference import native_bf16_linear_available

    # fp16 is left out on CPU (no fast kernels there); the bf16 steps run the same code with the other dtype.
    # The drift step compares a photograph under the option against fp32: in bf16 on a CPU without native bf16
    # that is emulated (~6x fp32), so such CPUs check the step with channels-last instead.
    drift_option = "bf16" if native_bf16_linear_available() else "channels_last"
    status = run_checks(tmp_path, 600, BENCH_QUICK="1", BENCH_DEVICE="cpu", PYTHON=sys.executable,
                        BENCH_PRECISIONS="fp32 bf16", BENCH_DRIFT_OPTIONS=drift_option)
    log = (tmp_path / "log.txt").read_text()
    assert status == 0, log[-4000:]
    assert "failed" not in log and "## done, status 0" in log
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "detector_bf16.json", "detector_bf16_cl.json", "detector_fp32.json", "drift.json",
        "log.txt", "vilbert.json",
    ]
    vilbert = json.loads((tmp_path / "vilbert.json").read_text())
    assert [case["batch"] for case in vilbert["cases"]] == [1, 8]
    assert all(0 < case["bf16_max_prob_diff"] < 0.01 for case in vilbert["cases"])
    if vilbert["packed_weights"]:  # on CPU the bench also reports the stricter oneDNN floor
        assert all(case["served_ratio_to_onednn_floor"] > 0 for case in vilbert["cases"])
    for name, precision, channels_last in (("fp32", "fp32", False), ("bf16", "bf16", False), ("bf16_cl", "bf16", True)):
        detector = json.loads((tmp_path / f"detector_{name}.json").read_text())
        assert (detector["precision"], detector["channels_last"], detector["device"]) == (precision, channels_last, "cpu")
        assert detector["gflop"]["backbone_fpn"] > 0 and detector["median_s"]["backbone_fpn"] > 0
    drift = json.loads((tmp_path / "drift.json").read_text())
    assert set(drift["results"]) == {drift_option}


def test_gpu_checks_reports_a_failed_step_and_goes_on(tmp_path):
    status = run_checks(tmp_path, 300, BENCH_QUICK="1", BENCH_DEVICE="no-such-device", PYTHON=sys.executable,
                        BENCH_PRECISIONS="fp32", BENCH_DRIFT_OPTIONS="bf16")
    log = (tmp_path / "log.txt").read_text()
    assert status != 0
    # every step was tried, and each says it failed
    assert log.count("!! failed") == log.count("## ") - 2  # all but "torch" and "done"
    assert "## detector drift" in log and "## done, status" in log
