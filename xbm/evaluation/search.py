"""Exact k-nearest-neighbour search by inner product, in bounded memory.

Two backends compute the same thing:

* ``faiss``: faiss' brute-force inner-product kernel (the one behind
  ``IndexFlatIP``).  On CPU it is called through ``faiss.knn``, which reads
  the gallery in place instead of copying it into an index; on CUDA data a
  GPU ``IndexFlatIP`` is built once when faiss was built with GPU support, and
  the CUDA tensors are handed to it directly (``faiss.contrib.torch_utils``),
  never copied to the host.
* ``torch``: a chunked ``query @ gallery.T`` followed by ``topk`` on the
  tensors' own device (CPU or CUDA).

Queries are processed in chunks so that neither an N x N similarity matrix
nor an N x (k + 1) scratch result is ever held at once.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

try:
    import faiss
    _FAISS_ERROR = None
except ImportError as err:  # faiss is optional; the torch backend covers everything
    faiss = None
    _FAISS_ERROR = str(err)

BACKENDS = ("auto", "faiss", "torch")

# Bounds for one chunk of queries: the torch backend's similarity block
# (chunk x gallery floats) and the faiss backend's per-chunk results.
_SIMILARITY_BLOCK_BYTES = 256 * 2**20
_RESULT_BLOCK_BYTES = 64 * 2**20
# faiss' CPU kernel works on blocks of 4096 queries; whole blocks keep it busy.
_FAISS_QUERY_BLOCK = 4096
# Largest k that faiss' GPU k-selection supports.
_FAISS_GPU_MAX_K = 2048
# Rows checked per step by the finiteness check (bounds its temporary mask).
_FINITE_CHECK_ROWS = 16384


@dataclass
class SearchProblem:
    """Validated inputs of one search: float32 tensors on one device."""

    query: torch.Tensor
    gallery: torch.Tensor
    exclude_self: bool

    @property
    def available(self) -> int:
        """How many neighbours each query can have at most."""
        return self.gallery.shape[0] - int(self.exclude_self)


def as_embedding_matrix(x, name: str) -> torch.Tensor:
    """Return ``x`` as a float32 2-D torch tensor, validating it.

    numpy arrays are wrapped without copying; float32 input is not copied.
    """
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"{name} must hold floating-point values, got dtype {x.dtype}")
        x = torch.from_numpy(x)
    elif not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must hold floating-point values, got dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (num_items, dim), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows)")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has width 0")
    x = x.detach().to(torch.float32)
    for start in range(0, x.shape[0], _FINITE_CHECK_ROWS):
        if not bool(torch.isfinite(x[start:start + _FINITE_CHECK_ROWS]).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
    return x


def prepare_search(query, gallery=None, exclude_self: bool | None = None) -> SearchProblem:
    """Validate embeddings and resolve leave-one-out.

    ``gallery=None`` searches the query set against itself; ``exclude_self``
    then defaults to True (leave-one-out).  With an explicit gallery,
    ``exclude_self=True`` means row i of the gallery is query i.
    """
    q = as_embedding_matrix(query, "query")
    if gallery is None:
        g = q
        exclude_self = True if exclude_self is None else bool(exclude_self)
    else:
        g = as_embedding_matrix(gallery, "gallery")
        exclude_self = False if exclude_self is None else bool(exclude_self)
        if g.shape[1] != q.shape[1]:
            raise ValueError(
                f"gallery width {g.shape[1]} differs from query width {q.shape[1]}")
        if g.device != q.device:
            raise ValueError(f"gallery is on {g.device} but query is on {q.device}")
        if exclude_self and g.shape[0] != q.shape[0]:
            raise ValueError(
                "exclude_self=True with a gallery needs gallery row i to be query i, "
                f"but query has {q.shape[0]} rows and gallery {g.shape[0]}")
    problem = SearchProblem(q, g, exclude_self)
    if problem.available < 1:
        raise ValueError("query: leave-one-out needs at least 2 rows")
    return problem


def faiss_import_error() -> str | None:
    """Why faiss cannot be imported here, or None when it can."""
    return _FAISS_ERROR


def resolve_backend(backend: str, device: torch.device, k: int) -> str:
    """Pick the backend that will run: 'faiss-cpu', 'faiss-gpu' or 'torch'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if faiss is None:
        if backend == "faiss":
            raise ValueError("backend='faiss' requested but faiss is not installed")
        return "torch"
    faiss_has_gpu = faiss.get_num_gpus() > 0
    if device.type == "cuda":
        # Copying CUDA data to a CPU faiss is far slower than a torch search
        # on the GPU, so "auto" only picks faiss when it can stay on the GPU.
        if faiss_has_gpu and k <= _FAISS_GPU_MAX_K:
            return "faiss-gpu"
        return "faiss-cpu" if backend == "faiss" and not faiss_has_gpu else "torch"
    return "faiss-cpu"


