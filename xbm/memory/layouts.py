"""Reading a saved memory: the friendly mismatch error and the layouts of older checkpoints.

Every layout xbm has written loads into today's `CrossBatchMemory` (a `load_state_dict` pre-hook, on
load_state_dict's own copy of the dict):
  - before the ring counters became extra state, they were `pointer` and `filled` (0-d int64 tensors);
  - before item tracking became its own submodule, its buffers were `item_ids` and `enqueued_feats`
    beside `feats` (now `items.item_ids`, `items.enqueued_feats`);
  - a memory saved with item tracking loads into one without it and the other way round
    (DRIFT.MEMORY_PROBE may change when a run resumes).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .item_tracking import UNKNOWN_ITEM

if TYPE_CHECKING:
    from .cross_batch_memory import CrossBatchMemory

OLD_COUNTER_KEYS = ("pointer", "filled")
ITEM_KEYS = ("item_ids", "enqueued_feats")  # the ItemTracker's buffers, once the memory's own


def check_and_upgrade_state(module: CrossBatchMemory, state_dict: dict, prefix: str, local_metadata: dict,
                            strict: bool, missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """load_state_dict pre-hook of CrossBatchMemory."""
    check_compatible(module, state_dict, prefix)
    upgrade_counters(state_dict, prefix, missing_keys)
    upgrade_item_keys(state_dict, prefix)
    reconcile_item_buffers(module, state_dict, prefix)


def check_compatible(module: CrossBatchMemory, state_dict: dict, prefix: str = "") -> None:
    """A ValueError naming XBM.SIZE / MODEL.HEAD.DIM / XBM.DTYPE when a saved memory does not fit this one
    (instead of torch's generic size-mismatch message, or a silent cast of the dtype)."""
    feats = state_dict.get(prefix + "feats")
    if feats is None:
        return  # reported as a missing key by load_state_dict
    differences = []
    if feats.dim() != 2 or feats.shape[0] != module.size:
        differences.append(f"size {feats.shape[0] if feats.dim() else '?'} vs {module.size}")
    if feats.dim() != 2 or feats.shape[1] != module.dim:
        differences.append(f"dim {feats.shape[-1] if feats.dim() else '?'} vs {module.dim}")
    if feats.dtype != module.feats.dtype:
        differences.append(f"dtype {feats.dtype} vs {module.feats.dtype}")
    if differences:
        raise ValueError(
            "cannot load cross-batch memory state: saved vs this memory differ in "
            + ", ".join(differences)
            + " (check XBM.SIZE, MODEL.HEAD.DIM, XBM.DTYPE)"
        )


def upgrade_counters(state_dict: dict, prefix: str, missing_keys: list) -> None:
    """`{prefix}pointer` and `{prefix}filled` replaced by the `{prefix}_extra_state` they mean; with only
    one of them the other is reported missing."""
    old = [prefix + key for key in OLD_COUNTER_KEYS]
    found = [key for key in old if key in state_dict]
    if not found:
        return
    if len(found) == len(old):
        counters = [int(state_dict[key]) for key in old]
        state_dict[prefix + "_extra_state"] = torch.tensor(counters, dtype=torch.int64)
    else:
        missing_keys.extend(key for key in old if key not in state_dict)
    for key in found:
        del state_dict[key]


def upgrade_item_keys(state_dict: dict, prefix: str) -> None:
    """The item buffers saved beside `feats` moved under `items.`."""
    for key in ITEM_KEYS:
        if prefix + key in state_dict:
            state_dict[f"{prefix}items.{key}"] = state_dict.pop(prefix + key)


def reconcile_item_buffers(module: CrossBatchMemory, state_dict: dict, prefix: str) -> None:
    """A memory saved without item tracking loads into one with it (ids unknown, the stored rows taken
    as enqueued: those entries are simply not probed), and a tracked one into an untracked memory (the
    item buffers are dropped)."""
    keys = [f"{prefix}items.{key}" for key in ITEM_KEYS]
    if module.items is None:
        for key in keys:
            state_dict.pop(key, None)
        return
    feats = state_dict.get(prefix + "feats")
    if feats is None or any(key in state_dict for key in keys):
        return  # a partial set is reported missing by load_state_dict
    state_dict[keys[0]] = torch.full((feats.shape[0],), UNKNOWN_ITEM, dtype=torch.int64)
    state_dict[keys[1]] = feats.clone()
