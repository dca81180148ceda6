"""Fast tests of service/web/inputs.py: a client's form fields and uploads into a validated JobRequest, or a
BadRequest with a stable code. Limits are tested at the limit, one over and one under; errors by code, status and
whole message. `bench/mutation.sh` runs these against mutants of service/web/inputs.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.boxes import check_boxes
from service.contract import ImageInfo, JobRequest
from service.errors import BadRequest
from service.settings import DEFAULT_TASKS, Settings
from service.web.inputs import (MAX_BOXES, MAX_BOXES_CHARS, parse_boxes, parse_submission, parse_tasks, parse_text,
                                parse_top_k)
from vilbert.tasks import TaskRegistry

REGISTRY = TaskRegistry.from_file()


def png(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 127, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


# -------------------------------------------------------------------------------------------------- parsing


def form(**fields):
    return {"text": "what is this?", **fields}


def test_parse_submission_defaults():
    request = parse_submission(form(), [png()], Settings(), REGISTRY)
    assert request.tasks == list(DEFAULT_TASKS) and request.top_k == 3 and request.boxes is None
    assert (request.images[0].width, request.images[0].height) == (64, 48)
    assert JobRequest.from_json(request.to_json()) == request


def test_classic_field_names_are_accepted():
    request = parse_submission({"text_input": " swimming elephant "}, [png()], Settings(), REGISTRY)
    assert request.text == "swimming elephant"


def test_default_tasks_follow_the_image_count():
    assert parse_tasks(None, REGISTRY, 2) == ["nlvr2", "retrieval_coco"]
    assert parse_tasks("", REGISTRY, 3) == ["retrieval_coco"]
    assert parse_tasks(" vqa, gqa,vqa ", REGISTRY, 1) == ["vqa", "gqa"]


@pytest.mark.parametrize("fields, images, code", [
    ({}, [], "missing_image"),
    ({"text": None}, [png()], "missing_text"),
    ({"text": "   "}, [png()], "empty_text"),
    ({"text": "x" * 1001}, [png()], "text_too_long"),
    ({"tasks": "vqa,teleport"}, [png()], "unknown_task"),
    ({"tasks": " , "}, [png()], "no_tasks"),
    ({"tasks": "nlvr2"}, [png()], "image_count"),
    ({"tasks": "visual7w"}, [png()], "missing_boxes"),
    ({"tasks": "guesswhat", "boxes": "[[0,0,10,10]]"}, [png(), png()], None),
    ({"tasks": "visual7w", "boxes": "[[1,2,3]]"}, [png()], "invalid_boxes"),
    ({"tasks": "visual7w", "boxes": "[[0,0,10,10]"}, [png()], "invalid_boxes"),
    ({"tasks": "visual7w", "boxes": "[[0,0,100,10]]"}, [png()], "invalid_boxes"),
    ({"tasks": "visual7w", "boxes": "[[5,5,2,10]]"}, [png()], "invalid_boxes"),
    ({"tasks": "visual7w", "boxes": "[[0,0,true,10]]"}, [png()], "invalid_boxes"),
    ({"tasks": "visual7w", "boxes": "[" + ",".join(["[0,0,5,5]"] * 100) + "]"}, [png()], "too_many_boxes"),
    ({"top_k": "abc"}, [png()], "invalid_top_k"),
    ({"top_k": "0"}, [png()], "invalid_top_k"),
    ({"top_k": "21"}, [png()], "invalid_top_k"),
    ({}, [png()] * 9, "too_many_images"),
    ({}, [b"definitely not an image"], "invalid_image"),
    ({}, [b""], "empty_image"),
    ({}, [png()[:60]], "invalid_image"),
])
def test_bad_submissions_get_codes(fields, images, code):
    data = form(**fields)
    data = {k: v for k, v in data.items() if v is not None}
    if code is None:
        assert parse_submission(data, images, Settings(), REGISTRY).boxes == [[0, 0, 10, 10]]
        return
    with pytest.raises(BadRequest) as caught:
        parse_submission(data, images, Settings(), REGISTRY)
    assert caught.value.code == code and caught.value.status == 400 and caught.value.message


def test_pixel_limit_is_413():
    with pytest.raises(BadRequest) as caught:
        parse_submission(form(), [png(200, 200)], Settings(max_image_pixels=10_000), REGISTRY)
    assert (caught.value.code, caught.value.status) == ("image_too_large", 413)


def test_box_checks():
    check_boxes([[0, 0, 64, 48]], 64, 48)
    with pytest.raises(BadRequest) as caught:
        check_boxes([[0, 0, 10, 10], [0, 0, float("nan"), 4]], 64, 48)
    assert (caught.value.code, caught.value.message) == ("invalid_boxes", "box 1 has a non-finite coordinate")
    assert parse_boxes(None) is None and parse_boxes("[[1, 2, 3.5, 4]]") == [[1.0, 2.0, 3.5, 4.0]]
    with pytest.raises(BadRequest) as caught:
        parse_boxes("[]")
    assert (caught.value.code, caught.value.message) == ("invalid_boxes",
                                                         "boxes must be a non-empty JSON list of [x1, y1, x2, y2]")
    assert parse_top_k(None, 20) == 3 and parse_top_k("20", 20) == 20




# ------------------------------------------------------------------------------------------- limits, exactly

def failure(call) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        call()
    return caught.value


def test_text_at_under_and_over_its_limit():
    assert parse_text("x" * 1000, 1000) == "x" * 1000
    assert parse_text("  " + "x" * 999 + "  ", 1000) == "x" * 999  # stripped before it is counted
    error = failure(lambda: parse_text("x" * 1001, 1000))
    assert (error.code, error.status, error.message) == ("text_too_long", 400,
                                                         "the text has 1001 characters, the limit is 1000")
    assert failure(lambda: parse_text(None, 10)).message == "the form field 'text' (or 'text_input') is required"
    assert failure(lambda: parse_text(" \t", 10)).message == "the text is empty"


def test_top_k_at_both_ends_and_one_past():
    assert parse_top_k("1", 20) == 1 and parse_top_k(" 20 ", 20) == 20 and parse_top_k("  ", 20) == 3
    assert failure(lambda: parse_top_k("0", 20)).message == "top_k must be between 1 and 20, got 0"
    assert failure(lambda: parse_top_k("21", 20)).message == "top_k must be between 1 and 20, got 21"
    assert failure(lambda: parse_top_k("2.5", 20)).message == "top_k must be an integer, got '2.5'"
    assert parse_top_k("+7", 20) == 7 and parse_top_k("007", 20) == 7
    for spelling in ("1_0", "\u0663", "\uff17", "0x5", "5e0", "- 5"):  # what int() or a sloppy pattern would take
        assert failure(lambda: parse_top_k(spelling, 20)).message == f"top_k must be an integer, got {spelling!r}"
    assert failure(lambda: parse_top_k("-5", 20)).message == "top_k must be between 1 and 20, got -5"


def test_image_count_at_the_limit_and_one_over():
    request = parse_submission(form(tasks="retrieval_coco"), [png()] * 8, Settings(), REGISTRY)
    assert len(request.images) == 8
    error = failure(lambda: parse_submission(form(), [png()] * 9, Settings(), REGISTRY))
    assert (error.code, error.message) == ("too_many_images", "9 images sent, the limit is 8")
    assert parse_tasks(None, REGISTRY, 1) == list(DEFAULT_TASKS)


def boxes_json(count: int) -> str:
    return "[" + ",".join(["[0,0,5,5]"] * count) + "]"


def test_candidate_boxes_at_the_task_limit_and_one_over():
    # visual7w reads 200 rows: 101 are the image's own (100 regions + the global one), 99 are left for candidates
    assert len(parse_submission(form(tasks="visual7w", boxes=boxes_json(99)), [png()], Settings(), REGISTRY).boxes) == 99
    error = failure(lambda: parse_submission(form(tasks="visual7w", boxes=boxes_json(100)), [png()], Settings(),
                                             REGISTRY))
    assert (error.code, error.message) == ("too_many_boxes", "task visual7w takes at most 99 candidate boxes")
    # guesswhat reads 306 rows: 205 candidates
    assert len(parse_submission(form(tasks="guesswhat", boxes=boxes_json(205)), [png()], Settings(),
                                REGISTRY).boxes) == 205
    missing = failure(lambda: parse_submission(form(tasks="vqa,visual7w"), [png()], Settings(), REGISTRY))
    assert (missing.code, missing.message) == ("missing_boxes",
                                               "task visual7w needs candidate boxes in the 'boxes' field")


def test_boxes_on_the_image_border_pass_and_degenerate_or_negative_ones_fail():
    check_boxes([[0, 0, 64, 48], [63, 47, 64, 48]], 64, 48)  # touching the right and bottom edges is inside
    cases = {
        "[[-1,0,10,10]]": "box 0 [-1.0, 0.0, 10.0, 10.0] lies outside the 64x48 image",
        "[[0,-0.5,10,10]]": "box 0 [0.0, -0.5, 10.0, 10.0] lies outside the 64x48 image",
        "[[0,0,64.5,10]]": "box 0 [0.0, 0.0, 64.5, 10.0] lies outside the 64x48 image",
        "[[0,0,10,48.5]]": "box 0 [0.0, 0.0, 10.0, 48.5] lies outside the 64x48 image",
        "[[0,0,10,10],[5,5,5,10]]": "box 1 must have x2 > x1 and y2 > y1",  # zero width
        "[[5,5,10,5]]": "box 0 must have x2 > x1 and y2 > y1",  # zero height
    }
    for boxes, message in cases.items():
        error = failure(lambda: parse_submission(form(tasks="visual7w", boxes=boxes), [png()], Settings(), REGISTRY))
        assert (error.code, error.status, error.message) == ("invalid_boxes", 400, message), boxes


def test_box_syntax_errors_name_the_box():
    assert failure(lambda: parse_boxes("{}")).message == "boxes must be a non-empty JSON list of [x1, y1, x2, y2]"
    assert failure(lambda: parse_boxes("[[0,0,1,1],[0,0,1]]")).message == \
        "box 1 must be a list of four numbers [x1, y1, x2, y2]"
    assert failure(lambda: parse_boxes("[[0,0,1,1],\"a\"]")).message == \
        "box 1 must be a list of four numbers [x1, y1, x2, y2]"
    assert failure(lambda: parse_boxes("[[0,0,1,false]]")).message == \
        "box 0 must be a list of four numbers [x1, y1, x2, y2]"
    assert failure(lambda: parse_boxes("nope")).message == "boxes must be JSON: [[x1, y1, x2, y2], ...]"
    assert parse_boxes("  ") is None and parse_boxes("[[0, 0, 1, 2]]") == [[0.0, 0.0, 1.0, 2.0]]


def test_the_failing_upload_is_named_and_the_pixel_limit_is_exact():
    at_limit = parse_submission(form(), [png(100, 100)], Settings(max_image_pixels=10_000), REGISTRY)
    assert (at_limit.images[0].width, at_limit.images[0].height) == (100, 100)
    error = failure(lambda: parse_submission(form(tasks="retrieval_coco"), [png(), b"not an image"], Settings(),
                                             REGISTRY))
    assert error.code == "invalid_image" and error.message.startswith("image 1: ") and error.status == 400
    big = failure(lambda: parse_submission(form(), [png(101, 100)], Settings(max_image_pixels=10_000), REGISTRY))
    assert (big.code, big.status) == ("image_too_large", 413) and big.message.startswith("image 0: ")


def test_a_non_default_request_survives_the_json_round_trip():
    request = parse_submission(form(text="point at the cup", tasks="visual7w,vqa", top_k="7",
                                    boxes="[[1, 2, 30, 40], [0, 0, 64, 48]]"), [png()], Settings(), REGISTRY)
    assert request == JobRequest(text="point at the cup", tasks=["visual7w", "vqa"], top_k=7,
                                 boxes=[[1.0, 2.0, 30.0, 40.0], [0.0, 0.0, 64.0, 48.0]],
                                 images=[ImageInfo(64, 48, len(png()), 64 * 48 * 3)], inputs="images")
    assert JobRequest.from_json(request.to_json()) == request


def test_nlvr2_needs_exactly_two_images():
    assert parse_submission(form(tasks="nlvr2"), [png(), png()], Settings(), REGISTRY).tasks == ["nlvr2"]
    error = failure(lambda: parse_submission(form(tasks="nlvr2"), [png()] * 3, Settings(), REGISTRY))
    assert (error.code, error.message) == ("image_count", "task nlvr2 needs 2 images, got 3")


def test_messages_say_what_is_wrong_and_leak_nothing():
    not_image = failure(lambda: parse_submission(form(), [b"definitely not an image"], Settings(), REGISTRY))
    assert (not_image.code, not_image.message) == (
        "invalid_image", "image 0: cannot decode the image: not an image in an accepted format "
                         "(JPEG, PNG, GIF, BMP, TIFF, WEBP, PPM, MPO)")  # no "<_io.BytesIO object at 0x…>"
    assert failure(lambda: parse_submission(form(), [], Settings(), REGISTRY)).message == \
        "at least one image file is required (form field 'image' or 'fileupload')"
    assert failure(lambda: parse_tasks(" , ", REGISTRY, 1)).message == "no task named in 'tasks'"
    unknown = failure(lambda: parse_tasks("vqa,teleport", REGISTRY, 1))
    assert unknown.code == "unknown_task" and unknown.message.startswith("unknown task 'teleport'; known tasks: vqa, ")
    not_a_list = failure(lambda: parse_boxes("{}"))
    assert (not_a_list.code, not_a_list.status) == ("invalid_boxes", 400)


# ---------------------------------------------------------------------------------- precomputed features

def region_file(count: int = 3, dim: int = 8, width: int = 64, height: int = 48) -> bytes:
    from detector.regions import RegionFeatures
    from service.features import to_npz

    boxes = np.tile(np.array([[1, 2, 30, 40]], np.float32), (count, 1))
    return to_npz(RegionFeatures(boxes, np.full((count, dim), 0.5, np.float32), np.full(count, 0.9, np.float32),
                                 np.ones(count, np.int64), count, width, height))


def test_a_feature_submission_becomes_a_features_request_with_its_files():
    from service.web.inputs import parse_feature_submission

    first, second = region_file(width=64, height=48), region_file(count=2, width=100, height=50)
    request, stored = parse_feature_submission(form(tasks="retrieval_coco", top_k="2"), [first, second], [],
                                               Settings(), REGISTRY, expected_dim=8)
    assert request == JobRequest(text="what is this?", tasks=["retrieval_coco"], top_k=2, boxes=None,
                                 images=[ImageInfo(64, 48, len(first)), ImageInfo(100, 50, len(second))],
                                 inputs="features")
    assert stored == [first, second]  # re-encoded after validation: the same .npz for a valid file
    assert JobRequest.from_json(request.to_json()) == request


def test_feature_submission_errors():
    from service.web.inputs import parse_feature_submission

    def submit(fields=None, files=(region_file(),), images=(), settings=Settings(), dim=8) -> BadRequest:
        return failure(lambda: parse_feature_submission(form(**(fields or {})), list(files), list(images), settings,
                                                        REGISTRY, dim))

    mixed = submit(images=[png()])
    assert (mixed.code, mixed.message) == ("mixed_inputs", "send either images or precomputed features, not both")
    boxes = submit({"tasks": "visual7w", "boxes": "[[0,0,5,5]]"})
    assert (boxes.code, boxes.message) == ("boxes_need_image",
                                           "candidate boxes need the image itself, not precomputed features")
    many = submit(files=[region_file()] * 3, settings=Settings(max_images=2))
    assert (many.code, many.message) == ("too_many_images", "3 feature files sent, the limit is 2")
    wrong_dim = submit(files=[region_file(), region_file(dim=4)])
    assert wrong_dim.code == "feature_size" and wrong_dim.message.startswith("features 1: region features have 4 ")
    junk = submit(files=[b"junk"])
    assert junk.code == "invalid_features" and junk.message.startswith("features 0: not a feature file")
    assert submit({"tasks": "nlvr2"}).code == "image_count"
    assert submit({"text": ""}).code == "empty_text"


def test_model_feature_dim_only_when_the_ready_workers_agree(redis_url):
    import json

    from redis import Redis

    from service.contract import alive_key
    from service.web.inputs import model_feature_dim

    connection = Redis.from_url(redis_url)
    connection.flushdb()
    assert model_feature_dim(connection) is None  # no worker: the worker checks
    connection.set(alive_key("a"), json.dumps({"feature_dim": 2048}))
    connection.set(alive_key("b"), json.dumps({"feature_dim": 2048}))
    assert model_feature_dim(connection) == 2048
    connection.set(alive_key("c"), json.dumps({"feature_dim": 1024}))
    assert model_feature_dim(connection) is None  # they disagree: no check here
    connection.delete(alive_key("c"))
    connection.set(alive_key("d"), json.dumps({"name": "an older worker that does not say"}))
    assert model_feature_dim(connection) is None


# --------------------------------------------------------------------------- hostile fields, within a budget

def test_boxes_with_huge_integers_or_deep_nesting_are_400s_not_500s():
    assert failure(lambda: parse_boxes("[[0, 0, 1, " + "9" * 400 + "]]")).message == (
        "boxes refused: an integer has more than 18 digits")
    deep = failure(lambda: parse_boxes("[" * 5000 + "]" * 5000))
    assert (deep.code, deep.message) == ("invalid_boxes", "boxes refused: the JSON is nested deeper than 2 levels")
    assert failure(lambda: parse_boxes("[[[0, 0, 1, 1]]]")).message == (
        "boxes refused: the JSON is nested deeper than 2 levels")
    assert failure(lambda: parse_boxes("[[0, 0, 1e309, 1]]")).message == "boxes refused: the number 1e309 is out of range"
    assert failure(lambda: parse_boxes("[[0, 0, NaN, 1]]")).message == "boxes refused: NaN is not a JSON number"
    assert failure(lambda: parse_boxes("[[0, 0, -Infinity, 1]]")).message == (
        "boxes refused: -Infinity is not a JSON number")
    assert parse_boxes("[[0, 0, 1, " + "9" * 18 + "]]")[0][3] == 1e18  # at the digit limit: parsed (then range-checked)


def test_boxes_length_and_count_at_their_limits():
    at_limit = "[" + ",".join(["[0,0,1,1]"] * MAX_BOXES) + "]"
    assert len(parse_boxes(at_limit)) == MAX_BOXES == 256
    over = failure(lambda: parse_boxes("[" + ",".join(["[0,0,1,1]"] * (MAX_BOXES + 1)) + "]"))
    assert (over.code, over.message) == ("too_many_boxes", "257 boxes sent, the limit is 256")
    padded = "[[0,0,1,1]" + " " * (MAX_BOXES_CHARS - 11) + "]"
    assert len(padded) == MAX_BOXES_CHARS and parse_boxes(padded) == [[0.0, 0.0, 1.0, 1.0]]
    long = failure(lambda: parse_boxes(padded + " "))
    assert (long.code, long.message) == ("invalid_boxes", f"boxes refused: the JSON is longer than {MAX_BOXES_CHARS} "
                                                          "characters")


def test_top_k_and_tasks_are_length_checked_before_parsing():
    assert parse_top_k("0" * 7 + "5", 20) == 5  # eight characters: parsed
    huge = failure(lambda: parse_top_k("9" * 5000, 20))
    assert (huge.code, huge.message) == ("invalid_top_k", "top_k must be between 1 and 20")
    registry = TaskRegistry.from_file()
    assert parse_tasks("vqa," * 249 + "vqa " * 1, registry, 1) == ["vqa"]  # 1000 characters: at the limit
    long = failure(lambda: parse_tasks("vqa," * 250 + "x", registry, 1))
    assert (long.code, long.message) == ("unknown_task", "'tasks' is 1001 characters long, the limit is 1000")


def test_a_request_whose_images_decode_past_the_limit_is_a_413():
    buffer = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buffer, "PNG")
    image = buffer.getvalue()
    settings = Settings(max_decoded_bytes_per_request=2 * 100 * 100 * 3)
    registry = TaskRegistry.from_file()
    request = parse_submission({"text": "hi", "tasks": "retrieval_coco"}, [image, image], settings, registry)
    assert [info.decoded_bytes for info in request.images] == [30_000, 30_000]
    with pytest.raises(BadRequest) as caught:
        parse_submission({"text": "hi", "tasks": "retrieval_coco"}, [image] * 3, settings, registry)
    assert (caught.value.code, caught.value.status, caught.value.message) == (
        "images_too_large", 413, "the images decode to 90000 bytes together, the limit per request is 60000")


def test_a_turned_tiffs_size_is_the_displayed_one_that_boxes_are_checked_against():
    """A camera TIFF stored 40x30 with a quarter-turn orientation is shown, decoded and pointed at as 30x40 (before
    2026-12-05 its headers swapped the size a second time, and boxes were checked against 40x30)."""
    from detector.images import load_image
    from service.web.inputs import check_image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buffer, "TIFF", tiffinfo={274: 6})
    info = check_image(buffer.getvalue(), 10_000)
    assert (info.width, info.height) == (30, 40) and load_image(buffer.getvalue()).shape == (40, 30, 3)
    check_boxes([[0, 0, 30, 40]], info.width, info.height)
    with pytest.raises(BadRequest, match="lies outside the 30x40 image"):
        check_boxes([[0, 0, 40, 30]], info.width, info.height)
