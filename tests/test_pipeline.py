"""Fast tests of service/worker/pipeline.py, the worker's stages (decode -> regions -> predict) run in-process on the
tiny bundle: what a result holds, what each stage refuses (code, message and stage), that a bad request fails alone,
the cache state and timings each request of a batch reports, and how a bundle loads. `bench/mutation.sh` runs these
against mutants of pipeline.py."""

from __future__ import annotations

import io
import logging
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from redis import Redis

from detector.categories import CATEGORIES_FILE
from detector.tiny import CHECKPOINT_FILE as DETECTOR_CHECKPOINT, CONFIG_FILE as DETECTOR_CONFIG
from modelkit.regions import REGIONS_PER_IMAGE
from service.bundle import TINY_NOTICE
from service.contract import DECODE, DETECTOR, VILBERT, timing_key
from service.errors import PipelineError
from service.settings import load_settings
from service.worker.cache import FeatureCache
from service.worker.pipeline import InferenceRequest, Pipeline, detector_precision, load_category_names, resolve_device
from vilbert.predictor import Predictor
from vilbert.tiny import write_tiny_vilbert

SIZES = dict(min_size=96, max_size=160)
DECODE_S, DETECTOR_S, VILBERT_S = timing_key(DECODE), timing_key(DETECTOR), timing_key(VILBERT)


def photo(seed: int, width: int = 320, height: int = 240) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8)).resize((width, height)).save(buffer, "JPEG")
    return buffer.getvalue()


def rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def pipeline(tiny_bundle) -> Pipeline:
    return Pipeline.from_dir(tiny_bundle, device="cpu", **SIZES)


def test_a_result_holds_the_answers_and_what_produced_them(pipeline):
    data = photo(1)
    result = pipeline.run(InferenceRequest([data], "what is this?", ["vqa", "snli_ve"], top_k=2))
    regions = pipeline.extractor.extract([rgb(data)])[0]
    assert result["text"] == "what is this?"
    assert result["tasks"] == pipeline.predictor.predict([regions], "what is this?", ["vqa", "snli_ve"], top_k=2)
    assert len(result["tasks"]["vqa"]["answers"]) == 2
    assert result["images"] == [{"width": 320, "height": 240, "regions": len(regions.boxes)}]
    assert set(result["timings"]) == {DECODE_S, DETECTOR_S, VILBERT_S}
    assert all(value >= 0 and round(value, 4) == value for value in result["timings"].values())
    assert result["cache"] == "off"
    assert result["model"] == {
        "device": "cpu", "detector": pipeline.extractor.identity, "tiny": True, "feature_dim": 64,
        "precision": {"vilbert": "fp32", "detector": "fp32"}, "notice": TINY_NOTICE}


def test_stages_are_announced_with_what_enters_them(pipeline):
    announced = []
    outcomes = pipeline.run_many([InferenceRequest([photo(1), photo(2)], "two dogs", ["nlvr2", "vqa"]),
                                  InferenceRequest([photo(3), b"not an image"], "x", ["vqa"]),
                                  InferenceRequest([photo(4)], "a cat", ["gqa"])],
                                 on_stage=lambda stage, detail: announced.append((stage, detail)))
    assert announced == [(DECODE, "5 image(s)"), (DETECTOR, "3 image(s)"), (VILBERT, "3 task(s)")]
    announced.clear()
    pipeline.run(InferenceRequest([photo(1)], "a cat", ["gqa", "vqa"]), on_stage=lambda *stage: announced.append(stage))
    assert announced == [(DECODE, "1 image(s)"), (DETECTOR, "1 image(s)"), (VILBERT, "2 task(s)")]
    assert isinstance(outcomes[1], PipelineError) and not isinstance(outcomes[0], PipelineError)
    assert pipeline.run(InferenceRequest([photo(4)], "a cat", ["gqa"]))["tasks"] == outcomes[2]["tasks"]


def features_of(pipeline: Pipeline, data: bytes):
    return pipeline.extractor.extract([rgb(data)])[0]


