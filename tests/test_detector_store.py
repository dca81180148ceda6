"""Feature store round trip and the extraction CLI (real process, resumable, bad images reported)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from detector.regions import RegionFeatures
from detector.store import FeatureStore, FeatureStoreError, decode_record, encode_record
from detector.tiny import write_tiny_detector

ROOT = Path(__file__).resolve().parent.parent


def sample(n: int = 7, d: int = 5) -> RegionFeatures:
    rng = np.random.default_rng(0)
    return RegionFeatures(boxes=rng.random((n, 4), dtype=np.float32), features=rng.random((n, d), dtype=np.float32),
                          scores=rng.random(n, dtype=np.float32), class_ids=rng.integers(1, 1600, n),
                          num_boxes=n, image_width=640, image_height=480)


def test_record_round_trip_without_pickle():
    regions = sample()
    raw = encode_record("COCO_123", regions)
    assert b"pickle" not in raw and raw[:8] == b"VLBFEAT1"
    key, back = decode_record(raw)
    assert key == "COCO_123" and (back.image_width, back.image_height, back.num_boxes) == (640, 480, 7)
    for name in ("boxes", "features", "scores", "class_ids"):
        np.testing.assert_array_equal(getattr(back, name), getattr(regions, name))
    with pytest.raises(FeatureStoreError):
        decode_record(b"\x80\x04garbage")


def test_every_malformed_record_is_a_feature_store_error():
    """Records also come from clients and from a shared Redis: a bad one must be refused with one error type."""
    raw = encode_record("x", sample())
    (length,) = np.frombuffer(raw[8:12], "<u4")
    cases = [raw[:10], raw[:40], raw[:12 + int(length)] + b"\0" * 8,
             raw.replace(b'"nbytes": 140', b'"nbytes": 940'), raw.replace(b'"offset": 0,', b'"offset":-4,'),
             raw.replace(b'"shape": [7, 4]', b'"shape": [9, 4]'), raw.replace(b'"arrays"', b'"arrayz"')]
    for bad in cases:
        assert bad != raw
        with pytest.raises(FeatureStoreError):
            decode_record(bad)


def test_record_codec_needs_neither_torch_nor_lmdb():
    code = "import sys, detector.records\nprint(sorted({'torch', 'lmdb'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_store_put_get(tmp_path):
    with FeatureStore(tmp_path / "s", readonly=False) as store:
        store.put("a", sample())
        assert "a" in store and "b" not in store and len(store) == 1
    with FeatureStore(tmp_path / "s") as store:
        np.testing.assert_array_equal(store.get("a").features, sample().features)
        assert list(store.keys()) == ["a"]
        with pytest.raises(KeyError):
            store.get("b")


def test_extraction_cli_is_resumable_and_reports_bad_images(tmp_path):
    config, checkpoint = write_tiny_detector(tmp_path / "det")
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(data.astronaut()).save(images / "astronaut.jpg")
    Image.fromarray(data.coffee()).save(images / "coffee.png")
    command = [sys.executable, "-m", "detector.extract", str(images), "--config", str(config),
               "--checkpoint", str(checkpoint), "--out", str(tmp_path / "store")]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    with FeatureStore(tmp_path / "store") as store:
        assert sorted(store.keys()) == ["astronaut", "coffee"]
        assert store.get("coffee").features.shape == (100, 64)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 1
    assert "resuming: 2 of 3" in second.stderr and "skipped" in second.stderr and "broken.jpg" in second.stderr
