"""Embeddings of a split and the retrieval metrics of a dataset's evaluation tasks."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..evaluation import evaluate
from ..utils.signals import ignore_stop_signals


@torch.no_grad()
def compute_embeddings(model, dataset, device, batch_size: int = 256, num_workers: int = 0):
    """(N, D) float32 embeddings on the CPU and the (N,) int64 labels of `dataset`, in order."""
    was_training = model.training
    model.eval()
    # A private generator: creating the iterator draws a worker seed from it, not from the global
    # RNG, so evaluating in the middle of training leaves the training's random stream as it was.
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        generator=torch.Generator(), worker_init_fn=ignore_stop_signals)
    chunks = []
    for images, _ in loader:
        chunks.append(model(images.to(device, non_blocking=True)).float().cpu())
    model.train(was_training)
    return torch.cat(chunks), torch.as_tensor(np.asarray(dataset.labels), dtype=torch.int64)


class Evaluator:
    """Runs every evaluation task of a dataset: leave-one-out or query -> gallery."""

    def __init__(self, tasks: dict, ks, device, batch_size=256, num_workers=0, backend="auto"):
        # tasks: name -> (query dataset, gallery dataset or None)
        self.tasks = tasks
        self.ks = tuple(ks)
        self.device = device
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.backend = backend

    def _embed(self, model, dataset):
        return compute_embeddings(model, dataset, self.device, self.batch_size, self.num_workers)

    def __call__(self, model) -> dict[str, dict]:
        results = {}
        for name, (query_set, gallery_set) in self.tasks.items():
            query, q_labels = self._embed(model, query_set)
            if gallery_set is None:
                results[name] = evaluate(query, q_labels, ks=self.ks, backend=self.backend)
            else:
                gallery, g_labels = self._embed(model, gallery_set)
                results[name] = evaluate(query, q_labels, gallery, g_labels, ks=self.ks, backend=self.backend)
        return results
