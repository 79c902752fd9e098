"""ResNet-18 / ResNet-50 backbones: torchvision's networks without avgpool and fc.

Parameter names are torchvision's (conv1, bn1, layer1..layer4), so torchvision
state dicts load directly (their `fc.*` classifier is dropped). LAST_STRIDE 1 sets
the stride of the last stage to 1, doubling the side of the final feature map
(7 -> 14 at 224 px) at the same number of parameters.
"""
from __future__ import annotations

import torch
from torchvision import models

from .build import BACKBONE_REGISTRY
from .convnet import Backbone

ARCHITECTURES = {"resnet18": models.resnet18, "resnet50": models.resnet50}


class ResNet(Backbone):
    """A torchvision ResNet trunk + global pooling; `out_features` 512 (18) or 2048 (50)."""

    def __init__(self, arch: str = "resnet50", pooling: str = "avg", last_stride: int = 2, stem_relu: bool = True):
        super().__init__(pooling)
        # False: bn1 -> maxpool without the ReLU, as the official XBM ResNet does (MODEL.BACKBONE.STEM_RELU).
        self.stem_relu = bool(stem_relu)
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown ResNet {arch!r}; choose one of {sorted(ARCHITECTURES)}")
        if last_stride not in (1, 2):
            raise ValueError(f"MODEL.BACKBONE.LAST_STRIDE must be 1 or 2, got {last_stride}")
        net = ARCHITECTURES[arch](weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_features = net.fc.in_features
        if last_stride == 1:
            first_block = self.layer4[0]
            for conv in (first_block.conv1, first_block.conv2, first_block.downsample[0]):
                conv.stride = (1, 1)

    @classmethod
    def from_config(cls, cfg) -> "ResNet":
        """The architecture MODEL.BACKBONE.NAME, with POOLING, LAST_STRIDE and STEM_RELU."""
        spec = cfg.MODEL.BACKBONE
        return cls(spec.NAME.lower(), pooling=spec.POOLING, last_stride=int(spec.LAST_STRIDE),
                   stem_relu=spec.STEM_RELU)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        if self.stem_relu:
            x = self.relu(x)
        x = self.maxpool(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


for _arch in ARCHITECTURES:  # one class, one registered name per depth
    BACKBONE_REGISTRY.register(_arch, ResNet)
