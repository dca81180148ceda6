"""Predictor: input building as the reference, every decoder, batching, precision, and the task registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vilbert import ImageRegions, Predictor, TaskRegistry
from vilbert.answers import AnswerListError, load_answer_list
from vilbert.predictor import SLOW_CPU_PRECISION, PredictionInputError, PredictRequest, box_locations, region_rows
from vilbert.tasks import UnknownTaskError
from vilbert.tiny import write_tiny_vilbert

FEATURES = 64


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_vilbert(path, feature_dim=FEATURES)
    return path


@pytest.fixture(scope="module")
def predictor(bundle) -> Predictor:
    return Predictor.from_dir(bundle)


def random_image(seed: int, n: int = 100, width: int = 640, height: int = 480) -> ImageRegions:
    rng = np.random.default_rng(seed)
    x1, y1 = rng.uniform(0, width - 60, n), rng.uniform(0, height - 60, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(5, 60, n), y1 + rng.uniform(5, 60, n)], 1).astype(np.float32)
    return ImageRegions(boxes, rng.random((n, FEATURES), dtype=np.float32) * 3, width, height)


def candidates(seed: int, n: int = 4) -> ImageRegions:
    image = random_image(seed, n)
    return image


# ---------------------------------------------------------------------------------------------- registry


def test_registry_has_the_twelve_released_tasks():
    registry = TaskRegistry.from_file()
    ids = {task.name: task.task_id for task in registry}
    assert ids == {"vqa": 1, "genome_qa": 2, "visual7w": 4, "retrieval_coco": 7, "retrieval_flickr30k": 8,
                   "refcoco": 9, "refcoco_plus": 10, "refcocog": 11, "nlvr2": 12, "snli_ve": 13, "gqa": 15,
                   "guesswhat": 17}
    assert registry.get("nlvr2").accepts_image_count(2) and not registry.get("nlvr2").accepts_image_count(1)
    assert registry.get("retrieval_coco").accepts_image_count(5)
    assert registry.get("guesswhat").max_region_num == 306 and registry.get("vqa").max_seq_length == 23
    assert [t.name for t in registry.resolve(["gqa", " vqa", "gqa"])] == ["gqa", "vqa"]
    with pytest.raises(UnknownTaskError, match="unknown task 'foil'.*vqa"):
        registry.get("foil")
    assert registry.by_task_id(17).name == "guesswhat"
    assert json.dumps(registry.get("vqa").describe())


def test_the_tiny_model_sees_its_inputs(predictor):
    """Another text or another image must change the tiny model's answers by far more than any test's tolerance,
    or no test could tell whether a batch gave one request's text or image to another (vilbert/tiny.py)."""
    image = random_image(17)
    base = predictor.predict([image], "a dog sleeps", ["snli_ve"])["snli_ve"]["probabilities"]
    other_text = predictor.predict([image], "two men play chess on a bench in the park", ["snli_ve"])["snli_ve"]
    other_image = predictor.predict([random_image(18)], "a dog sleeps", ["snli_ve"])["snli_ve"]
    for other in (other_text["probabilities"], other_image["probabilities"]):
        assert max(abs(base[label] - other[label]) for label in base) > 1e-3, (base, other)


# ---------------------------------------------------------------------------------------------- inputs


def test_region_rows_as_the_reference_reader():
    image = random_image(0, n=3, width=200, height=100)
    rows = region_rows(image)
    assert rows.features.shape == (4, FEATURES)
    np.testing.assert_allclose(rows.features[0], image.features.mean(0), rtol=1e-6)
    np.testing.assert_array_equal(rows.spatials[0], [0, 0, 1, 1, 1])
    x1, y1, x2, y2 = image.boxes[1]
    np.testing.assert_allclose(rows.spatials[2], [x1 / 200, y1 / 100, x2 / 200, y2 / 100, (x2 - x1) * (y2 - y1) / 20000], rtol=1e-6)
    np.testing.assert_array_equal(rows.boxes[0], [0, 0, 200, 100])
    # at most 100 boxes after the global region
    assert region_rows(random_image(1, n=150)).features.shape[0] == 101


