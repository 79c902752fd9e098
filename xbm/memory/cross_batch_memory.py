"""The cross-batch memory: a preallocated FIFO ring of detached embeddings and labels."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

Adapter = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# The state_dict keys of the ring counters in checkpoints written before they moved into the
# module's extra state (each a 0-d int64 tensor); `_upgrade_old_layout` still reads them.
_OLD_COUNTER_KEYS = ("pointer", "filled")


# The buffers of `track_items`: each slot's item id (-1: unknown) and its embedding as enqueued.
_ITEM_KEYS = ("item_ids", "enqueued_feats")
UNKNOWN_ITEM = -1


class UndoPoint(NamedTuple):
    """What one training step may overwrite: the ring counters and the rows it will touch."""

    pointer: int
    filled: int
    slots: torch.Tensor  # the slots the next enqueue writes
    feats: torch.Tensor  # their rows, or the whole buffer when the step also adapts the memory
    labels: torch.Tensor
    whole: bool
    items: tuple[torch.Tensor, torch.Tensor] | None = None  # the slots' item ids and enqueued rows


class CrossBatchMemory(nn.Module):
    """The ``size`` most recent embeddings (detached) and their labels, first in first out.

    Both buffers are allocated once at construction, so memory use is fixed at
    ``size * dim * itemsize + size * 8`` bytes and enqueueing is two slice copies.
    The write pointer and fill count are plain Python ints (no host-device sync per
    step) but they are saved in ``state_dict`` (as the module's extra state, one int64
    tensor ``[pointer, fill]`` under ``_extra_state``) so that a resumed run continues
    with exactly the same memory.

    Args:
        size: number of slots (XBM.SIZE); must be at least the batch size.
        dim: embedding width.
        device: where the buffers live (``.to()`` moves them like any module).
        dtype: floating storage type; float16/bfloat16 halve the bytes.
        check_finite: reject batches with NaN/Inf (costs one host-device sync per
            enqueue on CUDA; set False to skip the check).
        track_items: also keep, per slot, the id of the item it holds (its index in the
            training set, -1 when unknown) and its embedding as enqueued, which adaptation
            never rewrites (buffers ``item_ids`` and ``enqueued_feats``): what a diagnostic
            needs to re-embed stored items and tell drift from adaptation (DRIFT.MEMORY_PROBE).
            Doubles the memory's bytes.
    """

    feats: torch.Tensor
    labels: torch.Tensor

    def __init__(
        self,
        size: int,
        dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        check_finite: bool = True,
        track_items: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.size = size
        self.dim = dim
        self.check_finite = check_finite
        self.register_buffer("feats", torch.zeros(size, dim, dtype=dtype, device=device))
        self.register_buffer("labels", torch.zeros(size, dtype=torch.int64, device=device))
        self.track_items = bool(track_items)
        if self.track_items:
            self.register_buffer("item_ids", torch.full((size,), UNKNOWN_ITEM, dtype=torch.int64, device=device))
            self.register_buffer("enqueued_feats", torch.zeros(size, dim, dtype=dtype, device=device))
        self._pointer = 0  # next slot to write
        self._filled = 0  # number of valid slots
        # Public since torch 2.5 (pytorch PR #131690); requirements ask for 2.6.
        self.register_load_state_dict_pre_hook(_check_and_upgrade_state)

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return self._filled

    @property
    def is_full(self) -> bool:
        return self._filled == self.size

    @property
    def pointer(self) -> int:
        """Slot the next enqueue starts writing at (the oldest entry once full)."""
        return self._pointer

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers: size * dim * itemsize + size * 8, twice with track_items."""
        one = self.feats.numel() * self.feats.element_size() + self.labels.numel() * 8
        return 2 * one if self.track_items else one

    def newest_slots(self, count: int) -> torch.Tensor:
        """The slots of the `count` most recently enqueued rows (at most the fill), oldest first."""
        count = min(count, self._filled)
        return (torch.arange(self._pointer - count, self._pointer, device=self.feats.device) % self.size)

    def slot_ages(self) -> torch.Tensor:
        """Per slot, the rows enqueued after it (0 for the newest row); meaningful for valid slots."""
        slots = torch.arange(self.size, device=self.feats.device)
        return (self._pointer - 1 - slots) % self.size

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid entries in slot order, as views (no copy), in the storage dtype."""
        if self._filled == self.size:
            return self.feats, self.labels
        # Before the first wrap-around the valid slots are exactly 0 .. filled-1.
        return self.feats[: self._filled], self.labels[: self._filled]

    # ---------------------------------------------------------------- mutation
    def reset(self) -> None:
        """Forget every entry (buffers are kept, not reallocated)."""
        self.feats.zero_()
        self.labels.zero_()
        if self.track_items:
            self.item_ids.fill_(UNKNOWN_ITEM)
            self.enqueued_feats.zero_()
        self._pointer = 0
        self._filled = 0

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor,
                item_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Write a batch over the oldest slots; return the slot indices written (int64).

        The stored rows are a detached copy cast to the storage dtype. Row ``k`` of
        the batch lands in slot ``indices[k]``, which lets a loss skip the pair of an
        anchor with its own stored copy. With ``track_items`` the rows' ``item_ids``
        (None: unknown) and a second copy of the rows are kept too.
        """
        self._check_batch(embeddings, labels)
        if self.track_items:
            item_ids = self._checked_item_ids(item_ids, embeddings.shape[0])
        batch = embeddings.shape[0]
        start = self._pointer
        end = start + batch
        device = self.feats.device
        if end <= self.size:
            self.feats[start:end].copy_(embeddings)
            self.labels[start:end].copy_(labels)
            indices = torch.arange(start, end, device=device)
        else:
            # The batch straddles the end of the ring: split it into two slices.
            head = self.size - start
            tail = batch - head
            self.feats[start:].copy_(embeddings[:head])
            self.feats[:tail].copy_(embeddings[head:])
            self.labels[start:].copy_(labels[:head])
            self.labels[:tail].copy_(labels[head:])
            indices = torch.cat(
                (torch.arange(start, self.size, device=device), torch.arange(0, tail, device=device))
            )
        if self.track_items:
            self.item_ids[indices] = item_ids.to(self.item_ids.device, torch.int64)
            self.enqueued_feats[indices] = embeddings.to(self.enqueued_feats.device, self.enqueued_feats.dtype)
        self._pointer = end % self.size
        self._filled = min(self.size, self._filled + batch)
        return indices

    def _checked_item_ids(self, item_ids: torch.Tensor | None, batch: int) -> torch.Tensor:
        """One id per row (None: all unknown), checked before `enqueue` writes anything."""
        if item_ids is None:
            return torch.full((batch,), UNKNOWN_ITEM, dtype=torch.int64)
        if not isinstance(item_ids, torch.Tensor) or item_ids.shape != (batch,):
            got = tuple(item_ids.shape) if isinstance(item_ids, torch.Tensor) else type(item_ids).__name__
            raise ValueError(f"item_ids must be a 1-D tensor of one id per row ({batch}), got {got}")
        return item_ids

    @torch.no_grad()
    def undo_point(self, batch_size: int, adapting: bool) -> UndoPoint:
        """A copy of what the next `adapt_` (if `adapting`) and `enqueue` of `batch_size` rows
        change, so that a step found bad afterwards (a non-finite loss) can be taken back with
        `restore_` without a host synchronisation before it: the rows the enqueue overwrites, or
        the whole feature buffer when an adaptation rewrites every entry."""
        slots = (torch.arange(batch_size, device=self.feats.device) + self._pointer) % self.size
        feats = self.feats.clone() if adapting else self.feats[slots]
        items = (self.item_ids[slots], self.enqueued_feats[slots]) if self.track_items else None
        return UndoPoint(self._pointer, self._filled, slots, feats, self.labels[slots], adapting, items)

    @torch.no_grad()
    def restore_(self, point: UndoPoint) -> None:
        """Put the memory back as it was when `point` was taken."""
        if point.whole:
            self.feats.copy_(point.feats)
        else:
            self.feats[point.slots] = point.feats
        self.labels[point.slots] = point.labels
        if self.track_items and point.items is not None:
            self.item_ids[point.slots], self.enqueued_feats[point.slots] = point.items
        self._pointer, self._filled = point.pointer, point.filled

    @torch.no_grad()
    def adapt_(self, adapter: Adapter, batch_feats: torch.Tensor) -> None:
        """Replace the valid entries by ``adapter(valid_feats, batch_feats)``, in place.

        This is XBN's write-back: the adapted memory is what later steps see. It is a
        no-op with fewer than two entries, where a per-dimension std is undefined.
        Adapters with an ``apply_(memory, batch)`` method (all of ``xbm.memory``'s)
        adapt in place, without a second memory-sized tensor.
        """
        if self._filled < 2:
            return
        valid, _ = self.get()
        batch_feats = batch_feats.detach()
        # An adapter that treats entries by age (xbn_age) is given each valid row's age.
        ages = {"ages": self.slot_ages()[: self._filled]} if getattr(adapter, "uses_slot_ages", False) else {}
        in_place = getattr(adapter, "apply_", None)
        if in_place is not None:
            in_place(valid, batch_feats, **ages)
        else:
            valid.copy_(adapter(valid, batch_feats, **ages))

    def _check_batch(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
            shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings)
            raise ValueError(f"embeddings must be a 2-D tensor (batch, dim), got {shape}")
        if embeddings.shape[1] != self.dim:
            raise ValueError(
                f"embeddings width {embeddings.shape[1]} != memory dim {self.dim} (MODEL.HEAD.DIM)"
            )
        if not embeddings.is_floating_point():
            raise ValueError(f"embeddings must be floating point, got {embeddings.dtype}")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels)
            raise ValueError(f"labels must be a 1-D tensor, got {shape}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"labels length {labels.shape[0]} != embeddings batch size {embeddings.shape[0]}"
            )
        if embeddings.shape[0] > self.size:
            raise ValueError(
                f"batch of {embeddings.shape[0]} does not fit a memory of {self.size} slots: "
                "XBM.SIZE must be >= batch size"
            )
        if self.check_finite and not bool(torch.isfinite(embeddings).all()):
            raise ValueError("embeddings contain NaN or Inf; refusing to store them in the memory")

    # ------------------------------------------------------------ persistence
    def get_extra_state(self) -> torch.Tensor:
        """The ring counters for ``state_dict``: a tensor, so checkpoints load with weights_only=True
        and every value of the state dict is a tensor (clone, compare and move as the buffers)."""
        return torch.tensor([self._pointer, self._filled], dtype=torch.int64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        """Restore the counters of ``get_extra_state`` (read once, at load, into Python ints)."""
        pointer, filled = (int(v) for v in state.tolist())
        if not 0 <= filled <= self.size or not 0 <= pointer < self.size:
            raise ValueError(
                f"memory state has pointer {pointer} and fill {filled}, outside a memory of {self.size} slots"
            )
        if filled < self.size and pointer != filled:
            raise ValueError(
                f"memory state is inconsistent: pointer {pointer} != fill {filled} while the memory is not full"
            )
        self._pointer, self._filled = pointer, filled

    def _check_compatible(self, state_dict: dict, prefix: str = "") -> None:
        """A ValueError naming XBM.SIZE / MODEL.HEAD.DIM / XBM.DTYPE when a saved memory does not fit this one
        (instead of torch's generic size-mismatch message, or a silent cast of the dtype)."""
        feats = state_dict.get(prefix + "feats")
        if feats is None:
            return  # reported as a missing key by load_state_dict
        differences = []
        if feats.dim() != 2 or feats.shape[0] != self.size:
            differences.append(f"size {feats.shape[0] if feats.dim() else '?'} vs {self.size}")
        if feats.dim() != 2 or feats.shape[1] != self.dim:
            differences.append(f"dim {feats.shape[-1] if feats.dim() else '?'} vs {self.dim}")
        if feats.dtype != self.feats.dtype:
            differences.append(f"dtype {feats.dtype} vs {self.feats.dtype}")
        if differences:
            raise ValueError(
                "cannot load cross-batch memory state: saved vs this memory differ in "
                + ", ".join(differences)
                + " (check XBM.SIZE, MODEL.HEAD.DIM, XBM.DTYPE)"
            )

    def extra_repr(self) -> str:
        tracked = ", track_items=True" if self.track_items else ""
        return f"size={self.size}, dim={self.dim}, dtype={self.feats.dtype}, filled={self._filled}{tracked}"


def _check_and_upgrade_state(module: CrossBatchMemory, state_dict: dict, prefix: str, local_metadata: dict,
                             strict: bool, missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """load_state_dict pre-hook: the friendly mismatch error, the old layout read as the new one, and
    the item buffers reconciled with `track_items`."""
    module._check_compatible(state_dict, prefix)
    _upgrade_old_layout(state_dict, prefix, missing_keys)
    _reconcile_item_buffers(module, state_dict, prefix)


def _reconcile_item_buffers(module: CrossBatchMemory, state_dict: dict, prefix: str) -> None:
    """A memory saved without item tracking loads into one with it (ids unknown, the stored rows taken
    as enqueued: those entries are simply not probed), and a tracked one into an untracked memory (the
    item buffers are dropped): DRIFT.MEMORY_PROBE may change when a run resumes."""
    keys = [prefix + key for key in _ITEM_KEYS]
    if not module.track_items:
        for key in keys:
            state_dict.pop(key, None)
        return
    feats = state_dict.get(prefix + "feats")
    if feats is None or any(key in state_dict for key in keys):
        return  # a partial set is reported missing by load_state_dict
    state_dict[keys[0]] = torch.full((feats.shape[0],), UNKNOWN_ITEM, dtype=torch.int64)
    state_dict[keys[1]] = feats.clone()


def _upgrade_old_layout(state_dict: dict, prefix: str, missing_keys: list) -> None:
    """Checkpoints written before the counters were extra state hold them as `{prefix}pointer` and
    `{prefix}filled`: replace the two by the `{prefix}_extra_state` they mean (in load_state_dict's own
    copy of the dict). With only one of them the other is reported missing."""
    old = [prefix + key for key in _OLD_COUNTER_KEYS]
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
