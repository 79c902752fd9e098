"""A class-disjoint validation split carved out of the training split.

None of the papers' datasets ships a validation split, and choosing checkpoints on the test
set silently overstates results. DATA.VAL_FRACTION holds out that fraction of the training
classes (all their images); model selection then looks at those classes only.
"""
from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset


class LabelledSubset(Dataset):
    """Some items of a dataset, with the labels relabelled to 0..C-1 in class order."""

    def __init__(self, dataset, indices):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        _, self.labels = np.unique(np.asarray(dataset.labels)[self.indices], return_inverse=True)
        self.labels = self.labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        item, _ = self.dataset[int(self.indices[i])]
        return item, int(self.labels[i])


def split_validation(train_set, eval_view, fraction: float, seed: int = 0):
    """(train subset, validation subset): a seeded `fraction` of the classes goes to validation.

    `eval_view` is the same training split built with the test-time transform; the validation
    subset is taken from it so validation images are not augmented.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"DATA.VAL_FRACTION must be in (0, 1), got {fraction}")
    labels = np.asarray(train_set.labels)
    if len(eval_view) != len(labels) or not np.array_equal(np.asarray(eval_view.labels), labels):
        raise ValueError("the evaluation view of the training split does not match it item for item")
    classes = np.unique(labels)
    num_val = int(round(fraction * len(classes)))
    if num_val < 1 or num_val >= len(classes):
        raise ValueError(
            f"DATA.VAL_FRACTION {fraction} of {len(classes)} training classes leaves "
            f"{num_val} validation classes; choose a fraction that keeps at least one on each side"
        )
    val_classes = np.random.default_rng(seed).choice(classes, num_val, replace=False)
    is_val = np.isin(labels, val_classes)
    return LabelledSubset(train_set, np.flatnonzero(~is_val)), LabelledSubset(eval_view, np.flatnonzero(is_val))
