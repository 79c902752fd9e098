"""The training loop: m-per-class batches, in-batch loss plus a loss against the cross-batch memory.

One step (DESIGN.md section 1):
  images -> model -> unit embeddings e
  [adapt the memory to the batch's moments (XBN / AXBN)]
  enqueue e.detach() (before the memory loss, so the memory loss sees the batch too)
  loss = LOSS.INBATCH_WEIGHT * loss(e, labels) + XBM.WEIGHT * loss(e, labels, memory)
  backward -> optimizer step
"""
from __future__ import annotations

import json
import os
import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import check_cfg
from ..data.datasets import build_dataset, dataset_class
from ..data.sampler import MPerClassBatchSampler
from ..data.transforms import build_transforms
from ..data.validation import split_validation
from ..losses import build_loss
from ..memory import build_adapter, build_memory
from ..modeling import build_model
from ..utils.env import resolve_device, seed_everything
from ..utils.logger import setup_logger
from .checkpoint import load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from .drift import DriftMonitor
from .evaluator import Evaluator
from .solver import build_optimizer, build_scheduler

# Keys that may change between a checkpoint and the run that resumes it: they change how long or
# where a run goes, not what it computes.
RESUMABLE_CHANGES = (
    "OUTPUT_DIR", "MODEL.DEVICE", "DATA.NUM_WORKERS", "SOLVER.MAX_ITERS", "SOLVER.CHECKPOINT_PERIOD",
    "SOLVER.LOG_PERIOD", "TEST.EVAL_PERIOD", "TEST.BATCH_SIZE", "TEST.KNN_BACKEND", "TEST.RECALL_KS",
)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stops before the bad step changes any weight."""


AMP_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    return Evaluator(tasks, ks, device, cfg.TEST.BATCH_SIZE, cfg.DATA.NUM_WORKERS, cfg.TEST.KNN_BACKEND)


def format_results(results: dict[str, dict]) -> str:
    """A plain-text table: one row per evaluation task, one column per metric."""
    lines = []
    for task, metrics in results.items():
        names = [k for k, v in metrics.items() if isinstance(v, float)]
        lines.append(f"{'task':<10}" + "".join(f"{n:>9}" for n in names))
        lines.append(f"{task:<10}" + "".join(f"{100 * metrics[n]:>9.2f}" for n in names))
    return "\n".join(lines)


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """'KEY: saved -> current' for every leaf that differs (ignoring RESUMABLE_CHANGES)."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            diffs += config_differences(old, new, name + ".")
        elif name not in RESUMABLE_CHANGES and _plain(old) != _plain(new):
            diffs.append(f"{name}: {old!r} -> {new!r}")
    return diffs


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


