"""Age weighting of the memory's pairs (XBM.AGE_WEIGHT_SCALE): trust an entry less the older it is.

An entry enqueued `a` iterations ago was computed by a network `a` steps older than the one the loss
trains; the older, the further it has drifted (BENCHMARKS, "Memory drift"). Instead of correcting the
entries (XBN) or the encoder (a momentum key encoder, a refresh), the loss can count an old entry's
pairs less: entry j weighs

    w_j = exp(-a_j / scale) / mean_k exp(-a_k / scale)      (over the valid entries k)

so a memory of one age is unweighted and the memory term keeps its scale (the weights average 1); a
weight is floored at 1e-6 of the newest entry's (ages beyond ~14 scales), so that none underflows to 0
in float32 and the weighted losses stay finite. The
losses take the weights as `ref_weights` (xbm/losses/base.py): the contrastive loss multiplies each
pair's term by w_j, supervised contrastive counts entry j as w_j copies of itself.
"""
from __future__ import annotations

import torch

from .cross_batch_memory import CrossBatchMemory

# The smallest weight against the newest entry's: exp(-13.8); far above float32's underflow.
MIN_RELATIVE_WEIGHT = 1e-6


class AgeWeighting:
    """Weights of the memory's valid entries, in `memory.get()`'s order, from their age in iterations.

    Args:
        scale: the age (iterations) at which an entry's weight falls by a factor e against a new one.
    """

    def __init__(self, scale: float):
        if not scale > 0:
            raise ValueError(f"scale must be > 0 (iterations), got {scale!r}")
        self.scale = float(scale)

    @torch.no_grad()
    def weights(self, memory: CrossBatchMemory, rows_per_iteration: int) -> torch.Tensor:
        """(len(memory),) float32 weights averaging 1; `rows_per_iteration`: the global batch."""
        ages = torch.div(memory.slot_ages()[: len(memory)], rows_per_iteration, rounding_mode="floor")
        # shifted by the youngest age (0 once a batch is in): the same weights, no underflow of all of them
        raw = torch.exp(-(ages - ages.min()).float() / self.scale).clamp_min_(MIN_RELATIVE_WEIGHT)
        return raw / raw.mean()

    def __repr__(self) -> str:
        return f"AgeWeighting(scale={self.scale})"
