"""The m-per-class batch sampler of XBM: classes without replacement, m images each."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np


class MPerClassBatchSampler:
    """Endless batches of `batch_size // num_instances` classes x `num_instances` images.

    An epoch is one random permutation of the classes, cut into batches (the
    classes left over at the end of a permutation wait for the next one). A
    class with fewer than `num_instances` images is drawn with replacement.

    The whole stream is a pure function of (seed, batch number): batch `i`
    is the same whether the stream starts at 0 or at `start_batch=i`, which
    is what lets a resumed run see exactly the batches an uninterrupted one
    would have seen, and lets ranks of a distributed run take disjoint
    batches (rank r of w takes global batches r, r + w, r + 2w, ...).
    """

    def __init__(
        self,
        labels: Sequence[int],
        batch_size: int,
        num_instances: int,
        seed: int = 0,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
            raise ValueError(
                f"DATA.BATCH_SIZE ({batch_size}) must be a positive multiple of "
                f"DATA.NUM_INSTANCES ({num_instances})"
            )
        labels = np.asarray(labels, dtype=np.int64)
        classes, inverse = np.unique(labels, return_inverse=True)
        self.classes_per_batch = batch_size // num_instances
        if len(classes) < self.classes_per_batch:
            raise ValueError(
                f"a batch of {batch_size} images with {num_instances} per class needs "
                f"{self.classes_per_batch} classes, but the training split has only {len(classes)}"
            )
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse))
        self.indices_by_class = np.split(order, bounds[:-1])
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.seed = seed
        self.start_batch = start_batch
        self.rank = rank
        self.world_size = world_size

    @property
    def batches_per_epoch(self) -> int:
        return len(self.indices_by_class) // self.classes_per_batch

    def batch(self, number: int) -> list[int]:
        """Global batch `number` of the stream."""
        epoch, position = divmod(number, self.batches_per_epoch)
        class_order = np.random.default_rng([self.seed, epoch]).permutation(len(self.indices_by_class))
        chosen = class_order[position * self.classes_per_batch:(position + 1) * self.classes_per_batch]
        # One generator per batch: drawing images does not depend on earlier batches.
        rng = np.random.default_rng([self.seed, epoch, position + 1])
        batch = []
        for c in chosen:
            pool = self.indices_by_class[c]
            replace = len(pool) < self.num_instances
            batch.extend(rng.choice(pool, self.num_instances, replace=replace).tolist())
        return batch

    def numbered_batches(self) -> Iterator[tuple[int, list[int]]]:
        """This rank's (global batch number, batch) pairs, from `start_batch` on."""
        number = self.start_batch * self.world_size + self.rank
        while True:
            yield number, self.batch(number)
            number += self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        return (batch for _, batch in self.numbered_batches())