class Trainer:
    def __init__(self, cfg, resume: str | None = None):
        check_cfg(cfg)
        self.cfg = cfg
        self.output_dir = cfg.OUTPUT_DIR
        self.checkpoint_path = os.path.join(self.output_dir, "checkpoints", "last.pth")
        self.logger = setup_logger(self.output_dir)
        self.device = resolve_device(cfg.MODEL.DEVICE)
        seed_everything(cfg.SOLVER.SEED)

        self.amp_dtype = self._amp_dtype()
        self.train_set, val_tasks = self._training_data()
        self.evaluator = build_evaluator(cfg, self.device, val_tasks)
        self.model = build_model(cfg).to(self.device)
        self.criterion = build_loss(cfg)
        self.memory = build_memory(cfg, self.device)
        self.adapter = build_adapter(cfg) if self.memory is not None else None
        self.drift = self._drift_monitor() if cfg.XBM.DRIFT.ENABLE else None
        self.optimizer = build_optimizer(cfg, [p for p in self.model.parameters() if p.requires_grad])
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.iteration = 0
        self.best_metric = None  # best validation TEST.SELECT_METRIC so far
        if resume:
            self._resume(resume)
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
        if self.memory is not None:
            log(f"cross-batch memory: {self.memory.size} x {self.cfg.MODEL.HEAD.DIM} {self.cfg.XBM.DTYPE}, "
                f"{self.memory.nbytes / 2**20:.2f} MiB; adaptation {self.cfg.XBM.ADAPT.NAME}; "
                f"memory loss from iteration {self.cfg.XBM.START_ITERATION} with weight {self.cfg.XBM.WEIGHT}")
        else:
            log("cross-batch memory off (in-batch loss only)")

    def _amp_dtype(self):
        name = self.cfg.SOLVER.AMP.lower()
        if name not in AMP_DTYPES:
            raise ValueError(f"SOLVER.AMP {self.cfg.SOLVER.AMP!r} is not one of {tuple(AMP_DTYPES)}")
        if AMP_DTYPES[name] is not None and self.device.type != "cuda":
            raise ValueError(f"SOLVER.AMP {name} needs a CUDA device; this run is on {self.device} (use none)")
        return AMP_DTYPES[name]

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

    def _drift_monitor(self) -> DriftMonitor:
        cfg = self.cfg
        # The test-time transform: drift should measure the network, not the augmentation.
        probe_set = build_dataset(cfg, dataset_class(cfg).TRAIN_SPLIT, build_transforms(cfg, train=False))
        return DriftMonitor(probe_set, num_samples=cfg.XBM.DRIFT.NUM_SAMPLES, interval=cfg.XBM.DRIFT.INTERVAL,
                            device=self.device, batch_size=cfg.TEST.BATCH_SIZE)

    def _train_loader(self) -> DataLoader:
        cfg = self.cfg
        sampler = MPerClassBatchSampler(
            self.train_set.labels, cfg.DATA.BATCH_SIZE, cfg.DATA.NUM_INSTANCES,
            seed=cfg.SOLVER.SEED, start_batch=self.iteration,
        )
        return DataLoader(
            self.train_set, batch_sampler=sampler, num_workers=cfg.DATA.NUM_WORKERS,
            pin_memory=self.device.type == "cuda", persistent_workers=cfg.DATA.NUM_WORKERS > 0,
        )

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
            "memory": self.memory.state_dict() if self.memory is not None else None,
            "adapter": self.adapter.state_dict() if self.adapter is not None else None,
            "drift": self.drift.state_dict() if self.drift is not None else None,
            "rng": rng_states(),
        }

    def save(self) -> None:
        state = self.state_dict()
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
        state = load_checkpoint(path, map_location=self.device)
        import yaml  # yacs depends on PyYAML

        diffs = config_differences(yaml.safe_load(state["config"]), yaml.safe_load(self.cfg.dump()))
        if diffs:
            raise ValueError(f"checkpoint {path} was trained with another config: " + "; ".join(diffs))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.best_metric = state["best_metric"]
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"])
        if self.adapter is not None:
            self.adapter.load_state_dict(state["adapter"])
        if self.drift is not None and state.get("drift") is not None:
            self.drift.load_state_dict(state["drift"])
        restore_rng_states(state["rng"])
        self.iteration = state["iteration"]
        self.logger.info(f"resumed from {path} at iteration {self.iteration}")

    # ------------------------------------------------------------------ one step
    def _loss(self, embeddings, labels) -> tuple[torch.Tensor | None, dict]:
        cfg, parts = self.cfg, {}
        total = None
        if cfg.LOSS.INBATCH_WEIGHT > 0:
            loss = self.criterion(embeddings, labels)
            parts.update(_stats("inbatch", loss, self.criterion))
            total = cfg.LOSS.INBATCH_WEIGHT * loss
        if self.memory is not None:
            batch = embeddings.detach()
            if self.adapter is not None and len(self.memory) > 0:
                self.memory.adapt_(self.adapter, batch)
            slots = self.memory.enqueue(batch, labels)
            if self.iteration >= cfg.XBM.START_ITERATION and cfg.XBM.WEIGHT > 0:
                feats, mem_labels = self.memory.get()
                loss = self.criterion(embeddings, labels, feats, mem_labels, ref_self_index=slots)
                parts.update(_stats("memory", loss, self.criterion))
                total = cfg.XBM.WEIGHT * loss if total is None else total + cfg.XBM.WEIGHT * loss
        return total, parts

    def train_step(self, images, labels) -> dict:
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            embeddings = self.model(images)
        # Losses and the memory work in float32 whatever the network's precision.
        total, parts = self._loss(embeddings.float(), labels)
        if total is not None:
            if not torch.isfinite(total):
                raise NonFiniteLossError(
                    f"the loss became {total.item()} at iteration {self.iteration}; training stopped before "
                    f"this step changed any weight. The last good checkpoint is {self.checkpoint_path} "
                    "(if one was saved); lower SOLVER.BASE_LR or set SOLVER.GRAD_CLIP and resume from it."
                )
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
        self.scheduler.step()
        return parts

    # ------------------------------------------------------------------ the loop
    def evaluate(self, writer=None) -> dict[str, dict]:
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
        self._keep_best(results)
        return results

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
            save_checkpoint(self.state_dict(), os.path.join(os.path.dirname(self.checkpoint_path), "best.pth"))
            self.logger.info(f"new best validation {metric} {score:.4f} at iteration {self.iteration}: best.pth")

    def train(self) -> dict[str, dict]:
        from torch.utils.tensorboard import SummaryWriter

        cfg = self.cfg
        max_iters = cfg.SOLVER.MAX_ITERS
        writer = SummaryWriter(self.output_dir)
        self.model.train()
        results = {}
        batches = iter(self._train_loader())
        progress = tqdm(total=max_iters, initial=self.iteration, desc="train", dynamic_ncols=True)
        if self.drift is not None:
            self.drift.step(self.model, self.iteration)  # the first snapshot
        try:
            while self.iteration < max_iters:
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

    def _log_step(self, parts: dict, writer, progress) -> None:
        values = {name: float(value) for name, value in parts.items()}
        values["lr"] = self.optimizer.param_groups[0]["lr"]
        if self.memory is not None:
            values["memory/fill"] = len(self.memory) / self.memory.size
        for name, value in values.items():
            writer.add_scalar(name, value, self.iteration)
        if "loss/total" in values:
            progress.set_postfix(loss=f"{values['loss/total']:.4f}")
        text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        self.logger.debug(f"iter {self.iteration}: {text}")


def _stats(prefix: str, loss: torch.Tensor, criterion) -> dict:
    parts = {f"loss/{prefix}": loss.detach()}
    for name, count in getattr(criterion, "last_stats", {}).items():
        parts[f"pairs/{prefix}_{name}"] = count
    return parts
