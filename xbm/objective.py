"""The papers' training objective as one module that drops into any training loop.

    objective = CrossBatchObjective(ContrastiveLoss(), CrossBatchMemory(4096, 128), MomentMatching())
    for step, (images, labels) in enumerate(loader):
        loss, stats = objective(model(images), labels, step)
        if loss is not None:
            optimizer.zero_grad(); loss.backward(); optimizer.step()

One call does what Wang et al.'s XBM step and Ajanthan et al.'s XBN step do:
  1. under torch.distributed, gather the global batch (rank 0's rows first), so that every rank's
     memory holds the same entries;
  2. the in-batch loss: this rank's anchors against the (global) batch, times `inbatch_weight`;
  3. [XBN / AXBN] adapt the stored embeddings to the global batch's moments (`adapter`);
  4. enqueue the detached global batch (before the memory loss, so that loss sees it too: the
     slots it lands in tell the loss which stored entry is each anchor's own copy);
  5. from `start_iteration` on, the memory loss: the anchors against every stored entry, times
     `memory_weight` (with `age_weighting`, each entry's pairs weighted by its age).
What enters the memory is the global batch's embeddings, or, given `memory_rows` (a momentum key
encoder's embeddings of the same images, xbm/memory/key_encoder.py), those rows instead.
The memory and the adapter's filter state are part of `state_dict()`, so saving the objective next
to the model and the optimizer is enough to continue a run exactly.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from .config.rules import MEMORY_FILL_FROM
from .losses import build_loss
from .memory import MemoryAdapter, as_memory_adapter, build_adapter, build_memory
from .memory.age_weighting import AgeWeighting
from .memory.cross_batch_memory import CrossBatchMemory, UndoPoint
from .utils.distributed import all_gather_batch, all_gather_with_grad, get_rank, get_world_size


class ObjectiveUndoPoint(NamedTuple):
    """What one call may change before its loss is known to be finite (see `undo_point`)."""

    memory: UndoPoint | None
    adapter: dict | None


class CrossBatchObjective(nn.Module):
    """A pair loss on the batch plus the same loss against a cross-batch memory.

    Args:
        loss: a pair loss of `xbm.losses` (or any module with the same call signature:
            `loss(anchors, labels, ref_embeddings, ref_labels, ref_self_index=...)`).
        memory: the cross-batch memory, or None for the in-batch loss alone.
        adapter: rewrites the stored embeddings before each enqueue (a `xbm.memory.MemoryAdapter`:
            MomentMatching is XBN, KalmanMomentMatching AXBN; a plain callable is wrapped); None
            keeps them as stored (XBM).
        inbatch_weight / memory_weight: the two terms' weights (0 drops a term).
        start_iteration: the first iteration whose loss includes the memory term.
        fill_from: "iteration_0" fills the memory from the first call on (the official code);
            "start_iteration" only from `start_iteration` on.
        age_weighting: weights the memory term's pairs by the entries' ages (an
            `xbm.memory.AgeWeighting`; the loss must take `ref_weights`); None: every entry alike.
        check_values: let the loss check its inputs (unit norms, finite values; a host
            synchronisation each). The trainer checks finiteness itself, once per step.
    """

    def __init__(self, loss: nn.Module, memory: CrossBatchMemory | None = None,
                 adapter: MemoryAdapter | Callable | None = None, *,
                 inbatch_weight: float = 1.0, memory_weight: float = 1.0, start_iteration: int = 0,
                 fill_from: str = "iteration_0", age_weighting: AgeWeighting | None = None,
                 check_values: bool = True) -> None:
        super().__init__()
        if fill_from not in MEMORY_FILL_FROM:
            raise ValueError(f"fill_from must be one of {MEMORY_FILL_FROM}, got {fill_from!r}")
        if adapter is not None and memory is None:
            raise ValueError("an adapter needs a memory to adapt")
        if age_weighting is not None and memory is None:
            raise ValueError("age weighting weights memory entries: it needs a memory")
        if age_weighting is not None and not getattr(loss, "supports_ref_weights", False):
            raise ValueError(f"XBM.AGE_WEIGHT_SCALE weights the memory's pairs, which {type(loss).__name__} does not "
                             "support (ref_weights): use LOSS.NAME contrastive or supcon")
        self.loss = loss
        self.memory = memory
        self.adapter = as_memory_adapter(adapter)
        self.inbatch_weight = float(inbatch_weight)
        self.memory_weight = float(memory_weight)
        self.start_iteration = int(start_iteration)
        self.fill_from = fill_from
        self.age_weighting = age_weighting
        self.check_values = check_values

    # ------------------------------------------------------------------ the step
    def has_loss(self, iteration: int) -> bool:
        """Whether `forward` at this iteration returns a loss (a step without one has no backward)."""
        return self.inbatch_weight > 0 or (self.memory is not None and self._memory_loss_on(iteration))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, iteration: int, *,
                item_ids: torch.Tensor | None = None, memory_rows: torch.Tensor | None = None,
                gradient_norms: bool = False) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """The weighted loss of this step (None when it has none) and its parts: `loss/inbatch`,
        `loss/memory` and the losses' pair counts `pairs/<term>_<name>` (0-dim tensors).

        item_ids: the rows' dataset indices, kept by a memory that tracks items (else ignored).

        memory_rows: what to enqueue for this rank's rows instead of `embeddings` (detached; a momentum
        key encoder's embeddings of the same images); the adapter still matches the memory to the
        batch's `embeddings`, which the loss compares with it.

        gradient_norms: also the norm of each weighted term's gradient with respect to
        `embeddings` (`grad/inbatch_norm`, `grad/memory_norm`, and `grad/memory_over_inbatch`
        with both terms), by one extra backward through the losses; the step is unchanged."""
        stats: dict[str, torch.Tensor] = {}
        terms: dict[str, torch.Tensor] = {}
        total = None
        gathered = self._global_batch(embeddings, labels)
        batch_embeddings, batch_labels, own_rows = gathered
        if self.inbatch_weight > 0:
            if own_rows is None:
                loss = self.loss(embeddings, labels, check_values=self.check_values)
            else:
                # This rank's anchors against the global batch, own pairs excluded: averaged over
                # ranks by DDP, the gradient of the one-process loss on the global batch.
                loss = self.loss(embeddings, labels, batch_embeddings, batch_labels, ref_self_index=own_rows,
                                 check_values=self.check_values)
            stats.update(self._stats("inbatch", loss))
            total = terms["inbatch"] = self.inbatch_weight * loss
        if self.memory is not None and self._memory_fills(iteration):
            term = self._memory_term(embeddings, labels, iteration, gathered, stats, item_ids, memory_rows)
            if term is not None:
                terms["memory"] = term
                total = term if total is None else total + term
        if gradient_norms and terms:
            stats.update(_gradient_norms(terms, embeddings))
        return total, stats

    def _memory_term(self, embeddings, labels, iteration: int, gathered: tuple, stats: dict,
                     item_ids: torch.Tensor | None, memory_rows: torch.Tensor | None) -> torch.Tensor | None:
        """Adapt and enqueue the global batch; from `start_iteration` on, the weighted memory loss."""
        batch_embeddings, batch_labels, own_rows = gathered
        batch = batch_embeddings.detach()
        if self.adapter is not None and len(self.memory) > 0:
            self.memory.adapt_(self.adapter, batch)  # global-batch moments: every rank adapts alike
        if item_ids is not None and self.memory.track_items and own_rows is not None:
            item_ids = all_gather_batch(item_ids.to(embeddings.device))  # the global batch's, in its order
        rows = batch
        if memory_rows is not None:
            rows = memory_rows.detach() if own_rows is None else all_gather_batch(memory_rows.detach())
        slots = self.memory.enqueue(rows, batch_labels, item_ids if self.memory.track_items else None)
        if own_rows is not None:
            slots = slots[own_rows]
        if not self._memory_loss_on(iteration):
            return None
        feats, mem_labels = self.memory.get()
        weights = None if self.age_weighting is None else self.age_weighting.weights(self.memory, batch.shape[0])
        loss = self.loss(embeddings, labels, feats, mem_labels, ref_self_index=slots, check_values=self.check_values,
                         **({} if weights is None else {"ref_weights": weights}))
        stats.update(self._stats("memory", loss))
        return self.memory_weight * loss

    def _memory_loss_on(self, iteration: int) -> bool:
        return iteration >= self.start_iteration and self.memory_weight > 0

    def _memory_fills(self, iteration: int) -> bool:
        return self.fill_from == "iteration_0" or iteration >= self.start_iteration

    def _global_batch(self, embeddings, labels):
        """(embeddings, labels) of all ranks, rank 0's rows first, and this rank's rows in them.

        One process: the batch itself and None. The gathered embeddings carry gradients back to
        every rank when the in-batch loss uses them as its reference set.
        """
        world_size = get_world_size()
        if world_size == 1:
            return embeddings, labels, None
        gather = all_gather_with_grad if self.inbatch_weight > 0 else all_gather_batch
        start = get_rank() * embeddings.shape[0]
        own_rows = torch.arange(start, start + embeddings.shape[0], device=embeddings.device)
        return gather(embeddings), all_gather_batch(labels), own_rows

    def _stats(self, term: str, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        stats = {f"loss/{term}": loss.detach()}
        for name, count in getattr(self.loss, "last_stats", {}).items():
            stats[f"pairs/{term}_{name}"] = count
        return stats

    # ------------------------------------------------------------------ taking a step back
    def undo_point(self, global_batch: int) -> ObjectiveUndoPoint:
        """A copy of what the next call changes (the memory rows its enqueue overwrites, the whole
        memory and the adapter's filters when it adapts), for `restore_` to take the step back when
        its loss proves non-finite, with no host synchronisation before the step."""
        if self.memory is None:
            return ObjectiveUndoPoint(None, None)
        adapting = self.adapter is not None and len(self.memory) > 0
        return ObjectiveUndoPoint(self.memory.undo_point(global_batch, adapting),
                                  self.adapter.state_dict() if adapting else None)

    def restore_(self, point: ObjectiveUndoPoint) -> None:
        if point.memory is not None:
            self.memory.restore_(point.memory)
        if point.adapter is not None:
            self.adapter.load_state_dict(point.adapter)

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict:
        """The adapter's filter state (the memory saves its own, as a submodule)."""
        return {"adapter": self.adapter.state_dict() if self.adapter is not None else None}

    def set_extra_state(self, state: dict) -> None:
        saved = state.get("adapter")
        if (saved is None) != (self.adapter is None):
            raise ValueError(f"the saved objective has {'no' if saved is None else 'an'} adapter state and "
                             f"this one has {'no adapter' if self.adapter is None else 'an adapter'} "
                             "(XBM.ADAPT.NAME differs)")
        if saved is not None:
            self.adapter.load_state_dict(saved)

    def extra_repr(self) -> str:
        weighting = f", age_weighting={self.age_weighting!r}" if self.age_weighting is not None else ""
        return (f"inbatch_weight={self.inbatch_weight}, memory_weight={self.memory_weight}, "
                f"start_iteration={self.start_iteration}, fill_from={self.fill_from!r}, adapter={self.adapter!r}"
                + weighting)


def _gradient_norms(terms: dict[str, torch.Tensor], embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
    """|d term / d embeddings| for each weighted term, and the memory's over the in-batch's."""
    norms = {}
    for name, term in terms.items():
        grad, = torch.autograd.grad(term, embeddings, retain_graph=True)
        norms[f"grad/{name}_norm"] = grad.norm().detach()
    if len(norms) == 2:
        norms["grad/memory_over_inbatch"] = norms["grad/memory_norm"] / norms["grad/inbatch_norm"]
    return norms


def build_objective(cfg, device: torch.device | str = "cpu") -> CrossBatchObjective:
    """The objective of the config: LOSS.NAME weighted by LOSS.INBATCH_WEIGHT, and with XBM.ENABLE
    the memory (XBM.SIZE x MODEL.HEAD.DIM on `device`), XBM.ADAPT and XBM.WEIGHT from
    XBM.START_ITERATION on (with DRIFT.MEMORY_PROBE the memory tracks its items). The loss and the
    memory skip their own value checks: the trainer folds the finiteness check into its one host
    synchronisation per step."""
    loss = build_loss(cfg)
    memory = build_memory(cfg, device, check_finite=False,
                          track_items=cfg.DRIFT.MEMORY_PROBE or cfg.XBM.REFRESH_PER_STEP > 0)
    adapter = build_adapter(cfg) if memory is not None else None
    weighting = AgeWeighting(cfg.XBM.AGE_WEIGHT_SCALE) if memory is not None and cfg.XBM.AGE_WEIGHT_SCALE > 0 else None
    return CrossBatchObjective(loss, memory, adapter, inbatch_weight=cfg.LOSS.INBATCH_WEIGHT,
                               memory_weight=cfg.XBM.WEIGHT, start_iteration=cfg.XBM.START_ITERATION,
                               fill_from=cfg.XBM.FILL_FROM, age_weighting=weighting, check_values=False)
