"""Region labels in results (issue 14, item 5): every grounding region and pointing candidate carries the
detector's class name; without a category file (or with one that does not fit) labels are null and the worker
says why."""

from __future__ import annotations

import io
import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from detector.categories import CATEGORIES_FILE
from service.worker.pipeline import InferenceRequest, Pipeline
from test_categories import released_layout


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
