"""What happens around the training step, one hook each (detectron2's HookBase pattern).

The trainer calls, in the order the hooks were registered:
    before_train()                   once, before the first step
    before_step()  run_step()  after_step()   every iteration (trainer.iteration counts the
                                     steps done: it is already advanced in after_step)
    after_train()                    once, after the last step (not when a hook raised)
    close()                          always, last, even when a hook or the step raised
A hook that holds state a resumed run needs returns it from `state_dict()` as top-level
checkpoint entries and reads it back in `load_state_dict(checkpoint)`; every rank's hooks are
asked, and only rank 0 writes files.

The default hooks, in order (Trainer.build_hooks): StopOnSignal, DriftProbe (DRIFT.ENABLE),
MemoryDriftProbe (DRIFT.MEMORY_PROBE), MetricWriter, PeriodicCheckpointer, EvalHook. A new hook is a
subclass of HookBase passed to `Trainer(cfg, extra_hooks=[...])` (or `trainer.register_hooks([...])`);
the loop does not change.
"""
from __future__ import annotations

import json
import os
import time

import torch
from tqdm import tqdm

from ..diagnostics.drift import DriftMonitor
from ..diagnostics.memory_drift import MemoryProbe
from ..utils.distributed import broadcast_object, sum_over_ranks
from ..utils.files import write_atomically
from .checkpoint import save_checkpoint
from .run_guard import StopSignals, TrainingStopped
from .setup import build_drift_monitor, build_memory_probe, format_results


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
        return {}

    def load_state_dict(self, checkpoint: dict) -> None:
        pass


class StopOnSignal(HookBase):
    """SIGINT/SIGTERM (xbm-train's handlers): save last.pth and stop before the next step, on every
    rank alike. One process reads its own signal; under DDP the ranks act on the flag agreed in the last
    step's all-reduce (`Trainer.stop_requested`: no collective of its own), so a signal is acted on before
    the step after the one whose all-reduce saw it."""

    def before_step(self) -> None:
        trainer = self.trainer
        local = StopSignals.requested()
        if trainer.world_size == 1:
            signal_name = local
        else:
            signal_name = (local or "a signal on another rank") if trainer.stop_requested else None
        if signal_name:
            trainer.save()
            raise TrainingStopped(trainer.iteration, trainer.checkpoint_path, signal_name)


class DriftProbe(HookBase):
    """DRIFT.ENABLE: the drift of a fixed probe set's embeddings every DRIFT.INTERVAL iterations, in
    drift.jsonl (its own file: metrics.jsonl lines are evaluations) and tensorboard. Rank 0 only."""

    def __init__(self, monitor: DriftMonitor):
        self.monitor = monitor

    def before_train(self) -> None:
        self.monitor.step(self.trainer.model, self.trainer.iteration)  # the first snapshot

    def after_step(self) -> None:
        trainer = self.trainer
        drift = self.monitor.step(trainer.model, trainer.iteration)
        if drift is None:
            return
        write_drift(trainer, drift)

    def state_dict(self) -> dict:
        return {"drift": self.monitor.state_dict()}

    def load_state_dict(self, checkpoint: dict) -> None:
        if checkpoint.get("drift") is not None:
            self.monitor.load_state_dict(checkpoint["drift"])


class MemoryDriftProbe(HookBase):
    """DRIFT.MEMORY_PROBE: every DRIFT.MEMORY_INTERVAL iterations, how far a random sample of the memory's
    entries is from the current network's embeddings of their images, as stored and as enqueued
    (xbm/diagnostics/memory_drift.py), in drift.jsonl and tensorboard. Rank 0 only; no state to resume."""

    def __init__(self, probe: MemoryProbe):
        self.probe = probe

    def after_step(self) -> None:
        trainer = self.trainer
        measured = self.probe.step(trainer.model, trainer.objective.memory, trainer.iteration)
        if measured is not None:
            write_drift(trainer, measured)


def write_drift(trainer, values: dict) -> None:
    """A measurement to tensorboard and as one line of drift.jsonl (the two drift probes share the file)."""
    for name, value in values.items():
        trainer.writer.add_scalar(name, value, trainer.iteration)
    with open(os.path.join(trainer.output_dir, "drift.jsonl"), "a") as f:
        f.write(json.dumps({"iteration": trainer.iteration, **values}) + "\n")


