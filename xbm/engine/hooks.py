"""What happens around the training step, one hook each (detectron2's HookBase pattern).

The trainer calls, in the order the hooks were registered:
    before_train()                   once, before the first step
    before_step()  run_step()  after_step()   every iteration (trainer.iteration counts the
                                     steps done: it is already advanced in after_step)
    after_train()                    once, after the last step (not when a hook raised)
    close()                          always, last, even when a hook or the step raised
A hook is built with everything it needs as arguments (xbm/engine/defaults.py builds the default ones
from a config); from the trainer it reads only the loop's own state (iteration, max_iters, model,
objective, optimizer, scaler, guard, step_outputs, stop_requested, world_size, device). A hook that
holds state a resumed run needs returns it from `state_dict()` (a dict, saved under the hook's name: its
`checkpoint_name` or class name, xbm/engine/checkpointer.py) and reads it back in `load_state_dict(state)`;
every rank's hooks are asked, and only rank 0 writes files.

The default hooks, in order (DefaultTrainer.build_hooks): StopOnSignal, RefreshMemory
(XBM.REFRESH_PER_STEP), DriftProbe (DRIFT.ENABLE), MemoryDriftProbe (DRIFT.MEMORY_PROBE), MetricWriter, PeriodicCheckpointer, EvalHook, and the hooks that
act on each evaluation, which EvalHook calls in order: EvaluationWriter, BestCheckpointer, PlateauLR,
BestOnTestReport. A new hook is a subclass of HookBase passed to `DefaultTrainer(cfg, extra_hooks=[...])`
(or `trainer.register_hooks([...])`); the loop does not change.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from ..diagnostics.drift import DriftMonitor
from ..diagnostics.memory_drift import MemoryProbe
from ..memory.refresh import MemoryRefresh
from ..utils.distributed import broadcast_rows, get_rank, sum_over_ranks
from ..utils.files import write_atomically
from .run_guard import StopSignals, TrainingStopped
from .solver import PlateauFactor, apply_scheduled_lr


class HookBase:
    """Does nothing; subclasses override what they need. `self.trainer` is set on registration."""

    trainer = None

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def close(self) -> None:
        """Always called when `train()` ends, even by an exception: release what the hook holds."""

    def state_dict(self) -> dict:
        """This hook's state for a resumed run ({}: none), saved under its name."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class StopOnSignal(HookBase):
    """SIGINT/SIGTERM (xbm-train's handlers): `save()` and stop before the next step, on every rank alike,
    with TrainingStopped naming `checkpoint_path`. One process reads its own signal; under DDP the ranks act
    on the flag agreed in the last step's all-reduce (`trainer.stop_requested`: no collective of its own),
    so a signal is acted on before the step after the one whose all-reduce saw it."""

    def __init__(self, save: Callable[[], None], checkpoint_path: str):
        self.save, self.checkpoint_path = save, checkpoint_path

    def before_step(self) -> None:
        trainer = self.trainer
        local = StopSignals.requested()
        if trainer.world_size == 1:
            signal_name = local
        else:
            signal_name = (local or "a signal on another rank") if trainer.stop_requested else None
        if signal_name:
            self.save()
            raise TrainingStopped(trainer.iteration, self.checkpoint_path, signal_name)


class ScalarRecord:
    """Measurements to tensorboard and as lines {"iteration": N, name: value, ...} of one JSON-lines file
    (drift.jsonl: the two drift probes share it)."""

    def __init__(self, path: str, writer):
        self.path, self.writer = path, writer

    def __call__(self, iteration: int, values: dict) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, iteration)
        with open(self.path, "a") as f:
            f.write(json.dumps({"iteration": iteration, **values}) + "\n")


class DriftProbe(HookBase):
    """DRIFT.ENABLE: the drift of a fixed probe set's embeddings every DRIFT.INTERVAL iterations (the
    monitor's), to `record`. Rank 0 only."""

    def __init__(self, monitor: DriftMonitor, record: ScalarRecord):
        self.monitor, self.record = monitor, record

    def before_train(self) -> None:
        self.monitor.step(self.trainer.model, self.trainer.iteration)  # the first snapshot

    def after_step(self) -> None:
        drift = self.monitor.step(self.trainer.model, self.trainer.iteration)
        if drift is not None:
            self.record(self.trainer.iteration, drift)

    def state_dict(self) -> dict:
        return self.monitor.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.monitor.load_state_dict(state)


class MemoryDriftProbe(HookBase):
    """DRIFT.MEMORY_PROBE: every DRIFT.MEMORY_INTERVAL iterations, how far a random sample of the memory's
    entries is from the current network's embeddings of their images, as stored and as enqueued
    (xbm/diagnostics/memory_drift.py), to `record`. Rank 0 only; no state to resume."""

    def __init__(self, probe: MemoryProbe, record: ScalarRecord):
        self.probe, self.record = probe, record

    def after_step(self) -> None:
        trainer = self.trainer
        measured = self.probe.step(trainer.model, trainer.objective.memory, trainer.iteration)
        if measured is not None:
            self.record(trainer.iteration, measured)


