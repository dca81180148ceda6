"""Predictor.score_images, the scorer of a collection search: one text against many images with the text side
computed once and broadcast. The contract is equal results: each image's score equals the `retrieval_coco`
(or `retrieval_flickr30k`) score that a normal job gives for the same image and text."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vilbert import ImageRegions, Predictor
from vilbert.configuration import ViLBertConfig
from vilbert.modeling import ViLBertForVLTasks
from vilbert.predictor import PredictionInputError
from vilbert.tiny import write_tiny_vilbert
from test_predictor import FEATURES, random_image as image  # noqa: E402  (same tests directory)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    path = tmp_path_factory.mktemp("tiny-score")
    write_tiny_vilbert(path, feature_dim=FEATURES)
    return Predictor.from_dir(path)


def job_score(predictor: Predictor, text: str, regions, task: str) -> float:
    """What a normal job answers for one image: the retrieval task's score, unrounded."""
    rows = predictor._plan([regions], text, [task], None)[1]
    return float(predictor._run(rows)[0]["vil_logit"])


@pytest.mark.parametrize("task", ["retrieval_coco", "retrieval_flickr30k"])
def test_each_score_equals_the_job_score_for_that_image(predictor, task):
    images = [image(seed, n=n) for seed, n in zip(range(10, 19), (100, 37, 5, 100, 1, 64, 100, 12, 100))]
    text = "a dog catching a frisbee in the park"
    expected = np.array([job_score(predictor, text, regions, task) for regions in images])
    for batch_size in (1, 4, 64):  # padding to the longest in a batch must not leak into the shorter rows
        scores = predictor.score_images(text, images, task, batch_size=batch_size)
        assert scores.dtype == np.float32 and scores.shape == (9,)
        np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)
    # and equal to the rounded scores of one job over several images, as the API reports them
    answered = predictor.predict(images[:3], text, [task])[task]["scores"]
    np.testing.assert_allclose(predictor.score_images(text, images[:3], task), answered, atol=2e-6)


def test_the_text_side_is_computed_once_and_other_texts_score_differently(predictor):
    images = [image(seed) for seed in range(3)]
    calls = []
    handle = predictor.model.bert.embeddings.register_forward_hook(lambda *args: calls.append(args[2].shape[0]))
    try:
        predictor.score_images("one caption", images, batch_size=1)
    finally:
        handle.remove()
    assert calls == [1]  # one text embedding for three images in three forwards
    a = predictor.score_images("one caption", images)
    b = predictor.score_images("a completely different caption about trains", images)
    assert not np.allclose(a, b)


def test_bad_inputs(predictor):
    nothing = predictor.score_images("x", [])
    assert nothing.shape == (0,) and nothing.dtype == np.float32
    with pytest.raises(PredictionInputError) as caught:
        predictor.score_images("x", [image(1)], task="vqa")
    assert (caught.value.code, caught.value.message) == (
        "unknown_task", "task vqa does not score images; use a retrieval task")
    wrong = ImageRegions(np.zeros((3, 4), np.float32), np.zeros((3, 7), np.float32), 9, 9)
    with pytest.raises(PredictionInputError) as caught:
        predictor.score_images("x", [image(1), wrong])
    assert (caught.value.code, caught.value.message) == (
        "feature_size", "region features have 7 dimensions, the model expects 64")
    stacked = ImageRegions(np.zeros((3, 4), np.float32), np.zeros((1, 3, 7), np.float32), 9, 9)
    with pytest.raises(PredictionInputError) as caught:
        predictor.score_images("x", [stacked])
    assert caught.value.message == "region features have 7 dimensions, the model expects 64"
    flat = ImageRegions(np.zeros((1, 4), np.float32), np.zeros(FEATURES, np.float32), 9, 9)
    with pytest.raises(PredictionInputError) as caught:
        predictor.score_images("x", [flat])
    assert caught.value.code == "invalid_regions"
    with pytest.raises(ValueError) as caught:
        predictor.score_images("x", [image(1)], batch_size=0)
    assert str(caught.value) == "batch_size must be at least 1"


def test_the_encoder_continues_from_the_text_prefix_exactly():
    torch.manual_seed(0)
    config = ViLBertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                           intermediate_size=32, v_feature_size=8, v_hidden_size=16, v_num_hidden_layers=3,
                           v_num_attention_heads=2, v_intermediate_size=32, bi_hidden_size=16,
                           bi_num_attention_heads=2, t_biattention_id=[2, 3], v_biattention_id=[1, 2],
                           task_specific_tokens=True)
    model = ViLBertForVLTasks(config).eval()
    assert model.bert.encoder.text_only_layers == 2
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    features, spatials = torch.randn(3, 6, 8), torch.rand(3, 6, 5)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.inference_mode():
        full = model(ids.expand(3, -1), features, spatials, image_attention_mask=mask, task_ids=torch.ones(3, 1,
                                                                                                            dtype=torch.long))
        prefix = model.bert.encode_text(ids, torch.zeros_like(ids), torch.ones_like(ids), torch.ones(1, 1,
                                                                                                     dtype=torch.long))
        assert prefix.layers_done == 2 and prefix.states.shape[0] == 1
        shared = model.retrieval_logits(prefix, features, spatials, mask)
        with pytest.raises(ValueError, match="text-only layers"):
            model.bert.encoder(prefix.states, torch.zeros(1, 6, 16), prefix.mask, torch.zeros(1, 1, 1, 6), text_done=3)
    torch.testing.assert_close(shared, full.vil_logit[:, 0], rtol=0, atol=1e-6)
