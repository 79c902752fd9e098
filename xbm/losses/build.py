"""build_loss(cfg): the loss named by LOSS.NAME, from LOSS_REGISTRY.

Each loss module registers a builder `cfg -> nn.Module` that reads its own LOSS.* node
(`@LOSS_REGISTRY.register("contrastive")` in contrastive.py); a loss defined outside xbm registers
itself the same way and is then selected by its name in LOSS.NAME (README, Extending xbm).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..utils.registry import Registry

LOSS_REGISTRY: Registry[Callable[..., nn.Module]] = Registry("loss", "LOSS.NAME")


def build_loss(cfg) -> nn.Module:
    """The pair loss selected by ``cfg.LOSS.NAME``, built by its registered builder."""
    return LOSS_REGISTRY.get(cfg.LOSS.NAME)(cfg)
