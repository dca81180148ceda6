"""Property-based tests (Hypothesis) of every parser of client input: whatever a client sends, the parser either
returns a value of its documented shape or raises its own error with a code; it never raises anything else (which
the API would turn into a 500), and it never accepts something its checks should refuse.

The examples are derandomized (the same on every run, so CI is reproducible) and bounded in number, so the file
runs in seconds; `HYPOTHESIS_PROFILE=deep` runs ten times as many, with fresh randomness."""

from __future__ import annotations

import io
import json
import math
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from detector.images import ImageDecodeError
from detector.records import MAGIC, FeatureStoreError, decode_record, encode_record
from detector.regions import RegionFeatures
from modelkit.boundedjson import JsonBudgetError, loads_bounded
from service.errors import BadRequest
from service.features import MAX_FEATURE_MAGNITUDE, MAX_REGIONS, parse_features, to_npz
from service.web.inputs import MAX_BOXES, check_image, parse_boxes, parse_tasks, parse_text, parse_top_k
from vilbert.tasks import TaskRegistry

settings.register_profile("ci", max_examples=200, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REGISTRY = TaskRegistry.from_file()
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=6), inner, max_size=6),
    max_leaves=40,
)
# Text that looks like JSON more often than random text does: brackets, digits, exponents, constants.
json_ish = st.text(alphabet="[]{},:\" 0123456789.eE+-NaInfity", max_size=200) | st.text(max_size=200)


def depth(value) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


def finite_and_small(value) -> bool:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return True
    if isinstance(value, int):
        return len(str(abs(value))) <= 18
    if isinstance(value, float):
        return math.isfinite(value)
    children = value.values() if isinstance(value, dict) else value
    return all(finite_and_small(v) for v in children)


@given(json_ish)
def test_loads_bounded_returns_a_budgeted_value_or_its_own_error(text):
    try:
        value = loads_bounded(text, max_chars=150, max_depth=3)
    except JsonBudgetError:
        return
    assert len(text) <= 150 and depth(value) <= 3 and finite_and_small(value)


@given(json_values)
def test_loads_bounded_agrees_with_json_on_everything_within_budget(value):
    text = json.dumps(value)
    if depth(value) <= 4 and finite_and_small(value) and len(text) <= 10_000:
        assert loads_bounded(text, 10_000, 4) == json.loads(text)
    else:
        with pytest.raises(JsonBudgetError):
            loads_bounded(text, 10_000, 4)


boxes_like = st.lists(st.lists(st.integers(-10**25, 10**25) | st.floats() | st.booleans() | st.none(),
                               max_size=5) | st.integers(), max_size=8)


@given(st.one_of(json_ish, boxes_like.map(json.dumps), json_values.map(json.dumps)))
def test_parse_boxes_gives_finite_quadruples_or_a_coded_400(text):
    try:
        boxes = parse_boxes(text)
    except BadRequest as exc:
        assert exc.status == 400 and exc.code in ("invalid_boxes", "too_many_boxes")
        return
    if boxes is None:
        assert not text.strip()
        return
    assert 1 <= len(boxes) <= MAX_BOXES
    assert all(len(box) == 4 and all(isinstance(v, float) and math.isfinite(v) for v in box) for box in boxes)


@given(st.text(max_size=40))
def test_parse_top_k_gives_an_int_in_range_or_a_coded_400(text):
    try:
        value = parse_top_k(text, 20)
    except BadRequest as exc:
        assert exc.code == "invalid_top_k"
        return
    assert isinstance(value, int) and 1 <= value <= 20


@given(st.one_of(st.text(max_size=60), st.lists(st.sampled_from([t.name for t in REGISTRY] + ["nope", " ", ""]),
                                                 max_size=30).map(",".join)),
       st.integers(1, 8))
def test_parse_tasks_gives_known_distinct_names_or_a_coded_400(text, images):
    try:
        names = parse_tasks(text, REGISTRY, images)
    except BadRequest as exc:
        assert exc.code in ("unknown_task", "no_tasks")
        return
    assert names and len(names) == len(set(names)) and all(REGISTRY.get(n).name == n for n in names)


