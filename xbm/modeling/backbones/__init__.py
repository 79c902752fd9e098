"""Backbones: images (N, 3, H, W) -> pooled features (N, out_features).

    convnet      small CPU net for 32 px Glyphs (out_features = last CONVNET_WIDTHS entry)
    resnet18     torchvision ResNet-18 (512)
    resnet50     torchvision ResNet-50 (2048)
    bninception  BN-Inception (1024), loads the bn_inception-52deb4733.pth ImageNet port

`build_backbone(cfg)` reads MODEL.BACKBONE.{NAME, PRETRAINED, POOLING, LAST_STRIDE, STEM_RELU,
FROZEN_BN, CONVNET_WIDTHS}; weights are loaded before BatchNorm is frozen.
"""
from __future__ import annotations

from .bninception import BNInception
from .convnet import Backbone, ConvNet, GlobalPool
from .pretrained import PretrainedWeightsError, load_pretrained
from .resnet import ResNet

BACKBONES = ("convnet", "resnet18", "resnet50", "bninception")

__all__ = [
    "BACKBONES", "Backbone", "BNInception", "ConvNet", "GlobalPool", "PretrainedWeightsError", "ResNet",
    "build_backbone",
]


def build_backbone(cfg) -> Backbone:
    """The backbone named by MODEL.BACKBONE.NAME, with its weights and BatchNorm mode applied."""
    spec = cfg.MODEL.BACKBONE
    name = spec.NAME.lower()
    if name not in BACKBONES:
        raise ValueError(f"MODEL.BACKBONE.NAME {spec.NAME!r} is not one of {BACKBONES}")
    if name.startswith("resnet"):
        model = ResNet(name, pooling=spec.POOLING, last_stride=int(spec.LAST_STRIDE), stem_relu=spec.STEM_RELU)
    else:
        if not spec.STEM_RELU:
            raise ValueError(f"MODEL.BACKBONE.STEM_RELU False applies to ResNets only; keep True for {name}")
        if int(spec.LAST_STRIDE) != 2:
            raise ValueError(
                f"MODEL.BACKBONE.LAST_STRIDE {spec.LAST_STRIDE} applies to ResNets only; keep 2 for {name}"
            )
        if name == "convnet":
            model = ConvNet(spec.CONVNET_WIDTHS, pooling=spec.POOLING)
        else:
            model = BNInception(pooling=spec.POOLING)
    load_pretrained(model, name, spec.PRETRAINED)
    if spec.FROZEN_BN:
        model.freeze_batchnorm(True)
    return model
