"""DefaultTrainer: the one place that turns a config into a training run (detectron2's DefaultTrainer).

It builds the parts the loop (xbm/engine/trainer.py) is given, in a fixed order (the random draws of a
run depend on it): the process group, seeds, runtime checks, data, evaluator, model, DDP / compile
wrapper, objective, optimizer, schedule, scaler, the non-finite guard; then the hooks, each with explicit
arguments; then it resumes. It saves and resumes the run through one Checkpointer (xbm/engine/checkpointer.py).
"""
from __future__ import annotations

import logging
import os

import torch
import yaml  # yacs depends on PyYAML

from ..config import check_cfg
from ..config.checks import check_refresh_fits
from ..config.rules import check_global_batch, config_differences, resolve_memory_size
from ..data.build import TrainingSplitTestView, build_training_data, build_training_loader
from ..diagnostics.build import build_drift_monitor, build_memory_probe
from ..diagnostics.memory_drift import embed_training_items
from ..evaluation.build import build_evaluator, format_results
from ..memory.key_encoder import MomentumKeyEncoder
from ..memory.refresh import MemoryRefresh
from ..modeling import build_model
from ..objective import build_objective
from ..runtime import check_runtime, compiled, configure_backends, memory_format
from ..utils.distributed import all_gather_object, broadcast_object, get_rank, get_world_size, init_distributed
from ..utils.env import seed_everything
from ..utils.logger import setup_logger
from . import hooks as default_hooks
from .checkpointer import Checkpointer
from .events import TensorboardWriter
from .nonfinite import NonFiniteGuard
from .solver import build_optimizer, build_plateau, build_scheduler, parameter_groups
from .trainer import Trainer


