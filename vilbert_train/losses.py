"""Loss and training metric of each task type, as the reference's ForwardModelsTrain/Val compute them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from vilbert.modeling import ViLBertOutput
from vilbert.tasks import PAIR_HEAD

from .specs import TaskSpec


@dataclass
class StepResult:
    loss: torch.Tensor
    score: float  # summed metric over the batch's examples (VQA soft score or correct count)
    count: int  # examples


def flatten_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """[B, k, ...] text/visual fields -> [B*k, ...] model rows (k = 1, 2 for NLVR2, 4 for retrieval)."""
    keys = ("input_ids", "input_mask", "segment_ids", "features", "spatials", "image_mask")
    return {k: batch[k].reshape(-1, *batch[k].shape[2:]) for k in keys}


def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], spec: TaskSpec) -> ViLBertOutput:
    rows = flatten_rows(batch)
    task_ids = torch.full((rows["input_ids"].shape[0], 1), spec.task_id, dtype=torch.long,
                          device=rows["input_ids"].device)
    output = model(input_ids=rows["input_ids"], features=rows["features"], spatials=rows["spatials"],
                   token_type_ids=rows["segment_ids"], attention_mask=rows["input_mask"],
                   image_attention_mask=rows["image_mask"], task_ids=task_ids, pairs=spec.head == PAIR_HEAD)
    return ViLBertOutput(**output) if isinstance(output, dict) else output  # dict: from engine.OutputsAsDict


def region_logits(output: ViLBertOutput) -> torch.Tensor:
    """[B, R] grounding score of every region row."""
    return output.vision_logit.squeeze(2)


def candidate_logits(regions: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, R] region logits -> [B, K] score of each candidate box of a pointing task, empty slots at -10000."""
    return regions.gather(1, batch["mc_ids"]).masked_fill(~batch["mc_mask"].bool(), -10000.0)


LossAndScore = tuple[torch.Tensor, torch.Tensor]


def _answer_loss(output: ViLBertOutput, batch: dict[str, torch.Tensor], spec: TaskSpec) -> LossAndScore:
    logits = getattr(output, spec.head).float()
    target = batch["target"]
    # BCE averaged over every entry, times the number of answers = summed over answers, mean over the batch.
    loss = F.binary_cross_entropy_with_logits(logits, target) * target.shape[1]
    return loss, target.gather(1, logits.argmax(1, keepdim=True)).sum()


def _score_loss(output: ViLBertOutput, batch: dict[str, torch.Tensor], spec: TaskSpec) -> LossAndScore:
    logits = output.vil_logit.float().view(batch["input_ids"].shape[0], -1)  # [B, options]
    return F.cross_entropy(logits, batch["label"]), (logits.argmax(1) == batch["label"]).sum()


def _grounding_loss(output: ViLBertOutput, batch: dict[str, torch.Tensor], spec: TaskSpec) -> LossAndScore:
    logits = region_logits(output).float()
    target = batch["target"]
    loss = F.binary_cross_entropy_with_logits(logits, target) * target.shape[1]
    return loss, (target.gather(1, logits.argmax(1, keepdim=True)) > 0.5).sum()


def _pointing_loss(output: ViLBertOutput, batch: dict[str, torch.Tensor], spec: TaskSpec) -> LossAndScore:
    logits = candidate_logits(region_logits(output).float(), batch)
    target = batch["target"]
    loss = F.binary_cross_entropy_with_logits(logits, target, weight=batch["mc_mask"].float()) * target.shape[1]
    return loss, (logits.argmax(1) == target.argmax(1)).sum()


def _label_loss(output: ViLBertOutput, batch: dict[str, torch.Tensor], spec: TaskSpec) -> LossAndScore:
    """binary (NLVR2 pair head) and entailment: one-hot targets over the head's labels."""
    logits = getattr(output, spec.head).float()
    return F.binary_cross_entropy_with_logits(logits, batch["target"]), (logits.argmax(1) == batch["label"]).sum()


# The loss and the summed training metric of each task kind (vilbert.tasks.KINDS).
LOSSES: dict[str, Callable[[ViLBertOutput, dict[str, torch.Tensor], TaskSpec], LossAndScore]] = {
    "answer": _answer_loss, "score": _score_loss, "grounding": _grounding_loss, "pointing": _pointing_loss,
    "binary": _label_loss, "entailment": _label_loss,
}


def compute_loss(output: ViLBertOutput, batch: dict[str, torch.Tensor], spec: TaskSpec) -> StepResult:
    loss, score = LOSSES[spec.kind](output, batch, spec)
    # (meta tensors, used by vilbert_train.estimate to count FLOPs, have no value to read)
    return StepResult(loss, 0.0 if score.is_meta else float(score), batch["input_ids"].shape[0])
