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


class ChunkedClassBatchSampler(MPerClassBatchSampler):
    """The official XBM sampler: classes drawn in proportion to their remaining chunks of m images.

    research-xbm ret_benchmark/data/samplers/random_identity_sampler.py:46-86@223ecdc: at the start of
    an epoch each class's images are shuffled, padded to a multiple of m with images of the class drawn
    with replacement, and cut into chunks of m. Each batch draws `batch_size // m` distinct classes
    without replacement with probability proportional to the chunks each has left, and takes the next
    chunk of each. A class with no chunk left drops out; the epoch ends when fewer classes than a batch
    needs are left (their chunks are not used), and the next epoch starts afresh. Classes with many
    images therefore appear in proportion to their size, where MPerClassBatchSampler draws every class
    equally often.

    Determinism: epoch e is drawn from numpy's Generator seeded with (seed, e, 0), so the stream is a
    pure function of the seed, as in the parent class. Epochs have different numbers of batches, so
    reaching batch i replays the epochs before it (their batches are computed, not loaded).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._epoch_starts = [0]  # global batch number at which epoch e starts
        self._cached_epoch, self._cached_batches = -1, []

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of epoch `epoch`, in order."""
        if epoch == self._cached_epoch:
            return self._cached_batches
        rng = np.random.default_rng([self.seed, epoch, 0])
        m = self.num_instances
        chunks = []
        for pool in self.indices_by_class:
            images = pool.tolist()
            if len(images) % m:
                images += rng.choice(pool, m - len(images) % m, replace=True).tolist()
            rng.shuffle(images)
            chunks.append([images[i:i + m] for i in range(0, len(images), m)])
        remaining = np.array([len(c) for c in chunks], dtype=np.int64)
        taken = np.zeros(len(chunks), dtype=np.int64)
        batches = []
        while np.count_nonzero(remaining) >= self.classes_per_batch:
            available = np.flatnonzero(remaining)
            weights = remaining[available] / remaining[available].sum()
            chosen = rng.choice(available, self.classes_per_batch, replace=False, p=weights)
            batch = []
            for c in chosen:
                batch.extend(chunks[c][taken[c]])
                taken[c] += 1
                remaining[c] -= 1
            batches.append(batch)
        self._cached_epoch, self._cached_batches = epoch, batches
        return batches

    def batch(self, number: int) -> list[int]:
        """Global batch `number` of the stream."""
        epoch = self._epoch_of(number)
        return self.epoch_batches(epoch)[number - self._epoch_starts[epoch]]

    def _epoch_of(self, number: int) -> int:
        while self._epoch_starts[-1] <= number:
            epoch = len(self._epoch_starts) - 1
            self._epoch_starts.append(self._epoch_starts[-1] + len(self.epoch_batches(epoch)))
        # the last epoch whose start is <= number
        return int(np.searchsorted(self._epoch_starts, number, side="right")) - 1


# DATA.SAMPLER: how classes are drawn into batches.
SAMPLERS = {"uniform": MPerClassBatchSampler, "official": ChunkedClassBatchSampler}


def sampler_class(name: str) -> type[MPerClassBatchSampler]:
    if name not in SAMPLERS:
        raise ValueError(f"DATA.SAMPLER {name!r} is not one of {tuple(SAMPLERS)}")
    return SAMPLERS[name]
