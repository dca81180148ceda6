"""The detector configuration, read from the official `detectron_config.yaml` (vqa-maskrcnn-benchmark schema).

Absent keys take the fork's defaults (`maskrcnn_benchmark/config/defaults.py`); unknown keys are ignored. Only
the feature path ViLBERT uses is built: a ResNe(X)t-FPN body, the RPN, and the FPN MLP box head.
Image sizes and pixel means are NOT read from the YAML: the extraction script hard-codes them (see extractor.py).
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# CONV_BODY -> blocks per stage (res2..res5); the fork registers these FPN bodies.
BODIES = {"R-50-FPN": (3, 4, 6, 3), "R-101-FPN": (3, 4, 23, 3), "R-152-FPN": (3, 8, 36, 3)}


class DetectorConfigError(ValueError):
    pass


@dataclass(frozen=True)
class DetectorConfig:
    conv_body: str = "R-50-C4"
    out_channels: int = 256  # FPN width (MODEL.BACKBONE.OUT_CHANNELS)
    num_groups: int = 1
    width_per_group: int = 64
    stride_in_1x1: bool = True
    res2_out_channels: int = 256
    stem_out_channels: int = 64
    res5_dilation: int = 1
    rpn_use_fpn: bool = False
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    anchor_stride: tuple[int, ...] = (16,)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    pre_nms_top_n_test: int = 6000
    post_nms_top_n_test: int = 1000
    fpn_post_nms_top_n_test: int = 2000
    rpn_nms_thresh: float = 0.7
    rpn_min_size: int = 0
    roi_use_fpn: bool = False
    feature_extractor: str = "ResNet50Conv5ROIFeatureExtractor"
    predictor: str = "FastRCNNPredictor"
    pooler_resolution: int = 14
    pooler_scales: tuple[float, ...] = (1.0 / 16,)
    pooler_sampling_ratio: int = 0
    mlp_head_dim: int = 1024
    num_classes: int = 81
    attr: bool = False

    @property
    def stage_blocks(self) -> tuple[int, ...]:
        return BODIES[self.conv_body]

    def validate(self) -> "DetectorConfig":
        if self.conv_body not in BODIES:
            raise DetectorConfigError(
                f"MODEL.BACKBONE.CONV_BODY {self.conv_body!r} is not supported; supported: {', '.join(BODIES)}"
            )
        if not (self.rpn_use_fpn and self.roi_use_fpn):
            raise DetectorConfigError("only FPN detectors are supported (MODEL.RPN.USE_FPN and MODEL.ROI_HEADS.USE_FPN)")
        if self.feature_extractor != "FPN2MLPFeatureExtractor":
            raise DetectorConfigError(f"ROI_BOX_HEAD.FEATURE_EXTRACTOR {self.feature_extractor!r} is not supported")
        if self.predictor != "FPNPredictor":
            raise DetectorConfigError(f"ROI_BOX_HEAD.PREDICTOR {self.predictor!r} is not supported")
        if len(self.anchor_stride) != 5 or len(self.anchor_sizes) != 5:
            raise DetectorConfigError("an FPN RPN needs 5 anchor strides and 5 anchor sizes (P2-P6)")
        if len(self.pooler_scales) != 4:
            raise DetectorConfigError("ROI_BOX_HEAD.POOLER_SCALES must give the 4 scales of P2-P5")
        if self.res5_dilation != 1:
            raise DetectorConfigError("RESNETS.RES5_DILATION other than 1 is not supported")
        return self


def _sequence(convert):
    """yacs configs write tuples as strings, e.g. "(4, 8, 16, 32, 64)": read them as Python literals."""

    def parse(value):
        if isinstance(value, str):
            value = ast.literal_eval(value)
        if isinstance(value, (int, float)):
            value = (value,)
        return tuple(convert(x) for x in value)

    return parse


def _flag(value) -> bool:
    if isinstance(value, str) and value.strip() in ("True", "False"):
        return value.strip() == "True"
    if not isinstance(value, bool):
        raise ValueError(value)
    return value


# YAML path -> (field, converter)
_KEYS: dict[tuple[str, ...], tuple[str, Any]] = {
    ("BACKBONE", "CONV_BODY"): ("conv_body", str),
    ("BACKBONE", "OUT_CHANNELS"): ("out_channels", int),
    ("RESNETS", "NUM_GROUPS"): ("num_groups", int),
    ("RESNETS", "WIDTH_PER_GROUP"): ("width_per_group", int),
    ("RESNETS", "STRIDE_IN_1X1"): ("stride_in_1x1", _flag),
    ("RESNETS", "RES2_OUT_CHANNELS"): ("res2_out_channels", int),
    ("RESNETS", "STEM_OUT_CHANNELS"): ("stem_out_channels", int),
    ("RESNETS", "RES5_DILATION"): ("res5_dilation", int),
    ("RPN", "USE_FPN"): ("rpn_use_fpn", _flag),
    ("RPN", "ANCHOR_SIZES"): ("anchor_sizes", _sequence(int)),
    ("RPN", "ANCHOR_STRIDE"): ("anchor_stride", _sequence(int)),
    ("RPN", "ASPECT_RATIOS"): ("aspect_ratios", _sequence(float)),
    ("RPN", "PRE_NMS_TOP_N_TEST"): ("pre_nms_top_n_test", int),
    ("RPN", "POST_NMS_TOP_N_TEST"): ("post_nms_top_n_test", int),
    ("RPN", "FPN_POST_NMS_TOP_N_TEST"): ("fpn_post_nms_top_n_test", int),
    ("RPN", "NMS_THRESH"): ("rpn_nms_thresh", float),
    ("RPN", "MIN_SIZE"): ("rpn_min_size", int),
    ("ROI_HEADS", "USE_FPN"): ("roi_use_fpn", _flag),
    ("ROI_BOX_HEAD", "FEATURE_EXTRACTOR"): ("feature_extractor", str),
    ("ROI_BOX_HEAD", "PREDICTOR"): ("predictor", str),
    ("ROI_BOX_HEAD", "POOLER_RESOLUTION"): ("pooler_resolution", int),
    ("ROI_BOX_HEAD", "POOLER_SCALES"): ("pooler_scales", _sequence(float)),
    ("ROI_BOX_HEAD", "POOLER_SAMPLING_RATIO"): ("pooler_sampling_ratio", int),
    ("ROI_BOX_HEAD", "MLP_HEAD_DIM"): ("mlp_head_dim", int),
    ("ROI_BOX_HEAD", "NUM_CLASSES"): ("num_classes", int),
    ("ROI_BOX_HEAD", "ATTR"): ("attr", _flag),
}


def config_from_dict(raw: dict) -> DetectorConfig:
    model = (raw or {}).get("MODEL", {}) or {}
    values: dict[str, Any] = {}
    for (section, key), (field, convert) in _KEYS.items():
        part = model.get(section) or {}
        if isinstance(part, dict) and key in part:
            try:
                values[field] = convert(part[key])
            except (TypeError, ValueError, SyntaxError) as exc:
                raise DetectorConfigError(f"MODEL.{section}.{key}: invalid value {part[key]!r}") from exc
    return DetectorConfig(**values).validate()


def load_config(path: str | os.PathLike) -> DetectorConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"detector config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DetectorConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise DetectorConfigError(f"{path}: expected a mapping at the top level")
    return config_from_dict(raw)


def dump_config(config: DetectorConfig) -> dict:
    """The YAML mapping (official schema) for a config; used to write test configs."""
    model: dict[str, dict] = {}
    for (section, key), (field, _) in _KEYS.items():
        value = getattr(config, field)
        model.setdefault(section, {})[key] = list(value) if isinstance(value, tuple) else value
    return {"MODEL": {"META_ARCHITECTURE": "GeneralizedRCNN", **model}}
