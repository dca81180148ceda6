"""Region proposal network as the fork runs it at test time (`rpn.*` keys): Detectron legacy anchors, the "+1"
box convention, per-level top-k / NMS, then the best proposals over all levels per image."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from .kernels import nms

from .config import DetectorConfig

BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def legacy_cell_anchors(stride: int, size: int, aspect_ratios: tuple[float, ...]) -> np.ndarray:
    """Detectron's generate_anchors for one level: ratio enumeration (with rounding) around a (stride-1)-wide
    base box, then scaling to `size`. Returns [A, 4] x1 y1 x2 y2 (inclusive pixel convention)."""

    def whctrs(anchor):
        w, h = anchor[2] - anchor[0] + 1, anchor[3] - anchor[1] + 1
        return w, h, anchor[0] + 0.5 * (w - 1), anchor[1] + 0.5 * (h - 1)

    def make(ws, hs, x_ctr, y_ctr):
        ws, hs = ws[:, None], hs[:, None]
        return np.hstack((x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1), x_ctr + 0.5 * (ws - 1), y_ctr + 0.5 * (hs - 1)))

    base = np.array([0, 0, stride - 1, stride - 1], dtype=np.float64)
    w, h, x_ctr, y_ctr = whctrs(base)
    ratios = np.array(aspect_ratios, dtype=np.float64)
    ws = np.round(np.sqrt(w * h / ratios))
    hs = np.round(ws * ratios)
    ratio_anchors = make(ws, hs, x_ctr, y_ctr)
    scale = size / stride
    out = []
    for anchor in ratio_anchors:
        w, h, x_ctr, y_ctr = whctrs(anchor)
        out.append(make(np.array([w * scale]), np.array([h * scale]), x_ctr, y_ctr))
    return np.vstack(out).astype(np.float32)


class AnchorGenerator(nn.Module):
    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.strides = config.anchor_stride
        self.cell_anchors = _BufferList(
            torch.from_numpy(legacy_cell_anchors(s, z, config.aspect_ratios))
            for s, z in zip(config.anchor_stride, config.anchor_sizes)
        )

    def grid_anchors(self, level: int, height: int, width: int) -> torch.Tensor:
        """Anchors of one level for an H x W feature map, ordered (y, x, anchor): [H*W*A, 4]."""
        cell = self.cell_anchors[level]
        stride = self.strides[level]
        ys = torch.arange(0, height * stride, stride, dtype=torch.float32, device=cell.device)
        xs = torch.arange(0, width * stride, stride, dtype=torch.float32, device=cell.device)
        shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).reshape(-1, 1, 4)
        return (shifts + cell.float()[None]).reshape(-1, 4)


class _BufferList(nn.Module):
    """Buffers named 0, 1, 2, … (the checkpoint's `rpn.anchor_generator.cell_anchors.N`)."""

    def __init__(self, tensors):
        super().__init__()
        for index, tensor in enumerate(tensors):
            self.register_buffer(str(index), tensor)

    def __len__(self) -> int:
        return len(self._buffers)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._buffers[str(index)]


class RPNHead(nn.Module):
    def __init__(self, channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(channels, num_anchors * 4, 1)

    def forward(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = F.relu(self.conv(feature))
        return self.cls_logits(hidden), self.bbox_pred(hidden)


def decode_boxes(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Legacy BoxCoder (weights 1, 1, 1, 1; +1 widths): [K, 4] deltas on [K, 4] anchors -> [K, 4] boxes."""
    widths = anchors[:, 2] - anchors[:, 0] + 1
    heights = anchors[:, 3] - anchors[:, 1] + 1
    ctr_x = anchors[:, 0] + 0.5 * widths
    ctr_y = anchors[:, 1] + 0.5 * heights
    dx, dy = deltas[:, 0], deltas[:, 1]
    dw = deltas[:, 2].clamp(max=BBOX_XFORM_CLIP)
    dh = deltas[:, 3].clamp(max=BBOX_XFORM_CLIP)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    pred_w = torch.exp(dw) * widths
    pred_h = torch.exp(dh) * heights
    return torch.stack([pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                        pred_ctr_x + 0.5 * pred_w - 1, pred_ctr_y + 0.5 * pred_h - 1], dim=1)


def legacy_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """NMS with "+1" areas, suppressing IoU > threshold: torchvision's kernel on boxes grown by one pixel."""
    grown = boxes.clone()
    grown[:, 2:] += 1
    return nms(grown, scores, threshold)


class RPN(nn.Module):
    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.anchor_generator = AnchorGenerator(config)
        self.head = RPNHead(config.out_channels, len(config.aspect_ratios))
        self.pre_nms_top_n = config.pre_nms_top_n_test
        self.post_nms_top_n = config.post_nms_top_n_test
        self.fpn_post_nms_top_n = config.fpn_post_nms_top_n_test
        self.nms_thresh = config.rpn_nms_thresh
        self.min_size = config.rpn_min_size

    def forward(self, features: list[torch.Tensor], image_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """features P2..P6 [N, C, h, w]; image_sizes (height, width) to clip to, per image.
        Returns per image the proposals [P, 4] sorted by objectness (resized-image pixels)."""
        per_level: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for level, feature in enumerate(features):
            logits, deltas = self.head(feature)
            n, a, h, w = logits.shape
            objectness = logits.permute(0, 2, 3, 1).reshape(n, -1).sigmoid()
            deltas = deltas.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
            anchors = self.anchor_generator.grid_anchors(level, h, w)
            level_out = []
            for i in range(n):
                k = min(self.pre_nms_top_n, objectness.shape[1])
                scores, top = objectness[i].topk(k, sorted=True)
                boxes = decode_boxes(deltas[i, top].float(), anchors[top])
                height, width = image_sizes[i]
                boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width - 1)
                boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height - 1)
                if self.min_size > 0:
                    keep = ((boxes[:, 2] - boxes[:, 0] + 1) >= self.min_size) & ((boxes[:, 3] - boxes[:, 1] + 1) >= self.min_size)
                    boxes, scores = boxes[keep], scores[keep]
                keep = legacy_nms(boxes, scores.float(), self.nms_thresh)[: self.post_nms_top_n]
                level_out.append((boxes[keep], scores[keep]))
            per_level.append(level_out)
        proposals = []
        for i in range(len(image_sizes)):
            boxes = torch.cat([level[i][0] for level in per_level])
            scores = torch.cat([level[i][1] for level in per_level])
            top = scores.float().topk(min(self.fpn_post_nms_top_n, len(scores)), sorted=True).indices
            proposals.append(boxes[top])
        return proposals
