"""Pair losses against plain-loop float64 references written from the formulas."""

from __future__ import annotations

import math

import pytest
import torch
from yacs.config import CfgNode

from xbm.losses import (ContrastiveLoss, MultiSimilarityLoss, SupConLoss, TripletLoss,
                        build_loss)

# ----------------------------------------------------------------------------------
# Reference implementations: loops over anchors and pairs, one scalar at a time.
# ----------------------------------------------------------------------------------


def ref_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a, b) / (torch.sqrt(torch.dot(a, a)) * torch.sqrt(torch.dot(b, b)))


def ref_pairs(emb, labels, ref, ref_labels, self_index):
    """For each anchor: lists of (similarity, index) of positives and negatives."""
    in_batch = ref is None
    if in_batch:
        ref, ref_labels = emb, labels
    out = []
    for i in range(emb.shape[0]):
        positives, negatives = [], []
        for j in range(ref.shape[0]):
            if in_batch and j == i:
                continue
            if self_index is not None and int(self_index[i]) == j:
                continue
            s = ref_cosine(emb[i], ref[j])
            if int(labels[i]) == int(ref_labels[j]):
                positives.append((s, j))
            else:
                negatives.append((s, j))
        out.append((positives, negatives))
    return out


def ref_contrastive(emb, labels, ref=None, ref_labels=None, self_index=None,
                    margin=0.5, reduction="batch"):
    total, n_pos, n_neg = emb.new_zeros(()), 0, 0
    for positives, negatives in ref_pairs(emb, labels, ref, ref_labels, self_index):
        for s, _ in positives:
            if s < 1 - 1e-5:
                total = total + (1 - s)
                n_pos += 1
        for s, _ in negatives:
            if s > margin:
                total = total + s
                n_neg += 1
    if reduction == "batch":
        return total / emb.shape[0], n_pos, n_neg
    return (total / (n_pos + n_neg) if n_pos + n_neg else total * 0), n_pos, n_neg


def ref_multi_similarity(emb, labels, ref=None, ref_labels=None, self_index=None, alpha=2.0,
                         beta=40.0, base=0.5, margin=0.1, hard_mining=True):
    total, n_pos, n_neg = emb.new_zeros(()), 0, 0
    for positives, negatives in ref_pairs(emb, labels, ref, ref_labels, self_index):
        pos = [s for s, _ in positives if s < 1 - 1e-5]
        neg = [s for s, _ in negatives]
        if not pos or not neg:
            continue
        if hard_mining:
            min_pos, max_neg = min(s.item() for s in pos), max(s.item() for s in neg)
            mined_neg = [s for s in neg if s + margin > min_pos]
            mined_pos = [s for s in pos if s - margin < max_neg]
        else:
            mined_pos, mined_neg = pos, neg
        if not mined_pos or not mined_neg:
            continue
        pos_sum = sum(torch.exp(-alpha * (s - base)) for s in mined_pos)
        neg_sum = sum(torch.exp(beta * (s - base)) for s in mined_neg)
        total = total + torch.log(1 + pos_sum) / alpha + torch.log(1 + neg_sum) / beta
        n_pos += len(mined_pos)
        n_neg += len(mined_neg)
    return total / emb.shape[0], n_pos, n_neg


def ref_triplet(emb, labels, ref=None, ref_labels=None, self_index=None, margin=0.1,
                mining="semihard"):
    total, count = emb.new_zeros(()), 0
    pos_used, neg_used = set(), set()
    anchors_with_both = 0
    for i, (positives, negatives) in enumerate(ref_pairs(emb, labels, ref, ref_labels,
                                                         self_index)):
        if mining == "hard":
            if not positives or not negatives:
                continue
            anchors_with_both += 1
            s_p, p = min(positives, key=lambda t: t[0].item())
            s_n, n = max(negatives, key=lambda t: t[0].item())
            hinge = s_n - s_p + margin
            if hinge > 0:
                total = total + hinge
                pos_used.add((i, p))
                neg_used.add((i, n))
            continue
        for s_p, p in positives:
            for s_n, n in negatives:
                hinge = s_n - s_p + margin
                if hinge <= 0 or (mining == "semihard" and not s_n < s_p):
                    continue
                total = total + hinge
                count += 1
                pos_used.add((i, p))
                neg_used.add((i, n))
    denominator = anchors_with_both if mining == "hard" else count
    value = total / denominator if denominator else total * 0
    return value, len(pos_used), len(neg_used)


