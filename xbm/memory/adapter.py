"""What the memory and the objective call on a memory adapter (XBN, AXBN and the others).

`CrossBatchMemory.adapt_` calls `adapt_into`; the objective saves and restores the adapter's filter
state with `state_dict` / `load_state_dict`; the metric writer logs `log_values()`. An adapter is a
`MemoryAdapter`, or a plain callable ``fn(memory_feats, batch_feats) -> adapted`` (an ``nn.Module``
with ``forward`` included), which `as_memory_adapter` wraps.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch


class MemoryAdapter(ABC):
    """Rewrites the stored embeddings before each enqueue, one step of its filter per call.

    Subclasses implement `adapt_into`, `state_dict`, `load_state_dict` and `reset`; `__call__` and
    `apply_` (out of place / in place) follow from `adapt_into`.
    """

    #: Whether `adapt_into` needs `ages` (rows enqueued after each valid entry, 0 for the newest).
    uses_slot_ages: bool = False

    @abstractmethod
    def adapt_into(self, memory_feats: torch.Tensor, batch_feats: torch.Tensor, out: torch.Tensor,
                   ages: torch.Tensor | None = None) -> None:
        """One adaptation step: the adapted `memory_feats` written into `out`, which is either
        `memory_feats` itself (in place) or a tensor of its shape and dtype that does not overlap it.
        Reads every row of `memory_feats` before it writes any of `out` that could alias it."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The filter state (saved in checkpoints and in each step's undo point)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    @abstractmethod
    def reset(self) -> None:
        """Forget the filter state (the next call starts afresh)."""

    def log_values(self) -> dict[str, float]:
        """Scalars the metric writer logs as ``memory/<name>`` (AXBN: its Kalman gain)."""
        return {}

    @torch.no_grad()
    def __call__(self, memory_feats: torch.Tensor, batch_feats: torch.Tensor,
                 ages: torch.Tensor | None = None) -> torch.Tensor:
        """One adaptation step; the adapted memory as a new tensor (memory's dtype)."""
        out = torch.empty_like(memory_feats)
        self.adapt_into(memory_feats, batch_feats, out, ages)
        return out

    @torch.no_grad()
    def apply_(self, memory_feats: torch.Tensor, batch_feats: torch.Tensor,
               ages: torch.Tensor | None = None) -> torch.Tensor:
        """One adaptation step written into ``memory_feats`` (no memory-sized temporary)."""
        self.adapt_into(memory_feats, batch_feats, memory_feats, ages)
        return memory_feats


class CallableAdapter(MemoryAdapter):
    """A plain callable ``fn(memory_feats, batch_feats[, ages=...]) -> adapted`` as a MemoryAdapter.

    Its state is ``fn.state_dict()`` when it has one (an ``nn.Module``: keep filter state in buffers),
    else empty; `uses_slot_ages` is read from `fn` once, here.
    """

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        if not callable(fn):
            raise ValueError(f"a memory adapter must be a MemoryAdapter or a callable, got {type(fn).__name__}")
        self.fn = fn
        self.uses_slot_ages = bool(getattr(fn, "uses_slot_ages", False))

    @torch.no_grad()
    def adapt_into(self, memory_feats, batch_feats, out, ages=None) -> None:
        extra = {"ages": ages} if self.uses_slot_ages else {}
        out.copy_(self.fn(memory_feats, batch_feats, **extra))

    def state_dict(self) -> dict[str, Any]:
        return self.fn.state_dict() if isinstance(self.fn, torch.nn.Module) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(self.fn, torch.nn.Module):
            self.fn.load_state_dict(state)

    def reset(self) -> None:
        pass  # a plain callable's state, if any, is its own

    def __repr__(self) -> str:
        return f"CallableAdapter({self.fn!r})"


def as_memory_adapter(adapter: MemoryAdapter | Callable | None) -> MemoryAdapter | None:
    """`adapter` as a MemoryAdapter (a plain callable wrapped once); None stays None."""
    if adapter is None or isinstance(adapter, MemoryAdapter):
        return adapter
    return CallableAdapter(adapter)
