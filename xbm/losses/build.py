"""build_loss(cfg): the loss named by LOSS.NAME, configured from its LOSS.* node."""

from __future__ import annotations

from typing import Callable

from torch import nn

from .contrastive import ContrastiveLoss
from .multi_similarity import MultiSimilarityLoss
from .supcon import SupConLoss
from .triplet import TripletLoss


def _contrastive(cfg) -> nn.Module:
    node = cfg.LOSS.CONTRASTIVE
    return ContrastiveLoss(margin=node.MARGIN, reduction=node.REDUCTION)


def _multi_similarity(cfg) -> nn.Module:
    node = cfg.LOSS.MS
    return MultiSimilarityLoss(alpha=node.ALPHA, beta=node.BETA, base=node.BASE,
                               margin=node.MARGIN, hard_mining=node.HARD_MINING)


def _triplet(cfg) -> nn.Module:
    node = cfg.LOSS.TRIPLET
    return TripletLoss(margin=node.MARGIN, mining=node.MINING)


def _supcon(cfg) -> nn.Module:
    node = cfg.LOSS.SUPCON
    return SupConLoss(temperature=node.TEMPERATURE, pos_margin=node.POS_MARGIN,
                      neg_margin=node.NEG_MARGIN, mining=node.MINING)


LOSS_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "contrastive": _contrastive,
    "multi_similarity": _multi_similarity,
    "triplet": _triplet,
    "supcon": _supcon,
}


def build_loss(cfg) -> nn.Module:
    """The pair loss selected by ``cfg.LOSS.NAME`` (one of LOSS_BUILDERS)."""
    name = cfg.LOSS.NAME
    if name not in LOSS_BUILDERS:
        raise ValueError(f"LOSS.NAME must be one of {sorted(LOSS_BUILDERS)}, got {name!r}")
    return LOSS_BUILDERS[name](cfg)
