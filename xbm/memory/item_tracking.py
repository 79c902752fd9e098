"""Which item each memory slot holds, and its embedding as enqueued (DRIFT.MEMORY_PROBE).

A diagnostic that re-embeds the stored items with the current network needs each slot's item (its
index in the training set) and the row as it was enqueued, which adaptation never rewrites: that is
what tells drift of the network from the adapter's corrections.
"""
from __future__ import annotations

import torch
from torch import nn

UNKNOWN_ITEM = -1  # a slot whose item is not known (enqueued without ids, or loaded from an untracked memory)


class ItemTracker(nn.Module):
    """Per slot of a memory of `size` x `dim`: buffers ``item_ids`` (int64, -1 unknown) and
    ``enqueued_feats`` (the memory's dtype), saved in ``state_dict`` with the memory's."""

    item_ids: torch.Tensor
    enqueued_feats: torch.Tensor

    def __init__(self, size: int, dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.register_buffer("item_ids", torch.full((size,), UNKNOWN_ITEM, dtype=torch.int64, device=device))
        self.register_buffer("enqueued_feats", torch.zeros(size, dim, dtype=dtype, device=device))

    @property
    def nbytes(self) -> int:
        return self.item_ids.numel() * 8 + self.enqueued_feats.numel() * self.enqueued_feats.element_size()

    @staticmethod
    def checked_ids(item_ids: torch.Tensor | None, batch: int) -> torch.Tensor:
        """One id per row (None: all unknown), checked before the memory writes anything."""
        if item_ids is None:
            return torch.full((batch,), UNKNOWN_ITEM, dtype=torch.int64)
        if not isinstance(item_ids, torch.Tensor) or item_ids.shape != (batch,):
            got = tuple(item_ids.shape) if isinstance(item_ids, torch.Tensor) else type(item_ids).__name__
            raise ValueError(f"item_ids must be a 1-D tensor of one id per row ({batch}), got {got}")
        return item_ids

    @torch.no_grad()
    def record(self, slots: torch.Tensor, item_ids: torch.Tensor, rows: torch.Tensor) -> None:
        """The items and rows just enqueued into `slots`."""
        self.item_ids[slots] = item_ids.to(self.item_ids.device, torch.int64)
        self.enqueued_feats[slots] = rows.to(self.enqueued_feats.device, self.enqueued_feats.dtype)

    def snapshot(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of what `record` into `slots` would overwrite (for an undo point)."""
        return self.item_ids[slots], self.enqueued_feats[slots]

    @torch.no_grad()
    def put_back(self, slots: torch.Tensor, snapshot: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.item_ids[slots], self.enqueued_feats[slots] = snapshot

    @torch.no_grad()
    def reset(self) -> None:
        self.item_ids.fill_(UNKNOWN_ITEM)
        self.enqueued_feats.zero_()