def probe_hooks(trainer) -> list[HookBase]:
    """The measuring hooks the config asks for, on rank 0 (DRIFT.ENABLE, and DRIFT.MEMORY_PROBE when
    there is a memory)."""
    cfg, hooks = trainer.cfg, []
    if not trainer.is_main:
        return hooks
    if cfg.DRIFT.ENABLE:
        hooks.append(DriftProbe(build_drift_monitor(cfg, trainer.device)))
    if cfg.DRIFT.MEMORY_PROBE and trainer.objective.memory is not None:
        hooks.append(MemoryDriftProbe(build_memory_probe(cfg, trainer.train_set, trainer.device, trainer.world_size)))
    return hooks


class MetricWriter(HookBase):
    """The progress bar, and every SOLVER.LOG_PERIOD iterations (and the last) the step's losses,
    pair counts (SOLVER.LOG_GRAD_NORMS: gradient norms), learning rate, AMP and memory figures to
    tensorboard and the log. The losses are
    averaged over ranks and the pair counts summed (a collective)."""

    def before_train(self) -> None:
        trainer = self.trainer
        self.progress = tqdm(total=trainer.max_iters, initial=trainer.iteration, desc="train",
                             dynamic_ncols=True, disable=not trainer.is_main)

    def after_step(self) -> None:
        trainer = self.trainer
        self.progress.update(1)
        if not trainer.logs_after(trainer.iteration - 1):
            return
        parts = self._global(trainer.step_outputs) if trainer.world_size > 1 else trainer.step_outputs
        if not trainer.is_main:
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
            trainer.writer.add_scalar(name, value, trainer.iteration)
        if "loss/total" in values:
            self.progress.set_postfix(loss=f"{values['loss/total']:.4f}")
        text = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        trainer.logger.debug(f"iter {trainer.iteration}: {text}")

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
    """checkpoints/last.pth every SOLVER.CHECKPOINT_PERIOD iterations and at the end."""

    def after_step(self) -> None:
        period = self.trainer.cfg.SOLVER.CHECKPOINT_PERIOD
        if period and self.trainer.iteration % period == 0:
            self.trainer.save()

    def after_train(self) -> None:
        self.trainer.save()


