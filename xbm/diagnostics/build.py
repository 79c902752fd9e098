"""Building the diagnostics' probes from the config (DRIFT.*)."""
from __future__ import annotations

from ..data.build import training_eval_view, training_split_test_view
from .drift import DriftMonitor
from .memory_drift import MemoryProbe


def build_drift_monitor(cfg, device) -> DriftMonitor:
    # The test-time transform: drift should measure the network, not the augmentation.
    probe_set = training_split_test_view(cfg)
    return DriftMonitor(probe_set, num_samples=cfg.DRIFT.NUM_SAMPLES, interval=cfg.DRIFT.INTERVAL,
                        device=device, batch_size=cfg.TEST.BATCH_SIZE)


def build_memory_probe(cfg, train_set, device, world_size: int) -> MemoryProbe:
    """DRIFT.MEMORY_PROBE's probe: DRIFT.MEMORY_SAMPLES entries every DRIFT.MEMORY_INTERVAL iterations."""
    return MemoryProbe(training_eval_view(cfg, train_set), num_samples=cfg.DRIFT.MEMORY_SAMPLES,
                       interval=cfg.DRIFT.MEMORY_INTERVAL, global_batch=cfg.DATA.BATCH_SIZE * world_size,
                       seed=cfg.SOLVER.SEED, device=device, batch_size=cfg.TEST.BATCH_SIZE)