class DefaultTrainer(Trainer):
    """Builds a run from its config, trains it with `train()`, and saves and resumes it exactly."""

    def __init__(self, cfg, resume: str | None = None, extra_hooks: list | None = None):
        """`extra_hooks` run after the default ones and, registered before the resume, get their
        state back from the checkpoint."""
        check_cfg(cfg)
        device = init_distributed(cfg.MODEL.DEVICE)  # joins torchrun's process group, if any
        self.rank, world_size = get_rank(), get_world_size()
        self.is_main = self.rank == 0  # the one process that writes files and evaluates
        check_global_batch(cfg, world_size)
        self.output_dir = cfg.OUTPUT_DIR
        self.checkpoint_path = os.path.join(self.output_dir, "checkpoints", "last.pth")
        self.logger = setup_logger(self.output_dir if self.is_main else None)
        if not self.is_main:
            self.logger.setLevel(logging.WARNING)  # the other ranks report problems only
        self.logger.debug(f"config (defaults <- config file <- command line):\n{cfg.dump()}")
        seed_everything(cfg.SOLVER.SEED)
        amp_dtype = check_runtime(cfg, device)  # before any data is read
        configure_backends(cfg)
        # built when first read, then shared by the validation split, the probes and the refresh
        self.training_split_test_view = TrainingSplitTestView(cfg)
        self.train_set, val_tasks = build_training_data(cfg, self.training_split_test_view)
        self.cfg = cfg = resolve_memory_size(cfg, len(self.train_set), world_size)
        check_refresh_fits(cfg)  # XBM.SIZE -1 is known now
        self.evaluator = build_evaluator(cfg, device, val_tasks) if self.is_main else None
        image_format = memory_format(cfg)
        model = build_model(cfg).to(device, memory_format=image_format)
        # What training steps call (DDP, compiled); the model is what is saved and evaluated.
        network = compiled(distributed_model(model, device, world_size), cfg)
        objective = build_objective(cfg, device)
        # XBM.KEY_MOMENTUM: a copy of the model after DDP's broadcast, so the same on every rank.
        self.key_encoder = MomentumKeyEncoder(model, cfg.XBM.KEY_MOMENTUM) if objective.memory is not None \
            and cfg.XBM.KEY_MOMENTUM > 0 else None
        optimizer = build_optimizer(cfg, parameter_groups(cfg, model))
        self.plateau = build_plateau(cfg)  # SOLVER.SCHEDULER plateau: a factor stepped by evaluations
        scheduler = build_scheduler(cfg, optimizer, self.plateau)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        guard = NonFiniteGuard(model, objective, cfg.SOLVER.MAX_NONFINITE_STEPS, self.logger, world_size,
                               self.checkpoint_path)
        super().__init__(model, objective, None, optimizer, scheduler, scaler, max_iters=cfg.SOLVER.MAX_ITERS,
                         device=device, network=network, guard=guard, amp_dtype=amp_dtype,
                         memory_format=image_format, head_warmup_iters=cfg.SOLVER.HEAD_WARMUP_ITERS,
                         grad_clip=cfg.SOLVER.GRAD_CLIP, log_period=cfg.SOLVER.LOG_PERIOD,
                         log_grad_norms=cfg.SOLVER.LOG_GRAD_NORMS, world_size=world_size,
                         key_encoder=self.key_encoder)
        self.writer = TensorboardWriter(self.output_dir if self.is_main else None)
        self.register_hooks(self.build_hooks() + list(extra_hooks or []))
        self.checkpointer = self._checkpointer()
        if self.rank > 0:
            # Same weights everywhere (DDP copies rank 0's), but each rank its own augmentations.
            seed_everything(cfg.SOLVER.SEED + self.rank)
        resume = resume or cfg.SOLVER.RESUME
        if resume:
            self.resume(resume)
        if self.is_main:
            with open(os.path.join(self.output_dir, "config.yaml"), "w") as f:
                f.write(cfg.dump())
        self._log_setup()

    def _log_setup(self) -> None:
        """What this run is, in a few log lines."""
        cfg, log = self.cfg, self.logger.info
        labels = self.train_set.labels
        log(f"device {self.device}; {len(self.train_set)} training images in "
            f"{len(set(int(x) for x in labels))} classes; output in {self.output_dir}")
        params = sum(p.numel() for p in self.model.parameters())
        head = f"{cfg.MODEL.HEAD.DIM}-d head" if cfg.MODEL.HEAD.DIM else f"no head ({self.model.dim}-d features)"
        log(f"model {cfg.MODEL.BACKBONE.NAME} + {head}, {params / 1e6:.2f} M parameters")
        if self.world_size > 1:
            log(f"distributed: {self.world_size} processes, DATA.BATCH_SIZE {cfg.DATA.BATCH_SIZE} per process, "
                f"global batch {self.world_size * cfg.DATA.BATCH_SIZE}")
        memory = self.objective.memory
        if memory is not None:
            log(f"cross-batch memory: {memory.size} x {memory.dim} {cfg.XBM.DTYPE}, "
                f"{memory.nbytes / 2**20:.2f} MiB; adaptation {cfg.XBM.ADAPT.NAME}; "
                f"memory loss from iteration {cfg.XBM.START_ITERATION} with weight {cfg.XBM.WEIGHT}; "
                f"filled from {cfg.XBM.FILL_FROM}")
            corrections = [f"momentum key encoder {cfg.XBM.KEY_MOMENTUM}" if cfg.XBM.KEY_MOMENTUM > 0 else "",
                           f"{cfg.XBM.REFRESH_PER_STEP} entries refreshed per step" if cfg.XBM.REFRESH_PER_STEP > 0 else "",
                           f"pairs weighted by age, scale {cfg.XBM.AGE_WEIGHT_SCALE} iterations"
                           if cfg.XBM.AGE_WEIGHT_SCALE > 0 else ""]
            if any(corrections):
                log("encoder-side drift corrections: " + "; ".join(c for c in corrections if c))
        else:
            log("cross-batch memory off (in-batch loss only)" +
                ("; DRIFT.MEMORY_PROBE has no memory to probe" if cfg.DRIFT.MEMORY_PROBE else ""))
        if self.plateau is not None and cfg.SOLVER.PLATEAU.SPLIT != "val":
            self.logger.warning(f"SOLVER.PLATEAU.SPLIT {cfg.SOLVER.PLATEAU.SPLIT}: the learning rate is "
                                "driven by the test set, so every test number of this run is OPTIMISTIC")

    # ------------------------------------------------------------------ hooks
    def build_hooks(self) -> list[default_hooks.HookBase]:
        """The default hooks, in the order they run (see xbm/engine/hooks.py), each given what it needs."""
        cfg = self.cfg
        hooks: list[default_hooks.HookBase] = [default_hooks.StopOnSignal(self.save, self.checkpoint_path)]
        if self.objective.memory is not None and cfg.XBM.REFRESH_PER_STEP > 0:
            # before the probes (they see what the next step reads) and the checkpointer (it saves the result)
            embed = build_refresh_embedding(cfg, self.training_split_test_view.items_of(self.train_set), self.device)
            hooks.append(default_hooks.RefreshMemory(MemoryRefresh(cfg.XBM.REFRESH_PER_STEP), embed))
        hooks += self._probe_hooks()
        hooks += [default_hooks.MetricWriter(cfg.SOLVER.LOG_PERIOD, self.writer, self.logger, self.is_main),
                  default_hooks.PeriodicCheckpointer(self.save, cfg.SOLVER.CHECKPOINT_PERIOD)]
        listeners = []
        if self.is_main:
            listeners.append(default_hooks.EvaluationWriter(os.path.join(self.output_dir, "metrics.jsonl"),
                                                            self.writer, self.logger, format_results))
        listeners.append(default_hooks.BestCheckpointer(cfg.TEST.SELECT_METRIC, self.save_best, self.logger))
        if self.plateau is not None:
            listeners.append(default_hooks.PlateauLR(self.plateau, cfg.SOLVER.PLATEAU.SPLIT, cfg.SOLVER.PLATEAU.METRIC,
                                                     self.logger))
        if cfg.TEST.REPORT_BEST_ON_TEST:
            listeners.append(default_hooks.BestOnTestReport(
                cfg.TEST.SELECT_METRIC, os.path.join(self.output_dir, "best_on_test_OPTIMISTIC.json"), self.logger,
                self.is_main))
        self.eval_hook = default_hooks.EvalHook(cfg.TEST.EVAL_PERIOD, self._evaluate_everywhere, listeners)
        return hooks + [self.eval_hook] + listeners

    def _probe_hooks(self) -> list[default_hooks.HookBase]:
        """The measuring hooks the config asks for, on rank 0 (DRIFT.ENABLE, and DRIFT.MEMORY_PROBE when
        there is a memory)."""
        cfg, hooks = self.cfg, []
        if not self.is_main:
            return hooks
        record = default_hooks.ScalarRecord(os.path.join(self.output_dir, "drift.jsonl"), self.writer)
        if cfg.DRIFT.ENABLE:
            monitor = build_drift_monitor(cfg, self.training_split_test_view.whole(), self.device)
            hooks.append(default_hooks.DriftProbe(monitor, record))
        if cfg.DRIFT.MEMORY_PROBE and self.objective.memory is not None:
            items = self.training_split_test_view.items_of(self.train_set)
            probe = build_memory_probe(cfg, items, self.device, self.world_size)
            hooks.append(default_hooks.MemoryDriftProbe(probe, record))
        return hooks

    # ------------------------------------------------------------------ the loop, evaluation
    def train(self) -> dict[str, dict]:
        """Train to SOLVER.MAX_ITERS; the final evaluation's results."""
        self.data_loader = self.train_loader()
        try:
            super().train()
        finally:
            self.writer.close()
        return self.eval_hook.results

    def train_loader(self):
        """The training batches from the current iteration on (a resumed run continues the stream)."""
        return build_training_loader(self.cfg, self.train_set, self.iteration, self.rank, self.world_size,
                                     self.device)

    def _evaluate_everywhere(self) -> dict[str, dict]:
        """Rank 0 evaluates the bare model; the other ranks wait for its numbers (a broadcast)."""
        results = self.evaluator(self.model) if self.is_main else None
        return broadcast_object(results)

    def evaluate(self) -> dict[str, dict]:
        """An evaluation now, with everything that follows one (the EvalHook's listeners)."""
        return self.eval_hook.evaluate()

    # ------------------------------------------------------------------ state
    def _checkpointer(self) -> Checkpointer:
        """The run's checkpointables by name, and its hooks (the list itself: hooks registered later count)."""
        parts = {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler,
                 "objective": self.objective, "guard": self.guard}
        if self.plateau is not None:
            parts["plateau"] = self.plateau
        if self.key_encoder is not None:
            parts["key_encoder"] = self.key_encoder
        return Checkpointer(os.path.dirname(self.checkpoint_path), parts, self.hooks, rank=self.rank,
                            world_size=self.world_size)

    def checkpoint_state(self) -> dict | None:
        """The checkpoint of now (layout 2, xbm/engine/checkpointer.py); a collective: rank 0 gets it."""
        return self.checkpointer.state(iteration=self.iteration, config=self.cfg.dump())

    def save(self) -> None:
        """checkpoints/last.pth, and iter_<N>.pth with SOLVER.KEEP_CHECKPOINTS (the newest N kept)."""
        self.checkpointer.save("last.pth", keep=self.cfg.SOLVER.KEEP_CHECKPOINTS, iteration=self.iteration,
                               config=self.cfg.dump())

    def save_best(self) -> None:
        """checkpoints/best.pth (a collective, like `save`)."""
        self.checkpointer.save("best.pth", iteration=self.iteration, config=self.cfg.dump())

    def resume(self, path: str) -> None:
        """Load `path` ("auto": last.pth if there is one, else start from scratch); every rank must agree."""
        self._load(path)
        if self.world_size > 1:
            iterations = all_gather_object(self.iteration)
            if len(set(iterations)) > 1:
                raise ValueError(
                    f"the ranks resumed at different iterations {iterations}: every node must read the same checkpoint "
                    f"{self.checkpoint_path} (put OUTPUT_DIR on a shared file system or copy it to every node)")

    def _load(self, path: str) -> None:
        if path == "auto":
            path = self.checkpoint_path
            if not os.path.isfile(path):
                self.logger.info(f"no checkpoint at {path}: starting from scratch")
                return
        state = self.checkpointer.load(path)
        diffs = config_differences(yaml.safe_load(state["config"]), yaml.safe_load(self.cfg.dump()))
        if diffs:
            raise ValueError(f"checkpoint {path} was trained with another config: " + "; ".join(diffs))
        for note in self.checkpointer.restore(state):
            self.logger.warning(f"resuming from {path}: {note}")
        self.iteration = state["iteration"]
        self.logger.info(f"resumed from {path} at iteration {self.iteration}")
        saved_world = state.get("world_size", 1)
        if saved_world != self.world_size:
            batch = self.cfg.DATA.BATCH_SIZE
            self.logger.warning(
                f"{path} was written by a run of {saved_world} process(es) and this run has {self.world_size}: "
                f"the global batch changes from {saved_world * batch} to {self.world_size * batch} images and the "
                "batch stream continues elsewhere")


def distributed_model(model: torch.nn.Module, device: torch.device, world_size: int) -> torch.nn.Module:
    """The model wrapped in DistributedDataParallel under torchrun; the model itself otherwise."""
    if world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def build_refresh_embedding(cfg, items_view, device):
    """XBM.REFRESH_PER_STEP's `embed(model, item_ids)`: the items of `items_view` (the training set's items
    through the test-time transform), embedded in eval mode (as the memory probe re-embeds them)."""
    batch_size = cfg.TEST.BATCH_SIZE

    def embed(model, item_ids):
        return embed_training_items(model, items_view, item_ids, device, batch_size)

    return embed