def test_region_rows_with_candidates_put_them_last_and_merge_the_global_feature():
    image, cand = random_image(0, n=5), candidates(1, n=3)
    rows = region_rows(image, max_regions=200, candidates=cand)
    assert rows.features.shape[0] == 1 + 5 + 3 and rows.num_candidates == 3
    np.testing.assert_array_equal(rows.boxes[-3:], cand.boxes)
    expected = (image.features.mean(0) * 6 + cand.features.mean(0) * 4) / 10
    np.testing.assert_allclose(rows.features[0], expected, rtol=1e-6)


def test_box_locations_area():
    loc = box_locations(np.array([[0, 0, 50, 20]]), 100, 40)
    np.testing.assert_allclose(loc, [[0, 0, 0.5, 0.5, 0.25]])
    assert loc.dtype == np.float32  # from integer (or float64) boxes too


def test_every_region_row_has_the_reference_location():
    image = random_image(2, n=5, width=320, height=240)
    rows = region_rows(image)
    expected = [[0, 0, 1, 1, 1]] + [[x1 / 320, y1 / 240, x2 / 320, y2 / 240, (x2 - x1) * (y2 - y1) / (320 * 240)]
                                    for x1, y1, x2, y2 in image.boxes.tolist()]
    np.testing.assert_allclose(rows.spatials, expected, rtol=1e-6)
    np.testing.assert_array_equal(rows.boxes[1:], image.boxes)


def test_region_rows_are_float32_whatever_the_input_precision():
    def float64(regions: ImageRegions) -> ImageRegions:
        return ImageRegions(regions.boxes.astype(np.float64), regions.features.astype(np.float64),
                            regions.image_width, regions.image_height)

    rows = region_rows(float64(random_image(3, n=4)), candidates=float64(candidates(4, n=2)))
    assert rows.features.dtype == rows.spatials.dtype == rows.boxes.dtype == np.float32


def test_candidates_take_the_last_rows_and_detected_boxes_give_way():
    image, cand = random_image(5, n=100), candidates(6, n=4)
    rows = region_rows(image, candidates=cand)  # 101 rows in all, as the pointing tasks' feature files
    assert len(rows.features) == 101 and rows.num_candidates == 4
    np.testing.assert_array_equal(rows.boxes[1:97], image.boxes[:96])
    np.testing.assert_array_equal(rows.boxes[97:], cand.boxes)


@pytest.mark.parametrize("features,boxes", [
    (np.zeros(4, np.float32), np.zeros((4, 4), np.float32)),  # features of one dimension
    (np.zeros((2, FEATURES), np.float32), np.zeros((3, 4), np.float32)),  # counts differ
    (np.zeros((0, FEATURES), np.float32), np.zeros((0, 4), np.float32)),  # none at all
], ids=["one-dimensional", "counts differ", "empty"])
def test_unusable_regions_are_refused(features, boxes):
    with pytest.raises(PredictionInputError) as caught:
        region_rows(ImageRegions(boxes, features, 10, 10))
    assert (caught.value.code, str(caught.value)) == (
        "invalid_regions", "region features and boxes must be non-empty and of equal count")


# ---------------------------------------------------------------------------------------------- decoders


def direct_forward(predictor: Predictor, image: ImageRegions, text: str, task_name: str):
    """The model run by hand, without the predictor's batching, as the oracle for the decoders."""
    task = predictor.tasks.get(task_name)
    encoded = predictor.tokenizer.encode(text, task.max_seq_length)
    rows = region_rows(image)
    r = len(rows.features)
    with torch.inference_mode():
        return predictor.model(
            input_ids=torch.tensor([encoded.input_ids]),
            features=torch.from_numpy(rows.features)[None],
            spatials=torch.from_numpy(rows.spatials)[None],
            token_type_ids=torch.zeros(1, len(encoded.input_ids), dtype=torch.long),
            attention_mask=torch.tensor([encoded.attention_mask]),
            image_attention_mask=torch.ones(1, r, dtype=torch.long),
            task_ids=torch.tensor([[task.task_id]]),
        )


