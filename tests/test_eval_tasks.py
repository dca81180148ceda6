"""eval_tasks.py: each metric against values computed by hand, both on small arrays and end to end, where the
expected value comes from the service's own Predictor run on the same fixtures plus hand arithmetic."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

import eval_tasks
from vilbert import Predictor
from vilbert.tiny import write_tiny_vilbert
from vilbert_train import metrics, synthetic
from vilbert_train.annotations import read_refer, read_retrieval, read_snli_ve, read_visual7w
from vilbert_train.features import open_features
from vilbert_train.specs import SPECS

DIM = 16


# ------------------------------------------------------------------------------------------ metric functions


def test_vqa_score_by_hand():
    logits = np.array([[0.1, 2.0, 0.3], [5.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    targets = np.array([[0.0, 0.3, 1.0], [1.0, 0.0, 0.0], [0.6, 0.0, 0.0]])
    assert metrics.vqa_score(logits, targets) == pytest.approx((0.3 + 1.0 + 0.0) / 3)


def test_grounding_accuracy_uses_iou_above_half_with_the_plus_one_convention():
    predicted = np.array([[0, 0, 9, 9], [0, 0, 9, 9], [0, 0, 9, 9]])
    truth = np.array([[0, 0, 9, 9], [5, 0, 14, 9], [0, 0, 9, 4]])
    # IoUs: 1; 50 / 150; 50 / 100 = 0.5 exactly, which is not > 0.5
    np.testing.assert_allclose(metrics.box_iou(predicted, truth), [1.0, 1 / 3, 0.5])
    assert metrics.grounding_accuracy(predicted, truth) == pytest.approx(1 / 3)


def test_retrieval_recall_by_hand():
    scores = np.zeros((3, 12))
    scores[0] = np.arange(12)[::-1]  # caption 0's image (col 0) is ranked 1st
    scores[1] = np.arange(12)  # image 9 has 2 better (10, 11): rank 3
    scores[2] = np.arange(12)  # image 5 has 6 better: rank 7
    result = metrics.retrieval_recall(scores, np.array([0, 9, 5]))
    assert result == pytest.approx({"R@1": 1 / 3, "R@5": 2 / 3, "R@10": 1.0, "median_rank": 3.0, "mean_rank": 11 / 3})


def test_server_formats():
    answers = ["yes", "no", "two"]
    assert metrics.vqa_predictions([5, 7], np.array([2, 0]), answers) == [
        {"question_id": 5, "answer": "two"}, {"question_id": 7, "answer": "yes"}]
    assert metrics.gqa_predictions(["201", "202"], np.array([1, 1]), answers) == [
        {"questionId": "201", "prediction": "no"}, {"questionId": "202", "prediction": "no"}]


# ------------------------------------------------------------------------------------------------ end to end


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("eval")
    write_tiny_vilbert(work / "tiny", feature_dim=DIM, seed=3)
    root = work / "datasets"
    synthetic.write_vqa(root, DIM)
    synthetic.write_gqa(root, DIM)
    synthetic.write_snli_ve(root, DIM)
    synthetic.write_retrieval(root, DIM, 7)
    synthetic.write_refcoco(root, DIM)
    synthetic.write_visual7w(root, DIM)
    predictor = Predictor.from_dir(work / "tiny", pack_cpu_weights=False)
    return work, root, predictor


def run_eval(work: Path, root: Path, tasks: str, split: str | None = None) -> Path:
    args = ["--bert_model", "bert-base-uncased", "--from_pretrained", str(work / "tiny" / "multi_task_model.bin"),
            "--tasks", tasks, "--data_root", str(root), "--output_dir", str(work / "results"), "--batch_size", "5"]
    assert eval_tasks.main(args + (["--split", split] if split else [])) == 0
    return work / "results" / "multi_task_model"


def test_vqa_soft_score_matches_hand_computation(setup):
    work, root, predictor = setup
    reader = open_features(root / SPECS[1].features)
    questions = json.loads((root / "VQA" / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    answers = json.loads((work / "tiny" / "vqa_answers.json").read_text())
    # Rewrite the targets around what the model answers: 1.0 for every third question, 0.3 for the next, 0 else.
    targets, expected = [], []
    for k, q in enumerate(questions):
        top = predictor.predict([reader[str(q["image_id"])]], q["question"], ["vqa"])["vqa"]["answers"][0]
        chosen = answers.index(top["answer"])
        other = (chosen + 1) % 3129
        score = (1.0, 0.3, 0.0)[k % 3]
        targets.append({"question_id": q["question_id"], "image_id": q["image_id"],
                        "labels": [chosen, other] if score else [other], "scores": [score, 0.9] if score else [0.9]})
        expected.append(score)
    (root / "VQA" / "cache" / "val_target.pkl").write_bytes(pickle.dumps(targets))
    out = run_eval(work, root, "1")  # minval = the last 3000 of val (all 12 here)
    result = json.loads((out / "vqa_minval_metrics.json").read_text())
    assert result["examples"] == 12
    assert result["vqa_score"] == pytest.approx(np.mean(expected))  # (4 x 1.0 + 4 x 0.3) / 12
    server = json.loads((out / "vqa_minval_result.json").read_text())
    assert [p["question_id"] for p in server] == [q["question_id"] for q in questions]
    assert all(set(p) == {"question_id", "answer"} for p in server)


def test_vqa_and_gqa_test_splits_write_server_files(setup):
    work, root, predictor = setup
    out = run_eval(work, root, "vqa-gqa", "test")
    vqa = json.loads((out / "vqa_test_result.json").read_text())
    gqa = json.loads((out / "gqa_test_result.json").read_text())
    assert [p["question_id"] for p in vqa] == [9000, 9001, 9002]
    gqa_questions = json.loads((root / "gqa" / "testdev_balanced_questions.json").read_text())
    reader = open_features(root / SPECS[15].features)
    for entry in gqa:
        q = gqa_questions[entry["questionId"]]
        top = predictor.predict([reader[q["imageId"]]], q["question"], ["gqa"])["gqa"]["answers"][0]["answer"]
        assert entry["prediction"] == top
    assert "vqa_score" not in json.loads((out / "vqa_test_metrics.json").read_text())  # no answers on test


def test_snli_ve_accuracy_matches_hand_computation(setup):
    work, root, predictor = setup
    reader = open_features(root / SPECS[13].features)
    examples = read_snli_ve(root / "visual_entailment", "dev")
    predicted = [predictor.predict([reader[e.image_ids[0]]], e.text, ["snli_ve"])["snli_ve"]["label"] for e in examples]
    labels = [("contradiction", "neutral", "entailment")[e.labels[0]] for e in examples]
    expected = sum(p == t for p, t in zip(predicted, labels)) / len(labels)
    result = json.loads((run_eval(work, root, "13") / "snli_ve_dev_metrics.json").read_text())
    assert result["accuracy"] == pytest.approx(expected)


def test_grounding_accuracy_matches_hand_computation(setup):
    work, root, predictor = setup
    reader = open_features(root / SPECS[9].features)
    examples = read_refer(root / "refcoco", "refcoco", "val")
    hits = []
    for e in examples:
        box = predictor.predict([reader[e.image_ids[0]]], e.text, ["refcoco"], top_k=1)["refcoco"]["regions"][0]["box"]
        x1, y1, x2, y2 = box
        gx1, gy1, gx2, gy2 = e.box
        iw = min(x2, gx2) - max(x1, gx1) + 1
        ih = min(y2, gy2) - max(y1, gy1) + 1
        inter = max(iw, 0) * max(ih, 0)
        union = (x2 - x1 + 1) * (y2 - y1 + 1) + (gx2 - gx1 + 1) * (gy2 - gy1 + 1) - inter
        hits.append(inter / union > 0.5)
    result = json.loads((run_eval(work, root, "refcoco") / "refcoco_val_metrics.json").read_text())
    assert result["accuracy_iou>0.5"] == pytest.approx(np.mean(hits))


def test_retrieval_recall_matches_hand_ranking(setup):
    work, root, predictor = setup
    reader = open_features(root / SPECS[7].features)
    data = read_retrieval(root / "cocoRetreival", "val", coco=True)
    images = [reader[i] for i in data.image_ids]
    ranks = []
    for e in data.examples:
        scores = predictor.predict(images, e.text, ["retrieval_coco"])["retrieval_coco"]["scores"]
        own = scores[data.image_ids.index(e.image_ids[0])]
        ranks.append(1 + sum(s > own for s in scores))  # (scores differ by >1e-5 here: rounding to 6 places is safe)
    result = json.loads((run_eval(work, root, "7") / "retrieval_coco_val_metrics.json").read_text())
    assert result["examples"] == 12
    for k in (1, 5, 10):
        assert result[f"R@{k}"] == pytest.approx(np.mean([r <= k for r in ranks]))
    assert result["mean_rank"] == pytest.approx(np.mean(ranks))


def test_visual7w_pointing_accuracy_matches_hand_computation(setup):
    work, root, predictor = setup
    reader, gt = open_features(root / SPECS[4].features), open_features(root / SPECS[4].gt_features)
    examples = read_visual7w(root / "visual7w", "val")
    hits = []
    for e in examples:
        candidates = gt[e.image_ids[0]]  # this fixture's ground-truth file holds exactly the four candidates
        np.testing.assert_allclose(candidates.boxes, e.candidates, atol=1e-3)
        best = predictor.predict([reader[e.image_ids[0]]], e.text, ["visual7w"], candidates=[candidates])["visual7w"]["best"]
        hits.append(best == e.answer_index)
    result = json.loads((run_eval(work, root, "4") / "visual7w_val_metrics.json").read_text())
    assert result["accuracy"] == pytest.approx(np.mean(hits))


def test_missing_checkpoint_and_data_are_named(setup, tmp_path, capsys):
    work, root, _ = setup
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        eval_tasks.main(["--from_pretrained", str(tmp_path / "none.bin"), "--tasks", "1"])
    assert eval_tasks.main(["--from_pretrained", str(work / "tiny"), "--tasks", "12", "--data_root", str(tmp_path)]) == 2
    assert str(tmp_path / "nlvr2" / "dev.json") in capsys.readouterr().err
