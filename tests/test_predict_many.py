"""Predictor.predict_many: several requests in one forward give each request's own `predict` answers."""

from __future__ import annotations

import numpy as np
import pytest

from vilbert import ImageRegions, Predictor
from vilbert.predictor import PredictionInputError, PredictRequest
from vilbert.tiny import write_tiny_vilbert
from test_predictor import FEATURES, random_image as image  # noqa: E402  (same tests directory)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_vilbert(path, feature_dim=FEATURES)
    return Predictor.from_dir(path)


def assert_close(a, b, tol: float = 1e-5, path: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_close(a[key], b[key], tol, f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, tol, f"{path}[{i}]")
    elif isinstance(a, float):
        assert abs(a - b) <= tol, f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def test_batch_equals_each_request_alone_and_a_bad_request_fails_alone(predictor):
    requests = [
        PredictRequest([image(1)], "what is on the table?", ["vqa", "gqa", "refcoco"], top_k=3),
        PredictRequest([image(2, n=37)], "a long question with many more words than the first one has?",
                       ["vqa", "snli_ve"], top_k=2),  # another region count and text length: padding must not leak
        PredictRequest([image(3)], "bad", ["vqa"], top_k=1),  # replaced below by a wrong feature size
        PredictRequest([image(4), image(5)], "the left image has two dogs", ["nlvr2", "retrieval_coco"]),
        PredictRequest([image(6)], "x", ["vqa", "no_such_task"]),
        PredictRequest([image(7)], "the red one", ["refcocog"], candidates=[image(8, n=4)]),
        PredictRequest([image(9)], "which one is the cup?", ["visual7w"], candidates=[image(10, n=3)]),
    ]
    requests[2] = PredictRequest([ImageRegions(np.zeros((3, 4), np.float32), np.zeros((3, 7), np.float32), 9, 9)],
                                 "bad", ["vqa"])
    outcomes = predictor.predict_many(requests)
    assert len(outcomes) == len(requests)
    assert isinstance(outcomes[2], PredictionInputError) and outcomes[2].code == "feature_size"
    assert isinstance(outcomes[4], PredictionInputError) and outcomes[4].code == "unknown_task"
    assert outcomes[4].message.startswith("unknown task 'no_such_task'; known tasks: vqa, ")
    for index in (0, 1, 3, 5, 6):
        r = requests[index]
        alone = predictor.predict(r.images, r.text, r.tasks, top_k=r.top_k, candidates=r.candidates)
        assert_close(outcomes[index], alone)
    assert predictor.predict_many([]) == []
