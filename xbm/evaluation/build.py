"""Building the evaluator from the config, and the table its results are printed as."""
from __future__ import annotations

import torch

from ..data.datasets import build_dataset, dataset_class
from ..data.transforms import build_transforms
from ..runtime import evaluation_amp_dtype, memory_format
from .evaluator import Evaluator


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


def format_results(results: dict[str, dict]) -> str:
    """A plain-text table: one row per evaluation task, one column per metric."""
    lines = []
    for task, metrics in results.items():
        names = [k for k, v in metrics.items() if isinstance(v, float)]
        lines.append(f"{'task':<10}" + "".join(f"{n:>9}" for n in names))
        lines.append(f"{task:<10}" + "".join(f"{100 * metrics[n]:>9.2f}" for n in names))
    return "\n".join(lines)
