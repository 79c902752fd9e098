"""Rules about config keys that the trainer, the tools and the sweep share: which keys a resume may
change, which matter only with a memory, the special values of XBM.SIZE, and the keys renamed since
older versions (old config files and checkpoints keep loading)."""
from __future__ import annotations

import yaml
from yacs.config import CfgNode

from .defaults import get_cfg

# Keys that may change between a checkpoint and the run that resumes it: they change how long or
# where a run goes, not what it computes.
RESUMABLE_CHANGES = (
    "OUTPUT_DIR", "MODEL.DEVICE", "DATA.NUM_WORKERS", "SOLVER.MAX_ITERS", "SOLVER.RESUME", "SOLVER.CHECKPOINT_PERIOD",
    "SOLVER.LOG_PERIOD", "SOLVER.LOG_GRAD_NORMS", "TEST.EVAL_PERIOD", "TEST.BATCH_SIZE", "TEST.KNN_BACKEND", "TEST.RECALL_KS",
    "SOLVER.MAX_NONFINITE_STEPS", "DATA.PERSISTENT_WORKERS", "DATA.PREFETCH_FACTOR", "DATA.UINT8_TRANSFER",
    "PERF.CUDNN_BENCHMARK", "PERF.TF32", "PERF.CHANNELS_LAST", "PERF.COMPILE", "PERF.DETERMINISTIC",
    "DRIFT.MEMORY_PROBE", "DRIFT.MEMORY_INTERVAL", "DRIFT.MEMORY_SAMPLES",
    # timm backbones: whether missing weights may be downloaded; two ways of computing the same values
    "MODEL.BACKBONE.TIMM.HUB_DOWNLOAD", "MODEL.BACKBONE.TIMM.FUSED_ATTN", "MODEL.BACKBONE.TIMM.GRAD_CHECKPOINTING",
)

# Keys read only when XBM.ENABLE is True (a key ending with "." covers its whole sub-tree).
MEMORY_ONLY_KEYS = ("XBM.SIZE", "XBM.START_ITERATION", "XBM.WEIGHT", "XBM.DTYPE", "XBM.FILL_FROM", "XBM.ADAPT.",
                    "XBM.KEY_MOMENTUM", "XBM.REFRESH_PER_STEP", "XBM.AGE_WEIGHT_SCALE",
                    "DRIFT.MEMORY_PROBE", "DRIFT.MEMORY_INTERVAL", "DRIFT.MEMORY_SAMPLES")

MEMORY_SIZE_KEY = "XBM.SIZE"
# XBM.FILL_FROM: ours (every batch enters the memory) | the official trainer's (from XBM.START_ITERATION)
MEMORY_FILL_FROM = ("iteration_0", "start_iteration")
# XBM.SIZE -1: one memory entry per training image, a number known once the training set is read.
SIZE_OF_TRAINING_SET = -1
# XBM.SIZE 0 in a sweep grid: no memory (XBM.ENABLE False; XBM.SIZE keeps the config's value).
NO_MEMORY = 0

# Sections renamed since earlier versions: old dotted name -> new one. A config file or a
# checkpoint's saved config that uses the old name is read as the new one.
RENAMED_SECTIONS = {"XBM.DRIFT": "DRIFT"}


def is_memory_only(key: str) -> bool:
    """Whether `key` (dotted) changes nothing while XBM.ENABLE is False."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MEMORY_ONLY_KEYS)


def memory_size_overrides(raw: str, value: int) -> list[str]:
    """KEY VALUE overrides for one value of a sweep's XBM.SIZE grid: 0 = no memory (XBM.SIZE keeps the
    config's value, so the config stays valid), any other size turns the memory on."""
    if value == NO_MEMORY:
        return ["XBM.ENABLE", "False"]
    return [MEMORY_SIZE_KEY, raw, "XBM.ENABLE", "True"]


def check_global_batch(cfg: CfgNode, world_size: int) -> None:
    """The memory receives the batches of all ranks at once: it must hold one global batch (one process:
    one batch)."""
    global_batch = world_size * cfg.DATA.BATCH_SIZE
    # XBM.SIZE -1 (the whole training set) is only known once the data is read.
    if not cfg.XBM.ENABLE or cfg.XBM.SIZE == SIZE_OF_TRAINING_SET or cfg.XBM.SIZE >= global_batch:
        return
    if world_size == 1:
        raise ValueError(
            f"XBM.SIZE ({cfg.XBM.SIZE}) is smaller than DATA.BATCH_SIZE ({cfg.DATA.BATCH_SIZE}): the memory must "
            "hold at least one batch; raise XBM.SIZE or set XBM.ENABLE False"
        )
    raise ValueError(
        f"XBM.SIZE ({cfg.XBM.SIZE}) is smaller than the global batch of this distributed run, "
        f"DATA.BATCH_SIZE ({cfg.DATA.BATCH_SIZE}) per process x {world_size} processes = {global_batch}: "
        f"the memory receives every process's batch each step; set XBM.SIZE >= {global_batch} "
        "or lower DATA.BATCH_SIZE"
    )


