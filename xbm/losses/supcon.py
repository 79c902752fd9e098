"""Supervised contrastive loss (Khosla et al., NeurIPS 2020) with the pair-margin
mining used by XBN / AXBN (Ajanthan et al., 2023)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import (PairLoss, SameLabelPairs, SimilarityLossOutput, check_finite_number,
                   exp_above_, rows_max, rows_sum, take_same_label)
from .build import LOSS_REGISTRY

# Below every cosine similarity: "select every negative" without an infinite floor.
_BELOW_ALL_SIMILARITIES = -2.0


class SupConLoss(PairLoss):
    """Supervised contrastive loss over mined pairs, on cosine similarity S.

    Mining (``mining=True``, a pair-margin miner on the normalised Euclidean
    distance d = ||a/|a| - r/|r||| = sqrt(2 - 2 S)): positives with
    d > pos_margin and negatives with d < neg_margin are kept, i.e.
    S < 1 - pos_margin^2 / 2 and S > 1 - neg_margin^2 / 2. ``mining=False`` keeps
    every positive and negative pair.

    For anchor i with mined positives P_i and mined negatives N_i:
        loss_i = -1/|P_i| sum_{p in P_i} log(exp(S_ip/T) / sum_{k in P_i + N_i} exp(S_ik/T))

    Reduction: the mean of loss_i over the anchors with |P_i| >= 1 and
    |P_i| + |N_i| >= 2, which are exactly the anchors with loss_i > 0 (an anchor
    whose denominator holds only its single positive has loss 0); 0 if there are
    none. pytorch-metric-learning's SupConLoss with mined pairs averages over the
    anchors whose loss is > 0 (AvgNonZeroReducer), the same set up to floating
    point; unlike it, a batch in which no negative is mined still gets the loss
    of its positives rather than 0.

    ref_weights (w_k per reference row): reference k counts as w_k copies of itself,
    loss_i = -sum_p (w_p / W_i) log(exp(S_ip/T) / sum_k w_k exp(S_ik/T)) with
    W_i = sum_{p in P_i} w_p (all weights 1: the loss above); an anchor with W_i = 0 (or a
    denominator that underflows to 0) does not contribute. Weights must be >= 0.

    last_stats: the mined positive / negative pairs of the contributing anchors.
    """

    supports_ref_weights = True

    def __init__(self, temperature: float = 0.1, pos_margin: float = 0.2,
                 neg_margin: float = 0.8, mining: bool = True) -> None:
        super().__init__()
        self.temperature = check_finite_number("temperature", temperature, positive=True)
        self.pos_margin = check_finite_number("pos_margin", pos_margin, non_negative=True)
        self.neg_margin = check_finite_number("neg_margin", neg_margin, non_negative=True)
        self.mining = bool(mining)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, pos_margin={self.pos_margin}, "
                f"neg_margin={self.neg_margin}, mining={self.mining}")

    def similarity_loss(self, sim: Tensor, pairs: SameLabelPairs,
                        ref_weights: Tensor | None = None) -> SimilarityLossOutput:
        batch, rows = sim.shape[0], pairs.rows
        same_sim = take_same_label(sim, pairs, fill=-math.inf)  # sim: negatives only
        # d > m  <=>  2 - 2 S > m^2  <=>  S < 1 - m^2 / 2
        mined_pos = pairs.positive
        if self.mining:
            mined_pos = mined_pos & (same_sim < 1.0 - self.pos_margin ** 2 / 2)
        pos_weight = mined_pos.to(sim.dtype)
        n_pos = rows_sum(pos_weight, rows, batch)
        max_neg = sim.amax(dim=1)
        # Anchors without a mined positive do not contribute: they select no
        # negatives, so the negative count needs no per-anchor mask.
        neg_floor = torch.full_like(n_pos, 1.0 - self.neg_margin ** 2 / 2 if self.mining
                                    else _BELOW_ALL_SIMILARITIES)
        neg_floor = neg_floor.masked_fill_(n_pos == 0, math.inf)
        has_neg = max_neg > neg_floor
        # loss_i > 0 iff the denominator holds a second term
        contributes = (n_pos >= 2) | ((n_pos >= 1) & has_neg)
        n_anchors = contributes.sum()

        # shift every exponent by the largest similarity in the anchor's denominator
        row_max = rows_max(torch.where(mined_pos, same_sim, -math.inf), rows, batch)
        row_max = torch.where(has_neg, torch.maximum(row_max, max_neg), row_max)
        row_max = row_max.masked_fill(~torch.isfinite(row_max), 0.0)
        inv_t = 1.0 / self.temperature
        offset = torch.where(has_neg, (neg_floor - row_max) * inv_t, 0.0)
        # exp((S - row_max) / T) on mined negatives, else 0; overwrites sim
        exp_neg, neg_pairs = exp_above_(sim, neg_floor, inv_t, offset)
        exp_pos = torch.where(mined_pos, (same_sim - row_max[rows]) * inv_t, -math.inf).exp()
        pos_sim = torch.where(mined_pos, same_sim, 0.0)
        if ref_weights is not None:  # w_k copies of reference k: every term over k times w_k
            exp_neg.mul_(ref_weights)
            pos_weight = pos_weight * ref_weights[pairs.cols]
            exp_pos, pos_sim = exp_pos * ref_weights[pairs.cols], pos_sim * ref_weights[pairs.cols]
            weight_pos = rows_sum(pos_weight, rows, batch)
        partition = exp_neg.sum(dim=1) + rows_sum(exp_pos, rows, batch)
        pos_sim_sum = rows_sum(pos_sim, rows, batch)
        if ref_weights is not None:
            # An anchor whose positives weigh (next to) nothing, or whose denominator underflowed, has no
            # loss: 1 / W_i and 1 / Z_i would overflow.
            tiny = torch.finfo(sim.dtype).tiny
            contributes = contributes & (weight_pos > tiny) & (partition > tiny)
            n_anchors = contributes.sum()

        if ref_weights is None:
            inv_n_pos = torch.where(contributes, n_pos.clamp_min(1).reciprocal(), 0.0)
        else:  # 1 / W_i
            inv_n_pos = torch.where(contributes, weight_pos, math.inf).reciprocal()
        log_partition = torch.where(contributes, partition.log(), 0.0)
        # loss_i = log sum_k exp(S_ik / T) - mean_p S_ip / T
        per_anchor = log_partition + inv_t * (row_max - pos_sim_sum * inv_n_pos)
        scale = n_anchors.clamp_min(1).to(sim.dtype).reciprocal()
        value = torch.where(contributes, per_anchor, 0.0).sum() * scale

        # d loss_i / d S_ik = (softmax_ik - [k in P_i] / |P_i|) / T
        inv_partition = torch.where(contributes, partition.reciprocal(), 0.0)
        grad_sim = exp_neg.mul_(inv_partition[:, None])
        if ref_weights is None:
            grad_sim[rows, pairs.cols] = pos_weight * (exp_pos * inv_partition[rows] - inv_n_pos[rows])
        else:  # exp_pos already carries w_p: d loss_i / d S_ip = (w_p exp_ip / Z_i - w_p / W_i) / T
            grad_sim[rows, pairs.cols] = torch.where(mined_pos, exp_pos * inv_partition[rows]
                                                     - pos_weight * inv_n_pos[rows], 0.0)

        pos_pairs = torch.where(contributes, n_pos, 0.0).sum().long()
        return SimilarityLossOutput(value, grad_sim, scale * inv_t, pos_pairs, neg_pairs)


@LOSS_REGISTRY.register("supcon")
def build_supcon_loss(cfg) -> SupConLoss:
    """LOSS.NAME supcon: a SupConLoss from the LOSS.SUPCON node."""
    node = cfg.LOSS.SUPCON
    return SupConLoss(temperature=node.TEMPERATURE, pos_margin=node.POS_MARGIN,
                      neg_margin=node.NEG_MARGIN, mining=node.MINING)
