"""Loss and training metric of each task type, as the reference's ForwardModelsTrain/Val compute them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vilbert.modeling import ViLBertOutput

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
                   image_attention_mask=rows["image_mask"], task_ids=task_ids)
    return ViLBertOutput(**output) if isinstance(output, dict) else output  # dict: from engine.OutputsAsDict


def compute_loss(output: ViLBertOutput, batch: dict[str, torch.Tensor], spec: TaskSpec) -> StepResult:
    kind = spec.kind
    batch_size = batch["input_ids"].shape[0]
    if kind == "classifier":
        logits = getattr(output, spec.head).float()
        target = batch["target"]
        # BCE averaged over every entry, times the number of answers = summed over answers, mean over the batch.
        loss = F.binary_cross_entropy_with_logits(logits, target) * target.shape[1]
        score = target.gather(1, logits.argmax(1, keepdim=True)).sum()
    elif kind == "retrieval":
        logits = output.vil_logit.float().view(batch_size, -1)
        loss = F.cross_entropy(logits, batch["label"])
        score = (logits.argmax(1) == batch["label"]).sum()
    elif kind == "grounding":
        logits = output.vision_logit.float().squeeze(2)
        target = batch["target"]
        loss = F.binary_cross_entropy_with_logits(logits, target) * target.shape[1]
        score = (target.gather(1, logits.argmax(1, keepdim=True)) > 0.5).sum()
    elif kind == "pointing":
        region_logits = output.vision_logit.float().squeeze(2)
        mask = batch["mc_mask"].bool()
        logits = region_logits.gather(1, batch["mc_ids"]).masked_fill(~mask, -10000.0)
        target = batch["target"]
        loss = F.binary_cross_entropy_with_logits(logits, target, weight=mask.float()) * target.shape[1]
        score = (logits.argmax(1) == target.argmax(1)).sum()
    elif kind == "binary":
        logits = output.vil_binary_prediction.float()
        loss = F.binary_cross_entropy_with_logits(logits, batch["target"])
        score = (logits.argmax(1) == batch["label"]).sum()
    elif kind == "tri":
        logits = output.vil_tri_prediction.float()
        loss = F.binary_cross_entropy_with_logits(logits, batch["target"])
        score = (logits.argmax(1) == batch["label"]).sum()
    else:
        raise ValueError(f"unknown task kind {kind}")
    # (meta tensors, used by vilbert_train.estimate to count FLOPs, have no value to read)
    return StepResult(loss, 0.0 if score.is_meta else float(score), batch_size)
