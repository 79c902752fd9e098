"""Config rules of a training run's state (temporary home; see xbm/config)."""
from __future__ import annotations

# Keys that may change between a checkpoint and the run that resumes it: they change how long or
# where a run goes, not what it computes.
RESUMABLE_CHANGES = (
    "OUTPUT_DIR", "MODEL.DEVICE", "DATA.NUM_WORKERS", "SOLVER.MAX_ITERS", "SOLVER.RESUME", "SOLVER.CHECKPOINT_PERIOD",
    "SOLVER.LOG_PERIOD", "TEST.EVAL_PERIOD", "TEST.BATCH_SIZE", "TEST.KNN_BACKEND", "TEST.RECALL_KS",
    "SOLVER.MAX_NONFINITE_STEPS", "DATA.PERSISTENT_WORKERS", "DATA.PREFETCH_FACTOR", "DATA.UINT8_TRANSFER",
    "PERF.CUDNN_BENCHMARK", "PERF.TF32", "PERF.CHANNELS_LAST", "PERF.COMPILE", "PERF.DETERMINISTIC",
)


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


def check_global_batch(cfg, world_size: int) -> None:
    """The memory receives the batches of all ranks at once: it must hold one global batch."""
    global_batch = world_size * cfg.DATA.BATCH_SIZE
    # XBM.SIZE -1 (the whole training set) is only known once the data is read.
    if cfg.XBM.ENABLE and cfg.XBM.SIZE != -1 and cfg.XBM.SIZE < global_batch:
        raise ValueError(
            f"XBM.SIZE ({cfg.XBM.SIZE}) is smaller than the global batch of this distributed run, "
            f"DATA.BATCH_SIZE ({cfg.DATA.BATCH_SIZE}) per process x {world_size} processes = {global_batch}: "
            f"the memory receives every process's batch each step; set XBM.SIZE >= {global_batch} "
            "or lower DATA.BATCH_SIZE"
        )


def resolve_memory_size(cfg, num_train_images: int, world_size: int):
    """XBM.SIZE -1 means one entry per training image; config.yaml records the number."""
    if not cfg.XBM.ENABLE or cfg.XBM.SIZE != -1:
        return cfg
    cfg = cfg.clone()
    cfg.defrost()
    cfg.XBM.SIZE = num_train_images
    cfg.freeze()
    check_global_batch(cfg, world_size)
    return cfg
