"""Pair losses taking (embeddings, labels[, ref_embeddings, ref_labels])."""

from .base import PairLoss
from .build import LOSS_REGISTRY, build_loss
# Each loss module registers itself in LOSS_REGISTRY when imported (alphabetical order is the order
# an unknown LOSS.NAME lists them in).
from .contrastive import ContrastiveLoss
from .multi_similarity import MultiSimilarityLoss
from .supcon import SupConLoss
from .triplet import TripletLoss

__all__ = ["PairLoss", "ContrastiveLoss", "MultiSimilarityLoss", "TripletLoss", "SupConLoss",
           "build_loss", "LOSS_REGISTRY"]
