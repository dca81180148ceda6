"""bench/bench_pickles.py, whose figures docs/PERFORMANCE.md quotes, run small: both workloads are read by both
readers with the same result, and the report's ratio is the ratio of its own times."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_pickles_reports_both_readers_on_both_workloads(tmp_path):
    out = tmp_path / "pickles.json"
    done = subprocess.run([sys.executable, "bench/bench_pickles.py", "--questions", "300", "--records", "3",
                           "--repeats", "2", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert set(report["workloads"]) == {"target_cache", "region_records"}
    assert report["workloads"]["region_records"]["items"] == 3
    assert report["workloads"]["region_records"]["megabytes"] > 2.4  # three records of 100 x 2048 float32
    for figures in report["workloads"].values():
        assert figures["c_unpickler_ms_per_item"] > 0 and figures["checked_ms_per_item"] > 0
        assert figures["checked_over_c"] == pytest.approx(
            figures["checked_ms_per_item"] / figures["c_unpickler_ms_per_item"], rel=0.05, abs=0.02)
