"""modelkit: the facts the detector, the model, the trainer and the service share, each with one owner."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from modelkit.checkpoint import describe_key_problems, read_tensor_dict
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


# ------------------------------------------------------------------------------------------------- checkpoints


class CheckpointError(ValueError):
    pass


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def read(path, containers=("model_state_dict", "model")):
    return read_tensor_dict(path, "test checkpoint", containers, CheckpointError)


def test_a_state_dict_is_read_unwrapped_and_without_the_data_parallel_prefix(tmp_path):
    weights = {"module.encoder.weight": torch.ones(2), "head.bias": torch.zeros(1), "module.x.module.y": torch.ones(1)}
    path = tmp_path / "plain.bin"
    torch.save(weights, path)
    loaded = read(path)
    assert list(loaded) == ["encoder.weight", "head.bias", "x.module.y"] and isinstance(loaded, OrderedDict)
    assert torch.equal(loaded["encoder.weight"], torch.ones(2))
    # the first container that holds a mapping is unwrapped ("model" here: "model_state_dict" is not a mapping)
    torch.save({"model_state_dict": 3, "model": weights, "optimizer": {"lr": torch.tensor(1.0)}}, path)
    assert list(read(path)) == ["encoder.weight", "head.bias", "x.module.y"]
    torch.save({"model_state_dict": weights, "model": {"other": torch.ones(1)}}, path)
    assert list(read(path)) == ["encoder.weight", "head.bias", "x.module.y"]


def test_anything_but_a_mapping_of_tensors_is_refused_by_name(tmp_path):
    path = tmp_path / "checkpoint.bin"
    for content in ([torch.ones(1)], {"step": 5, "weight": torch.ones(1)}, {"model": [torch.ones(1)]}):
        torch.save(content, path)
        with pytest.raises(CheckpointError) as refused:
            read(path)
        assert str(refused.value) == f"{path}: expected a state dict (a mapping of parameter names to tensors)"
    with pytest.raises(FileNotFoundError, match=rf"^test checkpoint not found: {tmp_path / 'missing.bin'}$"):
        read(tmp_path / "missing.bin")
    with pytest.raises(FileNotFoundError, match="test checkpoint not found"):
        read(tmp_path)


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    # weights_only is passed explicitly, so torch's switch to the old default cannot turn it off
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker, path = tmp_path / "pwned", tmp_path / "evil.bin"
    torch.save({"weight": torch.ones(1), "payload": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError) as refused:
        read(path)
    assert str(refused.value).startswith(f"{path}: cannot be read as a PyTorch checkpoint with weights_only=True (")
    assert not marker.exists()
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read as a PyTorch checkpoint"):
        read(path)


def test_a_checkpoint_saved_on_a_gpu_is_read_on_the_cpu(tmp_path):
    """The released checkpoints were saved from CUDA tensors: their storages name a CUDA device."""
    saved = io.BytesIO()
    torch.save({"weight": torch.arange(3.0)}, saved)
    path = tmp_path / "from_gpu.bin"
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for member in source.infolist():
            content = source.read(member.filename)
            if member.filename.endswith("data.pkl"):  # the storage's location, a pickled "cpu", becomes "cuda"
                assert content.count(b"X\x03\x00\x00\x00cpu") == 1
                content = content.replace(b"X\x03\x00\x00\x00cpu", b"X\x04\x00\x00\x00cuda")
            target.writestr(member, content)
    loaded = read(path)
    assert loaded["weight"].device.type == "cpu" and loaded["weight"].tolist() == [0.0, 1.0, 2.0]


def test_key_problems_are_listed_by_group_up_to_a_limit():
    assert describe_key_problems([("missing", []), ("unexpected", [])]) == ""
    assert describe_key_problems([("missing", ["a", "b"]), ("unexpected", []), ("mismatched", ["c"])]) == (
        "  2 missing key(s):\n    a\n    b\n  1 mismatched key(s):\n    c")
    keys = [f"k{i}" for i in range(23)]
    assert describe_key_problems([("missing", keys)]) == (
        "  23 missing key(s):\n    " + "\n    ".join(keys[:20]) + "\n    … and 3 more")
    assert describe_key_problems([("missing", keys[:3])], shown=3) == "  3 missing key(s):\n    k0\n    k1\n    k2"
    assert describe_key_problems([("missing", keys[:4])], shown=3) == (
        "  4 missing key(s):\n    k0\n    k1\n    k2\n    … and 1 more")
