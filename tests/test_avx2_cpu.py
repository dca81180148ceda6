"""The models on an AVX2-only CPU, whatever CPU runs the suite: tests/cpu_probe.py natively and on QEMU's model of
an AMD EPYC Milan (Zen 3: AVX2, no AVX-512, no bf16), through .ci/on_zen3.sh, which changes what the CPU reports
(CPUID) for the interpreter and everything it runs.

On the Zen 3, PyTorch must choose its AVX2 kernels and see no AVX-512, AVX512-BF16 or AMX; our bf16 probe must
answer no and a bf16 predictor must log the slow-precision warning; and the detector's region features and
ViLBERT's answers must equal the native ones (to float rounding between kernel families). An AVX-512 instruction
reached anywhere on the way would kill the probe with SIGILL (QEMU emulates none).

On a host that is itself AVX2-only the emulated half skips (it would compare AVX2 with AVX2) and the native probe
checks the same facts. Needs root and qemu-user 7.2+ (.ci/run installs it). Without them the test skips with the reason, except in CI
as root without qemu-user, where it fails. ~30-60 s (the emulated interpreter is 10-30x slower)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
ON_ZEN3 = ROOT / ".ci" / "on_zen3.sh"
PROBE = ROOT / "tests" / "cpu_probe.py"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def emulation() -> dict[str, str]:
    """The environment for .ci/on_zen3.sh with this interpreter; skips (fails in CI as root) when it cannot run."""
    env = dict(os.environ, ZEN3_PYTHON=sys.executable)
    check = subprocess.run(["bash", str(ON_ZEN3), "--check"], cwd=ROOT, env=env, capture_output=True, text=True)
    if check.returncode != 0:
        reason = f"cannot emulate an AVX2-only CPU here: {check.stderr.strip()}"
        if os.environ.get("CI") and os.geteuid() == 0 and "needs qemu-x86_64" in check.stderr:
            pytest.fail(f"{reason} (CI is set and this is root: .ci/run installs qemu-user)")
        pytest.skip(reason)
    return env


def probe(command: list[str], env: dict[str, str] | None = None) -> dict:
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, f"{command[-3:]} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout)


def assert_same_answers(emulated, native, path: str = "answers") -> None:
    """Equal structure, labels and ids; numbers equal to float rounding."""
    if isinstance(native, dict):
        assert sorted(emulated) == sorted(native), path
        for key in native:
            assert_same_answers(emulated[key], native[key], f"{path}.{key}")
    elif isinstance(native, list):
        assert len(emulated) == len(native), path
        for index, (a, b) in enumerate(zip(emulated, native)):
            assert_same_answers(a, b, f"{path}[{index}]")
    elif isinstance(native, float):
        assert emulated == pytest.approx(native, rel=1e-4, abs=1e-5), path
    else:
        assert emulated == native, path


@pytest.fixture(scope="module")
def native(tiny_bundle) -> dict:
    """The probe on this machine's own CPU."""
    return probe([sys.executable, str(PROBE), str(tiny_bundle)])


def avx2_only(report: dict) -> bool:
    return report["avx2"] and not (report["avx512"] or report["avx512_bf16"] or report["amx"])


def assert_avx2_only_decisions(report: dict) -> None:
    """What an AVX2-only CPU reports, and what the code makes of it."""
    assert report["capability"] == "AVX2" and avx2_only(report)
    assert report["native_bf16_linear"] is False and report["bf16_warning"] is True


def test_the_bf16_warning_follows_what_this_cpu_has(native):
    assert native["bf16_warning"] is not native["native_bf16_linear"]
    assert native["pipeline_tasks"] == ["refcoco", "retrieval_coco", "snli_ve", "vqa"]
    if avx2_only(native):  # a real AVX2-only CPU: the facts the emulated test checks, seen natively
        assert_avx2_only_decisions(native)


def this_cpu_is_avx2_only() -> bool:
    """What the probe reports as avx2_only, read in this process (without running the probe)."""
    import torch

    cpu = torch.cpu
    return avx2_only({"avx2": cpu._is_avx2_supported(), "avx512": cpu._is_avx512_supported(),
                      "avx512_bf16": cpu._is_avx512_bf16_supported(), "amx": cpu._is_amx_tile_supported()})


@pytest.mark.cpu_heavy  # QEMU, a minute on an AVX-512 host
def test_an_avx2_only_cpu_gets_avx2_kernels_the_bf16_warning_and_the_same_answers(request):
    if this_cpu_is_avx2_only():
        pytest.skip("this CPU is itself AVX2-only (no AVX-512, no bf16, no AMX): the whole suite runs on one, and "
                    "test_the_bf16_warning_follows_what_this_cpu_has checks these facts natively")
    native = request.getfixturevalue("native")
    assert not avx2_only(native)
    emulation = request.getfixturevalue("emulation")
    tiny_bundle = request.getfixturevalue("tiny_bundle")
    zen3 = probe(["bash", str(ON_ZEN3), sys.executable, str(PROBE), str(tiny_bundle)], env=emulation)

    assert_avx2_only_decisions(zen3)
    np.testing.assert_allclose(zen3["features"], native["features"], rtol=1e-4, atol=1e-3)
    assert_same_answers(zen3["answers"], native["answers"])
    assert zen3["pipeline_tasks"] == native["pipeline_tasks"]
