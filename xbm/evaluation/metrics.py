"""Retrieval metrics: Recall@K, MAP@R and R-precision from one k-NN search.

Definitions (inner product on unit vectors; leave-one-out when no gallery is
given, which excludes each query from its own neighbours):

* Recall@K: fraction of queries with at least one same-label item among their
  K nearest neighbours.  A query without any same-label gallery item is a miss.
  K larger than the gallery (minus the query itself in leave-one-out) is
  searched as "the whole gallery" and still reported under its own key.
* R-precision and MAP@R (Musgrave et al. 2020, "A Metric Learning Reality
  Check"): R = number of same-label gallery items (the query itself excluded
  in leave-one-out); R-precision = hits among the top R / R;
  MAP@R = (1/R) sum_{i<=R} P(i) rel(i), with P(i) the precision at i.
  Queries with R = 0 are left out of both averages; ``evaluate`` reports how
  many under ``num_queries_without_positive``.  If every query has R = 0 the
  two metrics are NaN.

Order among exactly tied similarities is decided by the search backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from xbm.evaluation.search import SearchProblem, iter_knn_chunks, prepare_search

METRICS = ("recall", "map_at_r", "r_precision")
DEFAULT_KS = (1, 10, 100, 1000)


def _as_labels(labels, name: str, length: int) -> torch.Tensor:
    """Return integer labels as a 1-D int64 CPU tensor of the given length."""
    if isinstance(labels, torch.Tensor):
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got dtype {labels.dtype}")
        labels = labels.detach().cpu()
    else:
        array = np.asarray(labels)
        if array.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")
        labels = torch.from_numpy(array.astype(np.int64, copy=False))
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.shape[0] != length:
        raise ValueError(
            f"{name} has {labels.shape[0]} entries but its embeddings have {length} rows")
    return labels.to(torch.int64)


def _as_ks(ks) -> tuple[int, ...]:
    """Validate ks: a non-empty sequence of positive ints, deduplicated, in order."""
    if isinstance(ks, int) and not isinstance(ks, bool):
        ks = (ks,)
    if not isinstance(ks, Sequence) or len(ks) == 0:
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    for k in ks:
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"ks must hold positive ints, got {k!r}")
    return tuple(sorted({int(k) for k in ks}))


def _as_metrics(metrics) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or len(metrics) == 0:
        raise ValueError(f"metrics must be a non-empty subset of {METRICS}, got {metrics!r}")
    return tuple(metrics)


def _compact_label_ids(q_labels: torch.Tensor, g_labels: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Map labels to 0..C-1 (shared by query and gallery) for cheap counting."""
    if g_labels is None:
        q_ids = torch.unique(q_labels, return_inverse=True)[1]
        return q_ids, q_ids
    _, ids = torch.unique(torch.cat([q_labels, g_labels]), return_inverse=True)
    return ids[:q_labels.shape[0]], ids[q_labels.shape[0]:]


def _positives_per_query(problem: SearchProblem, q_ids: torch.Tensor,
                         g_ids: torch.Tensor) -> torch.Tensor:
    """R for each query: same-label gallery items, the query itself excluded."""
    num_classes = int(max(q_ids.max(), g_ids.max())) + 1
    counts = torch.bincount(g_ids, minlength=num_classes)
    r = counts[q_ids]
    if problem.exclude_self:
        r = r - (g_ids == q_ids).long()
    return r


class _Accumulator:
    """Running sums of per-query statistics over search chunks."""

    def __init__(self, ks: tuple[int, ...]):
        self.ks = ks
        self.recall_hits = dict.fromkeys(ks, 0)
        self.ap_sum = 0.0
        self.rp_sum = 0.0
        self.num_with_positive = 0

    def add_recall(self, match: torch.Tensor) -> None:
        # Rank of the first same-label neighbour; "never" when there is none,
        # so that a K beyond the searched k still counts it as a miss.
        never = torch.iinfo(torch.int64).max
        first = torch.where(match.any(dim=1), match.to(torch.uint8).argmax(dim=1),
                            torch.full_like(match[:, 0], never, dtype=torch.int64))
        for k in self.ks:
            self.recall_hits[k] += int((first < k).sum())

    def add_r_metrics(self, match: torch.Tensor, r: torch.Tensor) -> None:
        has_positive = r > 0
        match, r = match[has_positive], r[has_positive]
        self.num_with_positive += int(r.shape[0])
        if r.shape[0] == 0:
            return
        width = int(r.max())
        rel = match[:, :width].to(torch.float64)
        ranks = torch.arange(1, width + 1, device=rel.device, dtype=torch.float64)
        within_r = ranks[None, :] <= r[:, None]
        rel = rel * within_r
        r = r.to(torch.float64)
        self.rp_sum += float((rel.sum(dim=1) / r).sum())
        precision_at_i = rel.cumsum(dim=1) / ranks
        self.ap_sum += float(((precision_at_i * rel).sum(dim=1) / r).sum())


