"""Backbones: images (N, 3, H, W) -> pooled features (N, out_features), registered in BACKBONE_REGISTRY.

    convnet      small CPU net for 32 px Glyphs (out_features = last CONVNET_WIDTHS entry)
    resnet18     torchvision ResNet-18 (512)
    resnet50     torchvision ResNet-50 (2048)
    bninception  BN-Inception (1024), loads the bn_inception-52deb4733.pth ImageNet port
    timm:<name>  any timm model (its own feature width), e.g. timm:vit_small_patch16_224.dino (384);
                 needs the timm extra

`build_backbone(cfg)` reads MODEL.BACKBONE.{NAME, PRETRAINED, FROZEN_BN}, and each backbone's
`from_config` the keys it takes of POOLING, LAST_STRIDE, STEM_RELU, CONVNET_WIDTHS; weights are loaded
before BatchNorm is frozen.
"""
from __future__ import annotations

from .build import BACKBONE_REGISTRY, build_backbone
# Each module registers its backbone when imported.
from .convnet import Backbone, ConvNet, GlobalPool
from .resnet import ResNet
from .bninception import BNInception
from .timm_backbone import TimmBackbone
from .pretrained import PretrainedWeightsError, load_pretrained

__all__ = [
    "BACKBONE_REGISTRY", "Backbone", "BNInception", "ConvNet", "GlobalPool", "PretrainedWeightsError", "ResNet",
    "TimmBackbone", "build_backbone",
]
