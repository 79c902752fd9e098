"""The training loop: one `run_step` per iteration, and hooks around it (xbm/engine/hooks.py).

One step (xbm/objective.py has the papers' part of it):
  images -> model -> unit embeddings e
  loss = CrossBatchObjective(e, labels, iteration):
         LOSS.INBATCH_WEIGHT * loss(e, labels)
         [adapt the memory to the batch's moments (XBN / AXBN)], enqueue e.detach()
         + XBM.WEIGHT * loss(e, labels, memory)
  one host synchronisation: is everything finite? no -> the step is taken back (nonfinite.py)
  backward -> optimizer step; the learning rate schedule advances either way

Under torchrun (one process per GPU, DistributedDataParallel) DATA.BATCH_SIZE is per process:
the objective gathers the global batch, so all memories stay identical. Only rank 0 writes logs,
metrics and checkpoints, and evaluates.
"""
from __future__ import annotations

import logging
import os
import warnings

import torch

from ..config import check_cfg
from ..config.rules import check_global_batch, resolve_memory_size
from ..modeling import build_model
from ..objective import build_objective
from ..utils.distributed import agree_on_step, get_rank, get_world_size, init_distributed
from ..utils.env import seed_everything
from ..utils.logger import setup_logger
from . import hooks as default_hooks
from .checkpoint import checkpoint_state, resume_training, rng_states, save_training
from .nonfinite import NonFiniteGuard, NonFiniteLossError  # noqa: F401 (re-exported: the guard raises it)
from .performance import check_runtime, compiled, configure_backends, memory_format
from .run_guard import StopSignals
from .setup import build_evaluator, build_training_data, build_training_loader, distributed, log_setup
from .solver import build_optimizer, build_plateau, build_scheduler, parameter_groups


