"""Building the diagnostics' probes from the config (DRIFT.*)."""
from __future__ import annotations

from ..data.build import training_eval_view
from ..data.datasets import build_dataset, dataset_class
from ..data.transforms import build_transforms
from .drift import DriftMonitor
from .memory_drift import MemoryProbe


def build_drift_monitor(cfg, device) -> DriftMonitor:
    # The test-time transform: drift should measure the network, not the augmentation.
    probe_set = build_dataset(cfg, dataset_class(cfg).TRAIN_SPLIT, build_transforms(cfg, train=False))
    return DriftMonitor(probe_set, num_samples=cfg.DRIFT.NUM_SAMPLES, interval=cfg.DRIFT.INTERVAL,
                        device=device, batch_size=cfg.TEST.BATCH_SIZE)


def build_memory_probe(cfg, train_set, device, world_size: int) -> MemoryProbe:
    """DRIFT.MEMORY_PROBE's probe: DRIFT.MEMORY_SAMPLES entries every DRIFT.MEMORY_INTERVAL iterations."""
    return MemoryProbe(training_eval_view(cfg, train_set), num_samples=cfg.DRIFT.MEMORY_SAMPLES,
                       interval=cfg.DRIFT.MEMORY_INTERVAL, global_batch=cfg.DATA.BATCH_SIZE * world_size,
                       seed=cfg.SOLVER.SEED, device=device, batch_size=cfg.TEST.BATCH_SIZE)
