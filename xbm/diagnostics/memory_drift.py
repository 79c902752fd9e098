"""The memory's adaptation error: how far its entries are from what the network computes now.

Each memory entry was computed by the network of some earlier iteration. XBM keeps it as it was
(Wang et al. 2020 argue the "slow drift" makes that harmless); XBN and AXBN (Ajanthan et al. 2023)
rewrite every entry before each step so that the memory's per-dimension moments match the current
batch's. `MemoryProbe` measures what that achieves on a random sample of the entries: it re-embeds
their training images with the current network and compares

    memory_drift/cosine_stored    mean_i cos(m_i, f_i)   m_i: the entry as stored (adapted), what the loss reads
    memory_drift/cosine_enqueued  mean_i cos(e_i, f_i)   e_i: the entry as it was enqueued (never adapted)
    memory_drift/cosine_newest    mean cos(e_j, f_j) over the newest global batch only
    memory_drift/mean_age         mean age of the sampled entries, in iterations

where f_i is the current network's embedding of entry i's image (eval mode, test-time transform, no
gradient). cosine_stored - cosine_enqueued is the drift the adaptation removed (0 for plain XBM, whose
entries are never rewritten); negative means the adaptation moved the entries away from the network.
f_i is not quite what training would compute now (that is a random crop, in train mode), so even the
newest entries, enqueued one step earlier, have a cosine below 1: cosine_newest is that floor.

A measurement draws its sample from its own seeded generator and leaves the model's mode as it was, so
switching the probe on changes nothing in the run it observes.
"""
from __future__ import annotations

import numpy as np
import torch

from ..memory.cross_batch_memory import CrossBatchMemory
from .drift import COSINE_KEY, embed_in_eval_mode, feature_drift

STORED_KEY = "memory_drift/cosine_stored"
ENQUEUED_KEY = "memory_drift/cosine_enqueued"
NEWEST_KEY = "memory_drift/cosine_newest"
AGE_KEY = "memory_drift/mean_age"
SAMPLED_KEY = "memory_drift/sampled"
# Mixed into the sampling seed so the probe's stream is its own.
_PROBE_STREAM = 0x3E3_0D21


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the cosine similarity between row i of `a` and row i of `b` (float64): the
    feature-drift probe's cosine."""
    return feature_drift(a, b)[COSINE_KEY]


def known_slots(memory: CrossBatchMemory) -> torch.Tensor:
    """The valid slots whose item is known (entries loaded from an untracked checkpoint are not)."""
    valid = torch.arange(len(memory), device=memory.items.item_ids.device)
    return valid[memory.items.item_ids[valid] >= 0]


def embed_training_items(model: torch.nn.Module, dataset, item_ids: torch.Tensor, device=None,
                         batch_size: int = 256) -> torch.Tensor:
    """`model`'s embeddings (eval mode, no gradient; float32, CPU) of the items `item_ids` of `dataset` (the
    training set through the test-time transform): what the probe compares with and a refresh stores."""
    ids = item_ids.tolist()
    batches = (torch.stack([dataset[i][0] for i in ids[start:start + batch_size]])
               for start in range(0, len(ids), batch_size))
    return embed_in_eval_mode(model, batches, device)


class MemoryProbe:
    """Every `interval` iterations, re-embeds `num_samples` random memory entries and reports the
    cosines of the module docstring.

    Args:
        dataset: the training set the memory's item ids index, through the test-time transform
            (`xbm.data.build.TrainingSplitTestView.items_of`); yields (image tensor, label).
        num_samples: entries per measurement (all known ones if fewer).
        interval: iterations between measurements.
        global_batch: rows the memory receives per iteration (ages are counted in iterations).
        seed: the sample of iteration t is a function of (seed, t) only.
    """

    def __init__(self, dataset, num_samples: int = 256, interval: int = 100, global_batch: int = 1,
                 seed: int = 0, device=None, batch_size: int = 256):
        for name, value in (("num_samples", num_samples), ("interval", interval), ("global_batch", global_batch),
                            ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.dataset = dataset
        self.num_samples, self.interval, self.global_batch = num_samples, interval, global_batch
        self.seed = seed
        self.device = torch.device(device) if device is not None else None
        self.batch_size = batch_size

    def due(self, iteration: int) -> bool:
        return iteration > 0 and iteration % self.interval == 0

    def sample(self, memory: CrossBatchMemory, iteration: int) -> torch.Tensor:
        """The slots measured at `iteration`: a seeded random subset of the known ones, sorted."""
        candidates = known_slots(memory).cpu().numpy()
        count = min(self.num_samples, len(candidates))
        rng = np.random.default_rng([self.seed, iteration, _PROBE_STREAM])
        return torch.from_numpy(np.sort(rng.choice(candidates, size=count, replace=False)))

    def embed_items(self, model: torch.nn.Module, item_ids: torch.Tensor) -> torch.Tensor:
        """The current network's embeddings of these training items (float32, CPU)."""
        return embed_training_items(model, self.dataset, item_ids, self.device, self.batch_size)

    @torch.no_grad()
    def measure(self, model: torch.nn.Module, memory: CrossBatchMemory, iteration: int) -> dict | None:
        """The cosines now; None while the memory holds no known item."""
        if not memory.track_items:
            raise ValueError("the memory probe needs a memory built with track_items=True")
        slots = self.sample(memory, iteration)
        if len(slots) == 0:
            return None
        newest = memory.newest_slots(self.global_batch).cpu()
        newest = newest[memory.items.item_ids[newest.to(memory.items.item_ids.device)].cpu() >= 0]
        measured = torch.cat((slots, newest))  # one pass through the network for both
        device = memory.feats.device
        fresh = self.embed_items(model, memory.items.item_ids[measured.to(device)].cpu())
        fresh_sample, fresh_newest = fresh[:len(slots)], fresh[len(slots):]
        on_device = slots.to(device)
        ages = (memory.slot_ages()[on_device] // self.global_batch).double()  # whole iterations
        results = {STORED_KEY: mean_cosine(memory.feats[on_device], fresh_sample),
                   ENQUEUED_KEY: mean_cosine(memory.items.enqueued_feats[on_device], fresh_sample),
                   AGE_KEY: float(ages.mean()), SAMPLED_KEY: float(len(slots))}
        if len(newest):
            results[NEWEST_KEY] = mean_cosine(memory.items.enqueued_feats[newest.to(device)], fresh_newest)
        return results

    def step(self, model: torch.nn.Module, memory: CrossBatchMemory, iteration: int) -> dict | None:
        """measure() when `iteration` is a positive multiple of the interval, else None."""
        return self.measure(model, memory, iteration) if self.due(iteration) else None
