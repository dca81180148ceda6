"""bench/bench_pipeline.py, the GPU sizing run, checked on CPU with the tiny bundle (`--tiny`): every request kind
goes through the real Pipeline and the report holds the figures docs/OPERATIONS.md quotes, consistent with each
other. The official-size run itself needs a GPU (docs/PERFORMANCE.md, GPU section)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_pipeline_reports_consistent_figures(tmp_path):
    out = tmp_path / "pipeline.json"
    done = subprocess.run([sys.executable, "bench/bench_pipeline.py", "--tiny", "--device", "cpu", "--jobs", "3",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tiny random bundle written" in done.stdout
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["tiny"] is True and report["precision"] == "fp32"
    # every task kind answered: single-image tasks, pointing with 30 candidates, NLVR2 on two images
    assert len(report["every_task_regions"]) == 3 and all(n > 0 for n in report["every_task_regions"])
    assert set(report["stage_median_ms"]) == {"decode_s", "detector_s", "vilbert_s"}
    assert all(value > 0 for value in report["stage_median_ms"].values())
    assert report["sequential_jobs_per_s"] > 0 and report["batched8_jobs_per_s"] > 0
    assert report["gflop_per_vqa_job"] > 0 and report["matmul_gflops"] > 0
    floor_s = report["gflop_per_vqa_job"] / report["matmul_gflops"]
    assert report["sequential_ratio_to_floor"] == pytest.approx(1 / report["sequential_jobs_per_s"] / floor_s)
    assert "gpu" not in report  # GPU memory is measured only on CUDA
