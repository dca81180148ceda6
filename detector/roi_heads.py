"""Box head on the proposals (`roi_heads.box.*`): legacy RoIAlign on P2-P5 with the fork's level rule,
fc6 -> fc7 MLP, class scores. Box regression and the attribute head are loaded but never computed."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from .kernels import roi_align

from .config import DetectorConfig

CANONICAL_SCALE = 224
CANONICAL_LEVEL = 4
NUM_ATTRIBUTES = 400
ATTRIBUTE_EMBED = 256


def roi_levels(boxes: torch.Tensor, min_level: int = 2, max_level: int = 5) -> torch.Tensor:
    """Pyramid level index (0 = P2) per box: floor(4 + log2(sqrt(area) / 224 + 1e-6)), area with "+1"."""
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    levels = torch.floor(CANONICAL_LEVEL + torch.log2(torch.sqrt(area) / CANONICAL_SCALE + 1e-6))
    return (levels.clamp(min_level, max_level) - min_level).long()


class MultiLevelRoIAlign(nn.Module):
    def __init__(self, resolution: int, scales: tuple[float, ...], sampling_ratio: int):
        super().__init__()
        self.resolution, self.scales, self.sampling_ratio = resolution, scales, sampling_ratio
        self.min_level = int(round(-math.log2(scales[0])))
        self.max_level = int(round(-math.log2(scales[-1])))

    def forward(self, features: list[torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """features P2..P5; rois [K, 5] (batch index, x1, y1, x2, y2) -> [K, C, r, r]"""
        levels = roi_levels(rois[:, 1:], self.min_level, self.max_level)
        out = rois.new_zeros((len(rois), features[0].shape[1], self.resolution, self.resolution), dtype=features[0].dtype)
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            index = torch.nonzero(levels == level).squeeze(1)
            if len(index):
                out[index] = roi_align(feature, rois[index].to(feature.dtype), self.resolution, spatial_scale=scale,
                                       sampling_ratio=self.sampling_ratio, aligned=False)
        return out


class MLPFeatureExtractor(nn.Module):
    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.pooler = MultiLevelRoIAlign(config.pooler_resolution, config.pooler_scales, config.pooler_sampling_ratio)
        self.fc6 = nn.Linear(config.out_channels * config.pooler_resolution**2, config.mlp_head_dim)
        self.fc7 = nn.Linear(config.mlp_head_dim, config.mlp_head_dim)

    def forward(self, features: list[torch.Tensor], rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns fc6 and fc7, both after ReLU: [K, D]. fc6 is ViLBERT's region feature."""
        pooled = self.pooler(features[:4], rois).flatten(1)
        fc6 = F.relu(self.fc6(pooled))
        return fc6, F.relu(self.fc7(fc6))


class FPNPredictor(nn.Module):
    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.cls_score = nn.Linear(config.mlp_head_dim, config.num_classes)
        self.bbox_pred = nn.Linear(config.mlp_head_dim, config.num_classes * 4)  # loaded, not used for features
        if config.attr:  # training-time attribute head: loaded, never run
            self.cls_embed = nn.Embedding(config.num_classes, ATTRIBUTE_EMBED)
            self.attr_linear1 = nn.Linear(config.mlp_head_dim + ATTRIBUTE_EMBED, 512)
            self.attr_linear2 = nn.Linear(512, NUM_ATTRIBUTES)

    def forward(self, fc7: torch.Tensor) -> torch.Tensor:
        """[K, D] -> class logits [K, num_classes]"""
        return self.cls_score(fc7)


class BoxHead(nn.Module):
    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.feature_extractor = MLPFeatureExtractor(config)
        self.predictor = FPNPredictor(config)


class RoIHeads(nn.Module):
    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.box = BoxHead(config)

    def forward(self, features: list[torch.Tensor], proposals: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per image: fc6 features [P, D] and class logits [P, num_classes] of its proposals [P, 4]."""
        rois = torch.cat([torch.cat([torch.full((len(p), 1), float(i), device=p.device, dtype=p.dtype), p], 1)
                          for i, p in enumerate(proposals)])
        fc6, fc7 = self.box.feature_extractor(features, rois)
        logits = self.box.predictor(fc7)
        counts = [len(p) for p in proposals]
        return list(fc6.split(counts)), list(logits.split(counts))
