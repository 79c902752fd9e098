"""Embeddings of a split and the retrieval metrics of a dataset's evaluation tasks."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .metrics import evaluate
from ..utils.signals import ignore_stop_signals


def eval_loader(dataset, device, batch_size: int = 256, num_workers: int = 0, persistent_workers: bool = False,
                prefetch_factor: int = 2) -> DataLoader:
    """The in-order loader of an evaluation split (pinned host memory when the device is a GPU)."""
    workers = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor} if num_workers else {}
    # A private generator: creating the iterator draws a worker seed from it, not from the global
    # RNG, so evaluating in the middle of training leaves the training's random stream as it was.
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=torch.device(device).type == "cuda", generator=torch.Generator(),
                      worker_init_fn=ignore_stop_signals, **workers)


@torch.no_grad()
def compute_embeddings(model, dataset, device, batch_size: int = 256, num_workers: int = 0, *,
                       amp_dtype: torch.dtype | None = None, memory_format=torch.contiguous_format,
                       loader: DataLoader | None = None, desc: str | None = None):
    """(N, D) float32 embeddings on `device` and the (N,) int64 CPU labels of `dataset`, in order.

    The embeddings stay where the model computed them: the search runs on the same device. With
    `amp_dtype` the forward pass runs under autocast (as training did); `desc` shows a progress bar.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loader = loader or eval_loader(dataset, device, batch_size, num_workers)
    chunks = []
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for images, _ in tqdm(loader, desc=desc, disable=desc is None, leave=False, dynamic_ncols=True):
            images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            chunks.append(model(images).float())
    model.train(was_training)
    return torch.cat(chunks), torch.as_tensor(np.asarray(dataset.labels), dtype=torch.int64)


class Evaluator:
    """Runs every evaluation task of a dataset: leave-one-out or query -> gallery."""

    def __init__(self, tasks: dict, ks, device, batch_size=256, num_workers=0, backend="auto", *,
                 amp_dtype: torch.dtype | None = None, memory_format=torch.contiguous_format,
                 persistent_workers: bool = False, prefetch_factor: int = 2, progress: bool = True):
        # tasks: name -> (query dataset, gallery dataset or None)
        self.tasks = tasks
        self.ks = tuple(ks)
        self.device = torch.device(device)
        self.backend = backend
        self.amp_dtype = amp_dtype
        self.memory_format = memory_format
        self.progress = progress
        # One loader per split, kept so that persistent workers survive between evaluations.
        self._loaders = {}
        for query_set, gallery_set in tasks.values():
            for dataset in (query_set, gallery_set):
                if dataset is not None and id(dataset) not in self._loaders:
                    self._loaders[id(dataset)] = eval_loader(dataset, self.device, batch_size, num_workers,
                                                             persistent_workers, prefetch_factor)

    def _embed(self, model, dataset, desc: str):
        return compute_embeddings(model, dataset, self.device, amp_dtype=self.amp_dtype,
                                  memory_format=self.memory_format, loader=self._loaders[id(dataset)],
                                  desc=desc if self.progress else None)

    def __call__(self, model) -> dict[str, dict]:
        results = {}
        for name, (query_set, gallery_set) in self.tasks.items():
            query, q_labels = self._embed(model, query_set, f"embed {name}")
            if gallery_set is None:
                results[name] = evaluate(query, q_labels, ks=self.ks, backend=self.backend)
            else:
                gallery, g_labels = self._embed(model, gallery_set, f"embed {name} gallery")
                results[name] = evaluate(query, q_labels, gallery, g_labels, ks=self.ks, backend=self.backend)
        return results
