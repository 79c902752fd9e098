"""Datasets, one module each, and build_dataset(cfg, split, transform)."""
from __future__ import annotations

import os

from .cars196 import Cars196
from .cub200 import CUB200
from .deepfashion2 import DeepFashion2
from .glyphs import Glyphs
from .inshop import InShop
from .list_dataset import ListDataset
from .sop import SOP
from .vehicleid import VehicleID

DATASETS = {
    "glyphs": Glyphs,
    "sop": SOP,
    "inshop": InShop,
    "deepfashion2": DeepFashion2,
    "cub200": CUB200,
    "cars196": Cars196,
    "vehicleid": VehicleID,
    "list": ListDataset,
}

__all__ = ["DATASETS", "build_dataset", "dataset_class", *(cls.__name__ for cls in DATASETS.values())]


def dataset_class(cfg):
    """The class named by DATA.NAME."""
    name = cfg.DATA.NAME.lower()
    if name not in DATASETS:
        raise ValueError(f"DATA.NAME {cfg.DATA.NAME!r} is not a known dataset; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def _check_root(cfg, cls) -> None:
    """A downloaded dataset's root must exist and hold something, before any file is parsed."""
    if cls is Glyphs:
        return  # generated on first use
    root = cfg.DATA.ROOT
    if not os.path.isdir(root) or not os.listdir(root):
        where = f" (download it from {cls.DOWNLOAD_URL})" if getattr(cls, "DOWNLOAD_URL", None) else ""
        state = "does not exist" if not os.path.isdir(root) else "is empty"
        raise FileNotFoundError(
            f"DATA.ROOT {root!r} {state}: point DATA.ROOT at the unpacked {cls.__name__} folder{where}; "
            "see the dataset table in README.md"
        )


def build_dataset(cfg, split: str, transform=None):
    cls = dataset_class(cfg)
    _check_root(cfg, cls)
    if cls is Glyphs:
        return Glyphs(
            cfg.DATA.ROOT,
            split,
            transform=transform,
            min_fonts=cfg.DATA.GLYPHS.MIN_FONTS,
            image_size=cfg.DATA.GLYPHS.IMAGE_SIZE,
        )
    return cls(cfg.DATA.ROOT, split, transform=transform, bad_images=cfg.DATA.BAD_IMAGES)
