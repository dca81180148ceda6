"""modelkit: the facts the detector, the model, the trainer and the service share, each with one owner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modelkit.precision import PRECISIONS, precision_autocast, precision_dtype

ROOT = Path(__file__).resolve().parent.parent


def test_modelkit_imports_no_torch():
    # The web tier reads precision names and region counts from here; it must not pay for loading torch.
    code = "import sys, modelkit.precision, modelkit.regions, modelkit.checkpoint; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_service_settings_take_the_precision_names_from_modelkit():
    from service import settings

    assert settings.PRECISIONS is PRECISIONS


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_autocast_runs_in_its_dtype_even_inside_another_autocast(precision, dtype):
    a = torch.ones(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16), precision_autocast("cpu", precision):
        assert torch.mm(a, a).dtype == dtype


def test_unknown_precision_names_the_known_ones():
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        precision_dtype("int8")
