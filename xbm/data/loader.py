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

from .sampler import MPerClassBatchSampler

# Mixed into every sample seed so the augmentation stream never coincides with the sampler's
# numpy streams, which are also seeded from SOLVER.SEED and the batch number.
_AUGMENTATION_STREAM = 0x5EED_A06


def sample_seeds(seed: int, batch_number: int, count: int) -> list[int]:
    """The augmentation seeds of the `count` samples of global batch `batch_number` (64-bit)."""
    state = np.random.SeedSequence([seed, batch_number, _AUGMENTATION_STREAM]).generate_state(count, np.uint64)
    return [int(s) for s in state]


@contextmanager
def seeded_rngs(seed: int):
    """Run the body with torch's CPU RNG and python's `random` seeded by `seed` (the two RNGs
    torchvision's transforms draw from), then put both back as they were."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


class SeededItems(Dataset):
    """A view of `dataset` whose items are asked for as (index, seed): item `index`, with its
    transform run under `seed`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with seeded_rngs(seed):
            return self.dataset[index]


class SeededBatches:
    """The batches of an m-per-class sampler, each index paired with its sample seed."""

    def __init__(self, sampler: MPerClassBatchSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for number, batch in self.sampler.numbered_batches():
            yield list(zip(batch, sample_seeds(self.sampler.seed, number, len(batch))))


def build_train_loader(dataset: Dataset, sampler: MPerClassBatchSampler, num_workers: int = 0,
                       pin_memory: bool = False) -> DataLoader:
    """The endless training loader of `dataset` in `sampler`'s batches, seeded per sample."""
    # A DataLoader iterator draws its workers' base seed from `generator`, or else from the global
    # RNG; a private generator keeps training from consuming the global stream (the per-sample
    # seeds make the workers' own seeds irrelevant).
    generator = torch.Generator().manual_seed(sampler.seed)
    return DataLoader(SeededItems(dataset), batch_sampler=SeededBatches(sampler), num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0, generator=generator)