def ref_supcon(emb, labels, ref=None, ref_labels=None, self_index=None, temperature=0.1,
               pos_margin=0.2, neg_margin=0.8, mining=True):
    ref_all = emb if ref is None else ref
    losses, n_pos, n_neg = [], 0, 0
    for i, (positives, negatives) in enumerate(ref_pairs(emb, labels, ref, ref_labels,
                                                         self_index)):
        def distance(j):  # normalised Euclidean distance, for mining only
            a = emb[i].detach() / emb[i].detach().norm()
            r = ref_all[j].detach() / ref_all[j].detach().norm()
            return float((a - r).norm())
        if mining:
            positives = [(s, j) for s, j in positives if distance(j) > pos_margin]
            negatives = [(s, j) for s, j in negatives if distance(j) < neg_margin]
        if not positives or len(positives) + len(negatives) < 2:
            continue
        log_denominator = torch.log(sum(torch.exp(s / temperature)
                                        for s, _ in positives + negatives))
        terms = [s / temperature - log_denominator for s, _ in positives]
        losses.append(-sum(terms) / len(terms))
        n_pos += len(positives)
        n_neg += len(negatives)
    value = sum(losses) / len(losses) if losses else emb.new_zeros(())
    return value, n_pos, n_neg


LOSS_CASES = [
    (ContrastiveLoss, ref_contrastive, {}),
    (ContrastiveLoss, ref_contrastive, {"margin": 0.3, "reduction": "pairs"}),
    (MultiSimilarityLoss, ref_multi_similarity, {}),
    (MultiSimilarityLoss, ref_multi_similarity, {"hard_mining": False, "beta": 10.0}),
    (TripletLoss, ref_triplet, {"mining": "all"}),
    (TripletLoss, ref_triplet, {"mining": "semihard", "margin": 0.3}),
    (TripletLoss, ref_triplet, {"mining": "hard"}),
    (SupConLoss, ref_supcon, {}),
    (SupConLoss, ref_supcon, {"mining": False, "temperature": 0.5}),
    (SupConLoss, ref_supcon, {"pos_margin": 0.9, "neg_margin": 1.3}),
]
CASE_IDS = [f"{cls.__name__}-{i}" for i, (cls, _, _) in enumerate(LOSS_CASES)]

# ----------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------


