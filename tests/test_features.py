"""Fast tests of service/features.py, the parser of precomputed region features a client sends instead of an
image (a feature-store record or an .npz): every check with its whole message, at and past each limit.
`bench/mutation.sh` runs these against mutants of service/features.py."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest

from detector.records import MAGIC, MAX_HEADER_BYTES, encode_record
from detector.regions import RegionFeatures
from record_headers import with_header
from service.errors import BadRequest
from service.features import (MAX_FEATURE_DIM, MAX_FEATURE_MAGNITUDE, MAX_MEMBER_BYTES, MAX_NPZ_ENTRIES, MAX_REGIONS,
                              MAX_SIDE, parse_features, to_npz, validate)


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
    assert error(b"PK\x03\x04 not really a zip") == ("invalid_features",
                                                     "unreadable .npz: BadZipFile: File is not a zip file")
    assert error(npz(boxes=np.array([object(), 1], dtype=object), features=np.ones((2, 8)), image_width=10,
                     image_height=10)) == ("invalid_features", "boxes must be a plain numeric array, got dtype |O")


def test_missing_arrays_are_named():
    assert error(npz(features=np.ones((1, 8)), image_height=5)) == (
        "invalid_features", "the .npz lacks boxes, image_width")
    assert error(npz(boxes=np.ones((1, 4)), image_width=5)) == (
        "invalid_features", "the .npz lacks features, image_height")


def test_image_size_must_be_scalars():
    def side_error(width) -> tuple[str, str]:
        return error(npz(boxes=np.array([[0, 0, 1, 1]]), features=np.ones((1, 8)), image_width=width, image_height=5))

    assert side_error(np.array([1, 2])) == ("invalid_features", "image_width must be a scalar")
    assert side_error(np.array("wide")) == ("invalid_features", "image_width must be a plain numeric array, got "
                                                                "dtype <U4")
    assert parse_features(npz(boxes=np.array([[0, 0, 1, 1]]), features=np.ones((1, 8)), image_width=np.array([[7]]),
                              image_height=5.0)).image_width == 7


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
    assert validate(regions(width=1, height=1, boxes=np.array([[0, 0, 1, 1]] * 3, np.float32))).image_width == 1
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


# ------------------------------------------------------------------------------------ hostile inputs, bounded

def npz_members(members: dict[str, bytes], compress: int = zipfile.ZIP_STORED) -> bytes:
    """An .npz made member by member, so a member can say anything about itself."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compress) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def npy(header: dict, body: bytes = b"", version: tuple[int, int] = (1, 0)) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, header) if version == (1, 0) else \
        np.lib.format.write_array_header_2_0(stream, header)
    return stream.getvalue() + body


def valid_members(**replace: bytes) -> dict[str, bytes]:
    def member(array) -> bytes:
        stream = io.BytesIO()
        np.save(stream, np.asarray(array))
        return stream.getvalue()

    members = {"boxes.npy": member(np.array([[0, 0, 4, 4]], np.float32)),
               "features.npy": member(np.ones((1, 8), np.float32)),
               "image_width.npy": member(10), "image_height.npy": member(10)}
    members.update(replace)
    return members


def peak_bytes(call) -> int:
    tracemalloc.start()
    try:
        call()
    except BadRequest:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_an_npy_header_claiming_a_trillion_elements_is_refused_before_any_allocation():
    claim = npy({"descr": "<f4", "fortran_order": False, "shape": (1_000_000, 1_000_000)})
    data = npz_members(valid_members(**{"features.npy": claim}))
    assert error(data) == ("invalid_features", "features declares shape [1000000, 1000000] (4000000000000 bytes), "
                                               f"the limit is {MAX_MEMBER_BYTES} bytes")
    assert peak_bytes(lambda: parse_features(data)) < 1_000_000


def test_a_compressed_bomb_is_refused_from_the_zip_directory_without_inflating_it():
    buffer = io.BytesIO()
    np.savez_compressed(buffer, boxes=np.zeros((1, 4)), features=np.zeros((20_000, 1000)), image_width=5,
                        image_height=5)  # 160 MB of zeros in about 150 KB
    data = buffer.getvalue()
    assert len(data) < 1_000_000
    code, message = error(data)
    assert (code, message) == ("invalid_features", f"features inflates to 160000128 bytes, the limit is "
                                                   f"{MAX_MEMBER_BYTES}")
    assert peak_bytes(lambda: parse_features(data)) < 2_000_000


def test_the_largest_accepted_member_is_read():
    features = np.ones((MAX_REGIONS, MAX_FEATURE_DIM), np.float64)
    parsed = parse_features(npz(boxes=np.tile([[0, 0, 1, 1]], (MAX_REGIONS, 1)), features=features, image_width=5,
                                image_height=5))
    assert parsed.features.shape == (MAX_REGIONS, MAX_FEATURE_DIM) and MAX_MEMBER_BYTES == 100 * 4096 * 8 + 4096


