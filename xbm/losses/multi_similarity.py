"""Multi-Similarity loss (Wang et al., CVPR 2019) as used by XBM."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import (PairLoss, SameLabelPairs, SimilarityLossOutput, check_finite_number,
                   count_true, exp_above_, rows_min, rows_sum, take_same_label)
from .build import LOSS_REGISTRY
from .contrastive import POSITIVE_SIMILARITY_CEILING

# Below every cosine similarity: "select every negative" without an infinite floor.
_BELOW_ALL_SIMILARITIES = -2.0


class MultiSimilarityLoss(PairLoss):
    """Multi-Similarity loss on cosine similarity S.

    For anchor i with positives P (same label, not itself) and negatives N:

    - like the official code, positives with S >= 1 - 1e-5 are dropped first;
    - hard mining (``hard_mining=True``) keeps negatives with S_n + margin > min_P S_p
      and positives with S_p - margin < max_N S_n (min / max over all of P / N);
    - loss_i = (1/alpha) log(1 + sum_P exp(-alpha (S_p - base)))
             + (1/beta)  log(1 + sum_N exp( beta (S_n - base))) over the mined sets;
      an anchor whose mined positives or mined negatives are empty gives 0;
    - the loss is sum_i loss_i / B. Without hard mining every pair is used (still 0
      for an anchor without positives or without negatives).

    Computed stably (log(1 + sum exp x) with the largest exponent factored out).
    last_stats: the mined positive / negative pairs of the anchors that contribute.
    """

    def __init__(self, alpha: float = 2.0, beta: float = 40.0, base: float = 0.5,
                 margin: float = 0.1, hard_mining: bool = True) -> None:
        super().__init__()
        self.alpha = check_finite_number("alpha", alpha, positive=True)
        self.beta = check_finite_number("beta", beta, positive=True)
        self.base = check_finite_number("base", base)
        self.margin = check_finite_number("margin", margin)
        self.hard_mining = bool(hard_mining)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, base={self.base}, "
                f"margin={self.margin}, hard_mining={self.hard_mining}")

    def _selection_bounds(self, min_pos: Tensor, max_neg: Tensor):
        """Per anchor: positives with S < pos_ceiling and negatives with S > neg_floor
        are used; and whether the anchor contributes at all."""
        if self.hard_mining:
            pos_ceiling = max_neg + self.margin
            neg_floor = min_pos - self.margin
            # The least similar positive is mined iff any positive is (and the
            # most similar negative iff any negative is).
            contributes = (min_pos < pos_ceiling) & (max_neg > neg_floor)
        else:
            pos_ceiling = torch.full_like(min_pos, math.inf)
            neg_floor = torch.full_like(max_neg, _BELOW_ALL_SIMILARITIES)
            contributes = torch.isfinite(min_pos) & torch.isfinite(max_neg)
        # Anchors that do not contribute select nothing, so neither the counts
        # nor the gradient need a per-anchor mask afterwards.
        pos_ceiling = pos_ceiling.masked_fill(~contributes, -math.inf)
        neg_floor = neg_floor.masked_fill(~contributes, math.inf)
        return pos_ceiling, neg_floor, contributes

    def similarity_loss(self, sim: Tensor, pairs: SameLabelPairs) -> SimilarityLossOutput:
        batch, rows = sim.shape[0], pairs.rows
        same_sim = take_same_label(sim, pairs, fill=-math.inf)  # sim: negatives only
        usable = pairs.positive & (same_sim < POSITIVE_SIMILARITY_CEILING)
        min_pos = rows_min(torch.where(usable, same_sim, math.inf), rows, batch)
        max_neg = sim.amax(dim=1)  # -inf without negatives
        pos_ceiling, neg_floor, contributes = self._selection_bounds(min_pos, max_neg)

        # log(1 + sum exp x) = shift + log(exp(-shift) + sum exp(x - shift)) with
        # shift = max(0, largest x): the largest x sits at the least similar
        # positive / the most similar negative, so every exp(x - shift) <= 1.
        shift_pos = (-self.alpha * (min_pos - self.base)).clamp_min(0)
        shift_neg = (self.beta * (max_neg - self.base)).clamp_min(0)

        # positives: a few pairs per anchor
        mined_pos = usable & (same_sim < pos_ceiling[rows])
        exponent = -self.alpha * (same_sim - self.base) - shift_pos[rows]
        exp_pos = torch.where(mined_pos, exponent, -math.inf).exp()
        denom_pos = torch.exp(-shift_pos) + rows_sum(exp_pos, rows, batch)

        # negatives: the dense matrix; entry -> beta (S - base) - shift when mined
        offset = torch.where(contributes, self.beta * (neg_floor - self.base) - shift_neg, 0.0)
        exp_neg, neg_pairs = exp_above_(sim, neg_floor, self.beta, offset)
        denom_neg = torch.exp(-shift_neg) + exp_neg.sum(dim=1)

        per_anchor = ((shift_pos + denom_pos.log()) / self.alpha
                      + (shift_neg + denom_neg.log()) / self.beta)
        value = torch.where(contributes, per_anchor, 0.0).sum() / batch
        # d loss_i / dS: exp_neg / denom_neg on negatives, -exp_pos / denom_pos on
        # positives (all zero on anchors that do not contribute)
        grad_sim = exp_neg.mul_(denom_neg.reciprocal()[:, None])
        grad_sim[rows, pairs.cols] = -exp_pos / denom_pos[rows]
        return SimilarityLossOutput(value, grad_sim, 1.0 / batch, count_true(mined_pos), neg_pairs)


@LOSS_REGISTRY.register("multi_similarity")
def build_multi_similarity_loss(cfg) -> MultiSimilarityLoss:
    """LOSS.NAME multi_similarity: a MultiSimilarityLoss from the LOSS.MS node."""
    node = cfg.LOSS.MS
    return MultiSimilarityLoss(alpha=node.ALPHA, beta=node.BETA, base=node.BASE,
                               margin=node.MARGIN, hard_mining=node.HARD_MINING)
