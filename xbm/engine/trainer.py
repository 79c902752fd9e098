"""The training loop: m-per-class batches, in-batch loss plus a loss against the cross-batch memory.

One step:
  images -> model -> unit embeddings e
  [adapt the memory to the batch's moments (XBN / AXBN)]
  enqueue e.detach() (before the memory loss, so the memory loss sees the batch too)
  loss = LOSS.INBATCH_WEIGHT * loss(e, labels) + XBM.WEIGHT * loss(e, labels, memory)
  backward -> optimizer step

Under torchrun (one process per GPU, DistributedDataParallel) DATA.BATCH_SIZE is per process:
every rank gathers the global batch (rank 0's rows first), so all memories stay identical, and
computes the loss of its own anchors against the whole global batch and the whole memory.
Only rank 0 writes logs, metrics and checkpoints, and evaluates.
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import check_cfg
from ..config.rules import check_global_batch, config_differences, resolve_memory_size
from ..data.datasets import build_dataset, dataset_class
from ..data.loader import build_train_loader
from ..data.sampler import sampler_class
from ..data.transforms import build_transforms
from ..data.validation import split_validation
from ..losses import build_loss
from ..memory import build_adapter, build_memory
from ..modeling import build_model
from ..utils.distributed import (all_gather_batch, all_gather_object, all_gather_with_grad, all_ranks_true,
                                 broadcast_object, get_rank, get_world_size, init_distributed, sum_over_ranks)
from ..utils.env import seed_everything
from ..utils.logger import setup_logger
from .checkpoint import CHECKPOINT_KEYS, load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from .drift import DriftMonitor
from .evaluator import Evaluator
from .performance import check_runtime, compiled, configure_backends, evaluation_amp_dtype, memory_format
from .run_guard import TrainingStopped, stop_agreed
from .solver import build_optimizer, build_plateau, build_scheduler

class NonFiniteLossError(FloatingPointError):
    """The loss stayed NaN or infinite for SOLVER.MAX_NONFINITE_STEPS steps in a row; the run
    stops, and none of those steps changed any weight."""


def build_evaluator(cfg, device, extra_tasks: dict | None = None) -> Evaluator:
    """The dataset's own evaluation tasks, plus `extra_tasks` (the validation split)."""
    cls = dataset_class(cfg)
    transform = build_transforms(cfg, train=False)
    splits = {}  # a split used by several tasks (a shared gallery) is loaded once

    def split(name):
        if name is not None and name not in splits:
            splits[name] = build_dataset(cfg, name, transform)
        return splits.get(name)

    tasks = dict(extra_tasks or {})
    tasks.update({task: (split(query), split(gallery)) for task, (query, gallery) in cls.EVAL_TASKS.items()})
    ks = tuple(cfg.TEST.RECALL_KS) or tuple(cls.RECALL_KS)
    return Evaluator(tasks, ks, device, cfg.TEST.BATCH_SIZE, cfg.DATA.NUM_WORKERS, cfg.TEST.KNN_BACKEND,
                     amp_dtype=evaluation_amp_dtype(cfg, torch.device(device)), memory_format=memory_format(cfg),
                     persistent_workers=cfg.DATA.PERSISTENT_WORKERS, prefetch_factor=cfg.DATA.PREFETCH_FACTOR)


def format_results(results: dict[str, dict]) -> str:
    """A plain-text table: one row per evaluation task, one column per metric."""
    lines = []
    for task, metrics in results.items():
        names = [k for k, v in metrics.items() if isinstance(v, float)]
        lines.append(f"{'task':<10}" + "".join(f"{n:>9}" for n in names))
        lines.append(f"{task:<10}" + "".join(f"{100 * metrics[n]:>9.2f}" for n in names))
    return "\n".join(lines)


