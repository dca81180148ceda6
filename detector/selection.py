"""Region selection of the reference extraction script, vectorised.

The reference: probabilities = softmax over all classes; for every class c >= 1, greedy NMS (IoU > 0.5 with the
"+1" area convention) over ALL proposals ordered by that class's probability; each box's confidence is the
highest probability among the classes in which it survives; the boxes with the highest confidences are kept.

All 1600 NMS runs share the same boxes, so the pairwise suppression matrix is computed once, packed into bits,
and the greedy scan runs for all classes at once: one step per rank, each a few vector operations over
[classes, boxes/64] words. The result is identical to the per-class loop (`select_regions_loop`, kept as the
test oracle and the benchmark baseline).
"""

from __future__ import annotations

import numpy as np
import torch

from modelkit.regions import REGIONS_PER_IMAGE

from .kernels import nms

NMS_THRESHOLD = 0.5


def legacy_iou(boxes: torch.Tensor) -> torch.Tensor:
    """[R, 4] -> [R, R] IoU with "+1" widths and heights."""
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    wh = (rb - lt + 1).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area[:, None] + area[None, :] - inter)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """[R, R] bool -> [R, ceil(R/64)] int64 bit rows (bit j%64 of word j//64)."""
    rows, cols = mask.shape
    words = (cols + 63) // 64
    padded = torch.zeros(rows, words * 64, dtype=torch.int64, device=mask.device)
    padded[:, :cols] = mask.long()
    shifts = torch.arange(64, device=mask.device, dtype=torch.int64)
    return (padded.view(rows, words, 64) << shifts).sum(-1)


def max_confidence(boxes: torch.Tensor, probs: torch.Tensor, threshold: float = NMS_THRESHOLD,
                   conf_thresh: float = 0.0, top: int | None = None) -> torch.Tensor:
    """boxes [R, 4], probs [R, K] (column 0 = background) -> [R] best surviving class probability per box.

    With `top`, only what can decide the `top` best boxes is computed: a class's best box always survives its NMS,
    so the `top`-th largest of those guaranteed values is a floor under the `top`-th confidence. Entries scoring
    below the floor can neither be a selected box's confidence nor suppress one that is (suppression only reaches
    lower-scoring boxes of the same class). Boxes that cannot be selected then get 0; every box that can has its
    exact value."""
    probs = probs[:, 1:].float()
    num_boxes, num_classes = probs.shape
    if num_boxes == 0:
        return probs.new_zeros(0)
    floor = conf_thresh
    by_class = probs.t()  # [C, R]
    if top is not None and top < num_boxes:
        best_score, best_box = by_class.max(dim=1)
        guaranteed = probs.new_zeros(num_boxes).scatter_reduce(0, best_box, best_score, reduce="amax")
        if int((guaranteed > conf_thresh).sum()) >= top:
            floor = max(floor, float(guaranteed.topk(top).values[-1]))
            by_class = by_class[best_score >= floor]
    steps = int((by_class >= floor).sum(1).max()) if floor > conf_thresh else num_boxes
    if steps < num_boxes:
        scores, order = by_class.topk(steps, dim=1, sorted=True)  # [C', S] per class, best first
    else:
        scores, order = by_class.sort(dim=1, descending=True, stable=True)
    suppress = _pack_bits(legacy_iou(boxes.float()) > threshold).cpu().numpy().view(np.uint64)  # [R, W]
    kept = torch.from_numpy(_greedy_scan(order.cpu().numpy(), suppress)).to(scores.device)
    gains = torch.where(kept & (scores > conf_thresh) & (scores >= floor), scores, torch.zeros_like(scores))
    best = probs.new_zeros(num_boxes)
    return best.scatter_reduce(0, order.reshape(-1), gains.reshape(-1), reduce="amax")


def _greedy_scan(order: np.ndarray, suppress: np.ndarray) -> np.ndarray:
    """Greedy NMS for every class at once. order [C, S] box indices per class, best first; suppress [R, W] bit
    rows. Returns kept [C, S]. NumPy on purpose: each step is a handful of tiny operations, where a thread pool
    only adds latency (and much more of it when other processes share the cores)."""
    classes, steps = order.shape
    rows = np.arange(classes)
    words, shifts = order >> 6, (order & 63).astype(np.uint64)
    removed = np.zeros((classes, suppress.shape[1]), dtype=np.uint64)
    kept = np.empty((classes, steps), dtype=bool)
    for rank in range(steps):
        keep = ((removed[rows, words[:, rank]] >> shifts[:, rank]) & np.uint64(1)) == 0
        kept[:, rank] = keep
        removed[keep] |= suppress[order[keep, rank]]
    return kept


def max_confidence_loop(boxes: torch.Tensor, probs: torch.Tensor, threshold: float = NMS_THRESHOLD,
                        conf_thresh: float = 0.0) -> torch.Tensor:
    """The reference's per-class loop (one NMS call per class), for tests and benchmarks."""
    grown = boxes.float().clone()
    grown[:, 2:] += 1  # torchvision's IoU on boxes grown by one pixel is the "+1" IoU
    best = probs.new_zeros(len(boxes)).float()
    for c in range(1, probs.shape[1]):
        scores = probs[:, c].float()
        keep = nms(grown, scores, threshold)
        better = (scores[keep] > best[keep]) & (scores[keep] > conf_thresh)
        best[keep[better]] = scores[keep[better]]
    return best


def select_regions(boxes: torch.Tensor, probs: torch.Tensor,
                   num_regions: int = REGIONS_PER_IMAGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the kept boxes (best first) and their confidences. Always min(num_regions, R) boxes."""
    confidence = max_confidence(boxes, probs, top=num_regions)
    top = confidence.sort(descending=True, stable=True).indices[:num_regions]
    return top, confidence[top]