def make_batch(seed, batch=12, dim=8, classes=4, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    # class centres make positives more similar than negatives, so mining has
    # something to select on both sides of every threshold
    centres = torch.randn(classes, dim, generator=gen, dtype=dtype)
    emb = centres[labels] + 0.9 * torch.randn(batch, dim, generator=gen, dtype=dtype)
    emb = emb / emb.norm(dim=1, keepdim=True)
    return emb, labels, centres, gen


def make_memory(emb, labels, centres, gen, others=18):
    """Reference set: perturbed, rescaled copies of the batch (a memory holding the
    anchors' older embeddings) plus other items, shuffled; non-unit rows."""
    classes, dim = centres.shape
    other_labels = torch.randint(0, classes, (others,), generator=gen)
    other = centres[other_labels] + 0.9 * torch.randn(others, dim, generator=gen,
                                                       dtype=emb.dtype)
    copies = emb.detach() + 0.05 * torch.randn(emb.shape, generator=gen, dtype=emb.dtype)
    ref = torch.cat([copies, other])
    ref = ref * (0.5 + torch.rand(ref.shape[0], 1, generator=gen, dtype=emb.dtype))
    ref_labels = torch.cat([labels, other_labels])
    perm = torch.randperm(ref.shape[0], generator=gen)
    ref, ref_labels = ref[perm], ref_labels[perm]
    self_index = torch.argsort(perm)[: emb.shape[0]]  # where each copy went
    return ref, ref_labels, self_index


def loss_and_grad(fn, emb, *args, **kwargs):
    emb = emb.detach().clone().requires_grad_(True)
    out = fn(emb, *args, **kwargs)
    value = out[0] if isinstance(out, tuple) else out
    grad = None
    if value.requires_grad:  # a reference without any selected pair is a constant
        (grad,) = torch.autograd.grad(value, emb, allow_unused=True)
    grad = torch.zeros_like(emb) if grad is None else grad
    return value.detach(), grad, out


# ----------------------------------------------------------------------------------
# Values, gradients and stats against the references
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("cls,reference,kwargs", LOSS_CASES, ids=CASE_IDS)
def test_in_batch_matches_reference(cls, reference, kwargs, seed):
    emb, labels, _, _ = make_batch(seed)
    loss = cls(**kwargs)
    value, grad, _ = loss_and_grad(loss, emb, labels)
    stats = {k: int(v) for k, v in loss.last_stats.items()}
    ref_value, ref_grad, (_, n_pos, n_neg) = loss_and_grad(
        lambda e, l: reference(e, l, **kwargs), emb, labels)
    assert n_pos + n_neg > 0, "degenerate test input"
    torch.testing.assert_close(value, ref_value, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-10)
    assert stats == {"pos_pairs": n_pos, "neg_pairs": n_neg}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("cls,reference,kwargs", LOSS_CASES, ids=CASE_IDS)
def test_memory_matches_reference(cls, reference, kwargs, seed):
    emb, labels, centres, gen = make_batch(seed)
    ref, ref_labels, self_index = make_memory(emb, labels, centres, gen)
    self_index[::3] = -1  # some anchors have no stored copy: their copy is a positive
    loss = cls(**kwargs)
    value, grad, _ = loss_and_grad(loss, emb, labels, ref, ref_labels,
                                   ref_self_index=self_index)
    stats = {k: int(v) for k, v in loss.last_stats.items()}
    ref_value, ref_grad, (_, n_pos, n_neg) = loss_and_grad(
        lambda e, l: reference(e, l, ref, ref_labels, self_index, **kwargs), emb, labels)
    assert n_pos + n_neg > 0, "degenerate test input"
    torch.testing.assert_close(value, ref_value, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-10)
    assert stats == {"pos_pairs": n_pos, "neg_pairs": n_neg}


@pytest.mark.parametrize("cls,reference,kwargs", LOSS_CASES, ids=CASE_IDS)
def test_float32_and_half_memory_match_float64(cls, reference, kwargs):
    emb, labels, centres, gen = make_batch(3)
    ref, ref_labels, self_index = make_memory(emb, labels, centres, gen)
    ref_half = ref.half()
    expected, _, _ = reference(emb, labels, ref_half.double(), ref_labels, self_index, **kwargs)
    value = cls(**kwargs)(emb.float(), labels, ref_half, ref_labels, ref_self_index=self_index)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), expected, rtol=2e-4, atol=2e-5)


