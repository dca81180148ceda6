"""The detector as one module whose state-dict keys are the released checkpoint's, and its strict loader."""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Mapping

import torch
from torch import nn

from modelkit.checkpoint import describe_key_problems, read_tensor_dict

from .backbone import Backbone
from .config import DetectorConfig
from .roi_heads import RoIHeads
from .rpn import RPN

# Keys the checkpoint may carry that the feature path never reads.
OPTIONAL_PREFIXES = ("roi_heads.box.predictor.cls_embed.", "roi_heads.box.predictor.attr_linear1.",
                     "roi_heads.box.predictor.attr_linear2.", "roi_heads.box.predictor.bbox_pred.")
ANCHOR_PREFIX = "rpn.anchor_generator.cell_anchors."


class DetectorCheckpointError(ValueError):
    pass


class RegionDetector(nn.Module):
    """Faster R-CNN (ResNe(X)t-FPN) up to proposals, their fc6 features and class scores."""

    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.rpn = RPN(config)
        self.roi_heads = RoIHeads(config)

    def forward(self, images: torch.Tensor, image_sizes: list[tuple[int, int]]):
        """images [N, 3, H, W] padded to multiples of 32; image_sizes: the (height, width) proposals are clipped to.
        Returns per image: proposals [P, 4], fc6 [P, D], class logits [P, K]."""
        features = self.backbone(images)
        proposals = self.rpn(features, image_sizes)
        fc6, logits = self.roi_heads(features, proposals)
        return proposals, fc6, logits


def read_checkpoint(path: str | os.PathLike) -> "OrderedDict[str, torch.Tensor]":
    """Load `detectron_model.pth` safely: {"model": state_dict} (or a bare state dict), `module.` stripped."""
    return read_tensor_dict(path, "detector checkpoint", ("model",), DetectorCheckpointError)


def load_detector_state(model: RegionDetector, state: Mapping[str, torch.Tensor]) -> None:
    """Strict about every key the feature path needs; optional heads and anchors load when present."""
    expected = model.state_dict()
    required = [k for k in expected if not k.startswith(OPTIONAL_PREFIXES) and not k.startswith(ANCHOR_PREFIX)]
    missing = [k for k in required if k not in state]
    misshaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    unexpected = [k for k in state if k not in expected and not k.startswith(OPTIONAL_PREFIXES)]
    problems = describe_key_problems((("missing", missing), ("mis-shaped", misshaped), ("unexpected", unexpected)))
    if problems:
        raise DetectorCheckpointError("detector checkpoint does not match the config:\n" + problems)
    anchors = [k for k in expected if k.startswith(ANCHOR_PREFIX)]
    for key in anchors:  # the checkpoint's own anchors, when saved, must be the legacy ones this code generates
        if key in state and not torch.allclose(state[key].float(), expected[key].float()):
            raise DetectorCheckpointError(f"{key}: anchors in the checkpoint differ from the config's legacy anchors")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
