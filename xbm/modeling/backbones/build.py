"""BACKBONE_REGISTRY, and build_backbone(cfg): one path for every backbone.

Each backbone module registers its class (`@BACKBONE_REGISTRY.register("convnet")`). The class says
how the config builds it (`from_config(cfg)`) and which pixels its weights expect
(`INPUT_CONVENTION`, read by the transforms without building a network). A backbone defined outside
xbm registers itself the same way and is selected by MODEL.BACKBONE.NAME (README, Extending xbm).
"""
from __future__ import annotations

from ...utils.registry import Registry
from .pretrained import load_pretrained

BACKBONE_REGISTRY: Registry[type] = Registry("backbone", "MODEL.BACKBONE.NAME")


def build_backbone(cfg):
    """The backbone named by MODEL.BACKBONE.NAME, with its weights and BatchNorm mode applied."""
    spec = cfg.MODEL.BACKBONE
    model = BACKBONE_REGISTRY.get(spec.NAME).from_config(cfg)
    load_pretrained(model, spec.NAME.lower(), spec.PRETRAINED)
    if spec.FROZEN_BN:
        model.freeze_batchnorm(True)
    return model