class RefreshMemory(HookBase):
    """XBM.REFRESH_PER_STEP: after each step, `refresh` re-embeds its next memory entries with the model by
    `embed(model, item_ids) -> rows` (eval mode, no gradient; xbm/memory/refresh.py). Under DDP rank 0
    embeds and broadcasts the rows (each rank's BatchNorm statistics differ a little between DDP's buffer
    broadcasts), so every rank's memory stays the same. Its state is the sweep's cursor."""

    def __init__(self, refresh: MemoryRefresh, embed: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]):
        self.refresh, self.embed = refresh, embed

    def after_step(self) -> None:
        trainer = self.trainer
        memory = trainer.objective.memory
        model = trainer.model

        def embed(item_ids: torch.Tensor) -> torch.Tensor:
            rows = self.embed(model, item_ids) if get_rank() == 0 else None
            return broadcast_rows(rows, (len(item_ids), memory.dim), memory.dtype, memory.feats.device)

        self.refresh.refresh(memory, embed)

    def state_dict(self) -> dict:
        return self.refresh.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.refresh.load_state_dict(state)


class MetricWriter(HookBase):
    """The progress bar, and every `period` iterations (and the last) the step's losses, pair counts
    (gradient norms when the objective computed them), learning rate, AMP and memory figures to
    `writer` (tensorboard) and `logger` (debug level: log.txt). The losses are averaged over ranks and
    the pair counts summed (a collective: every rank has one; only `is_main` writes)."""

    def __init__(self, period: int, writer, logger: logging.Logger, is_main: bool = True):
        self.period, self.writer, self.logger, self.is_main = max(1, period), writer, logger, is_main

    def before_train(self) -> None:
        trainer = self.trainer
        self.progress = tqdm(total=trainer.max_iters, initial=trainer.iteration, desc="train",
                             dynamic_ncols=True, disable=not self.is_main)

    def after_step(self) -> None:
        trainer = self.trainer
        self.progress.update(1)
        if trainer.iteration % self.period != 0 and trainer.iteration != trainer.max_iters:
            return
        parts = self._global(trainer.step_outputs) if trainer.world_size > 1 else trainer.step_outputs
        if not self.is_main:
            return
        values = {name: float(value) for name, value in parts.items()}
        values["lr"] = trainer.optimizer.param_groups[0]["lr"]
        values["amp/skipped_steps"] = trainer.guard.skipped_steps
        if trainer.scaler.is_enabled():
            values["amp/grad_scale"] = trainer.scaler.get_scale()  # reads the device: logging steps only
        memory = trainer.objective.memory
        if memory is not None:
            values["memory/fill"] = len(memory) / memory.size
        if trainer.objective.adapter is not None:
            values.update({f"memory/{k}": v for k, v in trainer.objective.adapter.log_values().items()})
        for name, value in values.items():
            self.writer.add_scalar(name, value, trainer.iteration)
        if "loss/total" in values:
            self.progress.set_postfix(loss=f"{values['loss/total']:.4f}")
        text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        self.logger.debug(f"iter {trainer.iteration}: {text}")

    def _global(self, parts: dict) -> dict:
        """Losses averaged over ranks (the global batch's loss), pair counts summed."""
        trainer = self.trainer
        names = sorted(parts)  # every rank has the same keys: same config, same iteration
        local = torch.stack([torch.as_tensor(parts[n], dtype=torch.float64, device=trainer.device) for n in names])
        total = sum_over_ranks(local)
        return {n: v / trainer.world_size if n.startswith("loss/") else v for n, v in zip(names, total)}

    def after_train(self) -> None:
        self.close()  # before the final evaluation's own progress bar

    def close(self) -> None:
        if getattr(self, "progress", None) is not None:
            self.progress.close()


class PeriodicCheckpointer(HookBase):
    """`save()` every `period` iterations (0: never) and at the end."""

    def __init__(self, save: Callable[[], None], period: int):
        self.save, self.period = save, period

    def after_step(self) -> None:
        if self.period and self.trainer.iteration % self.period == 0:
            self.save()

    def after_train(self) -> None:
        self.save()


class EvalHook(HookBase):
    """`evaluate_fn()` every `period` iterations (0: only at the end) and at the end: {task: metrics}, the
    same on every rank. Each evaluation is handed to `listeners` (their `after_evaluation(results,
    seconds)`), in order; `results` holds the last one."""

    def __init__(self, period: int, evaluate_fn: Callable[[], dict], listeners: Sequence = ()):
        self.period, self.evaluate_fn, self.listeners = period, evaluate_fn, list(listeners)
        self.results: dict[str, dict] = {}

    def after_step(self) -> None:
        trainer = self.trainer
        if self.period and trainer.iteration % self.period == 0 and trainer.iteration < trainer.max_iters:
            self.evaluate()

    def after_train(self) -> None:
        self.evaluate()

    def evaluate(self) -> dict[str, dict]:
        start = time.time()
        results = self.evaluate_fn()
        seconds = time.time() - start
        for listener in self.listeners:
            listener.after_evaluation(results, seconds)
        self.results = results
        return results


