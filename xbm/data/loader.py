"""The training DataLoader, with augmentation that is a pure function of (seed, batch, position).

Why: PyTorch's DataLoader leaves a random transform's draws to whatever state the global RNG
(or, with workers, each worker's RNG seeded once per iterator) happens to be in. Then the crops
and flips of batch i depend on the number of workers, on every earlier use of the global RNG
(an evaluation creates a DataLoader iterator, which draws a seed), and on whether the run was
resumed, so a resumed run on an augmented dataset would not see the images an uninterrupted run
saw. Here every sample of global batch i gets its own seed, derived from (SOLVER.SEED, i, its
position in the batch), and its transform runs under that seed. Batch i is then the same tensor
whatever the worker count, the history of the run or where it resumed (the sampler already makes
the image indices of batch i such a function).
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..utils.signals import ignore_stop_signals
from .sampler import MPerClassBatchSampler

# Mixed into every sample seed so the augmentation stream never coincides with the sampler's
# numpy streams, which are also seeded from SOLVER.SEED and the batch number.
_AUGMENTATION_STREAM = 0x5EED_A06


def sample_seeds(seed: int, batch_number: int, count: int) -> list[int]:
    """The augmentation seeds of the `count` samples of global batch `batch_number` (64-bit)."""
    state = np.random.SeedSequence([seed, batch_number, _AUGMENTATION_STREAM]).generate_state(count, np.uint64)
    return [int(s) for s in state]


@contextmanager
def preserved_rngs():
    """Run the body, then put torch's CPU RNG and python's `random` back as they were."""
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)


def seed_rngs(seed: int) -> None:
    """Seed the two RNGs torchvision's transforms draw from: torch's CPU generator and python's
    `random`. (torch.manual_seed would also seed every CUDA device, about 200x slower per call,
    and CPU transforms never use them.)"""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)


class SeededItems(Dataset):
    """A view of `dataset` whose items are asked for as (index, seed): item `index` with its transform
    run under `seed`, followed by `index` itself (the memory probe re-embeds a stored entry by it). The
    global RNGs are left as they were."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def _seeded_item(self, index: int, seed: int):
        seed_rngs(seed)
        return (*self.dataset[index], index)

    def __getitem__(self, item: tuple[int, int]):
        with preserved_rngs():
            return self._seeded_item(*item)

    def __getitems__(self, items: list[tuple[int, int]]) -> list:
        # The DataLoader fetches a whole batch through here: save and restore the RNGs once per batch.
        with preserved_rngs():
            return [self._seeded_item(index, seed) for index, seed in items]


class SeededBatches:
    """The batches of an m-per-class sampler, each index paired with its sample seed."""

    def __init__(self, sampler: MPerClassBatchSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for number, batch in self.sampler.numbered_batches():
            yield list(zip(batch, sample_seeds(self.sampler.seed, number, len(batch))))


def build_train_loader(dataset: Dataset, sampler: MPerClassBatchSampler, num_workers: int = 0,
                       pin_memory: bool = False, prefetch_factor: int = 2) -> DataLoader:
    """The endless training loader of `dataset` in `sampler`'s batches, seeded per sample: it yields
    (images, labels, item_ids), item_ids being the items' indices in `dataset` (int64)."""
    # A DataLoader iterator draws its workers' base seed from `generator`, or else from the global
    # RNG; a private generator keeps training from consuming the global stream (the per-sample
    # seeds make the workers' own seeds irrelevant).
    generator = torch.Generator().manual_seed(sampler.seed)
    workers = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if num_workers > 0 else {}
    return DataLoader(SeededItems(dataset), batch_sampler=SeededBatches(sampler), num_workers=num_workers,
                      pin_memory=pin_memory, generator=generator, worker_init_fn=ignore_stop_signals, **workers)
