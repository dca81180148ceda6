"""Fast tests of service/features.py, the parser of precomputed region features a client sends instead of an
image (a feature-store record or an .npz): every check with its whole message, at and past each limit.
`bench/mutation.sh` runs these against mutants of service/features.py."""

from __future__ import annotations

import io

import numpy as np
import pytest

from detector.records import MAGIC, encode_record
from detector.regions import RegionFeatures
from service.errors import BadRequest
from service.features import MAX_FEATURE_DIM, MAX_REGIONS, MAX_SIDE, parse_features, to_npz, validate


def regions(count: int = 3, dim: int = 8, width: int = 64, height: int = 48, **arrays) -> RegionFeatures:
    fields = dict(boxes=np.tile(np.array([[1, 2, 30, 40]], np.float32), (count, 1)),
                  features=np.arange(count * dim, dtype=np.float32).reshape(count, dim) / 10,
                  scores=np.linspace(0.9, 0.5, count, dtype=np.float32), class_ids=np.arange(count, dtype=np.int64))
    fields.update(arrays)
    return RegionFeatures(num_boxes=count, image_width=width, image_height=height, **fields)


def npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def error(data: bytes, expected_dim: int | None = None) -> tuple[str, str]:
    with pytest.raises(BadRequest) as caught:
        parse_features(data, expected_dim)
    assert caught.value.status == 400
    return caught.value.code, caught.value.message


def same(a: RegionFeatures, b: RegionFeatures) -> bool:
    return all(np.array_equal(getattr(a, n), getattr(b, n)) and getattr(a, n).dtype == getattr(b, n).dtype
               for n in ("boxes", "features", "scores", "class_ids")) and \
        (a.num_boxes, a.image_width, a.image_height) == (b.num_boxes, b.image_width, b.image_height)


def test_both_formats_give_the_same_regions_in_float32_and_int64():
    original = regions()
    from_npz = parse_features(to_npz(original))
    from_record = parse_features(encode_record("photo", original))
    assert same(from_npz, original) and same(from_record, original)
    assert (from_npz.boxes.dtype, from_npz.features.dtype, from_npz.scores.dtype, from_npz.class_ids.dtype) == (
        np.float32, np.float32, np.float32, np.int64)


def test_an_npz_with_only_the_required_arrays_gets_zero_scores_and_classes():
    parsed = parse_features(npz(boxes=np.array([[0, 0, 5, 5], [1, 1, 2, 2]], np.float64),
                                features=np.ones((2, 8), np.float16), image_width=np.int32(10),
                                image_height=np.array([20]), extra=np.zeros(3)))
    assert parsed.boxes.dtype == np.float32 and parsed.features.dtype == np.float32
    assert parsed.scores.tolist() == [0.0, 0.0] and parsed.class_ids.tolist() == [0, 0]
    assert (parsed.num_boxes, parsed.image_width, parsed.image_height) == (2, 10, 20)


def test_not_a_feature_file():
    message = "not a feature file: send a record written by detector.store.encode_record or an .npz (see docs)"
    assert error(b"GIF89a...") == ("invalid_features", message)
    assert error(b"P") == ("invalid_features", message)


def test_corrupt_record_and_unreadable_npz():
    code, message = error(MAGIC + b"\x00\x01")
    assert code == "invalid_features" and message.startswith("corrupt feature record: ")
    code, message = error(b"PK\x03\x04 not really a zip")
    assert code == "invalid_features" and message.startswith("unreadable .npz (object arrays are refused): ")
    code, message = error(npz(boxes=np.array([object(), 1], dtype=object), features=np.ones((2, 8)),
                              image_width=10, image_height=10))
    assert code == "invalid_features" and message.startswith("unreadable .npz (object arrays are refused): ")


def test_missing_arrays_are_named():
    assert error(npz(features=np.ones((1, 8)), image_height=5)) == (
        "invalid_features", "the .npz lacks boxes, image_width")
    assert error(npz(boxes=np.ones((1, 4)), image_width=5)) == (
        "invalid_features", "the .npz lacks features, image_height")


def test_image_size_must_be_scalars():
    for width in (np.array([1, 2]), np.array("wide")):
        assert error(npz(boxes=np.array([[0, 0, 1, 1]]), features=np.ones((1, 8)), image_width=width,
                         image_height=5)) == ("invalid_features", "image_width and image_height must be scalars")


def test_scalar_boxes_count_as_none():
    assert error(npz(boxes=np.float32(3), features=np.ones((1, 8)), image_width=5, image_height=5)) == (
        "invalid_features", "boxes must have shape [N, 4], got []")


def invalid(message: str, **changes) -> None:
    with pytest.raises(BadRequest) as caught:
        validate(regions(**changes))
    assert (caught.value.code, caught.value.message) == ("invalid_features", message)