class Trainer:
    """Builds a run from its config, trains it with `train()`, and saves and resumes it exactly."""

    def __init__(self, cfg, resume: str | None = None, extra_hooks: list | None = None):
        """`extra_hooks` run after the default ones and, registered before the resume, get their
        state back from the checkpoint."""
        check_cfg(cfg)
        self.cfg = cfg
        self.device = init_distributed(cfg.MODEL.DEVICE)  # joins torchrun's process group, if any
        self.rank, self.world_size = get_rank(), get_world_size()
        self.is_main = self.rank == 0  # the one process that writes files and evaluates
        check_global_batch(cfg, self.world_size)
        self.output_dir = cfg.OUTPUT_DIR
        self.checkpoint_path = os.path.join(self.output_dir, "checkpoints", "last.pth")
        self.logger = setup_logger(self.output_dir if self.is_main else None)
        if not self.is_main:
            self.logger.setLevel(logging.WARNING)  # the other ranks report problems only
        self.logger.debug(f"config (defaults <- config file <- command line):\n{cfg.dump()}")
        seed_everything(cfg.SOLVER.SEED)
        self.amp_dtype = check_runtime(cfg, self.device)  # before any data is read
        configure_backends(cfg)
        self.memory_format = memory_format(cfg)
        self.train_set, val_tasks = build_training_data(cfg)
        self.cfg = cfg = resolve_memory_size(cfg, len(self.train_set), self.world_size)
        self.max_iters = cfg.SOLVER.MAX_ITERS
        self.evaluator = build_evaluator(cfg, self.device, val_tasks) if self.is_main else None
        self.model = build_model(cfg).to(self.device, memory_format=self.memory_format)
        # What training steps call (DDP, compiled); self.model is what is saved and evaluated.
        self.network = compiled(distributed(self.model, self.device, self.world_size), cfg)
        self.objective = build_objective(cfg, self.device)
        self.optimizer = build_optimizer(cfg, parameter_groups(cfg, self.model))
        self.plateau = build_plateau(cfg)  # SOLVER.SCHEDULER plateau: a factor stepped by evaluations
        self.scheduler = build_scheduler(cfg, self.optimizer, self.plateau)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.guard = NonFiniteGuard(self.model, self.objective, cfg.SOLVER.MAX_NONFINITE_STEPS, self.logger,
                                    self.world_size, self.checkpoint_path)
        self.iteration = 0
        self.writer = None  # tensorboard, on rank 0 during train()
        self.step_outputs: dict = {}  # the last step's losses and pair counts, for the hooks
        self.stop_requested = False  # whether some rank had a stop signal at the last step's all-reduce
        self.hooks: list[default_hooks.HookBase] = []
        self.register_hooks(self.build_hooks() + list(extra_hooks or []))
        if self.rank > 0:
            # Same weights everywhere (DDP copies rank 0's), but each rank its own augmentations.
            seed_everything(cfg.SOLVER.SEED + self.rank)
        resume = resume or cfg.SOLVER.RESUME
        if resume:
            self._resume(resume)
        if self.is_main:
            with open(os.path.join(self.output_dir, "config.yaml"), "w") as f:
                f.write(cfg.dump())
        log_setup(self)

    # ------------------------------------------------------------------ hooks
    def build_hooks(self) -> list[default_hooks.HookBase]:
        """The default hooks, in the order they run (see xbm/engine/hooks.py)."""
        return [default_hooks.StopOnSignal(), *default_hooks.probe_hooks(self), default_hooks.MetricWriter(),
                default_hooks.PeriodicCheckpointer(), default_hooks.EvalHook()]

    def register_hooks(self, hooks: list[default_hooks.HookBase]) -> None:
        for hook in hooks:
            hook.trainer = self
            self.hooks.append(hook)

    def _hook(self, kind: type):
        return next((h for h in self.hooks if isinstance(h, kind)), None)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, dict]:
        """Train to SOLVER.MAX_ITERS; the final evaluation's results."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(self.output_dir) if self.is_main else None
        self.network.train()
        self._batches = iter(self.train_loader())
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
            if self.writer is not None:
                self.writer.close()
        evaluation = self._hook(default_hooks.EvalHook)
        return evaluation.results if evaluation is not None else {}

    def train_loader(self):
        """The training batches from the current iteration on (a resumed run continues the stream)."""
        return build_training_loader(self.cfg, self.train_set, self.iteration, self.rank, self.world_size,
                                     self.device)

    def run_step(self) -> None:
        """One iteration: the next batch, `train_step`, and the iteration counter."""
        images, labels, item_ids = next(self._batches)
        self.step_outputs = self.train_step(images, labels, item_ids)
        self.iteration += 1

    def train_step(self, images, labels, item_ids=None) -> dict:
        """One step on this batch; `item_ids` (the loader's dataset indices) feed DRIFT.MEMORY_PROBE."""
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        has_loss = self.objective.has_loss(self.iteration)
        # A step without a loss has no backward, which DDP would wait for: call the bare model.
        network = self.network if has_loss else self.model
        self.guard.before_step(labels.shape[0] * self.world_size)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            embeddings = network(images)
        # Losses and the memory work in float32 whatever the network's precision.
        total, parts = self.objective(embeddings.float(), labels, self.iteration, item_ids=item_ids,
                                      gradient_norms=self.cfg.SOLVER.LOG_GRAD_NORMS and self.logs_after(self.iteration))
        finite = torch.isfinite(embeddings).all()
        if total is not None:
            finite = finite & torch.isfinite(total)
        # The step's one host synchronisation (under DDP its one all-reduce, so that every rank skips alike;
        # the stop flag of SIGINT/SIGTERM rides in it, for StopOnSignal before the next step).
        all_finite, self.stop_requested = agree_on_step(finite, StopSignals.requested() is not None)
        if not all_finite:
            self.guard.skip(self.iteration)
            self._advance_schedule()
            return parts
        self.guard.step_was_finite()
        if total is not None:
            self._optimize(total)
            parts["loss/total"] = total.detach()
        self._advance_schedule()
        return parts

    def _optimize(self, total: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.iteration < self.cfg.SOLVER.HEAD_WARMUP_ITERS:
            for p in self.model.backbone.parameters():
                p.grad = None  # optimizers skip parameters without a gradient
        if self.cfg.SOLVER.GRAD_CLIP > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.SOLVER.GRAD_CLIP)
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
        """Whether the step at `iteration` is a logging step (SOLVER.LOG_PERIOD, and the last)."""
        done = iteration + 1
        return done % max(1, self.cfg.SOLVER.LOG_PERIOD) == 0 or done == self.max_iters

    def evaluate(self) -> dict[str, dict]:
        """An evaluation now, with everything that follows one (see hooks.EvalHook)."""
        evaluation = self._hook(default_hooks.EvalHook)
        if evaluation is None:
            raise ValueError("this trainer has no EvalHook among its hooks: nothing to evaluate with")
        return evaluation.evaluate()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything an exact resume needs (docs/ARCHITECTURE.md: the checkpoint invariants)."""
        memory, adapter = self.objective.memory, self.objective.adapter
        state = {
            "iteration": self.iteration, "config": self.cfg.dump(), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "skipped_steps": self.guard.skipped_steps,
            "plateau": self.plateau.state_dict() if self.plateau is not None else None,
            # The layout of xbm 0.1's checkpoints: the objective's memory and adapter state apart.
            "memory": memory.state_dict() if memory is not None else None,
            "adapter": adapter.state_dict() if adapter is not None else None,
            "drift": None, "rng": rng_states(), "world_size": self.world_size,
        }
        for hook in self.hooks:
            state.update(hook.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.guard.skipped_steps = state.get("skipped_steps", 0)  # absent from checkpoints of xbm 0.1
        if self.plateau is not None and state.get("plateau") is not None:
            self.plateau.load_state_dict(state["plateau"])
        if self.objective.memory is not None:
            self.objective.memory.load_state_dict(state["memory"])
        if self.objective.adapter is not None:
            self.objective.adapter.load_state_dict(state["adapter"])
        for hook in self.hooks:
            hook.load_state_dict(state)
        self.iteration = state["iteration"]

    def checkpoint_state(self) -> dict | None:
        """state_dict() plus every rank's random state; a collective: all ranks call it, rank 0 gets it."""
        return checkpoint_state(self)

    def save(self) -> None:
        """checkpoints/last.pth, and iter_<N>.pth with SOLVER.KEEP_CHECKPOINTS (the newest N kept)."""
        save_training(self)

    def _resume(self, path: str) -> None:
        resume_training(self, path)
