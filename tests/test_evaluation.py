"""Tests for xbm.evaluation: k-NN search and Recall@K / MAP@R / R-precision."""

import math

import numpy as np
import pytest
import torch

from xbm.evaluation import evaluate, knn, map_at_r, r_precision, recall_at_k
from xbm.evaluation.search import _drop_self

try:
    import faiss  # noqa: F401
    BACKENDS = ["faiss", "torch"]
except ImportError:
    BACKENDS = ["torch"]


def unit_rows(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_set(seed, n=240, dim=12, num_classes=100, num_duplicates=30):
    """Random unit vectors; some rows are exact copies of another row of the same class."""
    rng = np.random.default_rng(seed)
    x = unit_rows(rng.standard_normal((n, dim)))
    labels = rng.integers(0, num_classes, n)
    src = rng.choice(n, num_duplicates, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), num_duplicates, replace=False)
    x[dst], labels[dst] = x[src], labels[src]
    return x, labels


def brute_force(q, q_labels, g=None, g_labels=None, ks=(1, 10, 100, 1000)):
    """Reference: full similarity matrix, a sort per query, plain Python loops."""
    leave_one_out = g is None
    if leave_one_out:
        g, g_labels = q, q_labels
    sims = q.astype(np.float64) @ g.astype(np.float64).T
    hits = dict.fromkeys(ks, 0)
    ap, rp, with_positive = [], [], 0
    for i in range(len(q)):
        candidates = [j for j in range(len(g)) if not (leave_one_out and j == i)]
        order = sorted(candidates, key=lambda j: -sims[i, j])
        rel = [bool(g_labels[j] == q_labels[i]) for j in order]
        for k in ks:
            hits[k] += any(rel[:k])
        r = sum(rel)
        if r == 0:
            continue
        with_positive += 1
        rp.append(sum(rel[:r]) / r)
        precisions = [sum(rel[:i + 1]) / (i + 1) for i in range(r) if rel[i]]
        ap.append(sum(precisions) / r)
    return {
        "recall": {k: hits[k] / len(q) for k in ks},
        "MAP@R": float(np.mean(ap)) if ap else math.nan,
        "RP": float(np.mean(rp)) if rp else math.nan,
        "without_positive": len(q) - with_positive,
    }


