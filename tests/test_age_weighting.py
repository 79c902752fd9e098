"""Age weighting of the memory's pairs (XBM.AGE_WEIGHT_SCALE): the weighted losses against plain loops,
the weights themselves, and the objective passing them for the memory term only."""
import math

import pytest
import torch

from xbm import CrossBatchObjective
from xbm.losses import ContrastiveLoss, MultiSimilarityLoss, SupConLoss
from xbm.memory import CrossBatchMemory
from xbm.memory.age_weighting import AgeWeighting


def _data(seed=0, batch=6, refs=20, dim=5, classes=3):
    g = torch.Generator().manual_seed(seed)
    anchors = torch.randn(batch, dim, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(classes, (batch,), generator=g)
    ref = torch.randn(refs, dim, generator=g, dtype=torch.float64)
    ref_labels = torch.randint(classes, (refs,), generator=g)
    weights = torch.rand(refs, generator=g, dtype=torch.float64) * 2
    self_index = torch.full((batch,), -1)
    self_index[0] = int((ref_labels == labels[0]).nonzero()[0]) if (ref_labels == labels[0]).any() else -1
    return anchors, labels, ref, ref_labels, weights, self_index


def _cosines(anchors, ref):
    a = anchors / anchors.norm(dim=1, keepdim=True)
    r = ref / ref.norm(dim=1, keepdim=True)
    return a @ r.T


def _weighted_contrastive_loop(anchors, labels, ref, ref_labels, w, self_index, margin, reduction):
    sim = _cosines(anchors, ref)
    total, active = anchors.new_zeros(()), 0.0
    for i in range(sim.shape[0]):
        for j in range(sim.shape[1]):
            if j == self_index[i]:
                continue
            s = sim[i, j]
            if labels[i] == ref_labels[j] and s < 1 - 1e-5:
                total, active = total + w[j] * (1 - s), active + float(w[j])
            elif labels[i] != ref_labels[j] and s > margin:
                total, active = total + w[j] * s, active + float(w[j])
    return total / sim.shape[0] if reduction == "batch" else total / active


def _weighted_supcon_loop(anchors, labels, ref, ref_labels, w, self_index, t, pos_margin, neg_margin):
    sim = _cosines(anchors, ref)
    losses = []
    for i in range(sim.shape[0]):
        pos = [j for j in range(sim.shape[1]) if j != self_index[i] and labels[i] == ref_labels[j]
               and sim[i, j] < 1 - pos_margin ** 2 / 2]
        neg = [j for j in range(sim.shape[1]) if labels[i] != ref_labels[j] and sim[i, j] > 1 - neg_margin ** 2 / 2]
        if not (len(pos) >= 2 or (len(pos) >= 1 and len(neg) >= 1)):
            continue
        big_w = sum(w[p] for p in pos)
        if big_w == 0:  # its positives weigh nothing: no loss
            continue
        log_z = torch.logsumexp(torch.stack([sim[i, k] / t + torch.log(w[k]) for k in pos + neg]), 0)
        losses.append(sum(w[p] / big_w * (log_z - sim[i, p] / t) for p in pos if w[p] > 0))
    return torch.stack(losses).mean() if losses else anchors.sum() * 0


@pytest.mark.parametrize("reduction", ["batch", "pairs"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_contrastive_loss_and_gradient_match_a_plain_loop(seed, reduction):
    anchors, labels, ref, ref_labels, w, self_index = _data(seed)
    loss = ContrastiveLoss(margin=0.1, reduction=reduction)
    value = loss(anchors, labels, ref, ref_labels, ref_self_index=self_index, ref_weights=w)
    grad, = torch.autograd.grad(value, anchors)
    expected = _weighted_contrastive_loop(anchors, labels, ref, ref_labels, w, self_index, 0.1, reduction)
    expected_grad, = torch.autograd.grad(expected, anchors)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("neg_margin", [1.3, 0.9])  # a wide miner (most pairs count) and the default one
@pytest.mark.parametrize("zeros", [False, True])  # some references weigh exactly 0
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_supcon_loss_and_gradient_match_a_plain_loop(seed, zeros, neg_margin):
    anchors, labels, ref, ref_labels, w, self_index = _data(seed)
    if zeros:
        w[::2] = 0.0
    loss = SupConLoss(temperature=0.1, pos_margin=0.2, neg_margin=neg_margin)
    value = loss(anchors, labels, ref, ref_labels, ref_self_index=self_index, ref_weights=w)
    grad, = torch.autograd.grad(value, anchors)
    expected = _weighted_supcon_loop(anchors, labels, ref, ref_labels, w, self_index, 0.1, 0.2, neg_margin)
    expected_grad, = torch.autograd.grad(expected, anchors)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", [ContrastiveLoss(margin=0.1, reduction="pairs"), SupConLoss(neg_margin=1.3)])
def test_unit_weights_give_the_unweighted_loss(loss):
    anchors, labels, ref, ref_labels, _, self_index = _data(3)
    plain = loss(anchors, labels, ref, ref_labels, ref_self_index=self_index)
    plain_grad, = torch.autograd.grad(plain, anchors)
    weighted = loss(anchors, labels, ref, ref_labels, ref_self_index=self_index,
                    ref_weights=torch.ones(len(ref), dtype=torch.float64))
    weighted_grad, = torch.autograd.grad(weighted, anchors)
    torch.testing.assert_close(weighted, plain, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(weighted_grad, plain_grad, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("loss", [ContrastiveLoss(margin=0.1, reduction="pairs"), SupConLoss(neg_margin=1.3)])
def test_weights_that_underflow_give_a_finite_loss_and_gradient(loss):
    anchors, labels, ref, ref_labels, _, self_index = _data(4)
    anchors32 = anchors.detach().float().requires_grad_()
    tiny = torch.full((len(ref),), 1e-44)  # subnormal in float32: 1 / w overflows
    value = loss(anchors32, labels, ref.float(), ref_labels, ref_self_index=self_index, ref_weights=tiny)
    grad, = torch.autograd.grad(value, anchors32)
    assert torch.isfinite(value) and torch.isfinite(grad).all()


def test_a_loss_without_weights_refuses_them_by_name():
    anchors, labels, ref, ref_labels, w, _ = _data(0)
    with pytest.raises(ValueError, match="MultiSimilarityLoss does not weight reference rows"):
        MultiSimilarityLoss()(anchors, labels, ref, ref_labels, ref_weights=w)
    with pytest.raises(ValueError, match=r"one weight per reference row \(20,\)"):
        SupConLoss()(anchors, labels, ref, ref_labels, ref_weights=w[:3])


def test_age_weights_decay_with_the_age_in_iterations_and_average_one():
    memory = CrossBatchMemory(12, 2)
    for step in range(4):  # 3 rows per iteration: slots 0-2 are the oldest (age 3 iterations)
        memory.enqueue(torch.randn(3, 2), torch.arange(3))
    weights = AgeWeighting(scale=2.0).weights(memory, rows_per_iteration=3)
    ages = torch.tensor([3, 3, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0], dtype=torch.float64)
    raw = torch.exp(-ages / 2.0)
    torch.testing.assert_close(weights.double(), raw / raw.mean())
    assert math.isclose(float(weights.mean()), 1.0, rel_tol=1e-6)
    memory.enqueue(torch.randn(3, 2), torch.arange(3))  # wraps: slots 0-2 are now the newest
    assert AgeWeighting(2.0).weights(memory, 3)[:3].tolist() == pytest.approx([weights[-1].item()] * 3)
    half = CrossBatchMemory(12, 2)
    half.enqueue(torch.randn(6, 2), torch.arange(6))  # half full: the valid rows only
    assert AgeWeighting(2.0).weights(half, 3).shape == (6,)
    with pytest.raises(ValueError, match="scale must be > 0"):
        AgeWeighting(0.0)
    old = CrossBatchMemory(4000, 2)
    for _ in range(1000):  # ages 0 .. 999 iterations at a scale of 1: exp(-999) underflows, the floor does not
        old.enqueue(torch.randn(4, 2), torch.arange(4))
    floored = AgeWeighting(1.0).weights(old, 4)
    assert float(floored.min()) > 0 and float(floored.min() / floored.max()) == pytest.approx(1e-6, rel=1e-3)


def test_the_objective_weights_the_memory_term_only():
    torch.manual_seed(0)
    memory_a, memory_b = CrossBatchMemory(32, 4), CrossBatchMemory(32, 4)
    weighting = AgeWeighting(scale=1.5)
    weighted = CrossBatchObjective(SupConLoss(neg_margin=1.3), memory_a, age_weighting=weighting)
    plain = CrossBatchObjective(SupConLoss(neg_margin=1.3), memory_b)
    for step in range(3):
        emb = torch.nn.functional.normalize(torch.randn(8, 4, dtype=torch.float64), dim=1).requires_grad_()
        labels = torch.arange(8) % 3
        _, parts_w = weighted(emb, labels, step)
        _, parts_p = plain(emb, labels, step)
        assert parts_w["loss/inbatch"] == parts_p["loss/inbatch"]
    # the last memory term by hand: 24 stored rows of 3 steps, ages 2, 1, 0 iterations, weighed so
    feats, mem_labels = memory_a.get()
    slots = torch.arange(16, 24)
    raw = torch.exp(-torch.tensor([2.0] * 8 + [1.0] * 8 + [0.0] * 8) / 1.5)
    expected = SupConLoss(neg_margin=1.3)(emb, labels, feats, mem_labels, ref_self_index=slots,
                                          ref_weights=raw / raw.mean())
    torch.testing.assert_close(parts_w["loss/memory"], expected.detach())
    assert not torch.isclose(parts_w["loss/memory"], parts_p["loss/memory"])