def test_a_bad_request_fails_alone_with_its_code_message_and_stage(pipeline):
    good = InferenceRequest([photo(5)], "a dog", ["vqa"])
    cases = [
        (InferenceRequest([], "x", ["vqa"]), ("missing_image", "at least one image is required", DECODE)),
        (InferenceRequest([photo(5), b"\x89PNG broken"], "x", ["vqa"]),
         ("invalid_image", "image 1: cannot decode the image", DECODE)),
        (InferenceRequest([photo(5)], "x", ["visual7w"], boxes=[[0, 0, 400, 100]]), 
         ("invalid_boxes", "box 0 [0, 0, 400, 100] lies outside the 320x240 image", DECODE)),
        (InferenceRequest([], "x", ["visual7w"], boxes=[[0, 0, 10, 10]], features=[features_of(pipeline, photo(5))]),
         ("boxes_need_image", "candidate boxes need the image itself, not precomputed features", DECODE)),
        (InferenceRequest([photo(5)], "x", ["nlvr2"]), ("image_count", "task nlvr2 needs 2 images, got 1", VILBERT)),
        (InferenceRequest([photo(5)], "x", ["visual7w", "nope"], boxes=[[0, 0, 10, 10]]),
         ("unknown_task", "unknown task 'nope'; known tasks: ", VILBERT)),
    ]
    outcomes = pipeline.run_many([good] + [request for request, _ in cases] + [good])
    assert outcomes[0]["tasks"] == outcomes[-1]["tasks"] == pipeline.run(good)["tasks"]
    for outcome, (request, (code, message, stage)) in zip(outcomes[1:], cases):
        assert isinstance(outcome, PipelineError), code
        assert (outcome.code, outcome.stage) == (code, stage)
        assert outcome.message.startswith(message), (outcome.message, message)
    with pytest.raises(PipelineError) as caught:
        pipeline.run(cases[0][0])
    assert caught.value.code == "missing_image"


def test_precomputed_features_skip_decode_and_the_detector(pipeline, monkeypatch):
    data = photo(6)
    from_image = pipeline.run(InferenceRequest([data], "a red car", ["vqa", "refcoco"]))
    features = features_of(pipeline, data)
    monkeypatch.setattr(pipeline.extractor, "extract", lambda *args, **kwargs: pytest.fail("the detector ran"))
    given = pipeline.run(InferenceRequest([], "a red car", ["vqa", "refcoco"], features=[features]))
    assert given["tasks"] == from_image["tasks"] and given["images"] == from_image["images"]
    assert given["cache"] == "features"
    assert set(given["timings"]) == {DECODE_S, VILBERT_S} and given["timings"][DECODE_S] == 0.0


def test_candidate_boxes_go_through_the_detector_only_for_a_pointing_task(pipeline, monkeypatch):
    data, boxes = photo(7), [[10, 10, 100, 120], [150, 30, 300, 200]]
    calls = []
    extract_boxes = pipeline.extractor.extract_boxes

    def counting(image, given):
        calls.append(np.asarray(given).tolist())
        return extract_boxes(image, given)

    monkeypatch.setattr(pipeline.extractor, "extract_boxes", counting)
    plain = pipeline.run(InferenceRequest([data], "which one?", ["vqa"], boxes=boxes))
    assert calls == [] and "candidates" not in plain["tasks"]["vqa"]
    pointed = pipeline.run(InferenceRequest([data], "which one?", ["vqa", "visual7w"], boxes=boxes))
    assert calls == [boxes]
    assert [c["box"] for c in pointed["tasks"]["visual7w"]["candidates"]] == boxes


def test_each_request_of_a_batch_reports_the_whole_batch_time(pipeline):
    started = time.perf_counter()
    first, second, pointing = pipeline.run_many([
        InferenceRequest([photo(8)], "a", ["vqa"]), InferenceRequest([photo(9), photo(10)], "b", ["retrieval_coco"]),
        InferenceRequest([photo(11)], "c", ["visual7w"], boxes=[[0, 0, 50, 50], [10, 10, 90, 90]])])
    elapsed = time.perf_counter() - started
    for stage in (DETECTOR_S, VILBERT_S):  # both waited for the one detector call and the one ViLBERT batch
        assert first["timings"][stage] == second["timings"][stage] > 0
    assert pointing["timings"][VILBERT_S] == first["timings"][VILBERT_S]
    # the candidate boxes' own detector pass comes on top of the shared call
    assert pointing["timings"][DETECTOR_S] > first["timings"][DETECTOR_S]
    assert first["timings"][DECODE_S] != second["timings"][DECODE_S]  # decoding is per request
    for result in (first, second, pointing):
        assert sum(result["timings"].values()) <= elapsed + 1e-3, result["timings"]  # parts of the call's time


