"""Building the diagnostics' probes from the config (DRIFT.*)."""
from __future__ import annotations

from .drift import DriftMonitor
from .memory_drift import MemoryProbe


def build_drift_monitor(cfg, probe_set, device) -> DriftMonitor:
    """DRIFT.ENABLE's monitor on `probe_set`, the training split through the test-time transform (drift
    should measure the network, not the augmentation)."""
    return DriftMonitor(probe_set, num_samples=cfg.DRIFT.NUM_SAMPLES, interval=cfg.DRIFT.INTERVAL,
                        device=device, batch_size=cfg.TEST.BATCH_SIZE)


def build_memory_probe(cfg, items_view, device, world_size: int) -> MemoryProbe:
    """DRIFT.MEMORY_PROBE's probe: DRIFT.MEMORY_SAMPLES entries every DRIFT.MEMORY_INTERVAL iterations,
    re-embedded from `items_view` (the training set's items through the test-time transform)."""
    return MemoryProbe(items_view, num_samples=cfg.DRIFT.MEMORY_SAMPLES,
                       interval=cfg.DRIFT.MEMORY_INTERVAL, global_batch=cfg.DATA.BATCH_SIZE * world_size,
                       seed=cfg.SOLVER.SEED, device=device, batch_size=cfg.TEST.BATCH_SIZE)
