"""The training loop: one `run_step` per iteration, and hooks around it (xbm/engine/hooks.py).

`Trainer` knows no config and no hook class: it is given its parts, which a notebook can make by hand,

    trainer = Trainer(model, objective, loader, optimizer, scheduler, hooks=[...], max_iters=1000)
    trainer.train()

and `DefaultTrainer(cfg)` (xbm/engine/defaults.py) makes from a config, as detectron2's DefaultTrainer does.

One step (xbm/objective.py has the papers' part of it):
  images -> network -> unit embeddings e
  loss = objective(e, labels, iteration):
         LOSS.INBATCH_WEIGHT * loss(e, labels)
         [adapt the memory to the batch's moments (XBN / AXBN)], enqueue e.detach()
         + XBM.WEIGHT * loss(e, labels, memory)
         [with a momentum key encoder, its embeddings of the images are what is enqueued]
  one host synchronisation: is everything finite? no -> the step is taken back (nonfinite.py)
  backward -> optimizer step; the learning rate schedule advances either way

Under torchrun (one process per GPU, DistributedDataParallel) the batch is per process: the objective
gathers the global batch, so all memories stay identical, and the step's one all-reduce tells every
rank whether to skip it and whether some rank was asked to stop.
"""
from __future__ import annotations

import logging
import warnings
from typing import Iterable

import torch

from ..utils.distributed import agree_on_step
from .hooks import HookBase
from .nonfinite import NonFiniteGuard, NonFiniteLossError  # noqa: F401 (re-exported: the guard raises it)
from .run_guard import StopSignals


