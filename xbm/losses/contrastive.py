"""Contrastive loss in the form used by XBM (Wang et al., CVPR 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import (PairLoss, SameLabelPairs, SimilarityLossOutput, check_finite_number,
                   count_true, sum_of_products, take_same_label)
from .build import LOSS_REGISTRY

# The official code drops positive pairs that are (numerically) identical.
POSITIVE_SIMILARITY_CEILING = 1.0 - 1e-5

REDUCTIONS = ("batch", "pairs")


class ContrastiveLoss(PairLoss):
    """XBM's contrastive loss on cosine similarity S.

    For anchor i: sum over positives j with S_ij < 1 - 1e-5 of (1 - S_ij), plus the
    sum over negatives j with S_ij > margin of S_ij (the official value; its
    gradient equals that of S_ij - margin).

    reduction:
      "batch" (official): the sum over all anchors divided by the batch size B.
      "pairs": the same sum divided by the number of active pairs (positives
      with S < 1 - 1e-5 plus negatives with S > margin); 0 when there are none.
      This keeps a 55,000-item memory term on the scale of the in-batch term.

    ref_weights (w_j >= 0 per reference row): each pair's term times w_j; "pairs" then
    divides by the summed weight of the active pairs (a weighted mean).

    last_stats: pos_pairs / neg_pairs = those active positive / negative pairs.
    """

    supports_ref_weights = True

    def __init__(self, margin: float = 0.5, reduction: str = "batch") -> None:
        super().__init__()
        self.margin = check_finite_number("margin", margin)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}"

    def similarity_loss(self, sim: Tensor, pairs: SameLabelPairs,
                        ref_weights: Tensor | None = None) -> SimilarityLossOutput:
        # same-label entries get a finite value that is never an active negative
        same_sim = take_same_label(sim, pairs, fill=min(self.margin, -1.0) - 1.0)
        active_pos = pairs.positive & (same_sim < POSITIVE_SIMILARITY_CEILING)
        pos_weight = active_pos.to(sim.dtype)
        active_neg = sim > self.margin
        neg_pairs = count_true(active_neg)
        pos_pairs = count_true(active_pos)
        # dL/dS before reduction: +1 on active negatives, -1 on active positives (times w_j)
        grad_sim = active_neg.to(sim.dtype)
        if ref_weights is not None:
            grad_sim.mul_(ref_weights)
            pos_weight = pos_weight * ref_weights[pairs.cols]
            active_weight = grad_sim.sum() + pos_weight.sum()  # before the positives' entries are written
        total = sum_of_products(grad_sim, sim) + (pos_weight * (1.0 - same_sim)).sum()
        grad_sim[pairs.rows, pairs.cols] = -pos_weight
        if self.reduction == "batch":
            scale = 1.0 / sim.shape[0]
        elif ref_weights is None:
            scale = (pos_pairs + neg_pairs).clamp_min(1).to(sim.dtype).reciprocal()
        else:
            # a summed weight too small to invert (or 0: nothing active) divides by 1 instead
            tiny = torch.finfo(sim.dtype).tiny
            scale = torch.where(active_weight > tiny, active_weight, 1.0).reciprocal()
        return SimilarityLossOutput(total * scale, grad_sim, scale, pos_pairs, neg_pairs)


@LOSS_REGISTRY.register("contrastive")
def build_contrastive_loss(cfg) -> ContrastiveLoss:
    """LOSS.NAME contrastive: a ContrastiveLoss from the LOSS.CONTRASTIVE node."""
    node = cfg.LOSS.CONTRASTIVE
    return ContrastiveLoss(margin=node.MARGIN, reduction=node.REDUCTION)
