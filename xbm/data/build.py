"""Building the training data from the config: the training set and its validation split, the test-time view
of the training items, and the loader of training batches."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from .datasets import build_dataset, dataset_class
from .loader import build_train_loader
from .sampler import sampler_class
from .transforms import build_transforms
from .validation import LabelledSubset, split_validation


class TrainingSplitTestView:
    """The training split through the test-time transform, built at the first request and shared after it:
    the validation split, the memory probe, the refresh and the drift monitor all embed these images, and a
    dataset that decodes its split when built (Glyphs) should do it once per run, not once per reader."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._whole = None
        self._items = None  # (train_set, its view): the probe and the refresh ask for the same one

    def whole(self):
        """The whole training split, index for index as the training set is built before any split."""
        if self._whole is None:
            cfg = self.cfg
            self._whole = build_dataset(cfg, dataset_class(cfg).TRAIN_SPLIT, build_transforms(cfg, train=False))
        return self._whole

    def items_of(self, train_set):
        """The items of `train_set`, index for index (the validation split's removal included): what the
        memory probe and the refresh re-embed by the ids the loader yields."""
        if self._items is not None and self._items[0] is train_set:
            return self._items[1]
        view = self.whole()
        if isinstance(train_set, LabelledSubset):
            view = LabelledSubset(view, train_set.indices)
        if len(view) != len(train_set):
            raise ValueError(f"the test-time view of the training split has {len(view)} items, "
                             f"the training set {len(train_set)}: DATA.NAME's dataset is not deterministic")
        self._items = (train_set, view)
        return view


def build_training_data(cfg, test_view: TrainingSplitTestView):
    """The training set and, with DATA.VAL_FRACTION, a class-disjoint validation task (its images from
    `test_view`)."""
    train_set = build_dataset(cfg, dataset_class(cfg).TRAIN_SPLIT, build_transforms(cfg, train=True))
    if cfg.DATA.VAL_FRACTION <= 0:
        return train_set, {}
    train_set, val_set = split_validation(train_set, test_view.whole(), cfg.DATA.VAL_FRACTION, seed=cfg.SOLVER.SEED)
    return train_set, {"val": (val_set, None)}


def build_training_loader(cfg, train_set, start_batch: int, rank: int, world_size: int,
                          device: torch.device) -> DataLoader:
    """Batches from `start_batch` on (a resumed run continues the same stream), this rank's share."""
    sampler = sampler_class(cfg.DATA.SAMPLER)(
        train_set.labels, cfg.DATA.BATCH_SIZE, cfg.DATA.NUM_INSTANCES,
        seed=cfg.SOLVER.SEED, start_batch=start_batch, rank=rank, world_size=world_size,
    )
    return build_train_loader(train_set, sampler, num_workers=cfg.DATA.NUM_WORKERS,
                              pin_memory=device.type == "cuda", prefetch_factor=cfg.DATA.PREFETCH_FACTOR)