@pytest.mark.parametrize("task_name,head,answers", [("vqa", "vil_prediction", "vqa"), ("gqa", "vil_prediction_gqa", "gqa"),
                                                    ("genome_qa", "vil_prediction", "vqa")])
def test_answer_decoder(predictor, task_name, head, answers):
    image = random_image(3)
    result = predictor.predict([image], "what is on the table?", [task_name], top_k=5)[task_name]
    probs = torch.softmax(getattr(direct_forward(predictor, image, "what is on the table?", task_name), head)[0], -1)
    top = probs.topk(5)
    assert [a["answer"] for a in result["answers"]] == [predictor.answers[answers][i] for i in top.indices.tolist()]
    np.testing.assert_allclose([a["probability"] for a in result["answers"]], top.values.numpy(), atol=2e-6)


def test_entailment_decoder(predictor):
    image = random_image(4)
    result = predictor.predict([image], "a dog sleeps", ["snli_ve"])["snli_ve"]
    probs = torch.softmax(direct_forward(predictor, image, "a dog sleeps", "snli_ve").vil_tri_prediction[0], -1)
    labels = ["contradiction", "neutral", "entailment"]
    assert result["label"] == labels[int(probs.argmax())]
    np.testing.assert_allclose([result["probabilities"][l] for l in labels], probs.numpy(), atol=2e-6)


def test_nlvr2_decoder_pairs_two_images(predictor):
    left, right = random_image(5), random_image(6)
    result = predictor.predict([left, right], "both images show two dogs", ["nlvr2"])["nlvr2"]
    pooled = torch.cat([direct_forward(predictor, img, "both images show two dogs", "nlvr2").pooled_output for img in (left, right)])
    with torch.inference_mode():
        probs = torch.softmax(predictor.model.vil_binary_prediction(pooled.reshape(1, -1))[0], -1)
    assert result["label"] == ["false", "true"][int(probs.argmax())]
    np.testing.assert_allclose([result["probabilities"]["false"], result["probabilities"]["true"]], probs.numpy(), atol=2e-6)
    assert result["probability"] == result["probabilities"][result["label"]]
    swapped = predictor.predict([right, left], "both images show two dogs", ["nlvr2"])["nlvr2"]
    assert swapped["probabilities"] != result["probabilities"]  # the pair is ordered: left image, right image
    with pytest.raises(PredictionInputError, match="needs 2 images"):
        predictor.predict([left], "x", ["nlvr2"])


def test_retrieval_ranks_images_by_score(predictor):
    images = [random_image(s) for s in (7, 8, 9)]
    result = predictor.predict(images, "a man riding a horse", ["retrieval_coco"])["retrieval_coco"]
    direct = [float(direct_forward(predictor, img, "a man riding a horse", "retrieval_coco").vil_logit) for img in images]
    np.testing.assert_allclose(result["scores"], direct, atol=2e-6)
    assert result["ranking"] == sorted(range(3), key=lambda i: -direct[i])
    assert abs(sum(result["probabilities"]) - 1) < 1e-5
    same = [random_image(7)] * 5  # equal scores keep the order they were given in
    assert predictor.predict(same, "a man riding a horse", ["retrieval_coco"])["retrieval_coco"]["ranking"] == [0, 1, 2, 3, 4]


def test_grounding_returns_pixel_boxes_of_top_regions(predictor):
    image = random_image(10)
    result = predictor.predict([image], "the red car", ["refcoco"], top_k=3)["refcoco"]
    logits = direct_forward(predictor, image, "the red car", "refcoco").vision_logit[0, :, 0]
    top = torch.softmax(logits, -1).topk(3)
    all_boxes = np.concatenate([[[0, 0, image.image_width, image.image_height]], image.boxes])
    for entry, index, prob in zip(result["regions"], top.indices.tolist(), top.values.tolist()):
        assert entry["region"] == index
        np.testing.assert_allclose(entry["box"], all_boxes[index], atol=0.01)
        assert abs(entry["score"] - prob) < 2e-6