def test_the_cache_state_of_each_request(pipeline, redis_url):
    cache = FeatureCache(Redis.from_url(redis_url), pipeline.extractor.identity)
    cached = pipeline.with_cache(cache)
    assert (cached.extractor, cached.predictor, cached.names) == (pipeline.extractor, pipeline.predictor,
                                                                   pipeline.names)
    assert (cached.tiny, cached.max_image_pixels, pipeline.cache) == (pipeline.tiny, pipeline.max_image_pixels, None)
    a, b = photo(11), photo(12)
    uncached = pipeline.run(InferenceRequest([a, b], "two dogs", ["nlvr2"]))
    outcomes = cached.run_many([InferenceRequest([a], "x", ["vqa"]), InferenceRequest([rgb(a)], "x", ["vqa"])])
    assert [o["cache"] for o in outcomes] == ["miss", "miss"]  # an in-process array is never cached
    both = cached.run(InferenceRequest([a, b], "two dogs", ["nlvr2"]))
    assert both["cache"] == "partial" and both["tasks"] == uncached["tasks"]
    assert cached.run(InferenceRequest([b, a], "two dogs", ["nlvr2"]))["cache"] == "hit"


def test_the_two_models_must_agree_on_the_feature_size(pipeline, tmp_path):
    write_tiny_vilbert(tmp_path, feature_dim=32)
    with pytest.raises(ValueError) as caught:
        Pipeline(pipeline.extractor, Predictor.from_dir(tmp_path))
    assert str(caught.value) == ("the detector gives 64-d region features but ViLBERT expects 32-d (v_feature_size): "
                                 "the bundle mixes files of different models")


def test_a_bundle_missing_files_is_named_with_the_fix(tmp_path, tiny_bundle):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / DETECTOR_CHECKPOINT).unlink()
    (bundle / DETECTOR_CONFIG).unlink()
    with pytest.raises(FileNotFoundError) as caught:
        Pipeline.from_dir(bundle, device="cpu")
    assert str(caught.value) == (
        f"the weights bundle in {bundle} lacks {DETECTOR_CHECKPOINT}, {DETECTOR_CONFIG}: run `python models/fetch.py "
        f"--dest {bundle}` for the released weights, or `python models/make_tiny.py --out DIR` for a tiny test bundle")


def test_defaults_are_the_reference_detector_sizes_on_the_best_device(tiny_bundle):
    loaded = Pipeline.from_dir(tiny_bundle)
    extractor = loaded.extractor
    assert (extractor.min_size, extractor.max_size, extractor.num_regions) == (800, 1333, REGIONS_PER_IMAGE)
    assert str(loaded.predictor.device) == str(extractor.device) == resolve_device("auto")
    assert loaded.predictor.precision == extractor.precision == "fp32"


def test_settings_reach_both_models(tiny_bundle, caplog):
    settings = load_settings({"MODEL_DIR": str(tiny_bundle), "DEVICE": "auto", "PRECISION": "bf16",
                              "DETECTOR_MIN_SIZE": "64", "DETECTOR_MAX_SIZE": "128", "DETECTOR_NUM_REGIONS": "7",
                              "MAX_IMAGE_PIXELS": "400000"})
    with caplog.at_level(logging.INFO, logger="service.worker.pipeline"):
        started = time.perf_counter()
        loaded = Pipeline.from_settings(settings)
        elapsed = time.perf_counter() - started
    extractor = loaded.extractor
    assert (extractor.min_size, extractor.max_size, extractor.num_regions) == (64, 128, 7)
    assert extractor.max_pixels == loaded.max_image_pixels == 400000
    # on CPU the detector stays fp32 (bf16 convolutions have no fast CPU kernels); ViLBERT takes the precision
    assert (extractor.precision, loaded.predictor.precision, str(loaded.predictor.device)) == ("fp32", "bf16", "cpu")
    assert loaded.tiny and loaded.names is not None
    packed = ", oneDNN-packed weights" if loaded.predictor.packed_weights else ""
    [message] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded detector")]
    took = re.fullmatch(rf"loaded detector {re.escape(extractor.identity)} \(fp32\) and ViLBERT \(bf16{packed}\) "
                        rf"from {re.escape(str(tiny_bundle))} on cpu in (\d+\.\d) s", message)
    assert took and float(took.group(1)) <= elapsed + 0.05, message
    result = loaded.run(InferenceRequest([photo(13, 640, 480)], "a", ["vqa"]))
    assert result["images"][0]["regions"] <= 7


