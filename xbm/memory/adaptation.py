"""Memory adaptation: align the stored embeddings' moments with the current ones.

XBN (Ajanthan et al. 2023, Eq. 6) replaces every stored embedding z by
``(z - mean(memory)) / (std(memory) + eps) * std(batch) + mean(batch)``, per dimension,
so that features computed by older network weights look like the current batch.
AXBN (Eq. 23) uses, instead of the batch moments, Kalman-filtered estimates of the
dataset moments; the EMA variant filters them with a constant gain.

All statistics are computed in float32 (float64 inputs stay float64), whatever the
storage dtype, and the result is returned in the memory's dtype. Each adapter is a
`MemoryAdapter` (xbm/memory/adapter.py): ``adapter(memory_feats, batch_feats)`` returns the
adapted memory as a new tensor, ``adapter.apply_`` writes it in place and ``adapter.adapt_into``
into a given tensor; one call of any is one step of the adapter's filter.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import torch
from yacs.config import CfgNode

from .adapter import MemoryAdapter
from .build import ADAPTER_REGISTRY

# Elements per chunk of the squared-deviation pass: on CPU 8 MB of float32 stays in a
# typical L3 cache and keeps the number of parallel regions small (each costs a
# scheduling round on a busy machine); elsewhere chunks only bound the temporary.
_CPU_CHUNK_ELEMENTS = 1 << 21
_DEVICE_CHUNK_ELEMENTS = 1 << 24


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _check_pair(memory_feats: torch.Tensor, batch_feats: torch.Tensor) -> None:
    for name, x in (("memory_feats", memory_feats), ("batch_feats", batch_feats)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
            desc = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 2-D floating tensor (rows, dim), got {desc}")
        if x.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 rows for a per-dimension std, got {x.shape[0]}")
    if memory_feats.shape[1] != batch_feats.shape[1]:
        raise ValueError(
            f"memory_feats width {memory_feats.shape[1]} != batch_feats width {batch_feats.shape[1]}"
        )


def _moments(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension (mean, unbiased std) over rows, computed in ``dtype``.

    Two passes (mean, then squared deviations) for accuracy, the second over row
    chunks: torch.std_mean over dim 0 of a 55,000 x 512 matrix is ~9x slower on CPU,
    and a low-precision memory is never copied whole to float32.
    """
    mean = x.sum(dim=0, dtype=dtype) / x.shape[0]
    squares = torch.zeros_like(mean)
    budget = _CPU_CHUNK_ELEMENTS if x.device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS
    for chunk in x.split(max(1, budget // max(1, x.shape[1]))):
        # chunk - mean promotes a float16/bfloat16 chunk to mean's dtype
        squares += (chunk - mean).square_().sum(dim=0)
    return mean, (squares / (x.shape[0] - 1)).sqrt_()


def _affine(
    source_mean: torch.Tensor,
    source_std: torch.Tensor,
    target_mean: torch.Tensor,
    target_std: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with z * scale + shift == (z - source_mean) / (source_std + eps) * target_std + target_mean."""
    scale = target_std / (source_std + eps)
    shift = target_mean - source_mean * scale
    return scale, shift


def _apply_affine(
    source: torch.Tensor,
    out: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    renormalize: bool,
) -> torch.Tensor:
    """out = source * scale + shift, rows re-normalised if asked; ``out`` may be ``source``.

    One fused pass: addcmul computes in scale's dtype (float32 for a low-precision
    memory) and rounds once into ``out``.
    """
    torch.addcmul(shift, source, scale, out=out)
    if renormalize:
        norms = torch.linalg.vector_norm(out, dim=1, keepdim=True, dtype=scale.dtype)
        out.div_(norms.clamp_min_(1e-12))
    return out


def moment_match(memory_feats: torch.Tensor, batch_feats: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """XBN, Eq. 6: memory rows moved to the batch's per-dimension mean and std (a new tensor).

    ``(memory - memory.mean(0)) / (memory.std(0) + eps) * batch.std(0) + batch.mean(0)``
    with torch's default (unbiased) std, computed in float32, returned in memory's dtype.
    """
    _check_pair(memory_feats, batch_feats)
    dtype = _stats_dtype(memory_feats.dtype)
    mem_mean, mem_std = _moments(memory_feats, dtype)
    batch_mean, batch_std = _moments(batch_feats.detach().to(memory_feats.device), dtype)
    scale, shift = _affine(mem_mean, mem_std, batch_mean, batch_std, eps)
    return _apply_affine(memory_feats, torch.empty_like(memory_feats), scale, shift, False)


class _MomentAdapter(MemoryAdapter):
    """Shared machinery: subclasses choose the target moments from the batch moments."""

    def __init__(self, eps: float, renormalize: bool) -> None:
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.eps = float(eps)
        self.renormalize = bool(renormalize)
        self.calls = 0  # adaptation steps taken (the filters' time index)

    @abstractmethod
    def _target_moments(
        self, batch_mean: torch.Tensor, batch_std: torch.Tensor, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (mean, std) the memory is mapped to, given this batch's moments."""

    def _scale_shift(
        self, memory_feats: torch.Tensor, batch_feats: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_pair(memory_feats, batch_feats)
        dtype = _stats_dtype(memory_feats.dtype)
        mem_mean, mem_std = _moments(memory_feats, dtype)
        batch_mean, batch_std = _moments(batch_feats.detach().to(memory_feats.device), dtype)
        target_mean, target_std = self._target_moments(batch_mean, batch_std, batch_feats.shape[0])
        self.calls += 1
        return _affine(mem_mean, mem_std, target_mean, target_std, self.eps)

    @torch.no_grad()
    def adapt_into(self, memory_feats: torch.Tensor, batch_feats: torch.Tensor, out: torch.Tensor,
                   ages: torch.Tensor | None = None) -> None:
        """One adaptation step written into ``out`` (``memory_feats`` itself for in place): the moments
        are taken before the single fused pass writes."""
        scale, shift = self._scale_shift(memory_feats, batch_feats)
        _apply_affine(memory_feats, out, scale, shift, self.renormalize)

    def reset(self) -> None:
        """Forget the filter state (the next call starts from the batch moments)."""
        self.calls = 0

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.state_dict()) - set(state)
        if missing:
            raise ValueError(f"{type(self).__name__} state is missing keys {sorted(missing)}")
        self.calls = int(state["calls"])

    def extra_repr(self) -> str:
        return f"eps={self.eps}, renormalize={self.renormalize}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class MomentMatching(_MomentAdapter):
    """XBN: match the memory's per-dimension mean/std to the current batch's (Eq. 6)."""

    def __init__(self, eps: float = 1e-5, renormalize: bool = False) -> None:
        super().__init__(eps, renormalize)

    def _target_moments(
        self, batch_mean: torch.Tensor, batch_std: torch.Tensor, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_mean, batch_std


class _FilteredMomentAdapter(_MomentAdapter):
    """Keeps running estimates (mu, sigma) of the dataset moments, blended with gain K."""

    def __init__(self, eps: float, renormalize: bool) -> None:
        super().__init__(eps, renormalize)
        self.mu: torch.Tensor | None = None
        self.sigma: torch.Tensor | None = None

    @abstractmethod
    def _gain(self, batch_size: int) -> float:
        """Blending weight of the new measurement (1 = take the batch moments)."""

    def _target_moments(
        self, batch_mean: torch.Tensor, batch_std: torch.Tensor, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.calls == 0 or self.mu is None or self.sigma is None:
            self.mu, self.sigma = batch_mean.clone(), batch_std.clone()
        else:
            gain = self._gain(batch_size)
            mu = self.mu.to(batch_mean.device, batch_mean.dtype)
            sigma = self.sigma.to(batch_std.device, batch_std.dtype)
            # lerp is exact at both ends: gain 1 gives the batch moments bit for bit.
            self.mu = torch.lerp(mu, batch_mean, gain)
            self.sigma = torch.lerp(sigma, batch_std, gain)
        return self.mu, self.sigma

    def reset(self) -> None:
        super().reset()
        self.mu = None
        self.sigma = None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(mu=_clone_or_none(self.mu), sigma=_clone_or_none(self.sigma))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.mu = _clone_or_none(state["mu"])
        self.sigma = _clone_or_none(state["sigma"])
        if self.calls > 0 and (self.mu is None or self.sigma is None):
            raise ValueError(f"{type(self).__name__} state has calls={self.calls} but no mu/sigma")


def _clone_or_none(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach().clone()


class KalmanMomentMatching(_FilteredMomentAdapter):
    """AXBN: a random-walk Kalman filter estimates the dataset mean and std (Eq. 23).

    The state (mu, sigma) per dimension shares one scalar covariance p and gain K;
    process noise Q = q, measurement noise R = r / batch_size. Call t = 0 sets mu and
    sigma to the batch moments and p = p0. Call t >= 1 is measurement update number
    u = t - 1; when ``u % interval == 0`` (so always on t = 1, then every ``interval``
    calls; interval=1 means every call) the gain is refreshed:
    ``p- = p + q; K = p- / (p- + R); p = (1 - K) p-``; on the other calls the last K
    is reused and p is left alone. Then ``mu += K (mean(batch) - mu)`` and
    ``sigma += K (std(batch) - sigma)``, and the memory is mapped to (mu, sigma).
    With r = 0 the gain is 1 and this is XBN exactly.
    """

    def __init__(
        self,
        q: float = 1.0,
        p0: float = 1.0,
        r: float = 0.01,
        interval: int = 1,
        eps: float = 1e-5,
        renormalize: bool = False,
    ) -> None:
        super().__init__(eps, renormalize)
        for name, value in (("q", q), ("p0", p0), ("r", r)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if q == 0 and r == 0:
            raise ValueError("q and r cannot both be 0 (the Kalman gain would be 0/0)")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an int >= 1, got {interval!r}")
        self.q, self.p0, self.r, self.interval = float(q), float(p0), float(r), interval
        self.p = float(p0)
        self.gain: float | None = None

    def _gain(self, batch_size: int) -> float:
        update_index = self.calls - 1
        if self.gain is None or update_index % self.interval == 0:
            p_prior = self.p + self.q
            noise = self.r / batch_size
            self.gain = p_prior / (p_prior + noise)
            self.p = (1.0 - self.gain) * p_prior
        return self.gain

    def reset(self) -> None:
        super().reset()
        self.p = self.p0
        self.gain = None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(p=self.p, gain=self.gain)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.p = float(state["p"])
        self.gain = None if state["gain"] is None else float(state["gain"])

    def log_values(self) -> dict[str, float]:
        return {} if self.gain is None else {"kalman_gain": self.gain}

    def extra_repr(self) -> str:
        return f"q={self.q}, p0={self.p0}, r={self.r}, interval={self.interval}, " + super().extra_repr()


def kalman_steady_gain(q: float, r: float, batch_size: int) -> float:
    """The gain KalmanMomentMatching settles to (after a few calls, whatever p0 and the interval): the
    fixed point of p- = p + q, K = p- / (p- + R), p = (1 - K) p-, with R = r / batch_size, is the
    positive root p- = (q + sqrt(q^2 + 4 q R)) / 2 of p-^2 - q p- - q R = 0."""
    noise = r / batch_size
    prior = (q + math.sqrt(q * q + 4.0 * q * noise)) / 2.0
    return prior / (prior + noise)


def kalman_r_for_gain(gain: float, q: float, batch_size: int) -> float:
    """XBM.ADAPT.KALMAN_R whose steady gain is `gain` (0 < gain <= 1): the inverse of
    `kalman_steady_gain`, R = q (1 - K) / K^2 and r = R * batch_size."""
    if not 0 < gain <= 1:
        raise ValueError(f"a Kalman gain is in (0, 1], got {gain!r}")
    return batch_size * q * (1.0 - gain) / (gain * gain)


class EMAMomentMatching(_FilteredMomentAdapter):
    """Constant-gain filter of the dataset moments (the AXBN paper's EMA variant).

    ``mu = momentum * mu + (1 - momentum) * mean(batch)`` (likewise sigma), i.e. a fixed
    gain K = 1 - momentum; the first call starts from the batch moments. momentum = 0
    is XBN exactly; the paper found 0.1 best.
    """

    def __init__(self, momentum: float = 0.1, eps: float = 1e-5, renormalize: bool = False) -> None:
        super().__init__(eps, renormalize)
        if not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        self.momentum = float(momentum)

    def _gain(self, batch_size: int) -> float:
        return 1.0 - self.momentum

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, " + super().extra_repr()


def _common_options(cfg: CfgNode) -> dict[str, Any]:
    """The XBM.ADAPT keys every moment adapter takes."""
    return {"eps": float(cfg.XBM.ADAPT.EPS), "renormalize": bool(cfg.XBM.ADAPT.RENORMALIZE)}


@ADAPTER_REGISTRY.register("xbn")
def build_xbn(cfg: CfgNode) -> MomentMatching:
    """XBM.ADAPT.NAME xbn: the memory takes the batch's moments (XBN)."""
    return MomentMatching(**_common_options(cfg))


@ADAPTER_REGISTRY.register("axbn")
def build_axbn(cfg: CfgNode) -> KalmanMomentMatching:
    """XBM.ADAPT.NAME axbn: Kalman-filtered moments (AXBN) from the XBM.ADAPT.KALMAN_* keys."""
    adapt = cfg.XBM.ADAPT
    return KalmanMomentMatching(q=float(adapt.KALMAN_Q), p0=float(adapt.KALMAN_P0), r=float(adapt.KALMAN_R),
                                interval=int(adapt.KALMAN_INTERVAL), **_common_options(cfg))


@ADAPTER_REGISTRY.register("ema")
def build_ema(cfg: CfgNode) -> EMAMomentMatching:
    """XBM.ADAPT.NAME ema: moments filtered with the constant gain 1 - XBM.ADAPT.EMA_MOMENTUM."""
    return EMAMomentMatching(momentum=float(cfg.XBM.ADAPT.EMA_MOMENTUM), **_common_options(cfg))
