"""Factories that turn the XBM section of the config into a memory and an adapter."""

from __future__ import annotations

import torch
from yacs.config import CfgNode

from .adaptation import EMAMomentMatching, KalmanMomentMatching, MomentMatching
from .cross_batch_memory import CrossBatchMemory

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ADAPTERS = ("none", "xbn", "axbn", "ema")


def build_memory(cfg: CfgNode, device: torch.device | str = "cpu", check_finite: bool = True) -> CrossBatchMemory | None:
    """A CrossBatchMemory of XBM.SIZE x MODEL.HEAD.DIM in XBM.DTYPE, or None if XBM.ENABLE is off.

    check_finite=False for a caller that checks the embeddings itself (the trainer folds that check
    into its one host synchronisation per step)."""
    if not cfg.XBM.ENABLE:
        return None
    dtype_name = str(cfg.XBM.DTYPE).lower()
    if dtype_name not in _DTYPES:
        raise ValueError(f"XBM.DTYPE must be one of {sorted(_DTYPES)}, got {cfg.XBM.DTYPE!r}")
    return CrossBatchMemory(
        size=int(cfg.XBM.SIZE), dim=int(cfg.MODEL.HEAD.DIM), device=device, dtype=_DTYPES[dtype_name],
        check_finite=check_finite,
    )


def build_adapter(cfg: CfgNode) -> MomentMatching | KalmanMomentMatching | EMAMomentMatching | None:
    """The memory adapter named by XBM.ADAPT.NAME (none | xbn | axbn | ema); None for none."""
    adapt = cfg.XBM.ADAPT
    name = str(adapt.NAME).lower()
    if name not in _ADAPTERS:
        raise ValueError(f"XBM.ADAPT.NAME must be one of {list(_ADAPTERS)}, got {adapt.NAME!r}")
    common = {"eps": float(adapt.EPS), "renormalize": bool(adapt.RENORMALIZE)}
    if name == "xbn":
        return MomentMatching(**common)
    if name == "axbn":
        return KalmanMomentMatching(
            q=float(adapt.KALMAN_Q),
            p0=float(adapt.KALMAN_P0),
            r=float(adapt.KALMAN_R),
            interval=int(adapt.KALMAN_INTERVAL),
            **common,
        )
    if name == "ema":
        return EMAMomentMatching(momentum=float(adapt.EMA_MOMENTUM), **common)
    return None
