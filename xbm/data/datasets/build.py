"""DATASET_REGISTRY, and build_dataset(cfg, split, transform): one path for every dataset.

Each dataset module registers its class (`@DATASET_REGISTRY.register("sop")`); the class says
everything the rest of xbm asks about a dataset (splits, evaluation tasks, its own transform steps and
input convention if it has them, and how it is built from the config: `from_config`), so nothing
outside the dataset's own module names a particular dataset. A dataset defined outside xbm registers
itself the same way and is selected by DATA.NAME (README, Extending xbm).
"""
from __future__ import annotations

from ...utils.registry import Registry

DATASET_REGISTRY: Registry[type] = Registry("dataset", "DATA.NAME")


def dataset_class(cfg) -> type:
    """The class registered under DATA.NAME."""
    return DATASET_REGISTRY.get(cfg.DATA.NAME)


def build_dataset(cfg, split: str, transform=None):
    """Split `split` of the DATA.NAME dataset, items passed through `transform`."""
    return dataset_class(cfg).from_config(cfg, split, transform)