class Trainer:
    """Trains `model` with `objective` on the batches of `data_loader` to `max_iters`, calling `hooks`.

    Args:
        model: the embedding model (what hooks save and evaluate).
        objective: `xbm.CrossBatchObjective` (or a module with its call and undo interface), built with
            check_values=False and its memory with check_finite=False: the loop checks finiteness itself,
            once per step, and takes a non-finite step back.
        data_loader: an iterable of (images, labels[, item_ids]) batches, iterated from its start when
            `train()` begins (a resumed run gives one that continues the stream); may be set later.
        optimizer, scheduler: stepped once per iteration (the scheduler also on a skipped step).
        scaler: a GradScaler (fp16); None: a disabled one.
        hooks: called around each step, in order (see xbm/engine/hooks.py).
        max_iters: the iteration `train()` stops at.
        device: where batches go.
        network: what the step calls (the model wrapped by DDP or torch.compile); None: `model`.
        guard: takes a non-finite step back (NonFiniteGuard); None: one stopping after 10 in a row.
        amp_dtype: autocast dtype of the network's forward (None: float32).
        memory_format: of the image batches (channels_last for convnets on GPU).
        head_warmup_iters: the first iterations update only the head (`model.backbone` gets no gradient).
        grad_clip: max gradient norm (0: no clipping).
        log_period: the logging iterations (every `log_period`-th and the last), when the objective also
            computes the gradient norms of its terms if `log_grad_norms`.
        world_size: processes of the run (the objective and guard need it; 1 without torchrun).
        key_encoder: a `xbm.memory.MomentumKeyEncoder` whose embeddings of each batch fill the memory, updated
            from `model` after each finite step; None: the memory stores the network's own embeddings.
    """

    def __init__(self, model: torch.nn.Module, objective: torch.nn.Module, data_loader: Iterable | None,
                 optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler | None = None,
                 hooks: Iterable[HookBase] = (), *, max_iters: int, device: torch.device | str = "cpu",
                 network: torch.nn.Module | None = None, guard: NonFiniteGuard | None = None,
                 amp_dtype: torch.dtype | None = None, memory_format: torch.memory_format = torch.contiguous_format,
                 head_warmup_iters: int = 0, grad_clip: float = 0.0, log_period: int = 20,
                 log_grad_norms: bool = False, world_size: int = 1, key_encoder: torch.nn.Module | None = None):
        self.model, self.objective, self.data_loader = model, objective, data_loader
        self.optimizer, self.scheduler = optimizer, scheduler
        self.device = torch.device(device)
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler(self.device.type, enabled=False)
        self.network = network if network is not None else model
        self.world_size = world_size
        self.guard = guard if guard is not None else NonFiniteGuard(model, objective, 10, logging.getLogger("xbm"),
                                                                   world_size, None)
        self.max_iters = max_iters
        self.amp_dtype, self.memory_format = amp_dtype, memory_format
        self.head_warmup_iters, self.grad_clip = head_warmup_iters, grad_clip
        self.log_period, self.log_grad_norms = log_period, log_grad_norms
        self.key_encoder = key_encoder
        self.iteration = 0
        self.step_outputs: dict = {}  # the last step's losses and pair counts, for the hooks
        self.stop_requested = False  # whether some rank had a stop signal at the last step's all-reduce
        self.hooks: list[HookBase] = []
        self.register_hooks(hooks)

    # ------------------------------------------------------------------ hooks
    def register_hooks(self, hooks: Iterable[HookBase]) -> None:
        for hook in hooks:
            hook.trainer = self
            self.hooks.append(hook)

    # ------------------------------------------------------------------ the loop
    def train(self) -> None:
        """Train from `iteration` to `max_iters`, the hooks around every step."""
        self.network.train()
        if self.key_encoder is not None:
            self.key_encoder.train()  # as MoCo's: BatchNorm on the batch's statistics
        self._batches = iter(self.data_loader)
        try:
            for hook in self.hooks:
                hook.before_train()
            while self.iteration < self.max_iters:
                for hook in self.hooks:
                    hook.before_step()
                self.run_step()
                for hook in self.hooks:
                    hook.after_step()
            for hook in self.hooks:
                hook.after_train()
        finally:
            for hook in self.hooks:
                hook.close()

    def run_step(self) -> None:
        """One iteration: the next batch, `train_step`, and the iteration counter."""
        images, labels, *item_ids = next(self._batches)
        self.step_outputs = self.train_step(images, labels, *item_ids)
        self.iteration += 1

    def train_step(self, images, labels, item_ids=None) -> dict:
        """One step on this batch; `item_ids` (the loader's dataset indices) feed a memory that tracks items."""
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        has_loss = self.objective.has_loss(self.iteration)
        # A step without a loss has no backward, which DDP would wait for: call the bare model.
        network = self.network if has_loss else self.model
        self.guard.before_step(labels.shape[0] * self.world_size)
        keys = None
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            embeddings = network(images)
            if self.key_encoder is not None:
                keys = self.key_encoder(images).float()
        # Losses and the memory work in float32 whatever the network's precision.
        total, parts = self.objective(embeddings.float(), labels, self.iteration, item_ids=item_ids,
                                      gradient_norms=self.log_grad_norms and self.logs_after(self.iteration),
                                      **({} if keys is None else {"memory_rows": keys}))
        finite = torch.isfinite(embeddings).all()
        if keys is not None:
            finite = finite & torch.isfinite(keys).all()
        if total is not None:
            finite = finite & torch.isfinite(total)
        # The step's one host synchronisation (under DDP its one all-reduce, so that every rank skips alike;
        # the stop flag of SIGINT/SIGTERM rides in it, for StopOnSignal before the next step).
        all_finite, self.stop_requested = agree_on_step(finite, StopSignals.requested() is not None)
        if not all_finite:
            self.guard.skip(self.iteration)
            if self.key_encoder is not None:
                self.key_encoder.copy_buffers(self.model)  # its forward moved its BatchNorm statistics too
            self._advance_schedule()
            return parts
        self.guard.step_was_finite()
        if total is not None:
            self._optimize(total)
            parts["loss/total"] = total.detach()
        if self.key_encoder is not None:
            self.key_encoder.update(self.model)
        self._advance_schedule()
        return parts

    def _optimize(self, total: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.iteration < self.head_warmup_iters:
            for p in self.model.backbone.parameters():
                p.grad = None  # optimizers skip parameters without a gradient
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _advance_schedule(self) -> None:
        # The learning rate is a function of the iteration, and a step that updates no weight (memory
        # loss only, before XBM.START_ITERATION; or a skipped step) is still an iteration. PyTorch warns
        # when the scheduler moves before the optimizer has ever stepped; that is intended here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before",
                                    category=UserWarning)
            self.scheduler.step()

    def logs_after(self, iteration: int) -> bool:
        """Whether the step at `iteration` is a logging step (every `log_period`-th, and the last)."""
        done = iteration + 1
        return done % max(1, self.log_period) == 0 or done == self.max_iters
