"""Region names (issue 14, item 5): the Visual Genome category file, its two layouts, what is refused, and the
`label` of every grounding region and pointing candidate in a result."""

from __future__ import annotations

import io
import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from detector.categories import CATEGORIES_FILE, CategoriesError, CategoryNames, name_terms, synthetic_categories
from service.worker.pipeline import InferenceRequest, Pipeline


def released_layout(count: int = 5) -> dict:
    """The released file's layout: object classes only, ids 0..K-2, detector class c = id c - 1."""
    return {"categories": [{"id": i, "name": f"thing{i}", "supercategory": "x"} for i in range(count)]}


def test_the_released_layout_maps_class_c_to_id_c_minus_1():
    names = CategoryNames.from_json(json.dumps(released_layout(5)).encode(), num_classes=6)
    assert names.num_classes == 6
    assert names.labels([0, 1, 2, 5]) == [None, "thing0", "thing1", "thing4"]  # 0 is background
    assert names.label(6) is None and names.label(-1) is None  # outside the detector's range: no name
    shuffled = released_layout(5)
    shuffled["categories"].reverse()  # order in the file does not matter, ids do
    assert CategoryNames.from_json(json.dumps(shuffled).encode(), 6).names == names.names


def test_a_layout_with_a_background_entry_maps_class_c_to_id_c():
    data = {"categories": [{"id": 0, "name": "__background__"}] + [{"id": i, "name": f"n{i}"} for i in range(1, 6)]}
    assert CategoryNames.from_json(json.dumps(data).encode(), 6).labels([1, 5]) == ["n1", "n5"]


@pytest.mark.parametrize("data, message", [
    (b"not json", "not a category file"),
    (b'{"cats": []}', "not a category file"),
    (json.dumps(released_layout(4)).encode(), "this detector has 5 object classes"),  # one short
    (json.dumps(released_layout(6)).encode(), "this detector has 5 object classes"),  # a 0..5 file without background
    (json.dumps({"categories": [{"id": 0, "name": "a"}] * 5}).encode(), "appears twice"),
    (json.dumps({"categories": [{"id": "0", "name": "a"}]}).encode(), "integer id"),
    (json.dumps({"categories": [{"id": i, "name": "" if i == 2 else "a"} for i in range(5)]}).encode(), "unprintable"),
    (json.dumps({"categories": [{"id": i, "name": "a\nb"} for i in range(5)]}).encode(), "unprintable"),
    (b" " * (1 << 20) + b"{}", "more than a category file has"),
])
def test_files_that_do_not_fit_the_detector_are_refused(data, message):
    with pytest.raises(CategoriesError, match=message):
        CategoryNames.from_json(data, num_classes=6)


def test_terms_are_lower_case_words_without_a_plural_s():
    assert name_terms("Two DOGS catch a frisbee, near glass buses!") == [
        "two", "dog", "catch", "a", "frisbee", "near", "glass", "buse"]
    assert name_terms("tennis racket") == ["tenni", "racket"]  # the same rule on both sides, so it still matches
    assert name_terms("") == []


def test_the_synthetic_file_is_in_the_released_layout():
    names = CategoryNames.from_json(synthetic_categories(1601), 1601)
    assert names.num_classes == 1601 and names.label(1) == "man" and all(names.names[1:])


def photo(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8)).resize((320, 240)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pipeline(tiny_bundle) -> Pipeline:
    return Pipeline.from_dir(tiny_bundle, device="cpu", min_size=96, max_size=160)


def test_grounding_regions_and_pointing_candidates_carry_the_detector_class_name(pipeline):
    data = photo(1)
    result = pipeline.run(InferenceRequest([data], "the dog on the left", ["refcoco"], top_k=20))
    regions = pipeline.extractor.extract([np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))])[0]
    labelled = 0
    for region in result["tasks"]["refcoco"]["regions"]:
        if region["region"] == 0:
            assert region["label"] is None  # the whole image is no detected object
            continue
        class_id = int(regions.class_ids[region["region"] - 1])
        assert 1 <= class_id < 1601 and region["label"] == pipeline.names.label(class_id) is not None
        np.testing.assert_allclose(region["box"], regions.boxes[region["region"] - 1], atol=0.01)
        labelled += 1
    assert labelled >= 10

    boxes = [[10, 10, 100, 120], [150, 30, 300, 200], [0, 0, 320, 240]]
    pointed = pipeline.run(InferenceRequest([data], "which one is the dog?", ["visual7w"], boxes=boxes))
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    expected = pipeline.extractor.extract_boxes(rgb, np.asarray(boxes, np.float32)).class_ids
    assert [c["label"] for c in pointed["tasks"]["visual7w"]["candidates"]] == pipeline.names.labels(expected)


def test_without_a_category_file_labels_are_null_and_the_worker_says_why(tiny_bundle, tmp_path, caplog):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / CATEGORIES_FILE).unlink()
    with caplog.at_level(logging.WARNING):
        pipeline = Pipeline.from_dir(bundle, device="cpu", min_size=96, max_size=160)
    assert pipeline.names is None and f"has no {CATEGORIES_FILE}" in caplog.text
    result = pipeline.run(InferenceRequest([photo(2)], "a dog", ["refcoco"], top_k=5))
    assert [r["label"] for r in result["tasks"]["refcoco"]["regions"]] == [None] * 5

    (bundle / CATEGORIES_FILE).write_text(json.dumps(released_layout(7)))  # a file for another detector
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert Pipeline.from_dir(bundle, device="cpu", min_size=96, max_size=160).names is None
    assert "this detector has 1600 object classes" in caplog.text
