"""The cross-batch memory: a preallocated FIFO ring of detached embeddings and labels.

The ring is this module; beside it, small pieces with one job each: item tracking for the drift
probe (item_tracking.py), the undo of a skipped step (undo.py), reading older layouts (layouts.py);
what the memory calls on an adapter is `MemoryAdapter` (adapter.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter import MemoryAdapter, as_memory_adapter
from .item_tracking import UNKNOWN_ITEM, ItemTracker  # noqa: F401 (UNKNOWN_ITEM: re-exported)
from .layouts import check_and_upgrade_state
from .undo import UndoPoint, restore, take_undo_point


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
            never rewrites (the submodule ``items``, an ItemTracker): what a diagnostic needs
            to re-embed stored items and tell drift from adaptation (DRIFT.MEMORY_PROBE).
            Doubles the memory's bytes.

    An undo point taken with ``adapting`` (the trainer takes one before each XBN step) makes the next
    adaptation write into a spare buffer of the memory's size, swapped in afterwards, so that the
    step can be undone without a copy of the memory (undo.py); the spare is not saved.
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
        self.items = ItemTracker(size, dim, dtype, device) if track_items else None
        self._pointer = 0  # next slot to write
        self._filled = 0  # number of valid slots
        self._spare: torch.Tensor | None = None  # the adaptation's target while an undo point needs the buffer
        self._adapt_out_of_place = False  # set by an adapting undo point, for the next adapt_
        # Public since torch 2.5 (pytorch PR #131690); requirements ask for 2.6.
        self.register_load_state_dict_pre_hook(check_and_upgrade_state)

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
    def track_items(self) -> bool:
        return self.items is not None

    @property
    def nbytes(self) -> int:
        """Bytes held by the saved buffers: size * dim * itemsize + size * 8, twice with track_items
        (the spare buffer of an XBN run's undo adds size * dim * itemsize)."""
        one = self.feats.numel() * self.feats.element_size() + self.labels.numel() * 8
        return one + (self.items.nbytes if self.items is not None else 0)

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
        if self.items is not None:
            self.items.reset()
        self._pointer = 0
        self._filled = 0
        self._spare = None

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
        if self.items is not None:
            item_ids = self.items.checked_ids(item_ids, embeddings.shape[0])
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
        if self.items is not None:
            self.items.record(indices, item_ids, embeddings)
        self._pointer = end % self.size
        self._filled = min(self.size, self._filled + batch)
        return indices

    @torch.no_grad()
    def rewrite_(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Replace the entries of valid `slots` by `rows` (their items re-embedded: a refresh, refresh.py);
        with item tracking, the rows also become the entries' as-enqueued copies."""
        if rows.shape != (len(slots), self.dim):
            raise ValueError(f"rows of shape {tuple(rows.shape)} for {len(slots)} slots of width {self.dim}")
        self.feats[slots] = rows.to(self.feats.device, self.feats.dtype)
        if self.items is not None:
            self.items.enqueued_feats[slots] = rows.to(self.feats.device, self.items.enqueued_feats.dtype)

    # ---------------------------------------------------------------- undo
    def undo_point(self, batch_size: int, adapting: bool) -> UndoPoint:
        """What the next `adapt_` (if `adapting`) and `enqueue` of `batch_size` rows change, so that a
        step found bad afterwards (a non-finite loss) can be taken back with `restore_`, with no host
        synchronisation before it and no copy of the memory (undo.py)."""
        return take_undo_point(self, batch_size, adapting)

    def restore_(self, point: UndoPoint) -> None:
        """Put the memory back as it was when `point` was taken."""
        restore(self, point)

    def keep_buffer_for_undo(self) -> None:
        """Make the next `adapt_` leave the current feature buffer as it is (an undo point holds it)."""
        self._adapt_out_of_place = True

    def swap_back(self, previous: torch.Tensor, filled: int) -> None:
        """Make `previous` (the buffer before an out-of-place adaptation) the feature buffer again. The
        rows past `filled` of the buffer set aside are zeroed: both buffers keep zeros in the slots not
        yet filled, as a memory that never swapped has."""
        self._spare, self.feats = self.feats, previous
        self._spare[filled:].zero_()

    def set_counters(self, pointer: int, filled: int) -> None:
        self._pointer, self._filled = pointer, filled

    def _spare_buffer(self) -> torch.Tensor:
        """The adaptation's target for an undoable step; zeros when first made (the rows past the fill
        must stay zero, see `swap_back`)."""
        spare = self._spare
        if spare is None or spare.shape != self.feats.shape or spare.dtype != self.feats.dtype \
                or spare.device != self.feats.device:
            self._spare = spare = torch.zeros_like(self.feats)
        return spare

    # ---------------------------------------------------------------- adaptation
    @torch.no_grad()
    def adapt_(self, adapter: MemoryAdapter, batch_feats: torch.Tensor) -> None:
        """Replace the valid entries by the adapter's map of them (``adapter.adapt_into``), with no
        second memory-sized tensor but the undo's spare buffer.

        This is XBN's write-back: the adapted memory is what later steps see. It is a no-op with
        fewer than two entries, where a per-dimension std is undefined. An adapter that treats
        entries by age (xbn_age: ``uses_slot_ages``) is given each valid row's age. After an
        adapting undo point the result goes into the spare buffer, which then becomes the memory's.
        """
        if self._filled < 2:
            return
        adapter = as_memory_adapter(adapter)
        valid, _ = self.get()
        batch_feats = batch_feats.detach()
        ages = self.slot_ages()[: self._filled] if adapter.uses_slot_ages else None
        if not self._adapt_out_of_place:
            adapter.adapt_into(valid, batch_feats, valid, ages)
            return
        self._adapt_out_of_place = False
        spare = self._spare_buffer()
        adapter.adapt_into(valid, batch_feats, spare[: self._filled], ages)
        self._spare, self.feats = self.feats, spare

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
        self._spare = None  # its rows past the fill may not be zero for the loaded state
        self._adapt_out_of_place = False

    def extra_repr(self) -> str:
        tracked = ", track_items=True" if self.track_items else ""
        return f"size={self.size}, dim={self.dim}, dtype={self.feats.dtype}, filled={self._filled}{tracked}"