def test_pointing_scores_the_candidates(predictor):
    image, cand = random_image(11), candidates(12, n=4)
    result = predictor.predict([image], "which one is the cup?", ["visual7w"], candidates=[cand])["visual7w"]
    assert len(result["candidates"]) == 4
    np.testing.assert_allclose([c["box"] for c in result["candidates"]], cand.boxes, atol=0.01)
    scores = [c["score"] for c in result["candidates"]]
    assert abs(sum(scores) - 1) < 1e-5 and result["best"] == int(np.argmax(scores))
    with pytest.raises(PredictionInputError, match="candidate boxes"):
        predictor.predict([image], "x", ["guesswhat"])
    with pytest.raises(PredictionInputError, match="at most 99"):
        predictor.predict([image], "x", ["visual7w"], candidates=[candidates(1, n=120)])


def test_labels_follow_the_most_probable_class(predictor):
    seen = {"nlvr2": set(), "snli_ve": set()}
    for seed in range(20, 26):
        pair = [random_image(seed), random_image(seed + 100)]
        for text in ("two dogs", "the left image shows more birds than the right one"):
            answer = predictor.predict(pair, text, ["nlvr2", "snli_ve"])
            for name in seen:
                probabilities = answer[name]["probabilities"]
                assert list(probabilities) == list(predictor.tasks.get(name).labels)
                assert answer[name]["label"] == max(probabilities, key=probabilities.get)
                seen[name].add(answer[name]["label"])
    # a decoder that always named the first class would fail here
    assert seen["nlvr2"] != {"false"} and seen["snli_ve"] != {"contradiction"}, seen


def assert_rounded(answer, key: str = "") -> None:
    """Scores and probabilities to 6 decimals, pixel boxes to 2, as docs/API.md says."""
    if isinstance(answer, dict):
        for name, value in answer.items():
            assert_rounded(value, name)
    elif isinstance(answer, list):
        for value in answer:
            assert_rounded(value, key)
    elif isinstance(answer, float):
        assert round(answer, 2 if key == "box" else 6) == answer, (key, answer)


def test_all_tasks_in_one_call_equal_each_task_alone(predictor):
    images = [random_image(13), random_image(14)]
    cand = [candidates(15), None]
    names = predictor.tasks.names
    together = predictor.predict(images, "is there a dog?", names, top_k=3, candidates=cand)
    assert list(together) == names
    assert {name: answer["task_id"] for name, answer in together.items()} == {
        task.name: task.task_id for task in predictor.tasks}
    assert_rounded(together)
    for name in names:
        alone = predictor.predict(images, "is there a dog?", [name], top_k=3, candidates=cand)[name]
        assert json.dumps(alone, sort_keys=True) == json.dumps(together[name], sort_keys=True) or _close(alone, together[name])


def _close(a, b, tol=1e-5) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) <= tol
    return a == b