def evaluate(query, q_labels, gallery=None, g_labels=None, ks=DEFAULT_KS,
             metrics=METRICS, backend: str = "auto", chunk_size: int | None = None) -> dict:
    """All requested retrieval metrics from a single chunked k-NN search.

    Args:
        query, q_labels: (N, d) embeddings (unit vectors; tensor or numpy) and
            N integer labels.
        gallery, g_labels: the gallery and its labels; None for leave-one-out
            over the query set (both must be None or both given).
        ks: the K of Recall@K.
        metrics: any of "recall", "map_at_r", "r_precision".
        backend, chunk_size: as in :func:`xbm.evaluation.search.knn`.

    Returns:
        dict with "R@K" per K (when "recall" is asked), "MAP@R" and "RP"
        (when asked), all python floats in [0, 1] (NaN for MAP@R/RP when no
        query has a positive), and the counts "num_queries",
        "num_queries_without_positive" and "num_neighbors" (k searched:
        max(max(ks), max R), clamped to the gallery size).
    """
    metrics = _as_metrics(metrics)
    ks = _as_ks(ks)
    if (gallery is None) != (g_labels is None):
        raise ValueError(
            "gallery and g_labels must be given together (or both None for leave-one-out)")
    problem = prepare_search(query, gallery)
    n = problem.query.shape[0]
    q_labels = _as_labels(q_labels, "q_labels", n)
    if g_labels is not None:
        g_labels = _as_labels(g_labels, "g_labels", problem.gallery.shape[0])
    q_ids, g_ids = _compact_label_ids(q_labels, g_labels)
    r = _positives_per_query(problem, q_ids, g_ids)

    wants_recall = "recall" in metrics
    wants_r_metrics = "map_at_r" in metrics or "r_precision" in metrics
    k = max(ks) if wants_recall else 1
    if wants_r_metrics:
        k = max(k, int(r.max()))
    k = min(k, problem.available)

    acc = _Accumulator(ks)
    ids_device = None
    for start, _sims, ids in iter_knn_chunks(problem, k, backend, chunk_size):
        if ids_device != ids.device:  # labels follow the search results' device
            ids_device = ids.device
            q_ids, g_ids, r = q_ids.to(ids_device), g_ids.to(ids_device), r.to(ids_device)
        stop = start + ids.shape[0]
        match = g_ids[ids] == q_ids[start:stop, None]
        if wants_recall:
            acc.add_recall(match)
        if wants_r_metrics:
            acc.add_r_metrics(match, r[start:stop])

    result: dict = {}
    if wants_recall:
        result.update({f"R@{k_}": acc.recall_hits[k_] / n for k_ in ks})
    denominator = acc.num_with_positive
    if "map_at_r" in metrics:
        result["MAP@R"] = acc.ap_sum / denominator if denominator else math.nan
    if "r_precision" in metrics:
        result["RP"] = acc.rp_sum / denominator if denominator else math.nan
    result["num_queries"] = n
    result["num_queries_without_positive"] = int((r == 0).sum())
    result["num_neighbors"] = k
    return result


def recall_at_k(query, q_labels, gallery=None, g_labels=None, ks=DEFAULT_KS,
                backend: str = "auto", chunk_size: int | None = None) -> dict[int, float]:
    """Recall@K for each K in ``ks``, as ``{K: fraction}`` (see module docs)."""
    res = evaluate(query, q_labels, gallery, g_labels, ks=ks, metrics=("recall",),
                   backend=backend, chunk_size=chunk_size)
    return {k: res[f"R@{k}"] for k in _as_ks(ks)}


def map_at_r(query, q_labels, gallery=None, g_labels=None, backend: str = "auto",
             chunk_size: int | None = None) -> float:
    """MAP@R over queries with at least one positive (see module docs)."""
    return evaluate(query, q_labels, gallery, g_labels, metrics=("map_at_r",),
                    backend=backend, chunk_size=chunk_size)["MAP@R"]


def r_precision(query, q_labels, gallery=None, g_labels=None, backend: str = "auto",
                chunk_size: int | None = None) -> float:
    """R-precision over queries with at least one positive (see module docs)."""
    return evaluate(query, q_labels, gallery, g_labels, metrics=("r_precision",),
                    backend=backend, chunk_size=chunk_size)["RP"]
