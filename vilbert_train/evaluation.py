"""Evaluate a model on one task's split with the paper's metric, and build prediction files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vilbert.answers import ANSWER_LISTS, load_answer_list

from . import metrics
from .annotations import MissingDataError
from .datasets import TaskDataset
from .engine import RunContext, autocast, to_device
from .losses import forward
from .specs import TaskSpec
from .streams import eval_batches

# Splits whose answers are withheld (evaluation servers); only predictions are written.
NO_ANSWER_SPLITS = {"vqa": ("test",), "gqa": ("test",), "snli_ve": (), "nlvr2": ("test",)}


def load_answers(spec: TaskSpec, model_dir: Path | None, data_root: Path) -> list[str] | None:
    """The answer vocabulary of a classifier task: the bundle's JSON list, else the dataset's label2ans pickle."""
    key = "gqa" if spec.head == "vil_prediction_gqa" else "vqa"
    filename, size = ANSWER_LISTS[key]
    if model_dir is not None and (model_dir / filename).is_file():
        return load_answer_list(model_dir / filename, size)
    pickle_path = data_root / ("gqa" if key == "gqa" else "VQA") / "cache" / "trainval_label2ans.pkl"
    if pickle_path.is_file():
        from models.safe_pickle import load_label2ans

        return load_label2ans(pickle_path)
    return None


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
        if spec.kind == "classifier":
            logits = getattr(output, spec.head)
        elif spec.kind == "tri":
            logits = output.vil_tri_prediction
        elif spec.kind == "binary":
            logits = output.vil_binary_prediction
        elif spec.kind == "grounding":
            logits = output.vision_logit.squeeze(2)
        elif spec.kind == "pointing":
            region = output.vision_logit.squeeze(2)
            logits = region.gather(1, batch["mc_ids"]).masked_fill(~batch["mc_mask"].bool(), -10000.0)
        else:
            raise ValueError(f"run_split does not handle {spec.kind}; use retrieval_scores")
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
    has_answers = split not in NO_ANSWER_SPLITS.get(spec.name, ())
    result: dict[str, Any] = {"task": spec.name, "task_id": spec.task_id, "split": split, "examples": len(dataset)}
    if spec.kind == "retrieval":
        scores, gt = retrieval_scores(model, dataset, ctx, batch_size, precision)
        result.update(metrics.retrieval_recall(scores, gt))
        order = np.argsort(-scores, axis=1, kind="stable")[:, :10]
        images = dataset.retrieval.image_ids
        predictions = [{"caption_id": e.qid, "top_images": [images[j] for j in order[c]]}
                       for c, e in enumerate(dataset.examples)]
        return result, predictions
    out = run_split(model, dataset, ctx, batch_size, precision, num_workers)
    examples = [dataset.examples[i] for i in out["index"]]
    qids = [e.qid for e in examples]
    best = out["logits"].argmax(1)
    if spec.kind == "classifier":
        if has_answers:
            result["vqa_score"] = metrics.vqa_score(out["logits"], out["target"])
        if answers is None:
            raise MissingDataError(f"{spec.name}: no answer list to name the predictions: put vqa_answers.json / "
                                   "gqa_answers.json next to the checkpoint, or cache/trainval_label2ans.pkl in the data")
        writer = metrics.gqa_predictions if spec.head == "vil_prediction_gqa" else metrics.vqa_predictions
        return result, writer(qids, best, answers)
    if spec.kind == "grounding":
        chosen = out["boxes"][np.arange(len(best)), best]
        result["accuracy_iou>0.5"] = metrics.grounding_accuracy(chosen, out["gt_box"])
        return result, [{"id": q, "box": [round(float(v), 2) for v in box], "region": int(r)}
                        for q, box, r in zip(qids, chosen, best)]
    if spec.kind == "pointing":
        labels = np.array([e.answer_index for e in examples])
        result["accuracy"] = metrics.accuracy(best, labels)
        return result, [{"id": q, "candidate": int(b)} for q, b in zip(qids, best)]
    labels = out["label"]
    valid = labels >= 0
    if has_answers:
        result["accuracy"] = metrics.accuracy(best[valid], labels[valid])
    names = ("contradiction", "neutral", "entailment") if spec.kind == "tri" else ("False", "True")
    return result, [{"id": q, "prediction": names[int(b)]} for q, b in zip(qids, best)]


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