def test_too_many_entries_unknown_dtypes_versions_and_truncation():
    many = valid_members(**{f"extra{i}.npy": b"" for i in range(MAX_NPZ_ENTRIES - 3)})
    assert error(npz_members(many)) == ("invalid_features", f"the .npz has {MAX_NPZ_ENTRIES + 1} entries, the limit "
                                                            f"is {MAX_NPZ_ENTRIES}")
    del many["extra0.npy"]
    assert parse_features(npz_members(many)).num_boxes == 1  # at the limit; the extra members are never read

    def member_error(name: str, data: bytes) -> tuple[str, str]:
        return error(npz_members(valid_members(**{name: data})))

    structured = npy({"descr": [("a", "<f4")], "fortran_order": False, "shape": (1, 4)}, b"\0" * 16)
    assert member_error("boxes.npy", structured) == ("invalid_features",
                                                     "boxes must be a plain numeric array, got dtype |V4")
    complex_ = npy({"descr": "<c16", "fortran_order": False, "shape": (1, 4)}, b"\0" * 64)
    assert member_error("boxes.npy", complex_) == ("invalid_features",
                                                   "boxes must be a plain numeric array, got dtype <c16")
    wide = npy({"descr": "<f16", "fortran_order": False, "shape": (1, 4)}, b"\0" * 64)
    assert member_error("boxes.npy", wide) == ("invalid_features", "boxes must be a plain numeric array, got dtype <f16")
    cube = npy({"descr": "<f4", "fortran_order": False, "shape": (1, 1, 4)}, b"\0" * 16)
    assert member_error("boxes.npy", cube) == ("invalid_features",
                                               "boxes must have at most 2 dimensions, got shape [1, 1, 4]")
    version2 = npy({"descr": "<f4", "fortran_order": False, "shape": (1, 4)}, np.array([0, 0, 4, 4], "<f4").tobytes(),
                   version=(2, 0))
    assert parse_features(npz_members(valid_members(**{"boxes.npy": version2}))).boxes.tolist() == [[0, 0, 4, 4]]
    version3 = b"\x93NUMPY\x03\x00" + version2[8:]
    assert member_error("boxes.npy", version3) == ("invalid_features",
                                                   "boxes: .npy format version (3, 0) is not accepted")
    short = npy({"descr": "<f4", "fortran_order": False, "shape": (1, 4)}, b"\0" * 15)
    assert member_error("boxes.npy", short) == ("invalid_features", "boxes is truncated: 15 of 16 bytes")


def test_only_npy_members_with_known_names_are_read():
    members = valid_members()
    members["features.bin"] = members.pop("features.npy")  # the right bytes under a name np.savez never writes
    assert error(npz_members(members)) == ("invalid_features", "the .npz lacks features")