def resolve_memory_size(cfg: CfgNode, num_train_images: int, world_size: int) -> CfgNode:
    """`cfg` with XBM.SIZE -1 replaced by the number of training images (so config.yaml and the
    checkpoints record the number), checked against the global batch; `cfg` itself otherwise."""
    if not cfg.XBM.ENABLE or cfg.XBM.SIZE != SIZE_OF_TRAINING_SET:
        return cfg
    cfg = cfg.clone()
    cfg.defrost()
    cfg.XBM.SIZE = num_train_images
    cfg.freeze()
    check_global_batch(cfg, world_size)
    return cfg


def rename_old_sections(data: dict) -> list[str]:
    """Move the sections of RENAMED_SECTIONS found in `data` (a nested dict of config keys, changed in
    place) to their new names; returns the old names found. Both names at once is a ValueError."""
    found = []
    for old, new in RENAMED_SECTIONS.items():
        *old_parents, old_leaf = old.split(".")
        parent = _subtree(data, old_parents)
        if not isinstance(parent, dict) or old_leaf not in parent:
            continue
        *new_parents, new_leaf = new.split(".")
        target = _subtree(data, new_parents, create=True)
        if new_leaf in target:
            raise ValueError(f"{old} is the old name of {new}: give only {new}")
        target[new_leaf] = parent.pop(old_leaf)
        if not parent and old_parents:
            _subtree(data, old_parents[:-1]).pop(old_parents[-1])  # nothing else was in that section
        found.append(old)
    return found


def renamed_key(key: str) -> str | None:
    """The new name of a dotted key under a renamed section (XBM.DRIFT.ENABLE -> DRIFT.ENABLE), else None."""
    for old, new in RENAMED_SECTIONS.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return None


def _subtree(data: dict, path: list[str], create: bool = False):
    node = data
    for part in path:
        if create:
            node = node.setdefault(part, {})
        elif not isinstance(node, dict) or part not in node:
            return None
        else:
            node = node[part]
    return node


def config_differences(saved: dict, current: dict) -> list[str]:
    """'KEY: saved -> current' for every leaf that differs, ignoring RESUMABLE_CHANGES and the renamed
    sections (a checkpoint of an earlier version saved XBM.DRIFT, read as DRIFT). A key the saved
    config lacks was added since the checkpoint was written: the run had its default's behaviour (a
    new key's default keeps the old behaviour), so it counts as the default."""
    saved, current = _renamed_copy(saved), _renamed_copy(current)
    _fill_missing(saved, yaml.safe_load(get_cfg().dump()))
    for data in (saved, current):
        _resolve_backbone_pooling(data)
    return _leaf_differences(saved, current, "")


def _resolve_backbone_pooling(data: dict) -> None:
    """MODEL.BACKBONE.POOLING "" means avg for xbm's own backbones (its default was avg until timm backbones
    came, whose own pooling "" selects), so a checkpoint that saved avg resumes under the new default."""
    backbone = data.get("MODEL", {}).get("BACKBONE", {})
    if backbone.get("POOLING") == "" and not str(backbone.get("NAME", "")).lower().startswith("timm:"):
        backbone["POOLING"] = "avg"


def _fill_missing(saved: dict, defaults: dict) -> None:
    """Give `saved` every leaf of `defaults` it lacks (in place)."""
    for key, value in defaults.items():
        if key not in saved:
            saved[key] = _deep_copy(value)
        elif isinstance(value, dict) and isinstance(saved[key], dict):
            _fill_missing(saved[key], value)


def _renamed_copy(data: dict) -> dict:
    copy = _deep_copy(data)
    rename_old_sections(copy)
    return copy


def _deep_copy(data):
    return {k: _deep_copy(v) for k, v in data.items()} if isinstance(data, dict) else data


def _leaf_differences(saved: dict, current: dict, prefix: str) -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            diffs += _leaf_differences(old, new, name + ".")
        elif name not in RESUMABLE_CHANGES and _plain(old) != _plain(new):
            diffs.append(f"{name}: {old!r} -> {new!r}")
    return diffs


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
