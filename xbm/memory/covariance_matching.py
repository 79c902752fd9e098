"""Full-covariance memory adaptation (XBM.ADAPT.NAME xbn_full): XBN with the covariance in place of the
per-dimension variances.

XBN (Ajanthan et al. 2023, Eq. 6) maps every stored embedding so that each dimension's mean and std
match the current batch's; a drift that rotates or mixes dimensions passes through it untouched. This
adapter matches the memory's mean and full covariance instead (a whitening and colouring transform, the
CORAL alignment of Sun et al. 2016 applied to the memory):

    z' = A (z - mean(memory)) + mean(batch),   A = T^(1/2) C^(-1/2)

with C the memory's covariance, plus a ridge r tr(C) / D I so that directions the memory barely spans
are not blown up, and T the target covariance. A batch of B < D rows has a
rank-deficient covariance, so T is a running estimate, the exponential moving average of the batch
covariances (`momentum` of the last estimate kept per call), shrunk towards its diagonal by
`shrinkage`: T = (1 - s) S + s diag(S). With diagonal covariances A is XBN's per-dimension std ratio.

Cost per call: the memory's covariance (M D^2), two D x D eigendecompositions, and the M x D by D x D
product that rewrites the memory (benchmarks/bench_memory_loss.py measures it at the SOP size).
"""
from __future__ import annotations

from typing import Any

import torch
from yacs.config import CfgNode

from .adaptation import _check_pair, _stats_dtype
from .adapter import MemoryAdapter
from .build import ADAPTER_REGISTRY

# Rows per chunk of the memory-sized passes: bounds the temporaries to a few MB.
_CHUNK_ROWS = 8192


def mean_and_covariance(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Row mean and unbiased covariance (D x D) of `x`, accumulated in `dtype` over row chunks."""
    mean = x.sum(dim=0, dtype=dtype) / x.shape[0]
    scatter = torch.zeros(x.shape[1], x.shape[1], dtype=dtype, device=x.device)
    for chunk in x.split(_CHUNK_ROWS):
        centered = chunk.to(dtype) - mean
        scatter += centered.T @ centered
    return mean, scatter / (x.shape[0] - 1)


def _symmetric_power(matrix: torch.Tensor, power: float, ridge: float = 0.0) -> torch.Tensor:
    """(matrix + ridge * mean eigenvalue * I)^power of a symmetric positive semi-definite matrix
    (eigenvalues that rounding made negative count as 0)."""
    values, vectors = torch.linalg.eigh(matrix)
    values = values.clamp_min(0.0)
    values = values + ridge * values.mean()
    return (vectors * values.pow(power)) @ vectors.T


class CovarianceMatching(MemoryAdapter):
    """xbn_full: the memory's mean and covariance mapped to the batch's mean and a filtered covariance.

    Args:
        momentum: share of the previous target covariance kept at each call (0: the batch's own).
        shrinkage: weight of the diagonal in the target covariance, in [0, 1] (1: per-dimension only).
        ridge: added to the memory covariance's eigenvalues before the inverse square root, as a
            fraction of their mean (> 0: the memory covariance is inverted).
        renormalize: re-normalise the adapted rows to unit length.
    """

    def __init__(self, momentum: float = 0.9, shrinkage: float = 0.1, ridge: float = 0.01,
                 renormalize: bool = False) -> None:
        for name, value in (("momentum", momentum), ("shrinkage", shrinkage)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if not ridge > 0:
            raise ValueError(f"ridge must be > 0 (the memory covariance is inverted), got {ridge!r}")
        self.momentum, self.shrinkage, self.ridge = float(momentum), float(shrinkage), float(ridge)
        self.renormalize = bool(renormalize)
        self.calls = 0
        self.covariance: torch.Tensor | None = None  # the running target covariance S

    def _target_covariance(self, batch_covariance: torch.Tensor) -> torch.Tensor:
        if self.covariance is None or self.calls == 0:
            self.covariance = batch_covariance.clone()
        else:
            previous = self.covariance.to(batch_covariance.device, batch_covariance.dtype)
            self.covariance = torch.lerp(batch_covariance, previous, self.momentum)
        diagonal = torch.diag_embed(torch.diagonal(self.covariance))
        return torch.lerp(self.covariance, diagonal, self.shrinkage)

    def map(self, memory_feats: torch.Tensor, batch_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, shift) with adapted = memory @ A.T + shift; one step of the target's filter."""
        _check_pair(memory_feats, batch_feats)
        # The M x D passes in float32 (float64 stays float64); the D x D algebra in float64, where the
        # eigenvalues span several orders of magnitude.
        dtype = _stats_dtype(memory_feats.dtype)
        memory_mean, memory_covariance = (t.double() for t in mean_and_covariance(memory_feats, dtype))
        batch_mean, batch_covariance = (t.double() for t in mean_and_covariance(
            batch_feats.detach().to(memory_feats.device), dtype))
        target = self._target_covariance(batch_covariance)
        self.calls += 1
        transform = _symmetric_power(target, 0.5) @ _symmetric_power(memory_covariance, -0.5, self.ridge)
        shift = batch_mean - memory_mean @ transform.T
        return transform, shift

    @torch.no_grad()
    def adapt_into(self, memory_feats: torch.Tensor, batch_feats: torch.Tensor, out: torch.Tensor,
                   ages: torch.Tensor | None = None) -> None:
        """One adaptation step written into ``out`` (``memory_feats`` itself for in place), chunk by
        chunk: each output chunk is written after its input chunk is read."""
        transform, shift = self.map(memory_feats, batch_feats)
        compute = _stats_dtype(memory_feats.dtype)
        transform_t, shift = transform.T.to(compute), shift.to(compute)
        for source, target in zip(memory_feats.split(_CHUNK_ROWS), out.split(_CHUNK_ROWS)):
            mapped = torch.addmm(shift, source.to(compute), transform_t)
            if self.renormalize:
                mapped /= torch.linalg.vector_norm(mapped, dim=1, keepdim=True).clamp_min(1e-12)
            target.copy_(mapped)

    def reset(self) -> None:
        self.calls = 0
        self.covariance = None

    def state_dict(self) -> dict[str, Any]:
        covariance = None if self.covariance is None else self.covariance.detach().clone()
        return {"calls": self.calls, "covariance": covariance}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"calls", "covariance"} - set(state)
        if missing:
            raise ValueError(f"CovarianceMatching state is missing keys {sorted(missing)}")
        self.calls = int(state["calls"])
        self.covariance = None if state["covariance"] is None else state["covariance"].detach().clone()

    def __repr__(self) -> str:
        return (f"CovarianceMatching(momentum={self.momentum}, shrinkage={self.shrinkage}, ridge={self.ridge}, "
                f"renormalize={self.renormalize})")


@ADAPTER_REGISTRY.register("xbn_full")
def build_xbn_full(cfg: CfgNode) -> CovarianceMatching:
    """XBM.ADAPT.NAME xbn_full: mean and full covariance (XBM.ADAPT.COVARIANCE_*, RENORMALIZE)."""
    adapt = cfg.XBM.ADAPT
    return CovarianceMatching(momentum=float(adapt.COVARIANCE_MOMENTUM), shrinkage=float(adapt.COVARIANCE_SHRINKAGE),
                              ridge=float(adapt.COVARIANCE_RIDGE), renormalize=bool(adapt.RENORMALIZE))