class EvaluationWriter(HookBase):
    """Each evaluation to `metrics_path` (one JSON line per task), tensorboard and the log, and once per
    task the number of queries without a positive (it depends on the data, not on the model). Rank 0."""

    def __init__(self, metrics_path: str, writer, logger: logging.Logger, format_results: Callable[[dict], str]):
        self.metrics_path, self.writer, self.logger, self.format_results = metrics_path, writer, logger, format_results
        self._tasks_without_positives_reported: set[str] = set()

    def after_evaluation(self, results: dict, seconds: float) -> None:
        iteration = self.trainer.iteration
        with open(self.metrics_path, "a") as f:
            for task, metrics in results.items():
                f.write(json.dumps({"iteration": iteration, "split": task, **metrics}) + "\n")
                for name, value in metrics.items():
                    self.writer.add_scalar(f"{task}/{name}", value, iteration)
        self.logger.info(f"evaluation at iteration {iteration} ({seconds:.1f} s):\n" + self.format_results(results))
        for task, metrics in results.items():
            count = metrics.get("num_queries_without_positive", 0)
            if count and task not in self._tasks_without_positives_reported:
                self._tasks_without_positives_reported.add(task)
                self.logger.warning(
                    f"evaluation task {task!r}: {count} of {metrics.get('num_queries')} queries have no image of "
                    "their class in the gallery; they count as misses in R@K and are left out of MAP@R and RP")


class BestCheckpointer(HookBase):
    """best.pth (`save_best()`, a collective) whenever the validation task's `metric` is the best so far;
    never chosen on the test set (no validation task: nothing)."""

    def __init__(self, metric: str, save_best: Callable[[], None], logger: logging.Logger):
        self.metric, self.save_best, self.logger = metric, save_best, logger
        self.best_metric = None  # best validation score so far

    def after_evaluation(self, results: dict, seconds: float) -> None:
        if "val" not in results:
            return
        if self.metric not in results["val"]:
            raise ValueError(f"TEST.SELECT_METRIC {self.metric!r} is not one of {sorted(results['val'])}")
        score = results["val"][self.metric]
        if self.best_metric is None or score > self.best_metric:
            self.best_metric = score
            self.save_best()
            self.logger.info(f"new best validation {self.metric} {score:.4f} at iteration {self.trainer.iteration}: "
                             "best.pth")

    def state_dict(self) -> dict:
        return {"best_metric": self.best_metric}

    def load_state_dict(self, state: dict) -> None:
        self.best_metric = state.get("best_metric")


class PlateauLR(HookBase):
    """SOLVER.SCHEDULER plateau: `plateau` stepped with each evaluation's `split` `metric` (every rank, same
    numbers); when it lowers its factor, the new rate applies from the next iteration on."""

    def __init__(self, plateau: PlateauFactor, split: str, metric: str, logger: logging.Logger):
        self.plateau, self.split, self.metric, self.logger = plateau, split, metric, logger

    def after_evaluation(self, results: dict, seconds: float) -> None:
        if self.metric not in results.get(self.split, {}):
            raise ValueError(f"SOLVER.PLATEAU.METRIC {self.metric!r} of task {self.split!r} is not among this "
                             f"evaluation's results {sorted(results.get(self.split, {}))}")
        if self.plateau.step(results[self.split][self.metric]):
            optimizer = self.trainer.optimizer
            apply_scheduled_lr(optimizer, self.trainer.scheduler)
            self.logger.info(f"{self.split} {self.metric} has not improved for {self.plateau.patience + 1} "
                             f"evaluations: learning rate x {self.plateau.factor} "
                             f"-> {optimizer.param_groups[0]['lr']:.3g}")


class BestOnTestReport(HookBase):
    """TEST.REPORT_BEST_ON_TEST: the official code's best-on-test report in `path` (rank 0 writes),
    labelled optimistic."""

    def __init__(self, metric: str, path: str, logger: logging.Logger, is_main: bool = True):
        self.metric, self.path, self.logger, self.is_main = metric, path, logger, is_main
        self.best_on_test = None

    def after_evaluation(self, results: dict, seconds: float) -> None:
        task = next(t for t in results if t != "val")  # the dataset's first evaluation task
        score = results[task][self.metric]
        if self.best_on_test is not None and score <= self.best_on_test["score"]:
            return
        iteration = self.trainer.iteration
        self.best_on_test = {"optimistic": True, "chosen_on": f"{task} {self.metric}", "score": score,
                             "iteration": iteration, "results": results}
        if self.is_main:
            write_atomically(self.path, json.dumps(self.best_on_test, indent=1).encode())
            self.logger.info(f"OPTIMISTIC (chosen on the test set, as the official code reports): best {task} "
                             f"{self.metric} so far {100 * score:.2f} at iteration {iteration}; not a result "
                             "to report as such (the last iteration and best.pth are)")

    def state_dict(self) -> dict:
        return {"best_on_test": self.best_on_test}

    def load_state_dict(self, state: dict) -> None:
        self.best_on_test = state.get("best_on_test")
