"""Age-cohort memory adaptation (XBM.ADAPT.NAME xbn_age): XBN applied to each age group of the memory
separately.

XBN (Ajanthan et al. 2023, Eq. 6) fits one per-dimension affine map to the whole memory, whose entries
were computed by networks of many ages: the newest by nearly today's network, the oldest by one
XBM.SIZE / batch iterations older, which drifted further. One map for all of them corrects the average
drift, too little for the old entries and too much for the new. This adapter splits the valid entries
into `groups` cohorts of equal age span (by the number of rows enqueued after them) and maps each
cohort's per-dimension mean and std to the batch's: each cohort, like the whole memory, is a sample of
the data distribution, so its moments should match the batch's as much as the whole memory's do.

Cost per call: XBN's two passes over the memory plus a gather and scatter of every row.
"""
from __future__ import annotations

import torch
from yacs.config import CfgNode

from .adaptation import MomentMatching, _affine, _apply_affine, _check_pair, _common_options, _moments, _stats_dtype
from .build import ADAPTER_REGISTRY


class CohortMomentMatching(MomentMatching):
    """xbn_age: per-dimension moment matching of each age cohort of the memory to the batch.

    `CrossBatchMemory.adapt_` passes `ages` (rows enqueued after each valid entry, 0 for the newest)
    to adapters whose `uses_slot_ages` is True. A cohort with fewer than 2 entries is left as it is
    (its std is undefined).
    """

    uses_slot_ages = True

    def __init__(self, groups: int = 4, eps: float = 1e-5, renormalize: bool = False) -> None:
        super().__init__(eps, renormalize)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be an int >= 1, got {groups!r}")
        self.groups = groups

    def cohorts(self, ages: torch.Tensor, capacity: int) -> torch.Tensor:
        """Cohort of each entry, 0 (newest) to groups - 1, by age over `capacity` equal spans."""
        return (ages * self.groups).div(capacity, rounding_mode="floor").clamp_max(self.groups - 1)

    @torch.no_grad()
    def adapt_into(self, memory_feats: torch.Tensor, batch_feats: torch.Tensor, out: torch.Tensor,
                   ages: torch.Tensor | None = None) -> None:
        """One adaptation step written into ``out`` (``memory_feats`` itself for in place); `ages` as
        CrossBatchMemory.slot_ages gives them for the valid rows. Cohorts are disjoint, so each is read
        before it is written."""
        _check_pair(memory_feats, batch_feats)
        if ages is None or ages.shape != (memory_feats.shape[0],):
            raise ValueError("xbn_age needs the age of every memory row (CrossBatchMemory.adapt_ passes them)")
        dtype = _stats_dtype(memory_feats.dtype)
        batch_mean, batch_std = _moments(batch_feats.detach().to(memory_feats.device), dtype)
        target_mean, target_std = self._target_moments(batch_mean, batch_std, batch_feats.shape[0])
        self.calls += 1
        cohort = self.cohorts(ages.to(memory_feats.device), memory_feats.shape[0])
        in_place = out.data_ptr() == memory_feats.data_ptr()
        for group in range(self.groups):
            rows = torch.nonzero(cohort == group).squeeze(1)
            members = memory_feats[rows]
            if len(rows) >= 2:
                mean, std = _moments(members, dtype)
                scale, shift = _affine(mean, std, target_mean, target_std, self.eps)
                out[rows] = _apply_affine(members, members, scale, shift, self.renormalize)
            elif not in_place:
                out[rows] = members  # too small a cohort is left as it is

    def extra_repr(self) -> str:
        return f"groups={self.groups}, " + super().extra_repr()


@ADAPTER_REGISTRY.register("xbn_age")
def build_xbn_age(cfg: CfgNode) -> CohortMomentMatching:
    """XBM.ADAPT.NAME xbn_age: XBN per age cohort (XBM.ADAPT.AGE_GROUPS cohorts)."""
    return CohortMomentMatching(groups=int(cfg.XBM.ADAPT.AGE_GROUPS), **_common_options(cfg))
