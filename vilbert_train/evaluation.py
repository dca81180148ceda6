"""Evaluate a model on one task's split with the paper's metric, and build prediction files."""

from __future__ import annotations

import json
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from vilbert.answers import ANSWER_LISTS, load_answer_list
from vilbert.modeling import ViLBertOutput

from . import metrics
from .annotations import MissingDataError
from .datasets import TaskDataset
from .engine import RunContext, autocast, to_device
from .losses import candidate_logits, forward, region_logits
from .specs import TaskSpec
from .streams import eval_batches

# Splits whose answers are withheld (evaluation servers); only predictions are written.
NO_ANSWER_SPLITS = {"vqa": ("test",), "gqa": ("test",), "snli_ve": (), "nlvr2": ("test",)}


def load_answers(spec: TaskSpec, model_dir: Path | None, data_root: Path) -> list[str] | None:
    """The answer vocabulary of an "answer" task: the bundle's JSON list, else the dataset's label2ans pickle."""
    key = spec.answers
    filename, size = ANSWER_LISTS[key]
    if model_dir is not None and (model_dir / filename).is_file():
        return load_answer_list(model_dir / filename, size)
    pickle_path = data_root / ("gqa" if key == "gqa" else "VQA") / "cache" / "trainval_label2ans.pkl"
    if pickle_path.is_file():
        from .safe_pickle import load_label2ans

        return load_label2ans(pickle_path)
    return None


def _head_logits(output: ViLBertOutput, batch: dict[str, torch.Tensor], spec: TaskSpec) -> torch.Tensor:
    return getattr(output, spec.head)


# Per-example logits of each kind that run_split evaluates ("score" ranks every image: retrieval_scores).
SPLIT_LOGITS: dict[str, Callable[[ViLBertOutput, dict[str, torch.Tensor], TaskSpec], torch.Tensor]] = {
    "answer": _head_logits, "entailment": _head_logits, "binary": _head_logits,
    "grounding": lambda output, batch, spec: region_logits(output),
    "pointing": lambda output, batch, spec: candidate_logits(region_logits(output), batch),
}


@torch.no_grad()
def run_split(model: torch.nn.Module, dataset: TaskDataset, ctx: RunContext, batch_size: int,
              precision: str = "fp32", num_workers: int = 0) -> dict[str, np.ndarray]:
    """Per-example outputs over the whole split (single process): logits, targets, labels, boxes."""
    spec = dataset.spec
    model.eval()
    out: dict[str, list] = {"index": [], "logits": [], "target": [], "label": [], "boxes": [], "gt_box": []}
    for batch in eval_batches(dataset, batch_size, num_workers=num_workers):
        batch = to_device(batch, ctx.device)
        with autocast(ctx, precision):
            output = forward(model, batch, spec)
        if spec.kind not in SPLIT_LOGITS:
            raise ValueError(f"run_split does not handle {spec.kind}; use retrieval_scores")
        logits = SPLIT_LOGITS[spec.kind](output, batch, spec)
        out["logits"].append(logits.float().cpu().numpy())
        out["index"].append(batch["index"].cpu().numpy())
        for key in ("target", "label", "boxes", "gt_box"):
            if key in batch:
                out[key].append(batch[key].cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items() if v}


@torch.no_grad()
def retrieval_scores(model: torch.nn.Module, dataset: TaskDataset, ctx: RunContext, batch_size: int,
                     precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """vil_logit of every caption against every image of the split: scores [captions, images] and the column of
    each caption's own image (the reference's eval_retrieval, image-retrieval direction)."""
    spec = dataset.spec
    model.eval()
    images = dataset.retrieval.image_ids
    column = {image: i for i, image in enumerate(images)}
    visuals = [dataset.visual(image) for image in images]
    scores = np.zeros((len(dataset.examples), len(images)), np.float32)
    pairs = [(c, i) for c in range(len(dataset.examples)) for i in range(len(images))]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        rows = [dataset.rows([dataset.examples[c].text], [visuals[i]]) for c, i in chunk]
        batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])).to(ctx.device) for k in rows[0]}
        with autocast(ctx, precision):
            logits = forward(model, batch, spec).vil_logit.float().view(-1).cpu().numpy()
        for (c, i), value in zip(chunk, logits):
            scores[c, i] = value
    gt = np.array([column[e.image_ids[0]] for e in dataset.examples])
    return scores, gt


