"""The paper's metrics, as plain functions of model scores and targets (numpy in, Python floats out)."""

from __future__ import annotations

import numpy as np


def vqa_score(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean soft score of the top answer: target[argmax] per question (VQA/GQA/Genome QA accuracy)."""
    logits, targets = np.asarray(logits), np.asarray(targets)
    if len(logits) == 0:
        return 0.0
    picked = targets[np.arange(len(logits)), logits.argmax(1)]
    return float(picked.mean())


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    return float((predictions == labels).mean()) if len(labels) else 0.0


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of boxes a [N, 4] and b [N, 4], "+1 pixel" convention as the reference."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]) + 1
    ih = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    return inter / (area_a + area_b - inter)


def grounding_accuracy(predicted_boxes: np.ndarray, gt_boxes: np.ndarray, threshold: float = 0.5) -> float:
    """Fraction of expressions whose chosen region overlaps the ground truth with IoU > 0.5."""
    if len(np.asarray(gt_boxes)) == 0:
        return 0.0
    return float((box_iou(predicted_boxes, gt_boxes) > threshold).mean())


def retrieval_recall(scores: np.ndarray, gt_image: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Image retrieval: scores [captions, images]; gt_image[c] = column of caption c's own image.
    Returns R@k (fraction of captions whose image is in the top k), median and mean rank (1 = best)."""
    scores = np.asarray(scores, np.float64)
    gt_image = np.asarray(gt_image)
    own = scores[np.arange(len(scores)), gt_image]
    # rank = 1 + images scored strictly higher than the right one (ties resolved in its favour)
    ranks = 1 + (scores > own[:, None]).sum(1)
    result = {f"R@{k}": float((ranks <= k).mean()) for k in ks}
    result.update(median_rank=float(np.median(ranks)), mean_rank=float(ranks.mean()))
    return result


def vqa_predictions(question_ids: list, answer_ids: np.ndarray, answers: list[str]) -> list[dict]:
    """The VQA evaluation server's result format: [{"question_id": int, "answer": str}]."""
    return [{"question_id": int(q), "answer": answers[int(a)]} for q, a in zip(question_ids, answer_ids)]


def gqa_predictions(question_ids: list, answer_ids: np.ndarray, answers: list[str]) -> list[dict]:
    """The GQA evaluation server's format: [{"questionId": str, "prediction": str}]."""
    return [{"questionId": str(q), "prediction": answers[int(a)]} for q, a in zip(question_ids, answer_ids)]