def test_bad_inputs_are_clear_errors(predictor):
    image = random_image(0)
    no_boxes = ImageRegions(np.zeros((0, 4), np.float32), np.zeros((0, FEATURES), np.float32), 10, 10)
    cases = [
        ([image], [], {}, "no_tasks", "no task requested"),
        ([], ["vqa"], {}, "no_images", "at least one image is required"),
        ([ImageRegions(np.zeros((2, 4), np.float32), np.zeros((2, 10), np.float32), 10, 10)], ["vqa"], {},
         "feature_size", "region features have 10 dimensions, the model expects 64"),
        ([ImageRegions(np.zeros((2, 4), np.float32), np.zeros((1, 2, 10), np.float32), 10, 10)], ["vqa"], {},
         "feature_size", "region features have 10 dimensions, the model expects 64"),
        ([ImageRegions(np.zeros((1, 4), np.float32), np.zeros(FEATURES, np.float32), 10, 10)], ["vqa"], {},
         "invalid_regions", "region features and boxes must be non-empty and of equal count"),
        ([image], ["nlvr2"], {}, "image_count", "task nlvr2 needs 2 images, got 1"),
        ([image], ["visual7w"], {}, "missing_candidates", "task visual7w needs candidate boxes"),
        ([image], ["visual7w"], {"candidates": [no_boxes]}, "missing_candidates", "task visual7w needs candidate boxes"),
        ([image], ["visual7w"], {"candidates": [candidates(1, n=100)]}, "too_many_candidates",
         "task visual7w takes at most 99 candidate boxes"),
    ]
    for images, tasks, extra, code, message in cases:
        with pytest.raises(PredictionInputError) as caught:
            predictor.predict(images, "x", tasks, **extra)
        assert (caught.value.code, str(caught.value)) == (code, message)
    with pytest.raises(UnknownTaskError):
        predictor.predict([image], "x", ["vqa", "foil"])
    for count in (1, 99):  # the bounds themselves are accepted
        answer = predictor.predict([image], "x", ["visual7w"], candidates=[candidates(2, n=count)])["visual7w"]
        assert len(answer["candidates"]) == count


def test_a_forward_pads_and_masks_text_and_regions(predictor):
    """`forward` itself pads rows of different text lengths and region counts; each row's heads equal its own
    forward alone (the served path groups rows by region count, but forward must not rely on that)."""
    short = predictor._plan([random_image(1, n=10)], "a dog", ["vqa"], None)[1]
    long = predictor._plan([random_image(2, n=30)], "a dog sleeping on a sofa next to a cat", ["vqa"], None)[1]
    together = predictor.forward(short + long)
    for position, row in enumerate(short + long):
        alone = predictor.forward([row])
        for head in ("vil_prediction", "vil_logit", "vil_tri_prediction", "pooled_output"):
            torch.testing.assert_close(getattr(together, head)[position], getattr(alone, head)[0], rtol=0, atol=1e-5)


def test_defaults_three_answers(predictor):
    assert len(predictor.predict([random_image(1)], "what is this?", ["vqa"])["vqa"]["answers"]) == 3


def test_one_forward_per_region_count(predictor, monkeypatch):
    forwards = []
    run = predictor.forward

    def counting(rows):
        forwards.append((sorted({len(row.regions.features) for row in rows}), len(rows)))
        return run(rows)

    monkeypatch.setattr(predictor, "forward", counting)
    predictor.predict_many([PredictRequest([random_image(1, n=10)], "a", ["vqa", "snli_ve"]),
                            PredictRequest([random_image(2, n=20)], "b", ["vqa"]),
                            PredictRequest([random_image(3, n=10)], "c", ["gqa"])])
    assert sorted(forwards) == [([11], 3), ([21], 1)]  # no region padding inside a forward


def test_bf16_stays_close_to_fp32(bundle, predictor):
    from vilbert.cpu_inference import native_bf16_linear_available

    bf16 = Predictor.from_dir(bundle, precision="bf16")
    # weights packed in bf16 only where the CPU has native bf16 instructions; autocast over nn.Linear elsewhere
    assert bf16.packed_weights == native_bf16_linear_available()
    unpacked = Predictor.from_dir(bundle, precision="bf16", pack_cpu_weights=False)
    assert not unpacked.packed_weights
    image = random_image(16)
    a = predictor.predict([image], "what sport is this?", ["vqa", "snli_ve"], top_k=1)
    for other in (bf16, unpacked):
        b = other.predict([image], "what sport is this?", ["vqa", "snli_ve"], top_k=1)
        for label in ("contradiction", "neutral", "entailment"):
            assert abs(a["snli_ve"]["probabilities"][label] - b["snli_ve"]["probabilities"][label]) < 0.02
    with pytest.raises(ValueError, match="precision"):
        Predictor.from_dir(bundle, precision="int3")


