"""Shared machinery of the pair losses: input checks, same-label pair lookup, cosine
similarity and a custom autograd function that turns a per-loss kernel into a step
of two matmuls plus a few elementwise passes.

Every loss works on the cosine similarity ``S[i, j]`` between anchor ``i`` (a row
of the batch) and reference item ``j`` (a row of the batch itself, or of the
cross-batch memory). A loss only implements :meth:`PairLoss.similarity_loss`, which
maps ``S`` and the list of same-label pairs to the loss value and ``dL/dS``. The
autograd function then computes ``S = A @ R.T`` forward and ``dL/dA = (dL/dS) @ R``
backward, instead of autograd recording a chain of B x M temporaries (M = 55,000
for SOP).

Why the pair structure is sparse: against a large memory almost every pair is a
negative; the same-label pairs (positives and each anchor's own stored copy) are
a few per anchor. They are found without a B x M pass (the batch labels are
sorted, every reference label is binary-searched among them), their similarities
are gathered into a short vector, and the kernels then overwrite those entries of
``S`` in place, so the dense matrix holds the negatives only and no B x M label
mask is ever built.

Performance notes (CPU, B x M = 64 x 55,000): a pass over the B x M matrix costs
about 1 ms on two idle cores, and on a busy machine every parallel op also waits
for a thread wake-up, so the kernels keep the number of B x M ops small and pick
cheap ones: ``torch.where`` and ``masked_fill`` on a B x M tensor cost several
times an arithmetic pass, so masking uses ``F.threshold_`` on a per-row shifted
matrix; bool masks are counted with ``torch.count_nonzero`` (a bool ``sum``
first converts the mask to int64).
"""

from __future__ import annotations

import abc
import functools
import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# Norms are clamped like F.normalize does, so a zero vector gets similarity 0.
NORM_EPS = 1e-12
# Reference rows whose norms all lie within this many machine epsilons of 1 are
# taken as unit vectors (the plain XBM memory): the cosine then needs no column
# rescaling, which saves two passes over the B x M similarity matrix.
UNIT_NORM_TOLERANCE_EPS = 8


class SameLabelPairs(NamedTuple):
    """The (anchor, reference) pairs that share a label, in row-major order.

    rows / cols: (K,) long indices into the B x M similarity matrix.
    positive: (K,) bool; False for an anchor paired with itself (in-batch) or with
    its own stored copy (``ref_self_index``): such pairs are neither positives nor
    negatives.
    """

    rows: Tensor
    cols: Tensor
    positive: Tensor


class SimilarityLossOutput(NamedTuple):
    """What a loss kernel returns for one similarity matrix.

    value: 0-dim loss. grad_sim: dL/dS up to the factor grad_scale (kept apart so
    the scaling happens on the small B x D gradient, not on a B x M matrix).
    pos_pairs / neg_pairs: 0-dim long counts of active pairs.
    """

    value: Tensor
    grad_sim: Tensor
    grad_scale: Tensor | float
    pos_pairs: Tensor
    neg_pairs: Tensor


Kernel = Callable[[Tensor, SameLabelPairs], SimilarityLossOutput]