def evaluate_task(model: torch.nn.Module, dataset: TaskDataset, ctx: RunContext, batch_size: int,
                  answers: list[str] | None = None, precision: str = "fp32", num_workers: int = 0
                  ) -> tuple[dict[str, Any], list[dict]]:
    """(metrics, predictions) for one task's split."""
    spec, split = dataset.spec, dataset.split
    result: dict[str, Any] = {"task": spec.name, "task_id": spec.task_id, "split": split, "examples": len(dataset)}
    if spec.kind == "score":  # every caption against every image, not one forward per example
        return _evaluate_retrieval(model, dataset, ctx, batch_size, precision, result)
    out = run_split(model, dataset, ctx, batch_size, precision, num_workers)
    split_result = SplitResult(spec, [dataset.examples[i] for i in out["index"]], out,
                               split not in NO_ANSWER_SPLITS.get(spec.name, ()), answers)
    return result, EVALUATORS[spec.kind](split_result, result)


def _evaluate_retrieval(model: torch.nn.Module, dataset: TaskDataset, ctx: RunContext, batch_size: int,
                        precision: str, result: dict[str, Any]) -> tuple[dict[str, Any], list[dict]]:
    scores, gt = retrieval_scores(model, dataset, ctx, batch_size, precision)
    result.update(metrics.retrieval_recall(scores, gt))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    images = dataset.retrieval.image_ids
    predictions = [{"caption_id": e.qid, "top_images": [images[j] for j in order[c]]}
                   for c, e in enumerate(dataset.examples)]
    return result, predictions


@dataclass
class SplitResult:
    """run_split's outputs over one split, with what the per-kind evaluators read."""

    spec: TaskSpec
    examples: list  # the dataset's examples in the order of the outputs
    out: dict[str, np.ndarray]
    has_answers: bool  # the split's answers are public (not withheld for an evaluation server)
    answers: list[str] | None  # answer vocabulary (answer tasks)

    @property
    def qids(self) -> list:
        return [e.qid for e in self.examples]

    @property
    def best(self) -> np.ndarray:
        return self.out["logits"].argmax(1)


def _evaluate_answers(r: SplitResult, result: dict[str, Any]) -> list[dict]:
    if r.has_answers:
        result["vqa_score"] = metrics.vqa_score(r.out["logits"], r.out["target"])
    if r.answers is None:
        raise MissingDataError(f"{r.spec.name}: no answer list to name the predictions: put vqa_answers.json / "
                               "gqa_answers.json next to the checkpoint, or cache/trainval_label2ans.pkl in the data")
    writer = metrics.gqa_predictions if r.spec.answers == "gqa" else metrics.vqa_predictions
    return writer(r.qids, r.best, r.answers)


def _evaluate_grounding(r: SplitResult, result: dict[str, Any]) -> list[dict]:
    best = r.best
    chosen = r.out["boxes"][np.arange(len(best)), best]
    result["accuracy_iou>0.5"] = metrics.grounding_accuracy(chosen, r.out["gt_box"])
    return [{"id": q, "box": [round(float(v), 2) for v in box], "region": int(b)}
            for q, box, b in zip(r.qids, chosen, best)]


def _evaluate_pointing(r: SplitResult, result: dict[str, Any]) -> list[dict]:
    labels = np.array([e.answer_index for e in r.examples])
    result["accuracy"] = metrics.accuracy(r.best, labels)
    return [{"id": q, "candidate": int(b)} for q, b in zip(r.qids, r.best)]


def _evaluate_labels(r: SplitResult, result: dict[str, Any]) -> list[dict]:
    labels, best = r.out["label"], r.best
    valid = labels >= 0
    if r.has_answers:
        result["accuracy"] = metrics.accuracy(best[valid], labels[valid])
    names = PREDICTION_LABELS[r.spec.kind]
    return [{"id": q, "prediction": names[int(b)]} for q, b in zip(r.qids, best)]


# The reference's label names in prediction files (capitalised booleans, unlike the API's).
PREDICTION_LABELS = {"entailment": ("contradiction", "neutral", "entailment"), "binary": ("False", "True")}
# Metric (written into the result) and predictions of each kind that run_split evaluates.
EVALUATORS: dict[str, Callable[[SplitResult, dict[str, Any]], list[dict]]] = {
    "answer": _evaluate_answers, "grounding": _evaluate_grounding, "pointing": _evaluate_pointing,
    "binary": _evaluate_labels, "entailment": _evaluate_labels,
}


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