def packed_dtypes(predictor: Predictor) -> set[torch.dtype]:
    from vilbert.cpu_inference import PackedLinear

    return {module.dtype for module in predictor.model.modules() if isinstance(module, PackedLinear)}


def test_weights_are_packed_as_the_cpu_allows(bundle):
    from vilbert.answers import load_bundle_answers
    from vilbert.checkpoint import load_model
    from vilbert.configuration import ViLBertConfig
    from vilbert.cpu_inference import native_bf16_linear_available, onednn_linear_available
    from vilbert.tokenization import Tokenizer

    model = load_model(bundle / "multi_task_model.bin", ViLBertConfig.from_json_file(bundle / "vilbert_config.json"),
                       device="cpu")
    default = Predictor(model, Tokenizer(bundle / "vocab.txt"), load_bundle_answers(bundle))
    assert (default.device, default.precision) == (torch.device("cpu"), "fp32")
    assert default.packed_weights is onednn_linear_available()
    assert packed_dtypes(default) == ({torch.float32} if onednn_linear_available() else set())
    bf16 = Predictor.from_dir(bundle, precision="bf16")
    assert bf16.packed_weights is native_bf16_linear_available()
    assert packed_dtypes(bf16) == ({torch.bfloat16} if native_bf16_linear_available() else set())
    for precision in ("fp32", "bf16", "fp16"):
        unpacked = Predictor.from_dir(bundle, precision=precision, pack_cpu_weights=False)
        assert unpacked.packed_weights is False and packed_dtypes(unpacked) == set()


def test_a_bundle_without_config_or_vocab_uses_the_packaged_ones(tmp_path, bundle, monkeypatch):
    import shutil

    import vilbert.predictor
    from vilbert.tokenization import PACKAGED_VOCAB

    assert Predictor.from_dir(bundle).tokenizer.vocab_path == bundle / "vocab.txt"
    bare = tmp_path / "bare"
    shutil.copytree(bundle, bare, ignore=shutil.ignore_patterns("vilbert_config.json", "vocab.txt"))
    # The released bundle has no config: the packaged one (full size) applies. Here the tiny one stands in for it.
    packaged = tmp_path / "packaged.json"
    shutil.copyfile(bundle / "vilbert_config.json", packaged)
    monkeypatch.setattr(vilbert.predictor, "PACKAGED_CONFIG", packaged)
    predictor = Predictor.from_dir(bare)
    assert predictor.tokenizer.vocab_path == PACKAGED_VOCAB and predictor.feature_dim == FEATURES


def test_slow_cpu_precisions_are_warned_about(bundle, caplog):
    from vilbert.cpu_inference import native_bf16_linear_available

    with caplog.at_level("WARNING", logger="vilbert.predictor"):
        Predictor.from_dir(bundle, precision="fp32")
        assert not caplog.records
        Predictor.from_dir(bundle, precision="fp16")
        assert [record.getMessage() for record in caplog.records] == [
            "precision fp16 on this CPU runs slower than fp32 (it lacks native fp16 instructions): "
            f"{SLOW_CPU_PRECISION['fp16']}. On CPU use PRECISION=fp32, or bf16 where the CPU has AVX512-BF16 or AMX"]
        caplog.clear()
        Predictor.from_dir(bundle, precision="bf16")
        assert ("bf16 on this CPU runs slower" in caplog.text) != native_bf16_linear_available()


def test_bundle_errors(tmp_path, bundle):
    with pytest.raises(FileNotFoundError, match="make_tiny.py"):
        Predictor.from_dir(tmp_path)
    (tmp_path / "a.json").write_text(json.dumps(["x"] * 10))
    with pytest.raises(AnswerListError, match="10 answers, the model's head has 3129"):
        load_answer_list(tmp_path / "a.json", 3129)
    (tmp_path / "b.json").write_text(json.dumps({"0": "yes"}))
    with pytest.raises(AnswerListError, match="list of answer strings"):
        load_answer_list(tmp_path / "b.json", 1)