def check_finite_number(name: str, value: float, *, positive: bool = False,
                        non_negative: bool = False) -> float:
    """Validate a scalar hyper-parameter and return it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if non_negative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


# ---------------------------------------------------------------------------
# Same-label pairs and per-anchor reductions over them
# ---------------------------------------------------------------------------


def find_same_label_pairs(labels: Tensor, ref_labels: Tensor,
                          self_cols: Tensor | None) -> SameLabelPairs:
    """All pairs (i, j) with labels[i] == ref_labels[j]; ``self_cols[i]`` (or -1)
    names the one column per anchor that is its own copy. Synchronises once."""
    labels, ref_labels = labels.long(), ref_labels.long()
    sorted_labels = labels.sort().values
    slot = torch.searchsorted(sorted_labels, ref_labels).clamp_max(labels.shape[0] - 1)
    candidates = (sorted_labels[slot] == ref_labels).nonzero().squeeze(1)
    rows, which = (labels[:, None] == ref_labels[candidates][None, :]).nonzero(as_tuple=True)
    cols = candidates[which]
    if self_cols is None:
        positive = torch.ones_like(rows, dtype=torch.bool)
    else:
        positive = cols != self_cols[rows]
    return SameLabelPairs(rows, cols, positive)


def take_same_label(sim: Tensor, pairs: SameLabelPairs, fill: float) -> Tensor:
    """Gather the similarities of the same-label pairs, then overwrite them in
    ``sim`` with ``fill`` so that ``sim`` holds the negatives only."""
    values = sim[pairs.rows, pairs.cols]
    sim[pairs.rows, pairs.cols] = fill
    return values


def rows_sum(values: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    """Per-anchor sum of per-pair values."""
    return values.new_zeros(n_rows).index_add_(0, rows, values)


def rows_min(values: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    """Per-anchor minimum of per-pair values; +inf for anchors without pairs."""
    return values.new_full((n_rows,), math.inf).scatter_reduce_(0, rows, values, "amin")


def rows_max(values: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    """Per-anchor maximum of per-pair values; -inf for anchors without pairs."""
    return values.new_full((n_rows,), -math.inf).scatter_reduce_(0, rows, values, "amax")


def count_true(mask: Tensor) -> Tensor:
    """Number of True entries, a 0-dim long tensor (no int64 copy of the mask)."""
    return torch.count_nonzero(mask)


def sum_of_products(a: Tensor, b: Tensor) -> Tensor:
    """sum(a * b) without a temporary when both share a dense layout."""
    if a.is_contiguous() and b.is_contiguous():
        return torch.dot(a.reshape(-1), b.reshape(-1))
    if a.T.is_contiguous() and b.T.is_contiguous():
        return torch.dot(a.T.reshape(-1), b.T.reshape(-1))
    return (a * b).sum()


def exp_above_(sim: Tensor, floor: Tensor, scale: float,
               offset: Tensor) -> tuple[Tensor, Tensor]:
    """In place: per anchor i, ``exp(scale * (S - floor[i]) + offset[i])`` on the
    entries of ``sim`` above ``floor[i]``; every other entry becomes 0.

    Returns (``sim`` overwritten so, number of selected entries). ``floor[i] =
    +inf`` selects nothing; ``offset`` must be finite.

    The kernel of the two losses that exponentiate their mined negatives
    (multi-similarity, SupCon). It is faster on CPU than masking with -inf and
    calling ``exp``: the exponent is computed in base 2 (``scale`` and
    ``offset`` times log2(e)) and raised with ``exp2``, whose vectorised CPU
    kernel costs about half of ``exp``'s and, unlike it, stays fast on the -inf
    of unselected entries (exp of an argument whose result underflows takes a
    path several times slower; exp2 only for finite arguments below -126 in
    float32). Working in place saves allocating a B x M buffer, whose first
    touch (page faults) can cost more than an arithmetic pass.
    """
    log2_scale = scale * _LOG2_E
    shifted = torch.add((-log2_scale * floor)[:, None], sim, alpha=log2_scale,
                        out=sim)  # > 0 iff selected
    F.threshold_(shifted, 0.0, 0.0)
    # Unselected entries are now +0.0, the only float whose bits are integer 0:
    # counting the same-width integer view needs no bool temporary.
    selected = torch.count_nonzero(shifted.view(_SAME_WIDTH_INT[shifted.dtype]))
    F.threshold_(shifted, 0.0, -math.inf)
    values = shifted.add_((offset * _LOG2_E)[:, None]).exp2_()
    return values, selected


_LOG2_E = 1.0 / math.log(2.0)
_SAME_WIDTH_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
                   torch.float64: torch.int64}


# ---------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------


def _check_label_vector(name: str, labels: Tensor, length: int, length_name: str) -> None:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},) to match {length_name}, "
                         f"got {tuple(labels.shape)}")


def _check_embedding_matrix(name: str, emb: Tensor) -> None:
    if not isinstance(emb, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(emb).__name__}")
    if emb.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(emb.shape)}")
    if not emb.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating point tensor, got dtype {emb.dtype}")


def validate_pair_inputs(embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor | None,
                         ref_labels: Tensor | None, ref_self_index: Tensor | None) -> None:
    """Shape, dtype and device checks that need no device synchronisation."""
    _check_embedding_matrix("embeddings", embeddings)
    batch = embeddings.shape[0]
    if batch == 0:
        raise ValueError("embeddings must contain at least one row")
    _check_label_vector("labels", labels, batch, "embeddings")
    if (ref_embeddings is None) != (ref_labels is None):
        missing = "ref_labels" if ref_labels is None else "ref_embeddings"
        raise ValueError(f"ref_embeddings and ref_labels must be given together; "
                         f"{missing} is missing")
    if ref_embeddings is None:
        if ref_self_index is not None:
            raise ValueError("ref_self_index requires ref_embeddings and ref_labels")
        return
    _check_embedding_matrix("ref_embeddings", ref_embeddings)
    if ref_embeddings.shape[1] != embeddings.shape[1]:
        raise ValueError(f"ref_embeddings width {ref_embeddings.shape[1]} != embeddings width "
                         f"{embeddings.shape[1]}")
    if ref_embeddings.shape[0] == 0:
        raise ValueError("ref_embeddings must contain at least one row")
    if ref_embeddings.device != embeddings.device:
        raise ValueError(f"ref_embeddings is on {ref_embeddings.device}, embeddings on "
                         f"{embeddings.device}")
    _check_label_vector("ref_labels", ref_labels, ref_embeddings.shape[0], "ref_embeddings")
    if ref_self_index is not None:
        _check_label_vector("ref_self_index", ref_self_index, batch, "embeddings")


def _norm_flags(ref_norms: Tensor) -> tuple[Tensor, Tensor]:
    """(every row norm finite, every row a unit vector within rounding) as 0-dim bool tensors.

    A non-finite entry makes its row norm non-finite: one reduction over M instead of an
    isfinite pass over the whole M x D memory."""
    low, high = torch.aminmax(ref_norms)
    tolerance = UNIT_NORM_TOLERANCE_EPS * torch.finfo(ref_norms.dtype).eps
    return torch.isfinite(low) & torch.isfinite(high), (low >= 1 - tolerance) & (high <= 1 + tolerance)


def _check_values(embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor | None,
                  ref_labels: Tensor | None, ref_self_index: Tensor | None,
                  ref_norms: Tensor | None) -> bool:
    """Data-dependent checks, batched into a single host synchronisation.

    Returns whether every reference row is a unit vector (within rounding)."""
    checks = [torch.isfinite(embeddings).all()]
    if ref_norms is not None:
        checks += list(_norm_flags(ref_norms))
    if ref_self_index is not None:
        size = ref_embeddings.shape[0]
        in_range = (ref_self_index >= -1) & (ref_self_index < size)
        stored = ref_labels[ref_self_index.clamp(0, size - 1)]
        checks += [in_range.all(), ((stored == labels) | (ref_self_index < 0) | ~in_range).all()]
    flags = torch.stack(checks).tolist()
    if not flags[0]:
        raise ValueError("embeddings contains non-finite values (NaN or inf)")
    if ref_norms is not None and not flags[1]:
        if not torch.isfinite(ref_embeddings).all():
            raise ValueError("ref_embeddings contains non-finite values (NaN or inf)")
        raise ValueError("ref_embeddings has rows whose norm overflows (values too large)")
    if ref_self_index is not None:
        if not flags[-2]:
            raise ValueError(f"ref_self_index values must lie in "
                             f"[-1, {ref_embeddings.shape[0] - 1}]")
        if not flags[-1]:
            raise ValueError("ref_self_index points to reference rows whose ref_labels differ "
                             "from the anchors' labels")
    return ref_norms is not None and bool(flags[2])


# ---------------------------------------------------------------------------
# Autograd function and base module
# ---------------------------------------------------------------------------


class _CosinePairLossFunction(torch.autograd.Function):
    """Loss of the similarity matrix S = anchors @ refs.T (times ref_inv_norm per
    column when the reference rows are not unit vectors).

    The kernel supplies dL/dS; backward is then dL/dA = dL/dS @ R (and dL/dR =
    dL/dS.T @ A when the reference is differentiable, e.g. the batch itself).
    """

    @staticmethod
    def forward(ctx, anchors: Tensor, refs: Tensor, ref_inv_norm: Tensor | None, kernel: Kernel,
                pairs: SameLabelPairs):
        # (R @ A.T).T: a B x M view whose B index runs fastest. BLAS computes this
        # product about 1.5x faster on CPU than A @ R.T; elementwise results keep
        # the layout and backward's dL/dS @ R is as fast with it.
        sim = torch.mm(refs, anchors.T).T
        if ref_inv_norm is not None:
            sim.mul_(ref_inv_norm)
        if sim.dtype in (torch.float16, torch.bfloat16):
            # exp/log of the loss are not reliable in half precision
            sim = sim.float()
        out = kernel(sim, pairs)
        grad_sim = out.grad_sim
        if ref_inv_norm is not None:
            grad_sim.mul_(ref_inv_norm)  # chain rule through the column scaling
        ctx.save_for_backward(anchors, refs, grad_sim.to(anchors.dtype))
        ctx.grad_scale = out.grad_scale
        ctx.mark_non_differentiable(out.pos_pairs, out.neg_pairs)
        return out.value.to(anchors.dtype), out.pos_pairs, out.neg_pairs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_value: Tensor, _grad_pos: Tensor, _grad_neg: Tensor):
        anchors, refs, grad_sim = ctx.saved_tensors
        scale = grad_value * ctx.grad_scale
        grad_anchors = grad_refs = None
        if ctx.needs_input_grad[0]:
            grad_anchors = (grad_sim @ refs).mul_(scale)
        if ctx.needs_input_grad[1]:
            grad_refs = (grad_sim.T @ anchors).mul_(scale)
        return grad_anchors, grad_refs, None, None, None


class PairLoss(nn.Module, metaclass=abc.ABCMeta):
    """Base class of the pair losses: ``loss(embeddings, labels, ref_embeddings=None,
    ref_labels=None, *, ref_self_index=None) -> scalar``.

    - Similarities are cosine similarities: both sides are L2-normalised (the
      XBN-adapted memory is not unit-norm; the cosine re-normalises it).
    - Without a reference the batch is its own reference; gradients flow through
      both sides and each anchor's pair with itself is excluded.
    - With a reference (the memory: constants, any float dtype, cast to the
      anchors' dtype) ``ref_self_index[i]`` is the reference row holding anchor
      i's own stored copy (or -1): exactly that pair is excluded; other
      same-label items stay positives. The stored copy must carry the anchor's
      label. Without ``ref_self_index`` nothing is excluded.
    - ``ref_weights`` (M,), for a loss whose ``supports_ref_weights`` is True: reference
      row j counts as ``ref_weights[j]`` copies of itself (its pairs' terms are weighted by
      it); XBM.AGE_WEIGHT_SCALE weights the memory's entries by their age so.
    - ``self.last_stats`` holds ``{"pos_pairs", "neg_pairs"}``: 0-dim long tensors
      counting the active pairs of the last call (no host synchronisation).
    - One call synchronises with the device for the input checks (skipped with
      ``check_values=False``) and in the same-label pair lookup, whose output size
      depends on the labels (``nonzero``); backward is first-order only.
    """

    # Whether similarity_loss takes ``ref_weights`` (one weight per reference column).
    supports_ref_weights = False

    def __init__(self) -> None:
        super().__init__()
        self.last_stats: dict[str, Tensor] = {}

    @abc.abstractmethod
    def similarity_loss(self, sim: Tensor, pairs: SameLabelPairs) -> SimilarityLossOutput:
        """Loss, dL/dS and active-pair counts from the B x M cosine similarities
        ``sim`` (owned by the kernel: it may overwrite them) and the same-label
        pairs; every other entry of ``sim`` is a negative pair. A loss with
        ``supports_ref_weights`` also takes ``ref_weights`` (M,) or None."""

    def forward(self, embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor | None = None,
                ref_labels: Tensor | None = None, *,
                ref_self_index: Tensor | None = None, ref_weights: Tensor | None = None,
                check_values: bool = True) -> Tensor:
        """``check_values=False`` skips the data-dependent checks and their host synchronisation,
        for a caller that vouches for its inputs (the trainer: finite embeddings, a memory and
        ``ref_self_index`` it wrote itself); the loss value is then identical, bit for bit."""
        validate_pair_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_self_index)
        kernel = self.similarity_loss
        if ref_weights is not None:
            kernel = functools.partial(kernel, ref_weights=self._checked_weights(ref_weights, ref_embeddings,
                                                                                embeddings))
        device = embeddings.device
        labels = labels.to(device)
        ref_norms = None
        if ref_embeddings is not None:
            ref_embeddings = ref_embeddings.to(embeddings.dtype)
            ref_labels = ref_labels.to(device)
            ref_norms = torch.linalg.vector_norm(ref_embeddings.detach(), dim=1)
        if ref_self_index is not None:
            ref_self_index = ref_self_index.to(device)
        if check_values:
            refs_are_unit = _check_values(embeddings, labels, ref_embeddings, ref_labels,
                                          ref_self_index, ref_norms)
        else:
            refs_are_unit = None  # decided on the device below

        anchors = F.normalize(embeddings, dim=1, eps=NORM_EPS)
        if ref_embeddings is None:
            pairs = find_same_label_pairs(labels, labels, torch.arange(len(labels), device=device))
            refs, ref_inv_norm = anchors, None
        else:
            pairs = find_same_label_pairs(labels, ref_labels, ref_self_index)
            if ref_embeddings.requires_grad:
                # a differentiable reference: let autograd see its normalisation
                refs, ref_inv_norm = F.normalize(ref_embeddings, dim=1, eps=NORM_EPS), None
            elif refs_are_unit is None:
                refs, ref_inv_norm = ref_embeddings, _unit_or_inverse_norms(ref_norms)
            elif refs_are_unit:
                refs, ref_inv_norm = ref_embeddings, None
            else:
                refs, ref_inv_norm = ref_embeddings, ref_norms.clamp_min(NORM_EPS).reciprocal()
        value, pos_pairs, neg_pairs = _CosinePairLossFunction.apply(
            anchors, refs, ref_inv_norm, kernel, pairs)
        self.last_stats = {"pos_pairs": pos_pairs, "neg_pairs": neg_pairs}
        return value

    def _checked_weights(self, ref_weights: Tensor, ref_embeddings: Tensor | None, embeddings: Tensor) -> Tensor:
        """The weights in the similarity matrix's dtype (the anchors', float32 for half precision)."""
        if not self.supports_ref_weights:
            raise ValueError(f"{type(self).__name__} does not weight reference rows (ref_weights); "
                             "the contrastive and supcon losses do")
        if ref_embeddings is None:
            raise ValueError("ref_weights weights reference rows: it needs ref_embeddings")
        if not isinstance(ref_weights, Tensor) or ref_weights.shape != (ref_embeddings.shape[0],):
            got = tuple(ref_weights.shape) if isinstance(ref_weights, Tensor) else type(ref_weights).__name__
            raise ValueError(f"ref_weights must have one weight per reference row ({ref_embeddings.shape[0]},), "
                             f"got {got}")
        dtype = torch.float32 if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings.dtype
        return ref_weights.to(embeddings.device, dtype)


def _unit_or_inverse_norms(ref_norms: Tensor) -> Tensor:
    """The column scaling of the cosine without asking the host whether the rows are unit
    vectors: exact ones when they all are (multiplying by 1.0 changes no bit, so the result is
    that of the unscaled path), else the inverse norms."""
    _, all_unit = _norm_flags(ref_norms)
    inverse = ref_norms.clamp_min(NORM_EPS).reciprocal()
    return torch.where(all_unit, torch.ones_like(inverse), inverse)