def test_member_size_limits_are_exact():
    header = npy({"descr": "<f4", "fortran_order": False, "shape": (1, 8)})
    exact = header + np.ones(8, "<f4").tobytes()
    padded = exact + b"\0" * (MAX_MEMBER_BYTES - len(exact))  # trailing bytes past the declared array: not read
    assert len(padded) == MAX_MEMBER_BYTES
    assert parse_features(npz_members(valid_members(**{"features.npy": padded}))).features.tolist() == [[1.0] * 8]
    assert error(npz_members(valid_members(**{"features.npy": padded + b"\0"}))) == (
        "invalid_features", f"features inflates to {MAX_MEMBER_BYTES + 1} bytes, the limit is {MAX_MEMBER_BYTES}")
    declares_the_limit = npy({"descr": "<f8", "fortran_order": False, "shape": (MAX_MEMBER_BYTES // 8,)}, b"\0" * 8)
    assert error(npz_members(valid_members(**{"features.npy": declares_the_limit}))) == (
        "invalid_features", f"features is truncated: 8 of {MAX_MEMBER_BYTES} bytes")
    over = npy({"descr": "<f8", "fortran_order": False, "shape": (MAX_MEMBER_BYTES // 8 + 1,)}, b"\0" * 8)
    assert error(npz_members(valid_members(**{"features.npy": over}))) == (
        "invalid_features", f"features declares shape [{MAX_MEMBER_BYTES // 8 + 1}] ({MAX_MEMBER_BYTES + 8} bytes), the "
                            f"limit is {MAX_MEMBER_BYTES} bytes")


def test_image_sides_at_their_limits_in_an_npz():
    def sides(width, height) -> tuple[int, int]:
        parsed = parse_features(npz(boxes=np.array([[0, 0, 1, 1]]), features=np.ones((1, 8)), image_width=width,
                                    image_height=height))
        return parsed.image_width, parsed.image_height

    assert sides(1, MAX_SIDE) == (1, MAX_SIDE) and sides(MAX_SIDE, 1) == (MAX_SIDE, 1)
    assert error(npz(boxes=np.array([[0, 0, 1, 1]]), features=np.ones((1, 8)), image_width=5,
                     image_height=np.inf)) == ("invalid_features", "image_height must be a whole number of pixels")
    assert error(npz(boxes=np.array([[0, 0, 1, 1]]), features=np.ones((1, 8)), image_width=5,
                     image_height=MAX_SIDE + 1)) == ("invalid_features", "image_height 100001 is out of range 1..100000")


def test_fortran_order_arrays_keep_their_layout():
    features = np.asfortranarray(np.arange(16, dtype=np.float32).reshape(2, 8))
    parsed = parse_features(npz(boxes=np.array([[0, 0, 1, 1], [1, 1, 2, 2]]), features=features, image_width=5,
                                image_height=5))
    assert parsed.features.tolist() == features.tolist()


@pytest.mark.parametrize("width, message", [
    (np.inf, "image_width must be a whole number of pixels"),
    (np.nan, "image_width must be a whole number of pixels"),
    (2.5, "image_width must be a whole number of pixels"),
    (1e300, "image_width 1e+300 is out of range 1..100000"),
    (10**18, "image_width 1000000000000000000 is out of range 1..100000"),
    (0, "image_width 0 is out of range 1..100000"),
])
def test_image_sides_that_int_would_choke_on_are_refused(width, message):
    assert error(npz(boxes=np.array([[0, 0, 1, 1]]), features=np.ones((1, 8)), image_width=width,
                     image_height=5)) == ("invalid_features", message)


def test_boxes_must_lie_inside_the_image_and_features_be_plausible():
    # 64x48: the padding slack is 1 + 64 / 4 = 17 pixels past the right and bottom edges, 1 before the left and top
    assert validate(regions(boxes=np.array([[-1, -1, 81, 65]] * 3, np.float32))).num_boxes == 3
    tall = np.array([[0, 50, 5, 60]] * 3, np.float32)  # y beyond the width, inside the height: x and y not mixed up
    assert validate(regions(width=10, height=100, boxes=tall)).num_boxes == 3
    assert validate(regions(width=100, height=10, boxes=tall[:, [1, 0, 3, 2]])).num_boxes == 3
    message = "boxes must lie inside the 64x48 image (give or take 17 pixels of padding)"
    invalid(message, boxes=np.array([[-1.5, 0, 5, 5]] * 3, np.float32))
    invalid(message, boxes=np.array([[0, -1.5, 5, 5]] * 3, np.float32))
    invalid(message, boxes=np.array([[0, 0, 81.5, 5]] * 3, np.float32))
    invalid(message, boxes=np.array([[0, 0, 5, 65.5]] * 3, np.float32))
    invalid(message, boxes=np.array([[0, 0, 1e30, 1e30]] * 3, np.float32))
    assert validate(regions(features=np.full((3, 8), -MAX_FEATURE_MAGNITUDE, np.float32))).num_boxes == 3
    invalid("feature values must lie within +-100000", features=np.full((3, 8), 1.5e5, np.float32))
    invalid("feature values must lie within +-100000", features=np.full((3, 8), -3e38, np.float32))


def record_with_header(header: bytes) -> bytes:
    return MAGIC + struct.pack("<I", len(header)) + header


@pytest.mark.parametrize("header, message", [
    (b'{"num_boxes": 1e309}', "the number 1e309 is out of range"),
    (b"[" * 5000 + b"]" * 5000, "the JSON is nested deeper than 4 levels"),
    (b'{"num_boxes": NaN}', "NaN is not a JSON number"),
    (b'{"num_boxes": ' + b"9" * 400 + b"}", "an integer has more than 18 digits"),
    (b"\xff\xfe", "the JSON is not UTF-8 text"),
])
def test_hostile_record_headers_are_corrupt_records(header, message):
    assert error(record_with_header(header)) == ("invalid_features", f"corrupt feature record: {message}")


def test_a_record_header_over_its_budget_is_refused_before_reading_it():
    assert error(MAGIC + struct.pack("<I", 2**31) + b"{}") == (
        "invalid_features", f"corrupt feature record: the header claims {2**31} bytes, the limit is {MAX_HEADER_BYTES}")


def test_record_header_values_must_be_counts_that_match_the_bytes():
    good = encode_record("photo", regions(count=2, dim=4))

    def with_change(change) -> tuple[str, str]:
        return error(with_header(good, change))

    assert with_change(lambda h: h.update(num_boxes=True))[1] == (
        "corrupt feature record: expected a non-negative integer in the header, got True")
    assert with_change(lambda h: h.update(image_width=-5))[1] == (
        "corrupt feature record: expected a non-negative integer in the header, got -5")
    assert with_change(lambda h: h.update(image_id=7))[1] == "corrupt feature record: image_id must be a string"
    assert with_change(lambda h: h["arrays"]["features"].update(shape=[2**40, 2**40]))[1] == (
        f"corrupt feature record: array features: shape [{2**40}, {2**40}] does not match its 32 bytes")
    assert with_change(lambda h: h["arrays"]["features"].update(shape=[2, 2, 2]))[1] == (
        "corrupt feature record: array features has 3 dimensions, at most 2")
    assert with_change(lambda h: h["arrays"]["boxes"].update(offset=10**6))[1] == (
        "corrupt feature record: array boxes lies outside the record")