class EvalHook(HookBase):
    """Evaluation every TEST.EVAL_PERIOD iterations and at the end (rank 0 evaluates the bare model;
    the others wait for its numbers). Each evaluation goes to metrics.jsonl, tensorboard and the log,
    and then: best.pth on the best validation TEST.SELECT_METRIC (never chosen on the test set), the
    plateau scheduler's step (SOLVER.SCHEDULER plateau) and TEST.REPORT_BEST_ON_TEST's report."""

    def __init__(self):
        self.best_metric = None  # best validation TEST.SELECT_METRIC so far
        self.best_on_test = None  # TEST.REPORT_BEST_ON_TEST: the best test score (optimistic)
        self.results: dict[str, dict] = {}
        self._tasks_without_positives_reported: set[str] = set()

    def after_step(self) -> None:
        trainer = self.trainer
        period = trainer.cfg.TEST.EVAL_PERIOD
        if period and trainer.iteration % period == 0 and trainer.iteration < trainer.max_iters:
            self.evaluate()

    def after_train(self) -> None:
        self.evaluate()

    def evaluate(self) -> dict[str, dict]:
        trainer = self.trainer
        results = None
        if trainer.is_main:
            start = time.time()
            results = trainer.evaluator(trainer.model)
            self._write(results)
            trainer.logger.info(f"evaluation at iteration {trainer.iteration} ({time.time() - start:.1f} s):\n"
                                + format_results(results))
            self._report_queries_without_positives(results)
        results = broadcast_object(results)  # the other ranks' barrier
        self._keep_best(results)
        self._step_plateau(results)
        self._report_best_on_test(results)
        self.results = results
        return results

    def _write(self, results: dict) -> None:
        trainer = self.trainer
        with open(os.path.join(trainer.output_dir, "metrics.jsonl"), "a") as f:
            for task, metrics in results.items():
                f.write(json.dumps({"iteration": trainer.iteration, "split": task, **metrics}) + "\n")
                if trainer.writer is not None:
                    for name, value in metrics.items():
                        trainer.writer.add_scalar(f"{task}/{name}", value, trainer.iteration)

    def _report_queries_without_positives(self, results: dict) -> None:
        """Once per task and run (the count depends on the data, not on the model)."""
        for task, metrics in results.items():
            count = metrics.get("num_queries_without_positive", 0)
            if count and task not in self._tasks_without_positives_reported:
                self._tasks_without_positives_reported.add(task)
                self.trainer.logger.warning(
                    f"evaluation task {task!r}: {count} of {metrics.get('num_queries')} queries have no image of "
                    "their class in the gallery; they count as misses in R@K and are left out of MAP@R and RP")

    def _keep_best(self, results: dict) -> None:
        """checkpoints/best.pth: the best validation score so far."""
        if "val" not in results:
            return
        trainer = self.trainer
        metric = trainer.cfg.TEST.SELECT_METRIC
        if metric not in results["val"]:
            raise ValueError(f"TEST.SELECT_METRIC {metric!r} is not one of {sorted(results['val'])}")
        score = results["val"][metric]
        if self.best_metric is None or score > self.best_metric:
            self.best_metric = score
            state = trainer.checkpoint_state()
            if trainer.is_main:
                save_checkpoint(state, os.path.join(os.path.dirname(trainer.checkpoint_path), "best.pth"))
                trainer.logger.info(f"new best validation {metric} {score:.4f} at iteration {trainer.iteration}: "
                                    "best.pth")

    def _step_plateau(self, results: dict) -> None:
        """SOLVER.SCHEDULER plateau: one step with this evaluation's score (every rank, same numbers)."""
        trainer = self.trainer
        if trainer.plateau is None:
            return
        split, metric = trainer.cfg.SOLVER.PLATEAU.SPLIT, trainer.cfg.SOLVER.PLATEAU.METRIC
        if metric not in results.get(split, {}):
            raise ValueError(f"SOLVER.PLATEAU.METRIC {metric!r} of task {split!r} is not among this "
                             f"evaluation's results {sorted(results.get(split, {}))}")
        if trainer.plateau.step(results[split][metric]):
            # Apply now, not from the next scheduler step: the next iteration runs at the new rate.
            factor = trainer.scheduler.lr_lambdas[0](trainer.scheduler.last_epoch)
            for group, base_lr in zip(trainer.optimizer.param_groups, trainer.scheduler.base_lrs):
                group["lr"] = base_lr * factor
            trainer.logger.info(f"{split} {metric} has not improved for {trainer.cfg.SOLVER.PLATEAU.PATIENCE + 1} "
                                f"evaluations: learning rate x {trainer.cfg.SOLVER.PLATEAU.FACTOR} "
                                f"-> {trainer.optimizer.param_groups[0]['lr']:.3g}")

    def _report_best_on_test(self, results: dict) -> None:
        """TEST.REPORT_BEST_ON_TEST: the official code's best-on-test report, labelled optimistic."""
        trainer = self.trainer
        if not trainer.cfg.TEST.REPORT_BEST_ON_TEST:
            return
        task = next(t for t in results if t != "val")  # the dataset's first evaluation task
        metric = trainer.cfg.TEST.SELECT_METRIC
        score = results[task][metric]
        if self.best_on_test is not None and score <= self.best_on_test["score"]:
            return
        self.best_on_test = {"optimistic": True, "chosen_on": f"{task} {metric}", "score": score,
                             "iteration": trainer.iteration, "results": results}
        if trainer.is_main:
            path = os.path.join(trainer.output_dir, "best_on_test_OPTIMISTIC.json")
            write_atomically(path, json.dumps(self.best_on_test, indent=1).encode())
            trainer.logger.info(f"OPTIMISTIC (chosen on the test set, as the official code reports): best {task} "
                                f"{metric} so far {100 * score:.2f} at iteration {trainer.iteration}; not a result "
                                "to report as such (the last iteration and best.pth are)")

    def state_dict(self) -> dict:
        return {"best_metric": self.best_metric, "best_on_test": self.best_on_test}

    def load_state_dict(self, checkpoint: dict) -> None:
        self.best_metric = checkpoint["best_metric"]
        self.best_on_test = checkpoint.get("best_on_test")