def test_differentiable_reference_gets_gradient():
    emb, labels, centres, gen = make_batch(4)
    ref, ref_labels, _ = make_memory(emb, labels, centres, gen)
    for cls, reference, kwargs in [(MultiSimilarityLoss, ref_multi_similarity, {"beta": 10.0}),
                                   (SupConLoss, ref_supcon, {"mining": False})]:
        grads = []
        for fn in (cls(**kwargs), lambda *a: reference(*a, **kwargs)):
            e = emb.clone().requires_grad_(True)
            r = ref.clone().requires_grad_(True)
            out = fn(e, labels, r, ref_labels)
            value = out[0] if isinstance(out, tuple) else out
            grads.append(torch.autograd.grad(value, (e, r)))
        for mine, expected in zip(*grads):
            torch.testing.assert_close(mine, expected, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("cls,reference,kwargs", LOSS_CASES, ids=CASE_IDS)
def test_batch_as_reference_with_self_index_equals_in_batch_value(cls, reference, kwargs):
    emb, labels, _, _ = make_batch(13)
    loss = cls(**kwargs)
    in_batch = loss(emb, labels)
    stats = dict(loss.last_stats)
    as_reference = loss(emb, labels, emb, labels, ref_self_index=torch.arange(12))
    torch.testing.assert_close(as_reference, in_batch, rtol=1e-12, atol=1e-14)
    assert loss.last_stats == stats


@pytest.mark.parametrize("cls,reference,kwargs", LOSS_CASES, ids=CASE_IDS)
def test_unit_and_rescaled_memory_agree(cls, reference, kwargs):
    emb, labels, centres, gen = make_batch(14)
    ref, ref_labels, self_index = make_memory(emb, labels, centres, gen)
    unit = ref / ref.norm(dim=1, keepdim=True)  # takes the no-rescaling path
    loss = cls(**kwargs)
    values, grads = [], []
    for memory in (unit, unit * 3.0):
        value, grad, _ = loss_and_grad(loss, emb, labels, memory, ref_labels,
                                       ref_self_index=self_index)
        values.append(value)
        grads.append(grad)
    torch.testing.assert_close(values[0], values[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=1e-10)


def test_arbitrary_integer_labels():
    emb, labels, centres, gen = make_batch(15)
    ref, ref_labels, self_index = make_memory(emb, labels, centres, gen)
    relabel = torch.tensor([-7, 10**12, 3, -(10**9)])  # negative and huge class ids
    for loss in (MultiSimilarityLoss(), SupConLoss(), TripletLoss(mining="all")):
        expected = loss(emb, labels, ref, ref_labels, ref_self_index=self_index)
        value = loss(emb, relabel[labels], ref, relabel[ref_labels], ref_self_index=self_index)
        torch.testing.assert_close(value, expected, rtol=0, atol=0)
        mixed_dtypes = loss(emb, labels.int(), ref, ref_labels, ref_self_index=self_index.int())
        torch.testing.assert_close(mixed_dtypes, expected, rtol=0, atol=0)


def test_same_label_item_stays_positive_and_only_self_copy_is_excluded():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([7, 3])
    angle = 0.3
    ref = torch.tensor([[math.cos(0.01), math.sin(0.01)],    # anchor 0's stored copy
                        [math.cos(angle), math.sin(angle)],  # another item of class 7
                        [0.0, 2.0],                          # anchor 1's stored copy, not unit
                        [1.0, 1.0]], dtype=torch.float64)    # class 5
    ref_labels = torch.tensor([7, 7, 3, 5])
    loss = ContrastiveLoss(margin=0.5)
    value = loss(emb, labels, ref, ref_labels, ref_self_index=torch.tensor([0, 2]))
    # anchor 0: positive (1 - cos 0.3), negative cos 45 deg > 0.5; anchor 1: negative cos 45
    expected = ((1 - math.cos(angle)) + 2 * math.cos(math.pi / 4)) / 2
    assert value.item() == pytest.approx(expected, rel=1e-12)
    assert int(loss.last_stats["pos_pairs"]) == 1
    assert int(loss.last_stats["neg_pairs"]) == 2
    # without the index the stored copy of anchor 0 counts as a positive too
    # (anchor 1's copy has similarity 1 and is dropped by the 1 - 1e-5 rule)
    value = loss(emb, labels, ref, ref_labels)
    assert value.item() == pytest.approx(expected + (1 - math.cos(0.01)) / 2, rel=1e-12)
    assert int(loss.last_stats["pos_pairs"]) == 2


def test_official_positive_ceiling_drops_identical_positives():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    loss = ContrastiveLoss()
    assert loss(emb, labels).item() == 0.0
    assert int(loss.last_stats["pos_pairs"]) == 0
    ms = MultiSimilarityLoss()
    assert ms(emb, labels).item() == 0.0


def test_multi_similarity_is_stable_for_large_beta():
    emb, labels, centres, gen = make_batch(5)
    ref, ref_labels, self_index = make_memory(emb, labels, centres, gen)
    kwargs = {"beta": 300.0, "alpha": 80.0, "hard_mining": False}
    expected, _, _ = ref_multi_similarity(emb, labels, ref, ref_labels, self_index, **kwargs)
    value = MultiSimilarityLoss(**kwargs)(emb.float(), labels, ref.float(), ref_labels,
                                          ref_self_index=self_index)
    assert torch.isfinite(value)
    torch.testing.assert_close(value.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exp_above_matches_exp_of_selected_entries(dtype):
    # exp_above_ is the dense masked-exp kernel of MultiSimilarityLoss: check it
    # alone, including exponents whose results are subnormal (float32: below
    # about -87.3) and an anchor that selects nothing (floor +inf).
    from xbm.losses.base import exp_above_
    gen = torch.Generator().manual_seed(11)
    sim = (torch.rand(6, 300, generator=gen, dtype=torch.float64) * 2 - 1)
    floor = torch.tensor([-0.5, 0.0, 0.3, -1.5, math.inf, 0.8], dtype=torch.float64)
    scale = 60.0
    # offset: the row's largest possible exponent (S = 1) lands at `top`; row 3
    # selects everything and spans normal, subnormal and underflowing results.
    log_tiny = math.log(torch.finfo(dtype).tiny)
    top = torch.tensor([0.0, -3.0, -30.0, log_tiny + 5, 0.0, -1.0], dtype=torch.float64)
    offset = torch.where(floor.isinf(), 0.0, top - scale * (1 - floor))
    expected = torch.zeros_like(sim)
    n_selected = 0
    for i in range(sim.shape[0]):
        for j in range(sim.shape[1]):
            if sim[i, j] > floor[i]:
                n_selected += 1
                expected[i, j] = math.exp(scale * (sim[i, j] - floor[i]) + offset[i])
    values, selected = exp_above_(sim.to(dtype).T.contiguous().T, floor.to(dtype), scale,
                                  offset.to(dtype))
    assert selected.dtype == torch.long and int(selected) == n_selected
    assert torch.all(values[expected == 0] == 0)
    tiny = torch.finfo(dtype).tiny
    normal = expected > 1e3 * tiny  # subnormal results carry fewer significant digits
    assert int((expected[expected > 0] < tiny).sum()) > 0, "no subnormal case covered"
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(values.double()[normal], expected[normal], rtol=rtol, atol=0)
    torch.testing.assert_close(values.double()[~normal], expected[~normal], rtol=0,
                               atol=1e3 * tiny)


def test_triplet_all_matches_dense_triplet_tensor_on_larger_reference():
    gen = torch.Generator().manual_seed(6)
    emb = torch.randn(16, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 6, (16,), generator=gen)
    ref = torch.randn(400, 8, generator=gen, dtype=torch.float64)
    ref_labels = torch.randint(0, 6, (400,), generator=gen)
    for mining in ("all", "semihard"):
        loss = TripletLoss(margin=0.2, mining=mining)
        value = loss(emb, labels, ref, ref_labels)
        # dense B x M x M hinge tensor: S_an - S_ap + margin
        sim = (emb / emb.norm(dim=1, keepdim=True)) @ (ref / ref.norm(dim=1, keepdim=True)).T
        same = labels[:, None] == ref_labels[None, :]
        hinge = sim[:, None, :] - sim[:, :, None] + 0.2
        keep = same[:, :, None] & ~same[:, None, :] & (hinge > 0)
        if mining == "semihard":
            keep &= sim[:, None, :] < sim[:, :, None]
        torch.testing.assert_close(value, hinge[keep].mean(), rtol=1e-10, atol=1e-12)
        assert int(loss.last_stats["pos_pairs"]) == int(keep.any(dim=2).sum())
        assert int(loss.last_stats["neg_pairs"]) == int(keep.any(dim=1).sum())


# ----------------------------------------------------------------------------------
# gradcheck (float64; the seeds keep every similarity away from the kinks)
# ----------------------------------------------------------------------------------

GRADCHECK_CASES = [
    ContrastiveLoss(margin=0.3),
    ContrastiveLoss(reduction="pairs"),
    MultiSimilarityLoss(beta=10.0),
    TripletLoss(mining="all"),
    TripletLoss(mining="hard"),
    SupConLoss(),
]


@pytest.mark.parametrize("loss", GRADCHECK_CASES, ids=lambda m: type(m).__name__)
def test_gradcheck(loss):
    emb, labels, centres, gen = make_batch(7, batch=6, dim=4, classes=2)
    ref, ref_labels, self_index = make_memory(emb, labels, centres, gen, others=8)
    sim = (emb @ (ref / ref.norm(dim=1, keepdim=True)).T)
    # stay clear of the contrastive thresholds under finite differences
    assert ((sim - 0.3).abs().min() > 1e-3) and ((sim - 0.5).abs().min() > 1e-3)
    scaled = (emb * torch.linspace(0.5, 2.0, emb.shape[0], dtype=emb.dtype)[:, None])
    x = scaled.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: loss(e, labels), (x,))
    assert torch.autograd.gradcheck(
        lambda e: loss(e, labels, ref, ref_labels, ref_self_index=self_index), (x,))


# ----------------------------------------------------------------------------------
# Edge cases
# ----------------------------------------------------------------------------------

ALL_LOSSES = [ContrastiveLoss(), ContrastiveLoss(reduction="pairs"), MultiSimilarityLoss(),
              MultiSimilarityLoss(hard_mining=False), TripletLoss(mining="all"),
              TripletLoss(mining="semihard"), TripletLoss(mining="hard"), SupConLoss(),
              SupConLoss(mining=False)]
ALL_REFERENCES = [(ref_contrastive, {}), (ref_contrastive, {"reduction": "pairs"}),
                  (ref_multi_similarity, {}), (ref_multi_similarity, {"hard_mining": False}),
                  (ref_triplet, {"mining": "all"}), (ref_triplet, {"mining": "semihard"}),
                  (ref_triplet, {"mining": "hard"}), (ref_supcon, {}),
                  (ref_supcon, {"mining": False})]


@pytest.mark.parametrize("index", range(len(ALL_LOSSES)))
@pytest.mark.parametrize("case", ["no_positives", "single_class", "single_anchor"])
def test_edge_cases_match_reference(index, case):
    loss = ALL_LOSSES[index]
    reference, kwargs = ALL_REFERENCES[index]
    emb, _, _, gen = make_batch(8, batch=6)
    if case == "no_positives":
        labels = torch.arange(6)
    elif case == "single_class":
        labels = torch.zeros(6, dtype=torch.long)
    else:
        emb, labels = emb[:1], torch.tensor([2])
    value, grad, _ = loss_and_grad(loss, emb, labels)
    ref_value, ref_grad, (_, n_pos, n_neg) = loss_and_grad(
        lambda e, l: reference(e, l, **kwargs), emb, labels)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    torch.testing.assert_close(value, ref_value.reshape(()), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-10)
    assert int(loss.last_stats["pos_pairs"]) == n_pos
    assert int(loss.last_stats["neg_pairs"]) == n_neg


def test_losses_without_any_valid_anchor_are_zero():
    emb, labels, _, _ = make_batch(9)
    empty_mining = [MultiSimilarityLoss(margin=-5.0), SupConLoss(pos_margin=2.5),
                    TripletLoss(margin=-5.0, mining="all")]
    for loss in empty_mining:
        value, grad, _ = loss_and_grad(loss, emb, labels)
        assert value.item() == 0.0
        assert torch.count_nonzero(grad) == 0
        assert int(loss.last_stats["pos_pairs"]) == 0


def test_last_stats_are_long_tensors():
    emb, labels, _, _ = make_batch(10)
    for loss in ALL_LOSSES:
        loss(emb, labels)
        for key in ("pos_pairs", "neg_pairs"):
            stat = loss.last_stats[key]
            assert isinstance(stat, torch.Tensor) and stat.dtype == torch.long and stat.dim() == 0


# ----------------------------------------------------------------------------------
# Bad input and non-finite values
# ----------------------------------------------------------------------------------

def _inputs():
    emb, labels, centres, gen = make_batch(11)
    ref, ref_labels, self_index = make_memory(emb, labels, centres, gen)
    return emb, labels, ref, ref_labels, self_index


@pytest.mark.parametrize("mutate,error,name", [
    (lambda a: a.update(emb=a["emb"][0]), ValueError, "embeddings"),
    (lambda a: a.update(labels=a["labels"][:-1]), ValueError, "labels"),
    (lambda a: a.update(labels=a["labels"].double()), TypeError, "labels"),
    (lambda a: a.update(ref_labels=None), ValueError, "ref_labels"),
    (lambda a: a.update(ref=None, self_index=None), ValueError, "ref_embeddings"),
    (lambda a: a.update(ref=a["ref"][:, :-1]), ValueError, "ref_embeddings"),
    (lambda a: a.update(ref_labels=a["ref_labels"][:-2]), ValueError, "ref_labels"),
    (lambda a: a.update(self_index=a["self_index"][:-1]), ValueError, "ref_self_index"),
    (lambda a: a.update(self_index=a["self_index"] + 100), ValueError, "ref_self_index"),
    (lambda a: a.update(self_index=a["self_index"] - 100), ValueError, "ref_self_index"),
    (lambda a: a.update(self_index=a["self_index"].roll(1)), ValueError, "ref_self_index"),
])
def test_bad_inputs_name_the_argument(mutate, error, name):
    emb, labels, ref, ref_labels, self_index = _inputs()
    args = {"emb": emb, "labels": labels, "ref": ref, "ref_labels": ref_labels,
            "self_index": self_index}
    mutate(args)
    with pytest.raises(error, match=name):
        ContrastiveLoss()(args["emb"], args["labels"], args["ref"], args["ref_labels"],
                          ref_self_index=args["self_index"])


def test_self_index_without_reference_is_rejected():
    emb, labels, *_ = _inputs()
    with pytest.raises(ValueError, match="ref_self_index"):
        TripletLoss()(emb, labels, ref_self_index=torch.zeros(12, dtype=torch.long))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_inputs_raise(bad):
    emb, labels, ref, ref_labels, self_index = _inputs()
    broken = emb.clone()
    broken[3, 1] = bad
    with pytest.raises(ValueError, match="embeddings"):
        MultiSimilarityLoss()(broken, labels)
    broken_ref = ref.clone()
    broken_ref[5, 0] = bad
    with pytest.raises(ValueError, match="ref_embeddings contains non-finite"):
        MultiSimilarityLoss()(emb, labels, broken_ref, ref_labels, ref_self_index=self_index)


def test_non_finite_loss_is_not_hidden():
    emb, labels, ref, ref_labels, self_index = _inputs()
    # a denormal temperature overflows exp(S / T): the loss must show it
    loss = SupConLoss(temperature=1e-310, mining=False)
    x = emb.clone().requires_grad_(True)
    value = loss(x, labels, ref, ref_labels, ref_self_index=self_index)
    assert not torch.isfinite(value)
    value.backward()
    assert not torch.isfinite(x.grad).all()


@pytest.mark.parametrize("factory,error", [
    (lambda: ContrastiveLoss(margin=math.nan), ValueError),
    (lambda: ContrastiveLoss(reduction="mean"), ValueError),
    (lambda: MultiSimilarityLoss(alpha=0.0), ValueError),
    (lambda: MultiSimilarityLoss(beta="40"), TypeError),
    (lambda: TripletLoss(mining="easy"), ValueError),
    (lambda: SupConLoss(temperature=-1.0), ValueError),
    (lambda: SupConLoss(pos_margin=-0.1), ValueError),
])
def test_bad_hyper_parameters(factory, error):
    with pytest.raises(error):
        factory()


# ----------------------------------------------------------------------------------
# build_loss
# ----------------------------------------------------------------------------------


def make_cfg(name):
    cfg = CfgNode()
    cfg.LOSS = CfgNode()
    cfg.LOSS.NAME = name
    cfg.LOSS.CONTRASTIVE = CfgNode({"MARGIN": 0.4, "REDUCTION": "pairs"})
    cfg.LOSS.MS = CfgNode({"ALPHA": 3.0, "BETA": 50.0, "BASE": 0.4, "MARGIN": 0.2,
                           "HARD_MINING": False})
    cfg.LOSS.TRIPLET = CfgNode({"MARGIN": 0.25, "MINING": "hard"})
    cfg.LOSS.SUPCON = CfgNode({"TEMPERATURE": 0.2, "POS_MARGIN": 0.1, "NEG_MARGIN": 0.9,
                               "MINING": False})
    return cfg


def test_build_loss_reads_every_key():
    loss = build_loss(make_cfg("contrastive"))
    assert isinstance(loss, ContrastiveLoss)
    assert (loss.margin, loss.reduction) == (0.4, "pairs")
    loss = build_loss(make_cfg("multi_similarity"))
    assert isinstance(loss, MultiSimilarityLoss)
    assert (loss.alpha, loss.beta, loss.base, loss.margin, loss.hard_mining) == (
        3.0, 50.0, 0.4, 0.2, False)
    loss = build_loss(make_cfg("triplet"))
    assert isinstance(loss, TripletLoss)
    assert (loss.margin, loss.mining) == (0.25, "hard")
    loss = build_loss(make_cfg("supcon"))
    assert isinstance(loss, SupConLoss)
    assert (loss.temperature, loss.pos_margin, loss.neg_margin, loss.mining) == (
        0.2, 0.1, 0.9, False)


def test_build_loss_rejects_unknown_name():
    with pytest.raises(ValueError, match="contrastive.*multi_similarity.*supcon.*triplet"):
        build_loss(make_cfg("arcface"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls,reference,kwargs", LOSS_CASES, ids=CASE_IDS)
def test_cuda_matches_cpu(cls, reference, kwargs):
    emb, labels, centres, gen = make_batch(12)
    ref, ref_labels, self_index = make_memory(emb, labels, centres, gen)
    cpu_value, cpu_grad, _ = loss_and_grad(cls(**kwargs), emb, labels, ref, ref_labels,
                                           ref_self_index=self_index)
    cuda = torch.device("cuda")
    value, grad, _ = loss_and_grad(cls(**kwargs), emb.to(cuda), labels.to(cuda),
                                   ref.to(cuda), ref_labels.to(cuda),
                                   ref_self_index=self_index.to(cuda))
    torch.testing.assert_close(value.cpu(), cpu_value)
    torch.testing.assert_close(grad.cpu(), cpu_grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_multi_similarity_accepts_half_precision_anchors(dtype):
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    labels = torch.arange(4).repeat_interleave(4)
    full = MultiSimilarityLoss()(emb, labels)
    half = MultiSimilarityLoss()(emb.to(dtype), labels)
    assert half.dtype == dtype
    assert half.float().item() == pytest.approx(full.item(), rel=2e-2)


@pytest.mark.parametrize("unit_refs", [True, False], ids=["unit-memory", "adapted-memory"])
@pytest.mark.parametrize("cls,reference,kwargs", LOSS_CASES, ids=CASE_IDS)
def test_unchecked_call_gives_the_same_bits(cls, reference, kwargs, unit_refs):
    """check_values=False (the trainer's call: no host synchronisation for the checks, the unit-norm
    question answered on the device) computes exactly what the checked call computes."""
    emb, labels, centres, gen = make_batch(21, dtype=torch.float32)
    ref, ref_labels, self_index = make_memory(emb, labels, centres, gen)
    if unit_refs:  # a plain XBM memory holds unit vectors: the checked call skips the column scaling
        ref = torch.nn.functional.normalize(ref, dim=1)
    from xbm.losses.base import _norm_flags

    assert bool(_norm_flags(torch.linalg.vector_norm(ref, dim=1))[1]) == unit_refs  # both paths are taken
    checked = loss_and_grad(cls(**kwargs), emb, labels, ref, ref_labels, ref_self_index=self_index)
    unchecked = loss_and_grad(cls(**kwargs), emb, labels, ref, ref_labels, ref_self_index=self_index,
                              check_values=False)
    assert torch.equal(checked[0], unchecked[0]) and torch.equal(checked[1], unchecked[1])
    in_batch = loss_and_grad(cls(**kwargs), emb, labels)
    assert torch.equal(in_batch[0], loss_and_grad(cls(**kwargs), emb, labels, check_values=False)[0])
