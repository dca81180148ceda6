"""A tiny random-weight detector in the official file formats (YAML + {"model": state_dict} .pth).

Same structure as the released X-152-FPN (FPN body, legacy RPN, MLP box head, 1601 classes, attribute head),
narrow enough to run in well under a second per image on a CPU at the real 800/1333 preprocessing. Its regions
and features are meaningless: the weights are random.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

from .config import DetectorConfig, dump_config
from .model import RegionDetector

CONFIG_FILE = "detectron_config.yaml"
CHECKPOINT_FILE = "detectron_model.pth"


def tiny_detector_config() -> DetectorConfig:
    return DetectorConfig(
        conv_body="R-50-FPN", out_channels=16, num_groups=2, width_per_group=4, stride_in_1x1=False,
        res2_out_channels=16, stem_out_channels=8, rpn_use_fpn=True, roi_use_fpn=True,
        anchor_stride=(4, 8, 16, 32, 64), pre_nms_top_n_test=1000, post_nms_top_n_test=300,
        fpn_post_nms_top_n_test=300, feature_extractor="FPN2MLPFeatureExtractor", predictor="FPNPredictor",
        pooler_resolution=7, pooler_scales=(0.25, 0.125, 0.0625, 0.03125), pooler_sampling_ratio=2,
        mlp_head_dim=64, num_classes=1601, attr=True,
    ).validate()


def write_tiny_detector(out_dir: str | os.PathLike, seed: int = 0, prefix_module: bool = False) -> tuple[Path, Path]:
    """Write detectron_config.yaml and detectron_model.pth into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = tiny_detector_config()
    torch.manual_seed(seed)
    model = RegionDetector(config)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "anchor" in name:
                continue
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif name.endswith("running_mean") or name.endswith(".bias"):
                tensor.normal_(0, 0.1)
            elif name.startswith(("rpn.head.bbox_pred", "rpn.head.cls_logits", "roi_heads.box.predictor.cls_score")) \
                    and name.endswith("weight"):
                tensor.normal_(0, 0.01)  # proposals near the anchors and unsaturated class scores, as in a trained model
            elif tensor.dim() > 1:
                fan_in = tensor[0].numel()
                tensor.normal_(0, (1.0 / fan_in) ** 0.5)
            else:
                tensor.uniform_(0.5, 1.5)
    state = {("module." if prefix_module else "") + k: v for k, v in model.state_dict().items()}
    config_path, checkpoint_path = out_dir / CONFIG_FILE, out_dir / CHECKPOINT_FILE
    header = "# TINY RANDOM-WEIGHT TEST DETECTOR: its regions and features are meaningless.\n"
    config_path.write_text(header + yaml.safe_dump(dump_config(config), sort_keys=False), encoding="utf-8")
    torch.save({"model": state, "iteration": 0}, checkpoint_path)
    return config_path, checkpoint_path
