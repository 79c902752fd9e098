"""Taking one memory step back: what the next adaptation and enqueue change, recorded before them.

A step whose loss proves non-finite is undone whole (xbm/engine/nonfinite.py). The undo point is taken
before the step, with no host synchronisation, and holds only what the step changes:
  - the ring counters (pointer, fill) and copies of the `batch` slots the enqueue overwrites (their
    rows, labels and, with item tracking, items): batch x dim values, not the memory;
  - when the step adapts the memory, a reference to the feature buffer as it is now. The memory then
    writes its next adaptation into its spare buffer and swaps the two (`CrossBatchMemory.adapt_`), so
    the referenced buffer is left untouched, and restoring swaps it back: no copy of the memory at all.
    The spare costs one more memory-sized buffer, allocated at the first adapting undo point.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from .cross_batch_memory import CrossBatchMemory


class UndoPoint(NamedTuple):
    """What one training step may change in a memory."""

    pointer: int
    filled: int
    slots: torch.Tensor  # the slots the next enqueue writes
    feats: torch.Tensor  # copies of their rows
    labels: torch.Tensor  # and of their labels
    previous: torch.Tensor | None  # the feature buffer before an adaptation (a reference), or None
    items: tuple[torch.Tensor, torch.Tensor] | None = None  # the slots' item ids and enqueued rows


@torch.no_grad()
def take_undo_point(memory: CrossBatchMemory, batch_size: int, adapting: bool) -> UndoPoint:
    """What the next `adapt_` (when `adapting`) and `enqueue` of `batch_size` rows change."""
    slots = (torch.arange(batch_size, device=memory.feats.device) + memory.pointer) % memory.size
    adapting = adapting and len(memory) >= 2  # adapt_ leaves a memory of fewer rows alone
    if adapting:
        memory.keep_buffer_for_undo()
    items = memory.items.snapshot(slots) if memory.items is not None else None
    return UndoPoint(memory.pointer, len(memory), slots, memory.feats[slots], memory.labels[slots],
                     memory.feats if adapting else None, items)


@torch.no_grad()
def restore(memory: CrossBatchMemory, point: UndoPoint) -> None:
    """Put `memory` back as it was when `point` was taken."""
    if point.previous is not None and point.previous is not memory.feats:
        memory.swap_back(point.previous, point.filled)  # the adaptation (and the enqueue after it) undone
    else:
        memory.feats[point.slots] = point.feats
    memory.labels[point.slots] = point.labels
    if point.items is not None and memory.items is not None:
        memory.items.put_back(point.slots, point.items)
    memory.set_counters(point.pointer, point.filled)
