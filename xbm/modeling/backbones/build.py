"""BACKBONE_REGISTRY, and build_backbone(cfg): one path for every backbone.

Each backbone module registers its class (`@BACKBONE_REGISTRY.register("convnet")`). The class says
how the config builds it (`from_config(cfg)`) and which pixels its weights expect
(`INPUT_CONVENTION`, read by the transforms without building a network). A backbone defined outside
xbm registers itself the same way and is selected by MODEL.BACKBONE.NAME (README, Extending xbm).
"""
from __future__ import annotations

from ...utils.registry import Registry

BACKBONE_REGISTRY: Registry[type] = Registry("backbone", "MODEL.BACKBONE.NAME")
# MODEL.BACKBONE.NAME timm:<name>: the family of every timm model (xbm/modeling/backbones/timm_backbone.py)
TIMM_PREFIX = "timm:"


def is_timm(name: str) -> bool:
    return name.strip().lower().startswith(TIMM_PREFIX)


def build_backbone(cfg):
    """The backbone named by MODEL.BACKBONE.NAME, with its weights and BatchNorm mode applied."""
    spec = cfg.MODEL.BACKBONE
    if not is_timm(spec.NAME):
        refuse_timm_keys(spec)
    model = BACKBONE_REGISTRY.get(spec.NAME).from_config(cfg)
    model.load_weights(spec)
    if spec.FROZEN_BN:
        model.freeze_batchnorm(True)
    return model


def refuse_timm_keys(spec) -> None:
    """MODEL.BACKBONE.TIMM.* change timm models only: another backbone keeps their defaults."""
    from ...config.defaults import get_cfg

    defaults = get_cfg().MODEL.BACKBONE.TIMM
    for key, value in spec.TIMM.items():
        if value != defaults[key]:
            raise ValueError(f"MODEL.BACKBONE.TIMM.{key} applies to timm backbones (MODEL.BACKBONE.NAME timm:<name>) "
                             f"only; remove it for {spec.NAME}")
