"""The corrections beyond XBN's per-dimension moments: xbn_full (mean and covariance, against scipy's
matrix square root) and xbn_age (XBN per age cohort, against moment_match on each cohort)."""
import numpy as np
import pytest
import scipy.linalg
import torch

from xbm.config import get_cfg
from xbm.memory import (CohortMomentMatching, CovarianceMatching, CrossBatchMemory, MomentMatching, build_adapter,
                        moment_match)


def _correlated(rows, dim, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return (torch.randn(rows, dim, generator=g, dtype=torch.float64) @ mixing + shift)


def _reference_full(memory, batches, momentum, shrinkage, ridge):
    """The numpy/scipy reading of the module docstring, one call per batch; the last call's output."""
    target = None
    out = memory.numpy().copy()
    for batch in batches:
        b = batch.numpy()
        batch_cov = np.cov(b, rowvar=False)
        target = batch_cov if target is None else momentum * target + (1 - momentum) * batch_cov
        shrunk = (1 - shrinkage) * target + shrinkage * np.diag(np.diag(target))
        mem_cov = np.cov(out, rowvar=False)
        mem_cov = mem_cov + ridge * np.trace(mem_cov) / mem_cov.shape[0] * np.eye(mem_cov.shape[0])
        transform = np.real(scipy.linalg.sqrtm(shrunk)) @ np.linalg.inv(np.real(scipy.linalg.sqrtm(mem_cov)))
        out = (out - out.mean(0)) @ transform.T + b.mean(0)
    return out


def test_covariance_matching_matches_a_scipy_reference_over_two_calls():
    memory = _correlated(300, 6, 0)
    batches = [_correlated(5, 6, 1, shift=2.0), _correlated(5, 6, 2, shift=2.5)]  # rank 4 < 6 each
    adapter = CovarianceMatching(momentum=0.7, shrinkage=0.2, ridge=0.01)
    ours = memory.clone()
    for batch in batches:
        adapter.apply_(ours, batch)
    expected = _reference_full(memory, batches, 0.7, 0.2, 0.01)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-7, atol=1e-9)
    # the filter's state: 0.7 x first batch covariance + 0.3 x second
    cov = [np.cov(b.numpy(), rowvar=False) for b in batches]
    np.testing.assert_allclose(adapter.covariance.numpy(), 0.7 * cov[0] + 0.3 * cov[1], rtol=1e-10)


def test_covariance_matching_gives_the_memory_the_batch_covariance():
    """No filter, no shrinkage, a full-rank batch: the adapted memory has the batch's mean and
    covariance, which XBN (per-dimension only) does not achieve on correlated data."""
    memory, batch = _correlated(2000, 5, 3), _correlated(400, 5, 4, shift=-1.0)
    full = CovarianceMatching(momentum=0.0, shrinkage=0.0, ridge=1e-12).apply_(memory.clone(), batch)
    xbn = moment_match(memory, batch)
    target = np.cov(batch.numpy(), rowvar=False)
    np.testing.assert_allclose(np.cov(full.numpy(), rowvar=False), target, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(full.mean(0).numpy(), batch.mean(0).numpy(), atol=1e-9)
    assert np.abs(np.cov(xbn.numpy(), rowvar=False) - target).max() > 0.1


def test_covariance_matching_keeps_a_low_precision_memory_and_its_state_round_trips():
    memory = _correlated(64, 4, 5).to(torch.bfloat16)
    adapter = CovarianceMatching()
    out = adapter(memory, _correlated(8, 4, 6).float())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    restored = CovarianceMatching()
    restored.load_state_dict(adapter.state_dict())
    batch = _correlated(8, 4, 7).float()
    assert torch.equal(adapter(memory, batch), restored(memory, batch))
    with pytest.raises(ValueError, match="ridge"):
        CovarianceMatching(ridge=0.0)


def test_cohort_matching_is_moment_matching_per_cohort():
    memory, batch = _correlated(40, 3, 8).float(), _correlated(6, 3, 9, shift=1.0).float()
    ages = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    ours = CohortMomentMatching(groups=4).apply_(memory.clone(), batch, ages)
    for group in range(4):  # ages 0-9 newest cohort, ..., 30-39 oldest
        rows = ((ages >= 10 * group) & (ages < 10 * (group + 1))).nonzero().squeeze(1)
        torch.testing.assert_close(ours[rows], moment_match(memory[rows], batch), rtol=1e-6, atol=1e-6)
    one = CohortMomentMatching(groups=1).apply_(memory.clone(), batch, ages)
    assert torch.equal(one, MomentMatching().apply_(memory.clone(), batch))


def test_the_memory_gives_cohort_matching_the_ring_ages():
    """Through CrossBatchMemory: rows enqueued together stay in one cohort after the ring wraps."""
    memory = CrossBatchMemory(12, 3)
    for step in range(5):  # batches of 4 into 12 slots: the ring wraps
        memory.enqueue(_correlated(4, 3, 10 + step).float(), torch.full((4,), step))
    batch = _correlated(4, 3, 20).float()
    expected = memory.feats.clone()
    for step in (2, 3, 4):  # the cohorts of 3 groups over 12 rows = the last three batches
        rows = (memory.labels == step).nonzero().squeeze(1)
        expected[rows] = moment_match(memory.feats[rows], batch)
    memory.adapt_(CohortMomentMatching(groups=3), batch)
    torch.testing.assert_close(memory.feats, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="age"):
        CohortMomentMatching().apply_(memory.feats.clone(), batch)


def test_both_corrections_are_built_from_the_config():
    cfg = get_cfg()
    cfg.XBM.ADAPT.NAME, cfg.XBM.ADAPT.COVARIANCE_MOMENTUM, cfg.XBM.ADAPT.COVARIANCE_SHRINKAGE = "xbn_full", 0.5, 0.3
    cfg.XBM.ADAPT.COVARIANCE_RIDGE = 0.02
    full = build_adapter(cfg)
    assert (full.momentum, full.shrinkage, full.ridge) == (0.5, 0.3, 0.02)
    cfg.XBM.ADAPT.NAME, cfg.XBM.ADAPT.AGE_GROUPS = "xbn_age", 6
    assert build_adapter(cfg).groups == 6


def test_a_run_with_the_covariance_filter_resumes_to_the_same_bits(glyph_root, tmp_path):
    """xbn_full's running covariance rides in the checkpoint (xbn_age's only state is its call count)."""
    adapter = "xbn_full"
    from xbm.config import load_cfg
    from xbm.engine.defaults import DefaultTrainer

    def train(name, iters, resume=None):
        cfg = load_cfg("configs/glyphs_xbn.yaml", [
            "DATA.ROOT", str(glyph_root), "DATA.GLYPHS.MIN_FONTS", "4", "OUTPUT_DIR", str(tmp_path / name),
            "SOLVER.MAX_ITERS", str(iters), "XBM.START_ITERATION", "2", "XBM.SIZE", "48", "TEST.EVAL_PERIOD", "0",
            "XBM.ADAPT.NAME", adapter])
        trainer = DefaultTrainer(cfg, resume=resume)
        trainer.train()
        return trainer

    straight = train("straight", 8)
    train("halves", 4)
    resumed = train("halves", 8, resume=str(tmp_path / "halves" / "checkpoints" / "last.pth"))
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    assert torch.equal(resumed.objective.memory.feats, straight.objective.memory.feats)
    assert resumed.objective.adapter.calls == straight.objective.adapter.calls == 7
