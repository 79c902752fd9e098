"""Checks of a merged config that must fail before any data is read or any step is taken."""
from yacs.config import CfgNode

from .rules import MEMORY_FILL_FROM, check_global_batch


def check_cfg(cfg: CfgNode) -> None:
    """Raise ValueError with one sentence naming the key and what to do."""
    batch, per_class = cfg.DATA.BATCH_SIZE, cfg.DATA.NUM_INSTANCES
    if per_class < 1:
        raise ValueError(f"DATA.NUM_INSTANCES must be at least 1, got {per_class}")
    if batch < per_class or batch % per_class:
        raise ValueError(
            f"DATA.BATCH_SIZE ({batch}) must be a multiple of DATA.NUM_INSTANCES ({per_class}): "
            f"a batch holds BATCH_SIZE / NUM_INSTANCES classes, e.g. set DATA.BATCH_SIZE {max(1, batch // per_class) * per_class}"
        )
    check_global_batch(cfg, world_size=1)
    if cfg.XBM.FILL_FROM not in MEMORY_FILL_FROM:
        raise ValueError(f"XBM.FILL_FROM {cfg.XBM.FILL_FROM!r} is not one of {MEMORY_FILL_FROM}")
    if cfg.XBM.ENABLE and cfg.XBM.WEIGHT < 0:
        raise ValueError(f"XBM.WEIGHT must be >= 0, got {cfg.XBM.WEIGHT}")
    if cfg.XBM.ENABLE:
        _check_drift_corrections(cfg)
    if cfg.LOSS.INBATCH_WEIGHT < 0:
        raise ValueError(f"LOSS.INBATCH_WEIGHT must be >= 0, got {cfg.LOSS.INBATCH_WEIGHT}")
    if cfg.LOSS.INBATCH_WEIGHT == 0 and not (cfg.XBM.ENABLE and cfg.XBM.WEIGHT > 0):
        raise ValueError("LOSS.INBATCH_WEIGHT is 0 and no memory loss is on: nothing would be trained")
    if cfg.SOLVER.MAX_ITERS < 1:
        raise ValueError(f"SOLVER.MAX_ITERS must be at least 1, got {cfg.SOLVER.MAX_ITERS}")
    if cfg.SOLVER.SEED < 0:
        raise ValueError(f"SOLVER.SEED must be >= 0 (it seeds numpy's SeedSequence), got {cfg.SOLVER.SEED}")
    if cfg.SOLVER.BASE_LR <= 0:
        raise ValueError(f"SOLVER.BASE_LR must be positive, got {cfg.SOLVER.BASE_LR}")
    if cfg.SOLVER.BACKBONE_LR_FACTOR < 0:
        raise ValueError(f"SOLVER.BACKBONE_LR_FACTOR must be >= 0 (0 freezes the backbone), got "
                         f"{cfg.SOLVER.BACKBONE_LR_FACTOR}")
    if not 0.0 < cfg.SOLVER.LAYER_DECAY <= 1.0:
        raise ValueError(f"SOLVER.LAYER_DECAY must be in (0, 1] (1 = off), got {cfg.SOLVER.LAYER_DECAY}")
    for key in ("CHECKPOINT_PERIOD", "LOG_PERIOD", "WARMUP_ITERS"):
        if getattr(cfg.SOLVER, key) < 0:
            raise ValueError(f"SOLVER.{key} must be >= 0, got {getattr(cfg.SOLVER, key)}")
    if cfg.SOLVER.SCHEDULER.lower() == "plateau":
        _check_plateau(cfg)
    if cfg.DRIFT.MEMORY_PROBE:
        _check_memory_probe(cfg)
    if cfg.TEST.EVAL_PERIOD < 0:
        raise ValueError(f"TEST.EVAL_PERIOD must be >= 0, got {cfg.TEST.EVAL_PERIOD}")
    if any(k < 1 for k in cfg.TEST.RECALL_KS):
        raise ValueError(f"TEST.RECALL_KS must hold positive integers, got {tuple(cfg.TEST.RECALL_KS)}")
    check_registered_names(cfg)


def check_registered_names(cfg: CfgNode) -> None:
    """DATA.NAME, MODEL.BACKBONE.NAME, LOSS.NAME and XBM.ADAPT.NAME must name registered entries.

    The registries are read now, not listed earlier, so a dataset, backbone, loss or adapter that a
    user's module registered before this check is as valid as a built-in one."""
    # Imported here: the registries fill as xbm's modules import, and those import torch; the rest
    # of xbm.config stays importable without it.
    from ..data.datasets import DATASET_REGISTRY
    from ..losses import LOSS_REGISTRY
    from ..memory import ADAPTER_REGISTRY
    from ..modeling.backbones import BACKBONE_REGISTRY

    for registry, name in ((DATASET_REGISTRY, cfg.DATA.NAME), (BACKBONE_REGISTRY, cfg.MODEL.BACKBONE.NAME),
                           (LOSS_REGISTRY, cfg.LOSS.NAME), (ADAPTER_REGISTRY, cfg.XBM.ADAPT.NAME)):
        registry.get(name)  # a ValueError naming the key and the registered names
    check_backbone(cfg)


