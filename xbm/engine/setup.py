"""Building a training run's parts from the config: data, loaders, evaluator, the DDP wrapper."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from ..data.datasets import build_dataset, dataset_class
from ..data.loader import build_train_loader
from ..data.sampler import sampler_class
from ..data.transforms import build_transforms
from ..data.validation import LabelledSubset, split_validation
from ..diagnostics.drift import DriftMonitor
from ..diagnostics.memory_drift import MemoryProbe, embed_training_items
from ..evaluation.evaluator import Evaluator
from .performance import evaluation_amp_dtype, memory_format


def build_training_data(cfg):
    """The training set and, with DATA.VAL_FRACTION, a class-disjoint validation task."""
    split = dataset_class(cfg).TRAIN_SPLIT
    train_set = build_dataset(cfg, split, build_transforms(cfg, train=True))
    if cfg.DATA.VAL_FRACTION <= 0:
        return train_set, {}
    eval_view = build_dataset(cfg, split, build_transforms(cfg, train=False))
    train_set, val_set = split_validation(train_set, eval_view, cfg.DATA.VAL_FRACTION, seed=cfg.SOLVER.SEED)
    return train_set, {"val": (val_set, None)}


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


def build_drift_monitor(cfg, device) -> DriftMonitor:
    # The test-time transform: drift should measure the network, not the augmentation.
    probe_set = build_dataset(cfg, dataset_class(cfg).TRAIN_SPLIT, build_transforms(cfg, train=False))
    return DriftMonitor(probe_set, num_samples=cfg.DRIFT.NUM_SAMPLES, interval=cfg.DRIFT.INTERVAL,
                        device=device, batch_size=cfg.TEST.BATCH_SIZE)


def training_eval_view(cfg, train_set):
    """The items of `train_set`, index for index (the validation split's removal included), through
    the test-time transform: what the memory probe re-embeds by the ids the loader yields."""
    view = build_dataset(cfg, dataset_class(cfg).TRAIN_SPLIT, build_transforms(cfg, train=False))
    if isinstance(train_set, LabelledSubset):
        view = LabelledSubset(view, train_set.indices)
    if len(view) != len(train_set):
        raise ValueError(f"the test-time view of the training split has {len(view)} items, "
                         f"the training set {len(train_set)}: DATA.NAME's dataset is not deterministic")
    return view


def build_memory_probe(cfg, train_set, device, world_size: int) -> MemoryProbe:
    """DRIFT.MEMORY_PROBE's probe: DRIFT.MEMORY_SAMPLES entries every DRIFT.MEMORY_INTERVAL iterations."""
    return MemoryProbe(training_eval_view(cfg, train_set), num_samples=cfg.DRIFT.MEMORY_SAMPLES,
                       interval=cfg.DRIFT.MEMORY_INTERVAL, global_batch=cfg.DATA.BATCH_SIZE * world_size,
                       seed=cfg.SOLVER.SEED, device=device, batch_size=cfg.TEST.BATCH_SIZE)


def build_refresh_embedding(cfg, train_set, device):
    """XBM.REFRESH_PER_STEP's `embed(model, item_ids)`: the items of the training set through the test-time
    transform, embedded in eval mode (as the memory probe re-embeds them)."""
    view, batch_size = training_eval_view(cfg, train_set), cfg.TEST.BATCH_SIZE

    def embed(model, item_ids):
        return embed_training_items(model, view, item_ids, device, batch_size)

    return embed


def build_training_loader(cfg, train_set, start_batch: int, rank: int, world_size: int,
                          device: torch.device) -> DataLoader:
    """Batches from `start_batch` on (a resumed run continues the same stream), this rank's share."""
    sampler = sampler_class(cfg.DATA.SAMPLER)(
        train_set.labels, cfg.DATA.BATCH_SIZE, cfg.DATA.NUM_INSTANCES,
        seed=cfg.SOLVER.SEED, start_batch=start_batch, rank=rank, world_size=world_size,
    )
    return build_train_loader(train_set, sampler, num_workers=cfg.DATA.NUM_WORKERS,
                              pin_memory=device.type == "cuda", prefetch_factor=cfg.DATA.PREFETCH_FACTOR)


def distributed(model: torch.nn.Module, device: torch.device, world_size: int) -> torch.nn.Module:
    """The model wrapped in DistributedDataParallel under torchrun; the model itself otherwise."""
    if world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def format_results(results: dict[str, dict]) -> str:
    """A plain-text table: one row per evaluation task, one column per metric."""
    lines = []
    for task, metrics in results.items():
        names = [k for k, v in metrics.items() if isinstance(v, float)]
        lines.append(f"{'task':<10}" + "".join(f"{n:>9}" for n in names))
        lines.append(f"{task:<10}" + "".join(f"{100 * metrics[n]:>9.2f}" for n in names))
    return "\n".join(lines)


def log_setup(trainer) -> None:
    """What this run is, in a few log lines."""
    cfg, log = trainer.cfg, trainer.logger.info
    labels = trainer.train_set.labels
    log(f"device {trainer.device}; {len(trainer.train_set)} training images in "
        f"{len(set(int(x) for x in labels))} classes; output in {trainer.output_dir}")
    params = sum(p.numel() for p in trainer.model.parameters())
    head = f"{cfg.MODEL.HEAD.DIM}-d head" if cfg.MODEL.HEAD.DIM else f"no head ({trainer.model.dim}-d features)"
    log(f"model {cfg.MODEL.BACKBONE.NAME} + {head}, {params / 1e6:.2f} M parameters")
    if trainer.world_size > 1:
        log(f"distributed: {trainer.world_size} processes, DATA.BATCH_SIZE {cfg.DATA.BATCH_SIZE} per process, "
            f"global batch {trainer.world_size * cfg.DATA.BATCH_SIZE}")
    memory = trainer.objective.memory
    if memory is not None:
        log(f"cross-batch memory: {memory.size} x {memory.dim} {cfg.XBM.DTYPE}, "
            f"{memory.nbytes / 2**20:.2f} MiB; adaptation {cfg.XBM.ADAPT.NAME}; "
            f"memory loss from iteration {cfg.XBM.START_ITERATION} with weight {cfg.XBM.WEIGHT}; "
            f"filled from {cfg.XBM.FILL_FROM}")
        corrections = [f"momentum key encoder {cfg.XBM.KEY_MOMENTUM}" if cfg.XBM.KEY_MOMENTUM > 0 else "",
                       f"{cfg.XBM.REFRESH_PER_STEP} entries refreshed per step" if cfg.XBM.REFRESH_PER_STEP > 0 else "",
                       f"pairs weighted by age, scale {cfg.XBM.AGE_WEIGHT_SCALE} iterations"
                       if cfg.XBM.AGE_WEIGHT_SCALE > 0 else ""]
        if any(corrections):
            log("encoder-side drift corrections: " + "; ".join(c for c in corrections if c))
    else:
        log("cross-batch memory off (in-batch loss only)" +
            ("; DRIFT.MEMORY_PROBE has no memory to probe" if cfg.DRIFT.MEMORY_PROBE else ""))
    if trainer.plateau is not None and cfg.SOLVER.PLATEAU.SPLIT != "val":
        trainer.logger.warning(f"SOLVER.PLATEAU.SPLIT {cfg.SOLVER.PLATEAU.SPLIT}: the learning rate is "
                               "driven by the test set, so every test number of this run is OPTIMISTIC")