@given(st.text(max_size=50) | st.none())
def test_parse_text_gives_stripped_bounded_text_or_a_coded_400(text):
    try:
        value = parse_text(text, 30)
    except BadRequest as exc:
        assert exc.code in ("missing_text", "empty_text", "text_too_long")
        return
    assert value == value.strip() and 1 <= len(value) <= 30


def sample_regions(count: int = 2) -> RegionFeatures:
    return RegionFeatures(boxes=np.array([[0, 0, 4, 4]] * count, np.float32), features=np.ones((count, 8), np.float32),
                          scores=np.ones(count, np.float32), class_ids=np.zeros(count, np.int64), num_boxes=count,
                          image_width=10, image_height=10)


def check_parsed(regions: RegionFeatures) -> None:
    """What parse_features promises about anything it accepts."""
    assert 1 <= len(regions.boxes) <= MAX_REGIONS and regions.features.shape[0] == len(regions.boxes)
    assert regions.boxes.dtype == np.float32 and regions.features.dtype == np.float32
    assert np.isfinite(regions.features).all() and np.abs(regions.features).max() <= MAX_FEATURE_MAGNITUDE
    assert 1 <= regions.image_width <= 100_000 and 1 <= regions.image_height <= 100_000


def corrupted(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    buffer = bytearray(data)
    for position, value in edits:
        buffer[position % len(buffer)] = value
    return bytes(buffer[:cut] if cut else buffer)


edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6)


@given(edits, st.none() | st.integers(1, 2000))
def test_parse_features_on_corrupted_npz_files_accepts_only_valid_regions(changes, cut):
    data = corrupted(to_npz(sample_regions()), changes, cut)
    try:
        check_parsed(parse_features(data))
    except BadRequest as exc:
        assert exc.code == "invalid_features"


@given(edits, st.none() | st.integers(1, 400))
def test_parse_features_on_corrupted_records_accepts_only_valid_regions(changes, cut):
    data = corrupted(encode_record("photo", sample_regions()), changes, cut)
    try:
        check_parsed(parse_features(data))
    except BadRequest as exc:
        assert exc.code == "invalid_features"


@given(json_values, st.binary(max_size=64))
def test_decode_record_with_any_json_header_raises_only_its_own_error(header, body):
    text = json.dumps(header).encode()
    try:
        decode_record(MAGIC + struct.pack("<I", len(text)) + text + body)
    except FeatureStoreError:
        pass


@given(st.sampled_from(["boxes", "features", "image_width", "image_height", "scores", "class_ids"]),
       st.sampled_from(["<f2", "<f4", "<f8", "<i1", "<u8", "<i8", ">f4", "|b1", "<c8", "<U3", "|O"]),
       st.lists(st.integers(0, 5), max_size=3))
def test_parse_features_on_npz_members_of_any_dtype_and_shape(name, dtype, shape):
    arrays = {"boxes": np.array([[0, 0, 1, 1]], np.float32), "features": np.ones((1, 8), np.float32),
              "image_width": np.int64(5), "image_height": np.int64(5)}
    arrays[name] = np.zeros(shape, dtype=np.dtype(dtype)) if dtype != "|O" else np.empty(shape, object)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    try:
        check_parsed(parse_features(buffer.getvalue()))
    except BadRequest as exc:
        assert exc.code == "invalid_features"


@given(st.binary(max_size=300))
def test_check_image_on_arbitrary_bytes_raises_only_image_errors(data):
    try:
        info = check_image(data, 1_000_000)
    except BadRequest as exc:
        assert exc.status in (400, 413) and exc.code
        return
    except ImageDecodeError:  # pragma: no cover - the function must convert these
        raise AssertionError("an ImageDecodeError escaped check_image")
    assert info.width >= 1 and info.height >= 1 and info.bytes == len(data)