def default_chunk_size(engine: str, num_gallery: int, k_search: int) -> int:
    """Queries per chunk that keep the per-chunk blocks within their bounds."""
    if engine == "torch":
        return max(1, _SIMILARITY_BLOCK_BYTES // (4 * num_gallery))
    rows = _RESULT_BLOCK_BYTES // (12 * k_search)  # float32 sims + int64 ids
    return max(_FAISS_QUERY_BLOCK, rows // _FAISS_QUERY_BLOCK * _FAISS_QUERY_BLOCK)


def _drop_self(sims: torch.Tensor, ids: torch.Tensor, self_ids: torch.Tensor, k: int):
    """Remove each row's own index from a (c, k + 1) result, keeping k columns.

    The query's own index is removed wherever it sits (an exact duplicate may
    be listed before it).  If it is not in the list at all (more ties than
    k + 1), the last column goes instead; the rest is still the top k.
    """
    is_self = ids == self_ids[:, None]
    self_col = torch.where(is_self.any(dim=1), is_self.to(torch.uint8).argmax(dim=1), k)
    if not bool(self_col.any()):  # the usual case: self ranked first
        return sims[:, 1:], ids[:, 1:]
    # Output column j takes input column j before self's position, j + 1 after it.
    after_self = torch.arange(k, device=ids.device)[None, :] >= self_col[:, None]
    return (torch.where(after_self, sims[:, 1:], sims[:, :-1]),
            torch.where(after_self, ids[:, 1:], ids[:, :-1]))


def _faiss_gpu_index(gallery: torch.Tensor):
    """A GPU IndexFlatIP over a CUDA gallery, filled from device memory.

    Returns (index, resources); the GPU resources must outlive the index.
    """
    import faiss.contrib.torch_utils  # noqa: F401  (lets faiss take CUDA tensors)

    resources = faiss.StandardGpuResources()
    config = faiss.GpuIndexFlatConfig()
    config.device = gallery.device.index or 0
    index = faiss.GpuIndexFlatIP(resources, gallery.shape[1], config)
    index.add(gallery.contiguous())
    return index, resources


@contextmanager
def _full_precision_matmul():
    """float32 products without TF32 inside: training may allow TF32 (PERF.TF32), whose 10-bit
    inputs are fine for gradients but move similarities by ~1e-3, enough to reorder near ties."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def iter_knn_chunks(problem: SearchProblem, k: int, backend: str = "auto",
                    chunk_size: int | None = None
                    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(start, sims, ids)`` for consecutive chunks of queries.

    ``sims`` and ``ids`` are (chunk, k) tensors sorted by decreasing
    similarity, with self-matches already removed when ``problem.exclude_self``.
    ``k`` must already be within ``1..problem.available``.
    """
    q, g = problem.query, problem.gallery
    k_search = k + int(problem.exclude_self)
    engine = resolve_backend(backend, q.device, k_search)
    if chunk_size is None:
        chunk_size = default_chunk_size(engine, g.shape[0], k_search)
    elif not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

    if engine == "faiss-gpu":
        index, _resources = _faiss_gpu_index(g)
    elif engine == "faiss-cpu":
        g_np = np.ascontiguousarray(g.cpu().numpy())

    for start in range(0, q.shape[0], chunk_size):
        q_chunk = q[start:start + chunk_size]
        self_ids = torch.arange(start, start + q_chunk.shape[0], device=q.device)
        if engine == "torch":
            with _full_precision_matmul():
                block = q_chunk @ g.T
            if problem.exclude_self:
                # Mask self instead of searching k + 1: exact even with duplicates.
                block[torch.arange(q_chunk.shape[0], device=q.device), self_ids] = -float("inf")
            sims, ids = torch.topk(block, k, dim=1, largest=True, sorted=True)
            del block
        else:
            if engine == "faiss-gpu":
                sims, ids = index.search(q_chunk.contiguous(), k_search)  # CUDA tensors in and out
            else:
                q_np = np.ascontiguousarray(q_chunk.cpu().numpy())
                sims_np, ids_np = faiss.knn(q_np, g_np, k_search, metric=faiss.METRIC_INNER_PRODUCT)
                sims, ids = torch.from_numpy(sims_np), torch.from_numpy(ids_np)
            if problem.exclude_self:
                sims, ids = _drop_self(sims, ids, self_ids.to(ids.device), k)
        yield start, sims, ids


def knn(query, gallery=None, k: int = 10, exclude_self: bool | None = None,
        backend: str = "auto", chunk_size: int | None = None):
    """Exact k nearest neighbours by inner product (cosine on unit vectors).

    Args:
        query: (Nq, d) float tensor or numpy array.
        gallery: (Ng, d) of the same kind and device; None searches the query
            set against itself (leave-one-out).
        k: neighbours per query.  More than exist (Ng, or Nq - 1 in
            leave-one-out) is clamped to that number with a UserWarning.
        exclude_self: drop each query's own index (default: True iff
            ``gallery`` is None).  The own index is removed wherever it sits,
            so exact duplicates of a query are kept as neighbours.
        backend: "auto" (faiss when installed and, for CUDA data, built with
            GPU support; else torch), "faiss" or "torch".  faiss' GPU search
            handles k <= 2048; beyond that CUDA data is searched with torch.
        chunk_size: queries per search chunk; default keeps a chunk's
            similarity block under 256 MB (torch) / results under 64 MB (faiss).

    Returns:
        (sims, indices), each (Nq, k), sorted by decreasing similarity: torch
        tensors on the query's device if ``query`` is a tensor, numpy arrays
        if it is a numpy array.  Indices point into the gallery (or query set).
        Order among exactly tied similarities is backend-dependent.
    """
    problem = prepare_search(query, gallery, exclude_self)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > problem.available:
        warnings.warn(f"k={k} exceeds the {problem.available} searchable gallery items; "
                      f"returning {problem.available} neighbours", UserWarning, stacklevel=2)
        k = problem.available

    n, device = problem.query.shape[0], problem.query.device
    sims_out = torch.empty((n, k), dtype=torch.float32, device=device)
    ids_out = torch.empty((n, k), dtype=torch.int64, device=device)
    for start, sims, ids in iter_knn_chunks(problem, k, backend, chunk_size):
        sims_out[start:start + sims.shape[0]] = sims
        ids_out[start:start + ids.shape[0]] = ids
    if isinstance(query, np.ndarray):
        return sims_out.numpy(), ids_out.numpy()
    return sims_out, ids_out