def check_backbone(cfg: CfgNode) -> None:
    """A timm backbone: timm installed, the model known, and MODEL.BACKBONE.* / TIMM.KWARGS accepted by it (the
    model is built on the meta device: no memory, no weights); another backbone: the timm-only keys unset."""
    import torch

    from ..modeling.backbones import BACKBONE_REGISTRY
    from ..modeling.backbones.build import is_timm, refuse_timm_keys
    from ..modeling.backbones.timm_backbone import timm_model_name

    spec = cfg.MODEL.BACKBONE
    if not is_timm(spec.NAME):
        refuse_timm_keys(spec)
        if cfg.SOLVER.LAYER_DECAY != 1.0:
            raise ValueError(f"SOLVER.LAYER_DECAY groups a timm model's layers; {spec.NAME} has no such grouping: "
                             "keep 1.0")
        return
    timm_model_name(spec.NAME)
    with torch.device("meta"):
        BACKBONE_REGISTRY.get(spec.NAME).from_config(cfg)


def _check_drift_corrections(cfg: CfgNode) -> None:
    """The encoder-side corrections' keys (XBM.KEY_MOMENTUM, XBM.REFRESH_PER_STEP, XBM.AGE_WEIGHT_SCALE)."""
    if not 0.0 <= cfg.XBM.KEY_MOMENTUM < 1.0:
        raise ValueError(f"XBM.KEY_MOMENTUM must be in [0, 1) (0 = off; e.g. 0.99), got {cfg.XBM.KEY_MOMENTUM}")
    if cfg.XBM.REFRESH_PER_STEP < 0:
        raise ValueError(f"XBM.REFRESH_PER_STEP must be >= 0 (0 = off), got {cfg.XBM.REFRESH_PER_STEP}")
    check_refresh_fits(cfg)
    if cfg.XBM.REFRESH_PER_STEP > 0 and cfg.XBM.AGE_WEIGHT_SCALE > 0:
        raise ValueError("XBM.AGE_WEIGHT_SCALE counts an entry's age from its enqueue, which a refresh "
                         "(XBM.REFRESH_PER_STEP) does not reset: set one of the two to 0")
    if cfg.XBM.AGE_WEIGHT_SCALE < 0:
        raise ValueError(f"XBM.AGE_WEIGHT_SCALE must be >= 0 (0 = off; an age in iterations), got "
                         f"{cfg.XBM.AGE_WEIGHT_SCALE}")
    if cfg.XBM.AGE_WEIGHT_SCALE > 0:
        from ..losses import LOSS_REGISTRY  # imported here, as in check_registered_names

        loss = LOSS_REGISTRY.get(cfg.LOSS.NAME)(cfg)
        if not getattr(loss, "supports_ref_weights", False):
            raise ValueError(f"XBM.AGE_WEIGHT_SCALE weights the memory's pairs, which LOSS.NAME {cfg.LOSS.NAME} does "
                             "not support: use contrastive or supcon, or set XBM.AGE_WEIGHT_SCALE 0")


def check_refresh_fits(cfg: CfgNode) -> None:
    """XBM.REFRESH_PER_STEP at most XBM.SIZE (again once XBM.SIZE -1 is resolved to the training set's size)."""
    if cfg.XBM.SIZE > 0 and cfg.XBM.REFRESH_PER_STEP > cfg.XBM.SIZE:
        raise ValueError(f"XBM.REFRESH_PER_STEP ({cfg.XBM.REFRESH_PER_STEP}) is more than the memory holds "
                         f"(XBM.SIZE {cfg.XBM.SIZE})")


def _check_memory_probe(cfg: CfgNode) -> None:
    """DRIFT.MEMORY_PROBE's counts must be positive (without a memory it is off: a sweep over XBM.SIZE
    may include 0)."""
    for key in ("MEMORY_INTERVAL", "MEMORY_SAMPLES"):
        if getattr(cfg.DRIFT, key) < 1:
            raise ValueError(f"DRIFT.{key} must be at least 1, got {getattr(cfg.DRIFT, key)}")


def _check_plateau(cfg: CfgNode) -> None:
    """SOLVER.SCHEDULER plateau needs evaluations, and a validation split unless the test set is asked for."""
    split = cfg.SOLVER.PLATEAU.SPLIT
    if split not in ("val", "test"):
        raise ValueError(f"SOLVER.PLATEAU.SPLIT must be val or test, got {split!r}")
    if cfg.TEST.EVAL_PERIOD <= 0:
        raise ValueError("SOLVER.SCHEDULER plateau is stepped at each evaluation: set TEST.EVAL_PERIOD > 0 "
                         "(the official code evaluates every 1000 iterations)")
    if split == "val" and cfg.DATA.VAL_FRACTION <= 0:
        raise ValueError("SOLVER.PLATEAU.SPLIT val needs a validation split: set DATA.VAL_FRACTION > 0 "
                         "(or SOLVER.PLATEAU.SPLIT test to follow the official code, whose test numbers are then optimistic)")
