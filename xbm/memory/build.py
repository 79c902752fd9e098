"""Factories that turn the XBM section of the config into a memory and an adapter.

Adapters come from ADAPTER_REGISTRY: a builder `cfg -> MemoryAdapter (or a plain callable) or None` per
XBM.ADAPT.NAME, registered where the adapter is defined (adaptation.py); an adapter defined outside xbm
registers itself the same way (README, Extending xbm).
"""

from __future__ import annotations

from typing import Callable

import torch
from yacs.config import CfgNode

from ..utils.registry import Registry
from .adapter import MemoryAdapter, as_memory_adapter
from .cross_batch_memory import CrossBatchMemory

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

ADAPTER_REGISTRY: Registry[Callable[[CfgNode], MemoryAdapter | Callable | None]] = Registry("memory adapter", "XBM.ADAPT.NAME")


@ADAPTER_REGISTRY.register("none")
def no_adaptation(cfg: CfgNode) -> None:
    """XBM.ADAPT.NAME none: the memory keeps the embeddings as they were computed (plain XBM)."""
    return None


def build_memory(cfg: CfgNode, device: torch.device | str = "cpu", check_finite: bool = True,
                 track_items: bool = False) -> CrossBatchMemory | None:
    """A CrossBatchMemory of XBM.SIZE x the embedding width (MODEL.HEAD.DIM, or the backbone's features
    with 0) in XBM.DTYPE, or None if XBM.ENABLE is off.
    track_items: keep each entry's item id and un-adapted copy (DRIFT.MEMORY_PROBE re-embeds them).

    check_finite=False for a caller that checks the embeddings itself (the trainer folds that check
    into its one host synchronisation per step)."""
    if not cfg.XBM.ENABLE:
        return None
    dtype_name = str(cfg.XBM.DTYPE).lower()
    if dtype_name not in _DTYPES:
        raise ValueError(f"XBM.DTYPE must be one of {sorted(_DTYPES)}, got {cfg.XBM.DTYPE!r}")
    from ..modeling import embedding_dim  # imported here: the model package is heavier than the memory's

    return CrossBatchMemory(
        size=int(cfg.XBM.SIZE), dim=embedding_dim(cfg), device=device, dtype=_DTYPES[dtype_name],
        check_finite=check_finite, track_items=track_items,
    )


def build_adapter(cfg: CfgNode) -> MemoryAdapter | None:
    """The memory adapter named by XBM.ADAPT.NAME, built by its registered builder (a plain callable it
    returns is wrapped as a MemoryAdapter); None for none."""
    return as_memory_adapter(ADAPTER_REGISTRY.get(cfg.XBM.ADAPT.NAME)(cfg))
