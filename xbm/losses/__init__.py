"""Pair losses taking (embeddings, labels[, ref_embeddings, ref_labels])."""

from .base import PairLoss
from .build import LOSS_BUILDERS, build_loss
from .contrastive import ContrastiveLoss
from .multi_similarity import MultiSimilarityLoss
from .supcon import SupConLoss
from .triplet import TripletLoss

__all__ = ["PairLoss", "ContrastiveLoss", "MultiSimilarityLoss", "TripletLoss", "SupConLoss",
           "build_loss", "LOSS_BUILDERS"]