def test_shapes_and_dtypes():
    invalid("boxes must be numeric, got dtype <U1", boxes=np.array([["a"] * 4] * 3))
    invalid("features must be numeric, got dtype bool", features=np.ones((3, 8), bool))
    invalid("scores must be numeric, got dtype complex64", scores=np.ones(3, np.complex64))
    invalid("class_ids must be numeric, got dtype <U1", class_ids=np.array(["a"] * 3))
    invalid("boxes must have shape [N, 4], got [3, 5]", boxes=np.ones((3, 5), np.float32))
    invalid("boxes must have shape [N, 4], got [12]", boxes=np.ones(12, np.float32))
    invalid("features must have shape [N, D] with N = 3 boxes, got [24]", features=np.ones(24, np.float32))
    invalid("features must have shape [N, D] with N = 3 boxes, got [2, 8]", features=np.ones((2, 8), np.float32))
    invalid("scores and class_ids, when given, need one value per box", scores=np.ones(2, np.float32))
    invalid("scores and class_ids, when given, need one value per box", class_ids=np.ones(4, np.int64))


def test_region_count_and_width_at_their_limits():
    assert validate(regions(count=1)).num_boxes == 1
    assert validate(regions(count=MAX_REGIONS)).num_boxes == MAX_REGIONS == 100
    invalid("between 1 and 100 regions are accepted, got 101", count=MAX_REGIONS + 1)
    invalid("between 1 and 100 regions are accepted, got 0", count=0)
    assert validate(regions(count=1, dim=1)).features.shape == (1, 1)
    assert validate(regions(count=1, dim=MAX_FEATURE_DIM)).features.shape == (1, 4096)
    invalid("feature width 4097 is out of range", count=1, dim=MAX_FEATURE_DIM + 1)
    invalid("feature width 0 is out of range", count=1, dim=0)


def test_the_model_width_is_checked_only_when_known():
    assert validate(regions(dim=8), expected_dim=8).features.shape == (3, 8)
    with pytest.raises(BadRequest) as caught:
        validate(regions(dim=8), expected_dim=2048)
    assert (caught.value.code, caught.value.message) == (
        "feature_size", "region features have 8 dimensions, the model expects 2048")


def test_values_must_be_finite_and_boxes_ordered():
    nan_box = np.tile(np.array([[1, 2, 30, 40]], np.float32), (3, 1))
    nan_box[2, 1] = np.nan
    invalid("boxes and features must be finite", boxes=nan_box)
    infinite = np.zeros((3, 8), np.float32)
    infinite[0, 7] = np.inf
    invalid("boxes and features must be finite", features=infinite)
    flat = np.array([[5, 5, 5, 5]] * 3, np.float32)  # x2 == x1, y2 == y1: a point is allowed
    assert validate(regions(boxes=flat)).boxes.tolist() == flat.tolist()
    invalid("boxes must have x2 >= x1 and y2 >= y1", boxes=np.array([[5, 5, 4, 6]] * 3, np.float32))
    invalid("boxes must have x2 >= x1 and y2 >= y1", boxes=np.array([[5, 5, 6, 4]] * 3, np.float32))


def test_image_size_at_its_limits():
    assert validate(regions(width=1, height=1)).image_width == 1
    assert validate(regions(width=MAX_SIDE, height=MAX_SIDE)).image_height == MAX_SIDE == 100_000
    invalid("image size 0x48 is out of range", width=0)
    invalid("image size 64x0 is out of range", height=0)
    invalid("image size 100001x48 is out of range", width=MAX_SIDE + 1)
    invalid("image size 64x100001 is out of range", height=MAX_SIDE + 1)


def test_to_npz_round_trips_every_array():
    original = validate(regions(count=5, dim=16, width=640, height=480))
    assert same(parse_features(to_npz(original)), original)


def test_scores_and_classes_come_back_flat_in_their_own_dtypes():
    parsed = validate(regions(scores=np.full((3, 1), 0.5, np.float64), class_ids=np.array([[7, 8, 9]], np.int32)))
    assert parsed.scores.shape == (3,) and parsed.scores.dtype == np.float32
    assert parsed.class_ids.tolist() == [7, 8, 9] and parsed.class_ids.dtype == np.int64


def test_each_box_side_is_checked_against_its_own_corner():
    assert validate(regions(boxes=np.array([[0, 0, 30, 10]] * 3, np.float32))).boxes[0].tolist() == [0, 0, 30, 10]
    assert validate(regions(boxes=np.array([[0, 20, 10, 30]] * 3, np.float32))).boxes[0].tolist() == [0, 20, 10, 30]
    invalid("boxes must have x2 >= x1 and y2 >= y1", boxes=np.array([[5, 0, 4, 6]] * 3, np.float32))  # x2 < x1 only
    invalid("boxes must have x2 >= x1 and y2 >= y1", boxes=np.array([[0, 5, 1, 4]] * 3, np.float32))  # y2 < y1 only


def test_parse_features_passes_the_model_width_on():
    assert error(to_npz(regions(dim=8)), expected_dim=16) == (
        "feature_size", "region features have 8 dimensions, the model expects 16")
    assert error(encode_record("photo", regions(dim=8)), expected_dim=16)[0] == "feature_size"
