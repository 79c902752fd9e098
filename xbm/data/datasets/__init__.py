"""Datasets, one module each, registered in DATASET_REGISTRY; build_dataset(cfg, split, transform)."""
from __future__ import annotations

from .build import DATASET_REGISTRY, build_dataset, dataset_class
# Each module registers its dataset when imported.
from .cars196 import Cars196
from .cub200 import CUB200
from .deepfashion2 import DeepFashion2
from .glyphs import Glyphs
from .inshop import InShop
from .list_dataset import ListDataset
from .sop import SOP
from .vehicleid import VehicleID

__all__ = ["DATASET_REGISTRY", "build_dataset", "dataset_class", "Cars196", "CUB200", "DeepFashion2", "Glyphs",
           "InShop", "ListDataset", "SOP", "VehicleID"]
