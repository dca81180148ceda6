"""Feature store round trip and the extraction CLI (real process, resumable, bad images reported)."""

from __future__ import annotations

import struct
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
from record_headers import with_header

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


def test_decoded_arrays_are_native_owned_and_in_the_records_types():
    regions = sample()
    wide = RegionFeatures(boxes=regions.boxes.astype(np.float64), features=regions.features.astype(np.float64),
                          scores=regions.scores.astype(np.float64), class_ids=regions.class_ids.astype(np.int32),
                          num_boxes=7, image_width=640, image_height=480)
    raw = encode_record("x", wide)
    assert raw == encode_record("x", regions)  # stored as float32 / int64 whatever the caller's types
    _, back = decode_record(raw)
    for name, dtype in (("boxes", np.float32), ("features", np.float32), ("scores", np.float32),
                        ("class_ids", np.int64)):
        array = getattr(back, name)
        assert array.dtype == dtype and array.dtype.isnative
        assert array.flags.owndata and array.flags.writeable  # not a read-only view pinning the record's bytes


def test_a_header_of_exactly_the_limit_is_read():
    from detector.records import MAX_HEADER_BYTES

    short = encode_record("", sample())
    (length,) = struct.unpack("<I", short[8:12])
    image_id = "i" * (MAX_HEADER_BYTES - length)
    raw = encode_record(image_id, sample())
    assert struct.unpack("<I", raw[8:12]) == (MAX_HEADER_BYTES,)
    assert decode_record(raw)[0] == image_id
    with pytest.raises(FeatureStoreError, match=rf"^the header claims {MAX_HEADER_BYTES + 1} bytes, the limit is "
                                                rf"{MAX_HEADER_BYTES}$"):
        decode_record(encode_record(image_id + "i", sample()))


def set_in(path, value):
    def change(header):
        *parents, last = path
        for key in parents:
            header = header[key]
        header[last] = value
    return change


def test_every_malformed_record_is_a_feature_store_error_that_says_what():
    """Records also come from clients and from a shared Redis: a bad one must be refused with one error type, and
    a message that says what is wrong."""
    raw = encode_record("x", sample())  # boxes 112 bytes at 0, features 140 at 112, scores 28, class_ids 56
    (length,) = struct.unpack("<I", raw[8:12])
    long = "9" * 60
    cases = [
        (b"VLBFEAT2" + raw[8:], "not a feature record of this format (bad magic)"),
        (raw[:10], "unpack requires a buffer of 4 bytes"),
        (raw[:12 + length] + b"\0" * 8, "array boxes lies outside the record"),
        (raw[:-8], "array class_ids lies outside the record"),
        (with_header(raw, set_in(("arrays", "features", "nbytes"), 940)), "array features lies outside the record"),
        (with_header(raw, set_in(("arrays", "features", "nbytes"), 40)),
         "array features: shape [7, 5] does not match its 40 bytes"),
        (with_header(raw, set_in(("arrays", "boxes", "offset"), -4)),
         "expected a non-negative integer in the header, got -4"),
        (with_header(raw, set_in(("arrays", "boxes", "offset"), long)),
         "expected a non-negative integer in the header, got " + "9" * 40),
        (with_header(raw, set_in(("arrays", "boxes", "offset"), 0.0)),
         "expected a non-negative integer in the header, got 0.0"),
        (with_header(raw, set_in(("arrays", "boxes", "offset"), True)),
         "expected a non-negative integer in the header, got True"),
        (with_header(raw, set_in(("arrays", "boxes", "shape"), [9, 4])),
         "array boxes: shape [9, 4] does not match its 112 bytes"),
        (with_header(raw, set_in(("arrays", "boxes", "shape"), [7, 4, 1])), "array boxes has 3 dimensions, at most 2"),
        (with_header(raw, set_in(("arrays", "boxes", "dtype"), "<f8")), "array boxes has dtype <f8, expected <f4"),
        (with_header(raw, set_in(("arrays", "boxes", "dtype"), long)),
         "array boxes has dtype " + "9" * 40 + ", expected <f4"),
        (with_header(raw, lambda header: header.pop("arrays")), "'arrays'"),
        (with_header(raw, set_in(("image_id",), 7)), "image_id must be a string"),
    ]
    for bad, message in cases:
        assert bad != raw
        with pytest.raises(FeatureStoreError) as refused:
            decode_record(bad)
        assert str(refused.value) == message


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