def test_the_load_message_says_when_weights_are_packed(tiny_bundle, caplog):
    with caplog.at_level(logging.INFO, logger="service.worker.pipeline"):
        loaded = Pipeline.from_dir(tiny_bundle, device="cpu", precision="fp16", **SIZES)  # fp16 is never packed
    assert not loaded.predictor.packed_weights
    [message] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded detector")]
    assert f"(fp32) and ViLBERT (fp16) from {tiny_bundle} on cpu in " in message


def test_devices_and_the_detector_precision(monkeypatch):
    import torch

    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # no GPU on the test machines: say there is one
    assert resolve_device("auto") == "cuda"
    assert [detector_precision(p, "cpu") for p in ("fp32", "bf16", "fp16")] == ["fp32"] * 3
    assert [detector_precision(p, "cuda:0") for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]


def test_category_names_or_why_there_are_none(tiny_bundle, tmp_path, caplog):
    assert load_category_names(tiny_bundle, 1601).label(1) is not None
    with caplog.at_level(logging.WARNING, logger="service.worker.pipeline"):
        assert load_category_names(tmp_path, 1601) is None
        (tmp_path / CATEGORIES_FILE).write_text("{not json", encoding="utf-8")
        assert load_category_names(tmp_path, 1601) is None
    missing, broken = [r.getMessage() for r in caplog.records]
    assert missing == (f"{tmp_path} has no {CATEGORIES_FILE}: region labels are left out (null); "
                       "`python models/fetch.py` installs it")
    assert broken.startswith(f"region labels are left out (null): {tmp_path / CATEGORIES_FILE}")
    assert [r.levelname for r in caplog.records] == ["WARNING", "ERROR"]


def test_an_image_over_the_pixel_limit_is_refused_at_decode(tiny_bundle):
    small = Pipeline.from_dir(tiny_bundle, device="cpu", max_image_pixels=320 * 240 - 1, **SIZES)
    outcome = small.run_many([InferenceRequest([photo(14)], "x", ["vqa"])])[0]
    assert isinstance(outcome, PipelineError) and (outcome.code, outcome.stage) == ("image_too_large", DECODE)
    assert outcome.message.startswith("image 0: ")


def test_every_grounded_row_but_the_whole_image_has_its_box_label(pipeline):
    data = photo(16)
    regions = features_of(pipeline, data)
    result = pipeline.run(InferenceRequest([data], "the dog", ["refcoco"], top_k=len(regions.boxes) + 1))
    labels = {r["region"]: r["label"] for r in result["tasks"]["refcoco"]["regions"]}
    assert labels == {0: None, **{row: pipeline.names.label(int(class_id))
                                  for row, class_id in enumerate(regions.class_ids, 1)}}


def test_region_labels_need_a_grounding_row_of_a_detected_box(pipeline):
    assert pipeline.region_label(1) == pipeline.names.label(1) is not None
    without = Pipeline(pipeline.extractor, pipeline.predictor)
    assert without.region_label(1) is None and without.names is None and without.tiny is False
    result = without.run(InferenceRequest([photo(15)], "the dog", ["refcoco", "visual7w"], top_k=101,
                                          boxes=[[0, 0, 50, 50]]))
    assert {r["label"] for r in result["tasks"]["refcoco"]["regions"]} == {None}
    assert [c["label"] for c in result["tasks"]["visual7w"]["candidates"]] == [None]
    assert "notice" not in result["model"]
