"""ResNe(X)t body with frozen batch norm, and the FPN, named as the released checkpoint (`backbone.body.*`,
`backbone.fpn.*`). Shapes: N images, C channels, H x W feature maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DetectorConfig


class FrozenBatchNorm2d(nn.Module):
    """y = x * w / sqrt(var) + (b - mean * w / sqrt(var)). No epsilon: the fork's layer has none."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * self.running_var.rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None].to(x.dtype) + shift[None, :, None, None].to(x.dtype)


class Stem(nn.Module):
    def __init__(self, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, out_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, C, H/4, W/4]"""
        return F.max_pool2d(F.relu(self.bn1(self.conv1(x))), kernel_size=3, stride=2, padding=1)


class Bottleneck(nn.Module):
    def __init__(self, in_channels: int, width: int, out_channels: int, groups: int, stride: int, stride_in_1x1: bool):
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride=stride_1x1, bias=False)
        self.bn1 = FrozenBatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride_3x3, padding=1, groups=groups, bias=False)
        self.bn2 = FrozenBatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(out_channels)
        self.downsample = None
        if in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), FrozenBatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + identity)


class ResNetBody(nn.Module):
    """Stem + stages res2..res5 (`layer1..layer4`). Returns C2..C5 (strides 4, 8, 16, 32)."""

    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.stem = Stem(config.stem_out_channels)
        in_channels = config.stem_out_channels
        width = config.num_groups * config.width_per_group
        out_channels = config.res2_out_channels
        self.out_channels: list[int] = []
        for index, blocks in enumerate(config.stage_blocks):
            stride = 1 if index == 0 else 2
            stage = nn.Sequential(*(
                Bottleneck(in_channels if b == 0 else out_channels, width, out_channels, config.num_groups,
                           stride if b == 0 else 1, config.stride_in_1x1)
                for b in range(blocks)
            ))
            self.add_module(f"layer{index + 1}", stage)
            self.out_channels.append(out_channels)
            in_channels, width, out_channels = out_channels, width * 2, out_channels * 2

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for index in range(1, 5):
            x = getattr(self, f"layer{index}")(x)
            features.append(x)
        return features


class FPN(nn.Module):
    """Lateral 1x1 + output 3x3 convs (with bias, no ReLU), nearest x2 top-down; P6 subsamples P5 (stride 2)."""

    def __init__(self, in_channels: list[int], out_channels: int):
        super().__init__()
        for index, channels in enumerate(in_channels, start=1):
            self.add_module(f"fpn_inner{index}", nn.Conv2d(channels, out_channels, 1))
            self.add_module(f"fpn_layer{index}", nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.num_levels = len(in_channels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """C2..C5 -> P2..P6"""
        last = getattr(self, f"fpn_inner{self.num_levels}")(features[-1])
        outputs = [getattr(self, f"fpn_layer{self.num_levels}")(last)]
        for index in range(self.num_levels - 1, 0, -1):
            lateral = getattr(self, f"fpn_inner{index}")(features[index - 1])
            last = lateral + F.interpolate(last, scale_factor=2, mode="nearest")
            outputs.insert(0, getattr(self, f"fpn_layer{index}")(last))
        outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        return outputs


class Backbone(nn.Module):
    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.body = ResNetBody(config)
        self.fpn = FPN(self.body.out_channels, config.out_channels)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[N, 3, H, W] (H, W multiples of 32) -> P2..P6 [N, out_channels, H/s, W/s] for s = 4..64"""
        return self.fpn(self.body(images))
