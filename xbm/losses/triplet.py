"""Triplet margin loss on cosine similarity, with three triplet selections."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import (PairLoss, SameLabelPairs, SimilarityLossOutput, check_finite_number,
                   count_true, rows_min, sum_of_products, take_same_label)
from .build import LOSS_REGISTRY

MINING_MODES = ("semihard", "hard", "all")


class TripletLoss(PairLoss):
    """Triplet loss on cosine similarity S; the hinge of a triplet (a, p, n) is
    ``max(0, S_an - S_ap + margin)`` (the same as ``d_ap - d_an + margin`` with
    d = 1 - S).

    mining:
      "all": every triplet with a positive hinge, i.e. S_an > S_ap - margin; the
        loss is the mean hinge over those triplets (0 if none).
      "semihard": the triplets with S_ap - margin < S_an < S_ap (negative less
        similar than the positive but inside the margin); mean hinge over them.
      "hard" (batch-hard): per anchor its least similar positive and most similar
        negative; the mean hinge over the anchors that have both (anchors with a
        zero hinge count in the mean).

    "all" and "semihard" are exact and memory-bounded against a large reference:
    instead of a B x P x N tensor, each anchor's negatives are sorted once and
    the number of negatives paired with each positive (and vice versa) is found
    by binary search; the loss is then linear in S with those counts as weights.
    They synchronise once with the host (the largest positive count per anchor).

    last_stats: "hard": the selected (anchor, positive) and (anchor, negative)
    pairs of anchors with a positive hinge; otherwise the distinct positive and
    negative pairs that occur in at least one selected triplet.
    """

    def __init__(self, margin: float = 0.1, mining: str = "semihard") -> None:
        super().__init__()
        self.margin = check_finite_number("margin", margin)
        if mining not in MINING_MODES:
            raise ValueError(f"mining must be one of {MINING_MODES}, got {mining!r}")
        self.mining = mining

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mining={self.mining!r}"

    def similarity_loss(self, sim: Tensor, pairs: SameLabelPairs) -> SimilarityLossOutput:
        if self.mining == "hard":
            return self._batch_hard(sim, pairs)
        return self._counted_triplets(sim, pairs)

    def _batch_hard(self, sim: Tensor, pairs: SameLabelPairs) -> SimilarityLossOutput:
        batch, rows = sim.shape[0], pairs.rows
        same_sim = take_same_label(sim, pairs, fill=-math.inf)  # sim: negatives only
        hardest_neg, neg_col = sim.max(dim=1)
        pos_sim = torch.where(pairs.positive, same_sim, math.inf)
        hardest_pos = rows_min(pos_sim, rows, batch)
        # column of the hardest positive (the smallest one on ties)
        is_hardest = pairs.positive & (pos_sim == hardest_pos[rows])
        no_column = sim.shape[1]
        pos_col = torch.full_like(hardest_pos, no_column, dtype=torch.long).scatter_reduce_(
            0, rows, torch.where(is_hardest, pairs.cols, no_column), "amin")
        has_both = torch.isfinite(hardest_pos) & torch.isfinite(hardest_neg)
        hinge = hardest_neg - hardest_pos + self.margin
        active = has_both & (hinge > 0)
        scale = has_both.sum().clamp_min(1).to(sim.dtype).reciprocal()
        value = torch.where(active, hinge, 0.0).sum() * scale

        weight = active.to(sim.dtype)
        anchors = torch.arange(batch, device=sim.device)
        grad_sim = torch.zeros_like(sim)
        grad_sim[anchors, neg_col] = weight
        grad_sim[anchors, pos_col.clamp_max(no_column - 1)] -= weight
        pairs_used = active.sum()
        return SimilarityLossOutput(value, grad_sim, scale, pairs_used, pairs_used.clone())

    def _counted_triplets(self, sim: Tensor, pairs: SameLabelPairs) -> SimilarityLossOutput:
        batch, size = sim.shape
        # same-label entries: a finite value below every threshold S_p - margin
        below_all = -3.0 - abs(self.margin)
        same_sim = take_same_label(sim, pairs, fill=below_all)
        pos_sim, pos_row, pos_col, pos_slot = _padded_positives(same_sim, pairs, batch)
        if pos_sim.shape[1] == 0:
            zero_count = torch.zeros((), dtype=torch.long, device=sim.device)
            return SimilarityLossOutput(sim.new_zeros(()), torch.zeros_like(sim), 1.0,
                                        zero_count, zero_count.clone())
        # A negative n pairs with positive p when S_n > S_p - margin (hinge > 0).
        pos_floor = pos_sim - self.margin
        neg_sorted = sim.sort(dim=1).values.contiguous()  # searchsorted wants row-major
        queries = sim.contiguous()
        # negatives per positive: #{n : S_n > floor_p}
        per_pos = size - torch.searchsorted(neg_sorted, pos_floor, right=True)
        # positives per negative: #{p : floor_p < S_n}
        per_neg = torch.searchsorted(pos_floor, queries)
        if self.mining == "semihard":
            # ... and additionally S_n < S_p
            per_pos -= size - torch.searchsorted(neg_sorted, pos_sim)
            per_neg -= torch.searchsorted(pos_sim, queries, right=True)

        triplets = per_pos.sum()
        per_pos_weight = per_pos.to(sim.dtype)
        grad_sim = per_neg.to(sim.dtype)
        # sum of hinges = sum_n per_neg S_n - sum_p per_pos S_p + margin * triplets
        pos_term = torch.where(per_pos > 0, per_pos_weight * pos_sim, 0.0).sum()
        hinge_sum = (sum_of_products(grad_sim, queries) - pos_term
                     + self.margin * triplets.to(sim.dtype))
        grad_sim[pos_row, pos_col] = -per_pos_weight[pos_row, pos_slot]
        scale = triplets.clamp_min(1).to(sim.dtype).reciprocal()
        return SimilarityLossOutput(hinge_sum * scale, grad_sim, scale,
                                    count_true(per_pos), count_true(per_neg))


def _padded_positives(same_sim: Tensor, pairs: SameLabelPairs, batch: int):
    """Each anchor's positive similarities in ascending order, padded with +inf to
    the largest number of positives per anchor (B, P); and for every positive pair
    its row, column and slot in that layout. Synchronises once."""
    positive = pairs.positive
    rows, cols, values = pairs.rows[positive], pairs.cols[positive], same_sim[positive]
    # sort by value, then stably by row: rows ascending, values ascending within
    order = values.argsort(stable=True)
    order = order[rows[order].argsort(stable=True)]
    rows, cols, values = rows[order], cols[order], values[order]
    counts = torch.bincount(rows, minlength=batch)
    width = int(counts.max()) if rows.numel() else 0
    first_of_row = counts.cumsum(0) - counts
    slot = torch.arange(rows.numel(), device=rows.device) - first_of_row[rows]
    padded = values.new_full((batch, width), math.inf)
    padded[rows, slot] = values
    return padded, rows, cols, slot


@LOSS_REGISTRY.register("triplet")
def build_triplet_loss(cfg) -> TripletLoss:
    """LOSS.NAME triplet: a TripletLoss from the LOSS.TRIPLET node."""
    node = cfg.LOSS.TRIPLET
    return TripletLoss(margin=node.MARGIN, mining=node.MINING)