def assert_matches_reference(result, ref, ks):
    for k in ks:
        assert result[f"R@{k}"] == pytest.approx(ref["recall"][k], abs=1e-12)
    assert result["MAP@R"] == pytest.approx(ref["MAP@R"], abs=1e-12)
    assert result["RP"] == pytest.approx(ref["RP"], abs=1e-12)
    assert result["num_queries_without_positive"] == ref["without_positive"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_leave_one_out_matches_brute_force(backend):
    x, labels = random_set(0)
    ks = (1, 2, 5, 10, 100, 1000)
    ref = brute_force(x, labels, ks=ks)
    assert 0 < ref["recall"][1] < ref["recall"][10] < 1  # non-trivial data
    assert ref["without_positive"] > 0
    result = evaluate(x, labels, ks=ks, backend=backend)
    assert_matches_reference(result, ref, ks)
    assert result["num_neighbors"] == len(x) - 1  # clamped from 1000
    assert result["num_queries"] == len(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_to_gallery_matches_brute_force(backend):
    q, q_labels = random_set(1, n=90)
    g, g_labels = random_set(2, n=200)
    q[:10], q_labels[:10] = g[:10], g_labels[:10]  # queries with exact copies in the gallery
    q_labels[10:15] = 999  # labels absent from the gallery
    ks = (1, 3, 10, 50)
    ref = brute_force(q, q_labels, g, g_labels, ks=ks)
    result = evaluate(q, q_labels, g, g_labels, ks=ks, backend=backend)
    assert_matches_reference(result, ref, ks)
    assert result["num_queries_without_positive"] >= 5


def test_hand_made_leave_one_out():
    # Unit vectors on a circle at these angles: similarity order = angle distance.
    x = unit_rows(np.stack([np.cos(np.radians([0, 10, 25, 45, 70])),
                            np.sin(np.radians([0, 10, 25, 45, 70]))], axis=1))
    labels = [0, 1, 0, 0, 1]
    # Neighbour labels in order (relevant = 1):
    #   q0: 1,0,0,1 -> rel 0,1,1,0  R=2  RP 1/2  AP (1/2)(1/2)     = 1/4
    #   q1: 0,0,0,1 -> rel 0,0,0,1  R=1  RP 0    AP 0
    #   q2: 1,0,0,1 -> rel 0,1,1,0  R=2  RP 1/2  AP 1/4
    #   q3: 0,1,1,0 -> rel 1,0,0,1  R=2  RP 1/2  AP (1/2)(1/1)     = 1/2
    #   q4: 0,0,1,0 -> rel 0,0,1,0  R=1  RP 0    AP 0
    result = evaluate(x, labels, ks=(1, 2, 3, 4))
    assert result["R@1"] == pytest.approx(1 / 5)
    assert result["R@2"] == pytest.approx(3 / 5)
    assert result["R@3"] == pytest.approx(4 / 5)
    assert result["R@4"] == pytest.approx(1.0)
    assert result["RP"] == pytest.approx(1.5 / 5)
    assert result["MAP@R"] == pytest.approx(1.0 / 5)
    assert map_at_r(x, labels) == pytest.approx(0.2)
    assert r_precision(x, labels) == pytest.approx(0.3)


def test_hand_made_query_to_gallery_with_missing_label():
    def circle(deg):
        return unit_rows(np.stack([np.cos(np.radians(deg)), np.sin(np.radians(deg))], axis=1))

    gallery, g_labels = circle([0, 30, 60, 90]), [1, 2, 1, 3]
    query, q_labels = circle([5, 50, 80]), [1, 2, 7]
    # q0 sees labels 1,2,1,3: R=2, rel 1,0,1,0 -> RP 1/2, AP (1/2)(1) = 1/2
    # q1 sees labels 1,2,3,1: R=1, rel 0,1,0,0 -> RP 0, AP 0
    # q2 has label 7, absent from the gallery: a recall miss, left out of MAP@R / RP
    result = evaluate(query, q_labels, gallery, g_labels, ks=(1, 2, 100))
    assert result["R@1"] == pytest.approx(1 / 3)
    assert result["R@2"] == pytest.approx(2 / 3)
    assert result["R@100"] == pytest.approx(2 / 3)
    assert result["MAP@R"] == pytest.approx(0.25)
    assert result["RP"] == pytest.approx(0.25)
    assert result["num_queries_without_positive"] == 1
    assert result["num_neighbors"] == 4
    assert recall_at_k(query, q_labels, gallery, g_labels, ks=(2, 1)) == {
        1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_of_query_do_not_count_as_self(backend):
    # Rows 0-5: six copies of the vector at 0 degrees, each with its own label, so no
    # copy is a positive of another.  Row 6 at 90 degrees (label 0), row 7 at 100
    # (label 1).  Keeping a query's own copy instead of a twin (dropping "the
    # first hit" rather than self) would turn R@1 of rows 0-5 into hits.
    angles = np.radians([0, 0, 0, 0, 0, 0, 90, 100])
    x = unit_rows(np.stack([np.cos(angles), np.sin(angles)], axis=1))
    labels = np.array([0, 1, 2, 3, 4, 5, 0, 1])
    s, ids = knn(x, k=5, backend=backend)
    assert not (ids == np.arange(len(x))[:, None]).any()
    for i in range(6):
        assert set(ids[i]) == set(range(6)) - {i}
    np.testing.assert_allclose(s[:6], 1.0, atol=1e-6)
    # k = 2 with five tied copies: self may fall outside the k + 1 candidates,
    # the result must still be two of the other copies.
    _, ids2 = knn(x, k=2, backend=backend)
    for i in range(6):
        assert len(set(ids2[i])) == 2 and set(ids2[i]) <= set(range(6)) - {i}
    # First hits: q0 at rank 6 (row 6), q1 at rank 7 (row 7), q2-q5 never (R = 0),
    # q6 and q7 within 7 (the copies hold their labels); nobody at rank 1.
    result = evaluate(x, labels, ks=(1, 7), backend=backend)
    assert result["R@1"] == 0.0
    assert result["R@7"] == pytest.approx(4 / 8)
    assert result["MAP@R"] == 0.0 and result["RP"] == 0.0
    assert result["num_queries_without_positive"] == 4


def test_drop_self_removes_own_index_wherever_it_is():
    sims = torch.tensor([[1.0, 1.0, 0.5], [1.0, 1.0, 1.0], [0.9, 0.8, 0.7]])
    ids = torch.tensor([[7, 3, 9], [4, 5, 6], [2, 1, 0]])
    self_ids = torch.tensor([3, 8, 0])
    s, i = _drop_self(sims, ids, self_ids, 2)
    assert i.tolist() == [[7, 9], [4, 5], [2, 1]]  # row 1: self absent -> last dropped
    torch.testing.assert_close(s, torch.tensor([[1.0, 0.5], [1.0, 1.0], [0.9, 0.8]]))


def test_backends_agree_on_neighbours_and_metrics():
    if len(BACKENDS) < 2:
        pytest.skip("faiss not installed")
    rng = np.random.default_rng(4)
    x = unit_rows(rng.standard_normal((300, 16)))  # continuous data: no exact ties
    s_f, i_f = knn(x, k=20, backend="faiss")
    s_t, i_t = knn(x, k=20, backend="torch")
    np.testing.assert_array_equal(i_f, i_t)
    np.testing.assert_allclose(s_f, s_t, atol=1e-5)
    order = np.argsort(-(x @ x.T) + 10 * np.eye(300), axis=1, kind="stable")[:, :20]
    np.testing.assert_array_equal(i_f, order)
    xd, ld = random_set(5)
    assert evaluate(xd, ld, backend="faiss") == pytest.approx(
        evaluate(xd, ld, backend="torch"), abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunking_gives_the_same_result(backend):
    x, labels = random_set(6, n=150)
    whole_s, whole_i = knn(x, k=9, backend=backend, chunk_size=10_000)
    for chunk in (1, 7, 64):
        s, i = knn(x, k=9, backend=backend, chunk_size=chunk)
        # Other chunk shapes may use other BLAS kernels: equal up to rounding.
        np.testing.assert_allclose(s, whole_s, atol=1e-6)
        # Only exact duplicates (similarity 1) are tied and may swap places.
        assert ((i == whole_i) | np.isclose(s, 1.0)).all()
        assert evaluate(x, labels, ks=(1, 5, 20), backend=backend, chunk_size=chunk) == \
            pytest.approx(evaluate(x, labels, ks=(1, 5, 20), backend=backend), abs=1e-12)


def test_knn_types_devices_and_clamping():
    x, _ = random_set(7, n=30, num_duplicates=0)
    s, i = knn(x, k=4)
    assert isinstance(s, np.ndarray) and s.dtype == np.float32 and i.dtype == np.int64
    assert s.shape == i.shape == (30, 4)
    assert (np.diff(s, axis=1) <= 0).all()
    st, it = knn(torch.from_numpy(x).double(), k=4)
    assert isinstance(st, torch.Tensor) and it.dtype == torch.int64
    np.testing.assert_array_equal(it.numpy(), i)
    with pytest.warns(UserWarning, match="k=50"):
        s, i = knn(x, k=50)
    assert i.shape == (30, 29)
    assert sorted(i[0]) == list(range(1, 30))
    # Plain self-search keeps self first; an explicit gallery is not leave-one-out.
    _, i_self = knn(x, k=1, exclude_self=False)
    np.testing.assert_array_equal(i_self[:, 0], np.arange(30))
    _, i_gal = knn(x, x, k=1)
    np.testing.assert_array_equal(i_gal[:, 0], np.arange(30))
    _, i_gal_loo = knn(x, x, k=29, exclude_self=True)
    np.testing.assert_array_equal(np.sort(i_gal_loo, axis=1), np.sort(i[:, :29], axis=1))


def test_recall_beyond_gallery_size_and_return_types():
    x, labels = random_set(8, n=40, num_classes=15, num_duplicates=0)
    rec = recall_at_k(torch.from_numpy(x), torch.from_numpy(labels), ks=(1, 10, 1000))
    assert list(rec) == [1, 10, 1000]
    assert all(type(v) is float and 0.0 <= v <= 1.0 for v in rec.values())
    r = np.bincount(labels)[labels] - 1
    assert rec[1000] == pytest.approx(float((r > 0).mean()))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, labels = random_set(9)
    xt, lt = torch.from_numpy(x).cuda(), torch.from_numpy(labels).cuda()
    assert evaluate(xt, lt) == pytest.approx(evaluate(x, labels, backend="torch"), abs=1e-12)
    s, i = knn(xt, k=5)
    assert s.device.type == "cuda" and i.device.type == "cuda"


def test_errors_name_the_argument():
    x, labels = random_set(10, n=20, num_duplicates=0)
    with pytest.raises(ValueError, match="q_labels"):
        evaluate(x, labels[:-1])
    with pytest.raises(ValueError, match="g_labels"):
        evaluate(x, labels, x, labels[:5])
    with pytest.raises(ValueError, match="query"):
        knn(x[0], k=1)
    with pytest.raises(ValueError, match="width"):
        knn(x, x[:, :5], k=1)
    with pytest.raises(ValueError, match="query"):
        evaluate(x[:0], labels[:0])
    with pytest.raises(ValueError, match="gallery"):
        knn(x, x[:0], k=1)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="query.*NaN"):
        evaluate(bad, labels)
    bad[3, 2] = np.inf
    with pytest.raises(ValueError, match="gallery"):
        knn(x, bad, k=1)
    with pytest.raises(TypeError, match="q_labels"):
        evaluate(x, labels.astype(np.float32))
    with pytest.raises(TypeError, match="g_labels"):
        evaluate(x, labels, x, torch.ones(20, dtype=torch.bool))
    with pytest.raises(TypeError, match="query"):
        knn(np.zeros((3, 2), dtype=np.int64), k=1)
    with pytest.raises(ValueError, match="g_labels"):
        evaluate(x, labels, x)
    with pytest.raises(ValueError, match="backend"):
        knn(x, k=1, backend="annoy")
    with pytest.raises(ValueError, match="k must"):
        knn(x, k=0)
    with pytest.raises(ValueError, match="ks"):
        recall_at_k(x, labels, ks=())
    with pytest.raises(ValueError, match="ks"):
        recall_at_k(x, labels, ks=(0, 1))
    with pytest.raises(ValueError, match="metrics"):
        evaluate(x, labels, metrics=("nmi",))
    with pytest.raises(ValueError, match="chunk_size"):
        knn(x, k=1, chunk_size=0)
    with pytest.raises(ValueError, match="at least 2"):
        knn(x[:1], k=1)
    with pytest.raises(ValueError, match="exclude_self"):
        knn(x, x[:10], k=1, exclude_self=True)
