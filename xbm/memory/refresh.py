"""Partial refresh (XBM.REFRESH_PER_STEP): re-embed some stored entries with the current network.

A memory entry is stale because the network that computed it has since moved on. Re-embedding the
entry's image with today's network removes that drift exactly (up to the difference between the
train-mode view it was stored from and the eval-mode view it is re-embedded from), at the price of one
forward pass per refreshed image. The memory must know each entry's item (its index in the training set):
it tracks items (item_tracking.py), as the drift probe's memory does.

Which entries: a cursor sweeps the ring in the direction opposite to the write pointer, R slots per
step, so that every slot is re-embedded once every size / R steps and the entries refreshed are of every
age. Re-embedding "the R oldest" instead, as one might first think, is wasted work in a FIFO memory: the
oldest entries are the next ones the enqueue overwrites, so an entry refreshed so would be read by one
step or none. Moving with the write pointer would, at R = the batch, refresh every entry at the same age
(possibly the age of the newest). The refreshed row also replaces the entry's "as enqueued" copy that
the probe compares with (it is the row as the network last computed it).
"""
from __future__ import annotations

from typing import Callable

import torch

from .cross_batch_memory import CrossBatchMemory


class MemoryRefresh:
    """Picks the slots to re-embed at each step and writes the fresh rows; its state is the cursor.

    Args:
        per_step: entries re-embedded per step (R), at most the memory's size.
    """

    def __init__(self, per_step: int):
        if isinstance(per_step, bool) or not isinstance(per_step, int) or per_step < 1:
            raise ValueError(f"per_step must be a positive int, got {per_step!r}")
        self.per_step = per_step
        self.cursor = 0  # the next slot the sweep visits; the sweep moves towards lower slots

    def next_slots(self, memory: CrossBatchMemory) -> torch.Tensor:
        """The slots of this step (valid ones whose item is known, in sweep order), advancing the cursor."""
        if not memory.track_items:
            raise ValueError("a refresh needs a memory built with track_items=True (the items' images)")
        if self.per_step > memory.size:
            raise ValueError(f"cannot refresh {self.per_step} entries per step in a memory of {memory.size}")
        device = memory.feats.device
        slots = (self.cursor - torch.arange(self.per_step, device=device)) % memory.size
        self.cursor = (self.cursor - self.per_step) % memory.size
        # While the memory is not full its valid slots are 0 .. fill - 1.
        slots = slots[slots < len(memory)]
        return slots[memory.items.item_ids[slots] >= 0]

    @torch.no_grad()
    def refresh(self, memory: CrossBatchMemory, embed: Callable[[torch.Tensor], torch.Tensor]) -> int:
        """Re-embed this step's slots with `embed(item_ids) -> rows`; the number of entries refreshed."""
        slots = self.next_slots(memory)
        if len(slots):
            memory.rewrite_(slots, embed(memory.items.item_ids[slots]))
        return len(slots)

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])
