"""Predictor: input building as the reference, every decoder, batching, precision, and the task registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vilbert import ImageRegions, Predictor, TaskRegistry
from vilbert.answers import AnswerListError, load_answer_list
from vilbert.predictor import PredictionInputError, box_locations, region_rows
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


def test_all_tasks_in_one_call_equal_each_task_alone(predictor):
    images = [random_image(13), random_image(14)]
    cand = [candidates(15), None]
    names = predictor.tasks.names
    together = predictor.predict(images, "is there a dog?", names, top_k=3, candidates=cand)
    assert list(together) == names
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
    with pytest.raises(PredictionInputError, match="feature"):
        predictor.predict([ImageRegions(np.zeros((2, 4), np.float32), np.zeros((2, 10), np.float32), 10, 10)], "x", ["vqa"])
    with pytest.raises(UnknownTaskError):
        predictor.predict([random_image(0)], "x", ["vqa", "foil"])
    with pytest.raises(PredictionInputError, match="no task"):
        predictor.predict([random_image(0)], "x", [])


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


def test_slow_cpu_precisions_are_warned_about(bundle, caplog):
    from vilbert.cpu_inference import native_bf16_linear_available

    with caplog.at_level("WARNING", logger="vilbert.predictor"):
        Predictor.from_dir(bundle, precision="fp32")
        assert not caplog.records
        Predictor.from_dir(bundle, precision="fp16")
        assert "fp16 on this CPU runs slower than fp32" in caplog.text
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
