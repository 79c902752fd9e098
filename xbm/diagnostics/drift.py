"""Feature drift, the XBM paper's "slow drift": how far the embeddings of fixed images move.

The memory holds embeddings computed by older versions of the network. Wang et al. (2020) argue
that this is harmless because, after the first iterations, an instance's embedding changes
little between iteration t - dt and t. `DriftMonitor` measures exactly that on a fixed random
subset of the training set (the probe set), shown through the test-time transform so that only
the network changes between two measurements:

    drift/mean_distance = mean_i || e_i(t) - e_i(t - dt) ||_2
    drift/mean_cosine   = mean_i cos(e_i(t), e_i(t - dt))

On unit embeddings distance^2 = 2 - 2 cosine per instance. A monitor's measurements use no
random numbers and leave the model's mode as it was, so switching one on does not change the
training run it observes.
"""
from __future__ import annotations

import numpy as np
import torch

DISTANCE_KEY = "drift/mean_distance"
COSINE_KEY = "drift/mean_cosine"
# Probe images are kept in memory between measurements when they fit in this many bytes.
_CACHE_LIMIT_BYTES = 256 * 2**20


def _as_matrix(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (num_instances, dim) matrix, got shape {tuple(x.shape)}")
    return x.detach().to(torch.float64)


def feature_drift(old, new) -> dict[str, float]:
    """Mean L2 distance and mean cosine similarity between row i of `old` and row i of `new`."""
    old, new = _as_matrix(old, "old"), _as_matrix(new, "new").to(old.device)
    if old.shape != new.shape:
        raise ValueError(
            f"old and new embeddings must have the same shape, got {tuple(old.shape)} and {tuple(new.shape)}")
    distance = (new - old).norm(dim=1)
    cosine = torch.nn.functional.cosine_similarity(old, new, dim=1, eps=1e-12)
    return {DISTANCE_KEY: float(distance.mean()), COSINE_KEY: float(cosine.mean())}


def probe_indices(dataset_size: int, num_samples: int, seed: int = 0) -> np.ndarray:
    """The probe set: `num_samples` distinct indices (all if fewer), sorted, fixed by `seed`."""
    if dataset_size < 1:
        raise ValueError("the drift probe needs a non-empty dataset")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    count = min(num_samples, dataset_size)
    chosen = np.random.default_rng(seed).choice(dataset_size, size=count, replace=False)
    return np.sort(chosen)


@torch.no_grad()
def embed_in_eval_mode(model: torch.nn.Module, batches, device=None) -> torch.Tensor:
    """Float32 CPU embeddings of an iterable of image batches, with the model in eval mode and no
    gradient; the model's mode is restored. `device`: where to run (default: the model's)."""
    device = device or model_device(model)
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(batch.to(device, non_blocking=True)).float().cpu() for batch in batches])
    finally:
        model.train(was_training)


def model_device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


class DriftMonitor:
    """Embeds a fixed subset of a dataset every `interval` iterations and reports its drift.

    `dataset` yields (image tensor, label) through the test-time transform. Usage in a loop::

        monitor = DriftMonitor(train_set_with_test_transform, num_samples=256, interval=50)
        monitor.step(model, 0)                  # first snapshot: returns None
        for iteration in range(1, max_iters + 1):
            ...                                 # one training step
            drift = monitor.step(model, iteration)
            if drift is not None:               # every `interval` iterations
                log(drift)                      # {"drift/mean_distance": ..., "drift/mean_cosine": ...}

    Each measurement is against the previous snapshot (taken `interval` iterations earlier).
    `state_dict()` / `load_state_dict()` carry the last snapshot across a resume.
    """

    def __init__(self, dataset, num_samples: int = 256, interval: int = 50, seed: int = 0,
                 device=None, batch_size: int = 256):
        if interval < 1:
            raise ValueError(f"interval must be at least 1, got {interval}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset = dataset
        self.indices = probe_indices(len(dataset), num_samples, seed)
        self.interval = interval
        self.device = torch.device(device) if device is not None else None
        self.batch_size = batch_size
        self.snapshot: torch.Tensor | None = None
        self.snapshot_iteration: int | None = None
        self._cached_batches: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    # -- probe images ----------------------------------------------------------------------------
    def _load_batches(self):
        # A plain loop, not a DataLoader: creating a DataLoader iterator draws from the global RNG.
        for start in range(0, len(self.indices), self.batch_size):
            chunk = self.indices[start:start + self.batch_size]
            yield torch.stack([self.dataset[int(i)][0] for i in chunk])

    def _batches(self):
        if self._cached_batches is not None:
            yield from self._cached_batches
            return
        kept, fits = [], True
        for batch in self._load_batches():
            if fits:
                per_image = batch[0].numel() * batch.element_size()
                fits = per_image * len(self.indices) <= _CACHE_LIMIT_BYTES
                kept.append(batch)
            yield batch
        if fits:
            self._cached_batches = kept

    # -- measuring ---------------------------------------------------------------------------------
    def embed(self, model: torch.nn.Module) -> torch.Tensor:
        """(num_samples, dim) float32 CPU embeddings of the probe set, in eval mode (mode restored)."""
        return embed_in_eval_mode(model, self._batches(), self.device)

    def measure(self, model: torch.nn.Module, iteration: int) -> dict[str, float] | None:
        """Embed the probe set now; drift against the previous snapshot (None if this is the first)."""
        embeddings = self.embed(model)
        drift = None if self.snapshot is None else feature_drift(self.snapshot, embeddings)
        self.snapshot, self.snapshot_iteration = embeddings, int(iteration)
        return drift

    def due(self, iteration: int) -> bool:
        return self.snapshot is None or iteration % self.interval == 0

    def step(self, model: torch.nn.Module, iteration: int) -> dict[str, float] | None:
        """measure() when there is no snapshot yet or `iteration` is a multiple of the interval."""
        if not self.due(iteration) or iteration == self.snapshot_iteration:
            return None
        return self.measure(model, iteration)

    # -- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"indices": torch.from_numpy(self.indices.copy()), "iteration": self.snapshot_iteration,
                "embeddings": self.snapshot}

    def load_state_dict(self, state: dict) -> None:
        indices = state["indices"]
        indices = indices.numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
        if not np.array_equal(indices, self.indices):
            raise ValueError("the saved drift snapshot was taken on another probe set "
                             "(DRIFT.NUM_SAMPLES, the seed or the training set changed)")
        self.snapshot = state["embeddings"]
        self.snapshot_iteration = state["iteration"]