class Trainer:
    def __init__(self, cfg, resume: str | None = None):
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
        self.train_set, val_tasks = self._training_data()
        self.cfg = cfg = resolve_memory_size(cfg, len(self.train_set), self.world_size)
        self.evaluator = build_evaluator(cfg, self.device, val_tasks) if self.is_main else None
        self.model = build_model(cfg).to(self.device, memory_format=self.memory_format)
        # What training steps call (DDP, compiled); self.model is what is saved and evaluated.
        self.network = compiled(self._distributed(self.model), cfg)
        self.criterion = build_loss(cfg)
        # The memory's finiteness check is part of the step's one host synchronisation (train_step).
        self.memory = build_memory(cfg, self.device, check_finite=False)
        self.adapter = build_adapter(cfg) if self.memory is not None else None
        self.drift = self._drift_monitor() if cfg.DRIFT.ENABLE and self.is_main else None
        self.optimizer = build_optimizer(cfg, [p for p in self.model.parameters() if p.requires_grad])
        self.plateau = build_plateau(cfg)  # SOLVER.SCHEDULER plateau: a factor stepped by evaluations
        self.scheduler = build_scheduler(cfg, self.optimizer, self.plateau)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.iteration = 0
        self.best_metric = None  # best validation TEST.SELECT_METRIC so far
        self.skipped_steps = 0  # steps skipped for a non-finite loss, in all
        self.nonfinite_streak = 0  # ... and in a row, up to now
        self._buffer_backup = None  # the model's buffers before the step in progress
        self._tasks_without_positives_reported = set()
        self.best_on_test = None  # TEST.REPORT_BEST_ON_TEST: the evaluation with the best test score (optimistic)
        if self.rank > 0:
            # Same weights everywhere (DDP copies rank 0's), but each rank its own augmentations.
            seed_everything(cfg.SOLVER.SEED + self.rank)
        resume = resume or cfg.SOLVER.RESUME
        if resume:
            self._resume(resume)
            self._check_ranks_agree()
        if self.is_main:
            with open(os.path.join(self.output_dir, "config.yaml"), "w") as f:
                f.write(cfg.dump())
        self._log_setup()

    # ------------------------------------------------------------------ set-up
    def _log_setup(self) -> None:
        log = self.logger.info
        log(f"device {self.device}; {len(self.train_set)} training images in "
            f"{len(set(int(x) for x in self.train_set.labels))} classes; output in {self.output_dir}")
        params = sum(p.numel() for p in self.model.parameters())
        log(f"model {self.cfg.MODEL.BACKBONE.NAME} + {self.cfg.MODEL.HEAD.DIM}-d head, {params / 1e6:.2f} M parameters")
        if self.world_size > 1:
            log(f"distributed: {self.world_size} processes, DATA.BATCH_SIZE {self.cfg.DATA.BATCH_SIZE} per process, "
                f"global batch {self.world_size * self.cfg.DATA.BATCH_SIZE}")
        if self.memory is not None:
            log(f"cross-batch memory: {self.memory.size} x {self.cfg.MODEL.HEAD.DIM} {self.cfg.XBM.DTYPE}, "
                f"{self.memory.nbytes / 2**20:.2f} MiB; adaptation {self.cfg.XBM.ADAPT.NAME}; "
                f"memory loss from iteration {self.cfg.XBM.START_ITERATION} with weight {self.cfg.XBM.WEIGHT}; "
                f"filled from {self.cfg.XBM.FILL_FROM}")
        if self.plateau is not None and self.cfg.SOLVER.PLATEAU.SPLIT != "val":
            self.logger.warning(f"SOLVER.PLATEAU.SPLIT {self.cfg.SOLVER.PLATEAU.SPLIT}: the learning rate is "
                                "driven by the test set, so every test number of this run is OPTIMISTIC")
        else:
            log("cross-batch memory off (in-batch loss only)")

    def _training_data(self):
        """The training set and, with DATA.VAL_FRACTION, a class-disjoint validation task."""
        cfg = self.cfg
        split = dataset_class(cfg).TRAIN_SPLIT
        train_set = build_dataset(cfg, split, build_transforms(cfg, train=True))
        if cfg.DATA.VAL_FRACTION <= 0:
            return train_set, {}
        eval_view = build_dataset(cfg, split, build_transforms(cfg, train=False))
        train_set, val_set = split_validation(train_set, eval_view, cfg.DATA.VAL_FRACTION, seed=cfg.SOLVER.SEED)
        return train_set, {"val": (val_set, None)}

    def _distributed(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model wrapped in DistributedDataParallel under torchrun; the model itself otherwise."""
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def _drift_monitor(self) -> DriftMonitor:
        cfg = self.cfg
        # The test-time transform: drift should measure the network, not the augmentation.
        probe_set = build_dataset(cfg, dataset_class(cfg).TRAIN_SPLIT, build_transforms(cfg, train=False))
        return DriftMonitor(probe_set, num_samples=cfg.DRIFT.NUM_SAMPLES, interval=cfg.DRIFT.INTERVAL,
                            device=self.device, batch_size=cfg.TEST.BATCH_SIZE)

    def _train_loader(self) -> DataLoader:
        cfg = self.cfg
        sampler = sampler_class(cfg.DATA.SAMPLER)(
            self.train_set.labels, cfg.DATA.BATCH_SIZE, cfg.DATA.NUM_INSTANCES,
            seed=cfg.SOLVER.SEED, start_batch=self.iteration, rank=self.rank, world_size=self.world_size,
        )
        return build_train_loader(self.train_set, sampler, num_workers=cfg.DATA.NUM_WORKERS,
                                  pin_memory=self.device.type == "cuda", prefetch_factor=cfg.DATA.PREFETCH_FACTOR)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "config": self.cfg.dump(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "best_metric": self.best_metric,
            "skipped_steps": self.skipped_steps,
            "plateau": self.plateau.state_dict() if self.plateau is not None else None,
            "best_on_test": self.best_on_test,
            "memory": self.memory.state_dict() if self.memory is not None else None,
            "adapter": self.adapter.state_dict() if self.adapter is not None else None,
            "drift": self.drift.state_dict() if self.drift is not None else None,
            "rng": rng_states(),
            "world_size": self.world_size,
        }

    def _checkpoint_state(self) -> dict | None:
        """state_dict() plus every rank's random state; a collective: all ranks call it, rank 0 gets it."""
        state = self.state_dict()
        if self.world_size > 1:
            state["rng_per_rank"] = all_gather_object(state["rng"])
        return state if self.is_main else None

    def save(self) -> None:
        state = self._checkpoint_state()
        if not self.is_main:
            return
        save_checkpoint(state, self.checkpoint_path)
        keep = self.cfg.SOLVER.KEEP_CHECKPOINTS
        if keep > 0:
            folder = os.path.dirname(self.checkpoint_path)
            save_checkpoint(state, os.path.join(folder, f"iter_{self.iteration:07d}.pth"))
            numbered = sorted(f for f in os.listdir(folder) if f.startswith("iter_") and f.endswith(".pth"))
            for old in numbered[:-keep]:
                os.remove(os.path.join(folder, old))

    def _resume(self, path: str) -> None:
        if path == "auto":
            path = self.checkpoint_path
            if not os.path.isfile(path):
                self.logger.info(f"no checkpoint at {path}: starting from scratch")
                return
        # Read on the CPU: load_state_dict moves weights, optimizer and memory state to their
        # device, and the random states must stay CPU tensors (see restore_rng_states).
        state = load_checkpoint(path, map_location="cpu", required=CHECKPOINT_KEYS)
        import yaml  # yacs depends on PyYAML

        diffs = config_differences(yaml.safe_load(state["config"]), yaml.safe_load(self.cfg.dump()))
        if diffs:
            raise ValueError(f"checkpoint {path} was trained with another config: " + "; ".join(diffs))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.best_metric = state["best_metric"]
        self.skipped_steps = state.get("skipped_steps", 0)  # absent from checkpoints of xbm 0.1
        if self.plateau is not None and state.get("plateau") is not None:
            self.plateau.load_state_dict(state["plateau"])
        self.best_on_test = state.get("best_on_test")
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"])
        if self.adapter is not None:
            self.adapter.load_state_dict(state["adapter"])
        if self.drift is not None and state.get("drift") is not None:
            self.drift.load_state_dict(state["drift"])
        per_rank = state.get("rng_per_rank")
        same_world = per_rank is not None and len(per_rank) == self.world_size
        for note in restore_rng_states(per_rank[self.rank] if same_world else state["rng"]):
            self.logger.warning(f"resuming from {path}: {note}")
        self.iteration = state["iteration"]
        self.logger.info(f"resumed from {path} at iteration {self.iteration}")
        saved_world = state.get("world_size", 1)
        if saved_world != self.world_size:
            self.logger.warning(
                f"{path} was written by a run of {saved_world} process(es) and this run has {self.world_size}: "
                f"the global batch changes from {saved_world * self.cfg.DATA.BATCH_SIZE} to "
                f"{self.world_size * self.cfg.DATA.BATCH_SIZE} images and the batch stream continues elsewhere")

    def _check_ranks_agree(self) -> None:
        """Every rank must resume from the same checkpoint (OUTPUT_DIR on a file system all nodes read)."""
        if self.world_size == 1:
            return
        iterations = all_gather_object(self.iteration)
        if len(set(iterations)) > 1:
            raise ValueError(
                f"the ranks resumed at different iterations {iterations}: every node must read the same "
                f"checkpoint {self.checkpoint_path} (put OUTPUT_DIR on a shared file system or copy it to every node)")

    # ------------------------------------------------------------------ one step
    def _global_batch(self, embeddings, labels):
        """(embeddings, labels) of all ranks, rank 0's rows first, and this rank's rows in them.

        One process: the batch itself and None. The gathered embeddings carry gradients back to
        every rank when the in-batch loss uses them as its reference set.
        """
        if self.world_size == 1:
            return embeddings, labels, None
        gather = all_gather_with_grad if self.cfg.LOSS.INBATCH_WEIGHT > 0 else all_gather_batch
        start = self.rank * embeddings.shape[0]
        own_rows = torch.arange(start, start + embeddings.shape[0], device=embeddings.device)
        return gather(embeddings), all_gather_batch(labels), own_rows

    def _step_has_loss(self) -> bool:
        cfg = self.cfg
        return cfg.LOSS.INBATCH_WEIGHT > 0 or (
            self.memory is not None and self.iteration >= cfg.XBM.START_ITERATION and cfg.XBM.WEIGHT > 0)

    def _loss(self, embeddings, labels) -> tuple[torch.Tensor | None, dict]:
        cfg, parts = self.cfg, {}
        total = None
        batch_embeddings, batch_labels, own_rows = self._global_batch(embeddings, labels)
        if cfg.LOSS.INBATCH_WEIGHT > 0:
            if own_rows is None:
                loss = self.criterion(embeddings, labels, check_values=False)
            else:
                # This rank's anchors against the global batch, own pairs excluded: averaged over
                # ranks by DDP, the gradient of the one-process loss on the global batch.
                loss = self.criterion(embeddings, labels, batch_embeddings, batch_labels, ref_self_index=own_rows,
                                      check_values=False)
            parts.update(_stats("inbatch", loss, self.criterion))
            total = cfg.LOSS.INBATCH_WEIGHT * loss
        if self.memory is not None:
            batch = batch_embeddings.detach()
            if not self._memory_fills():
                return total, parts
            if self.adapter is not None and len(self.memory) > 0:
                self.memory.adapt_(self.adapter, batch)  # global-batch moments: every rank adapts alike
            slots = self.memory.enqueue(batch, batch_labels)
            if own_rows is not None:
                slots = slots[own_rows]
            if self.iteration >= cfg.XBM.START_ITERATION and cfg.XBM.WEIGHT > 0:
                feats, mem_labels = self.memory.get()
                loss = self.criterion(embeddings, labels, feats, mem_labels, ref_self_index=slots, check_values=False)
                parts.update(_stats("memory", loss, self.criterion))
                total = cfg.XBM.WEIGHT * loss if total is None else total + cfg.XBM.WEIGHT * loss
        return total, parts

    def _memory_fills(self) -> bool:
        """Whether this step's batch enters the memory (XBM.FILL_FROM)."""
        return self.cfg.XBM.FILL_FROM == "iteration_0" or self.iteration >= self.cfg.XBM.START_ITERATION

    def train_step(self, images, labels) -> dict:
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        # A step without a loss has no backward, which DDP would wait for: call the bare model.
        network = self.network if self._step_has_loss() else self.model
        undo = self._undo_point(labels.shape[0] * self.world_size)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            embeddings = network(images)
        # Losses and the memory work in float32 whatever the network's precision.
        total, parts = self._loss(embeddings.float(), labels)
        finite = torch.isfinite(embeddings).all()
        if total is not None:
            finite = finite & torch.isfinite(total)
        # The step's one host synchronisation (an all-reduce under DDP: every rank skips alike).
        if not all_ranks_true(finite):
            self._skip_step(undo)
            self._advance_schedule()
            return parts
        self.nonfinite_streak = 0
        if total is not None:
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
            parts["loss/total"] = total.detach()
        self._advance_schedule()
        return parts

    # ------------------------------------------------------------------ skipped steps
    def _undo_point(self, global_batch: int) -> tuple:
        """What a step changes before its loss is known to be finite: the model's buffers
        (BatchNorm statistics see the forward pass), the memory and the adapter's filters."""
        buffers = list(self.model.buffers())
        if self._buffer_backup is None:
            self._buffer_backup = [torch.empty_like(b) for b in buffers]
        copy_all(self._buffer_backup, buffers)
        memory = adapter = None
        if self.memory is not None:
            adapting = self.adapter is not None and len(self.memory) > 0
            memory = self.memory.undo_point(global_batch, adapting)
            adapter = self.adapter.state_dict() if adapting else None
        return self._buffer_backup, memory, adapter

    def _skip_step(self, undo: tuple) -> None:
        """Take back a step with a non-finite loss or embeddings, as GradScaler skips a step whose
        gradients overflow: nothing it computed is kept. Stop after SOLVER.MAX_NONFINITE_STEPS in a row."""
        buffers, memory, adapter = undo
        copy_all(list(self.model.buffers()), buffers)
        if memory is not None:
            self.memory.restore_(memory)
        if adapter is not None:
            self.adapter.load_state_dict(adapter)
        self.skipped_steps += 1
        self.nonfinite_streak += 1
        limit = self.cfg.SOLVER.MAX_NONFINITE_STEPS
        where = "" if self.world_size == 1 else f" on at least one of {self.world_size} ranks"
        self.logger.warning(f"iteration {self.iteration}: non-finite loss or embeddings{where}; step skipped "
                            f"({self.nonfinite_streak} in a row, {self.skipped_steps} in all; the run stops at {limit} "
                            "in a row)")
        if self.nonfinite_streak >= limit:
            first = self.iteration - self.nonfinite_streak + 1
            raise NonFiniteLossError(
                f"the loss was non-finite for {self.nonfinite_streak} steps in a row (iterations {first} to "
                f"{self.iteration}); training stopped, and none of those steps changed any weight. The last good "
                f"checkpoint is {self.checkpoint_path} (if one was saved); lower SOLVER.BASE_LR, set SOLVER.GRAD_CLIP "
                "or SOLVER.AMP bf16/none, and resume from it.")

    def _advance_schedule(self) -> None:
        # The learning rate is a function of the iteration, and a step that updates no weight (memory
        # loss only, before XBM.START_ITERATION; or AMP skipping an overflowing step) is still an
        # iteration. PyTorch warns when the scheduler moves before the optimizer has ever stepped;
        # here that is intended, so that one warning is silenced (and only it).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before",
                                    category=UserWarning)
            self.scheduler.step()

    # ------------------------------------------------------------------ the loop
    def evaluate(self, writer=None) -> dict[str, dict]:
        """Rank 0 evaluates the bare model (no DDP collectives); the others wait for its numbers."""
        results = None
        if self.is_main:
            start = time.time()
            results = self.evaluator(self.model)
            with open(os.path.join(self.output_dir, "metrics.jsonl"), "a") as f:
                for task, metrics in results.items():
                    f.write(json.dumps({"iteration": self.iteration, "split": task, **metrics}) + "\n")
                    if writer is not None:
                        for name, value in metrics.items():
                            writer.add_scalar(f"{task}/{name}", value, self.iteration)
            self.logger.info(f"evaluation at iteration {self.iteration} ({time.time() - start:.1f} s):\n"
                             + format_results(results))
            self._report_queries_without_positives(results)
        results = broadcast_object(results)  # the other ranks' barrier
        self._keep_best(results)
        self._step_plateau(results)
        self._report_best_on_test(results)
        return results

    def _report_queries_without_positives(self, results: dict) -> None:
        """Once per task and run (the count depends on the data, not on the model)."""
        for task, metrics in results.items():
            count = metrics.get("num_queries_without_positive", 0)
            if count and task not in self._tasks_without_positives_reported:
                self._tasks_without_positives_reported.add(task)
                self.logger.warning(
                    f"evaluation task {task!r}: {count} of {metrics.get('num_queries')} queries have no image of "
                    "their class in the gallery; they count as misses in R@K and are left out of MAP@R and RP")
    def _step_plateau(self, results: dict) -> None:
        """SOLVER.SCHEDULER plateau: one step with this evaluation's score (every rank, same numbers)."""
        if self.plateau is None:
            return
        split, metric = self.cfg.SOLVER.PLATEAU.SPLIT, self.cfg.SOLVER.PLATEAU.METRIC
        if metric not in results.get(split, {}):
            raise ValueError(f"SOLVER.PLATEAU.METRIC {metric!r} of task {split!r} is not among this "
                             f"evaluation's results {sorted(results.get(split, {}))}")
        if self.plateau.step(results[split][metric]):
            # Apply now, not from the next scheduler step: the next iteration runs at the new rate.
            factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
            for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = base_lr * factor
            self.logger.info(f"{split} {metric} has not improved for {self.cfg.SOLVER.PLATEAU.PATIENCE + 1} "
                             f"evaluations: learning rate x {self.cfg.SOLVER.PLATEAU.FACTOR} "
                             f"-> {self.optimizer.param_groups[0]['lr']:.3g}")

    def _report_best_on_test(self, results: dict) -> None:
        """TEST.REPORT_BEST_ON_TEST: the official code's best-on-test report, labelled optimistic."""
        if not self.cfg.TEST.REPORT_BEST_ON_TEST:
            return
        task = next(t for t in results if t != "val")  # the dataset's first evaluation task
        metric = self.cfg.TEST.SELECT_METRIC
        score = results[task][metric]
        if self.best_on_test is not None and score <= self.best_on_test["score"]:
            return
        self.best_on_test = {"optimistic": True, "chosen_on": f"{task} {metric}", "score": score,
                             "iteration": self.iteration, "results": results}
        if self.is_main:
            path = os.path.join(self.output_dir, "best_on_test_OPTIMISTIC.json")
            with open(path + ".tmp", "w") as f:
                json.dump(self.best_on_test, f, indent=1)
            os.replace(path + ".tmp", path)
            self.logger.info(f"OPTIMISTIC (chosen on the test set, as the official code reports): best {task} "
                             f"{metric} so far {100 * score:.2f} at iteration {self.iteration}; not a result to "
                             "report as such (the last iteration and best.pth are)")

    def _keep_best(self, results: dict) -> None:
        """checkpoints/best.pth: the best validation score so far (never chosen on the test set)."""
        if "val" not in results:
            return
        metric = self.cfg.TEST.SELECT_METRIC
        if metric not in results["val"]:
            raise ValueError(f"TEST.SELECT_METRIC {metric!r} is not one of {sorted(results['val'])}")
        score = results["val"][metric]
        if self.best_metric is None or score > self.best_metric:
            self.best_metric = score
            state = self._checkpoint_state()
            if self.is_main:
                save_checkpoint(state, os.path.join(os.path.dirname(self.checkpoint_path), "best.pth"))
                self.logger.info(f"new best validation {metric} {score:.4f} at iteration {self.iteration}: best.pth")

    def train(self) -> dict[str, dict]:
        from torch.utils.tensorboard import SummaryWriter

        cfg = self.cfg
        max_iters = cfg.SOLVER.MAX_ITERS
        writer = SummaryWriter(self.output_dir) if self.is_main else None
        self.network.train()
        results = {}
        batches = iter(self._train_loader())
        progress = tqdm(total=max_iters, initial=self.iteration, desc="train", dynamic_ncols=True,
                        disable=not self.is_main)
        if self.drift is not None:
            self.drift.step(self.model, self.iteration)  # the first snapshot
        try:
            while self.iteration < max_iters:
                stop_signal = stop_agreed(self.device, self.world_size)  # SIGINT/SIGTERM (xbm-train)
                if stop_signal:
                    self.save()
                    raise TrainingStopped(self.iteration, self.checkpoint_path, stop_signal)
                images, labels = next(batches)
                parts = self.train_step(images, labels)
                self.iteration += 1
                progress.update(1)
                if self.drift is not None:
                    self._log_drift(self.drift.step(self.model, self.iteration), writer)
                if self.iteration % max(1, cfg.SOLVER.LOG_PERIOD) == 0 or self.iteration == max_iters:
                    self._log_step(parts, writer, progress)
                if cfg.SOLVER.CHECKPOINT_PERIOD and self.iteration % cfg.SOLVER.CHECKPOINT_PERIOD == 0:
                    self.save()
                if cfg.TEST.EVAL_PERIOD and self.iteration % cfg.TEST.EVAL_PERIOD == 0 and self.iteration < max_iters:
                    results = self.evaluate(writer)
            progress.close()
            self.save()
            results = self.evaluate(writer)
        finally:
            progress.close()
            if writer is not None:
                writer.close()
        return results

    def _log_drift(self, drift: dict | None, writer) -> None:
        if drift is None:
            return
        for name, value in drift.items():
            writer.add_scalar(name, value, self.iteration)
        # Its own file: metrics.jsonl lines are evaluations, which sweeps and plots read as such.
        with open(os.path.join(self.output_dir, "drift.jsonl"), "a") as f:
            f.write(json.dumps({"iteration": self.iteration, **drift}) + "\n")

    def _global_parts(self, parts: dict) -> dict:
        """Losses averaged over ranks (the global batch's loss), pair counts summed (a collective)."""
        names = sorted(parts)  # every rank has the same keys: same config, same iteration
        local = torch.stack([torch.as_tensor(parts[n], dtype=torch.float64, device=self.device) for n in names])
        total = sum_over_ranks(local)
        return {n: v / self.world_size if n.startswith("loss/") else v for n, v in zip(names, total)}

    def _log_step(self, parts: dict, writer, progress) -> None:
        if self.world_size > 1:
            parts = self._global_parts(parts)
        if not self.is_main:
            return
        values = {name: float(value) for name, value in parts.items()}
        values["lr"] = self.optimizer.param_groups[0]["lr"]
        values["amp/skipped_steps"] = self.skipped_steps
        if self.scaler.is_enabled():
            values["amp/grad_scale"] = self.scaler.get_scale()  # reads the device: logging steps only
        if self.memory is not None:
            values["memory/fill"] = len(self.memory) / self.memory.size
        for name, value in values.items():
            writer.add_scalar(name, value, self.iteration)
        if "loss/total" in values:
            progress.set_postfix(loss=f"{values['loss/total']:.4f}")
        text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        self.logger.debug(f"iter {self.iteration}: {text}")


@torch.no_grad()
def copy_all(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """targets[i].copy_(sources[i]) for all i, in a few fused kernels where torch has them."""
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(targets, sources)
    else:
        for target, source in zip(targets, sources):
            target.copy_(source)


def _stats(prefix: str, loss: torch.Tensor, criterion) -> dict:
    parts = {f"loss/{prefix}": loss.detach()}
    for name, count in getattr(criterion, "last_stats", {}).items():
        parts[f"pairs/{prefix}_{name}"] = count
    return parts
