"""Memory adaptation (XBN, AXBN, EMA) against hand-written references."""

import io
import math
import statistics

import numpy as np
import pytest
import torch
from yacs.config import CfgNode

from xbm.memory import (
    EMAMomentMatching,
    KalmanMomentMatching,
    MomentMatching,
    build_adapter,
    moment_match,
)


def _numpy_moment_match(memory, batch, eps):
    m = memory.astype(np.float64)
    b = batch.astype(np.float64)
    return (m - m.mean(0)) / (m.std(0, ddof=1) + eps) * b.std(0, ddof=1) + b.mean(0)


@pytest.mark.parametrize("eps", [1e-5, 0.3])
def test_moment_match_formula(eps):
    rng = np.random.default_rng(0)
    memory = (rng.normal(size=(50, 7)) * rng.uniform(0.1, 3, 7) + rng.normal(size=7)).astype(np.float32)
    batch = (rng.normal(size=(9, 7)) * 0.5 - 1).astype(np.float32)
    out = moment_match(torch.from_numpy(memory), torch.from_numpy(batch), eps=eps)
    assert out.dtype == torch.float32 and out.shape == memory.shape
    np.testing.assert_allclose(out.numpy(), _numpy_moment_match(memory, batch, eps), rtol=1e-5, atol=1e-5)


def test_moment_match_returns_new_tensor_and_keeps_input():
    memory = torch.randn(10, 3)
    copy = memory.clone()
    out = moment_match(memory, torch.randn(4, 3))
    assert out.data_ptr() != memory.data_ptr()
    assert torch.equal(memory, copy)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_moment_match_low_precision_computes_in_float32(dtype):
    memory = torch.randn(40, 6).to(dtype)
    batch = torch.randn(8, 6)
    out = moment_match(memory, batch)
    assert out.dtype == dtype
    # statistics in float32, rounded once on output
    assert torch.equal(out, moment_match(memory.float(), batch).to(dtype))


def test_moment_match_errors():
    with pytest.raises(ValueError, match="width"):
        moment_match(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="batch_feats needs at least 2 rows"):
        moment_match(torch.randn(5, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="memory_feats must be a 2-D"):
        moment_match(torch.randn(5), torch.randn(5, 3))


def _sequence(seed, steps, dim=3, dtype=torch.float64):
    """(memory, batch) pairs with drifting moments and varying sizes."""
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for t in range(steps):
        rows = 6 + (t * 5) % 11
        batch_size = 2 + (t * 3) % 7
        memory = torch.randn(rows, dim, generator=gen, dtype=dtype) * (1 + t % 3) + t * 0.1
        batch = torch.randn(batch_size, dim, generator=gen, dtype=dtype) * 0.5 - 0.2 * t
        pairs.append((memory, batch))
    return pairs


def _columns(x):
    return [[float(v) for v in x[:, d]] for d in range(x.shape[1])]


def _hand_kalman(pairs, q, p0, r, interval, eps):
    """Plain-float AXBN: returns the expected adapted memories and gains, step by step."""
    outputs, gains = [], []
    mu = sigma = None
    p = gain = None
    for t, (memory, batch) in enumerate(pairs):
        b_cols = _columns(batch)
        b_mean = [statistics.mean(c) for c in b_cols]
        b_std = [statistics.stdev(c) for c in b_cols]
        if t == 0:
            mu, sigma, p = list(b_mean), list(b_std), p0
        else:
            if (t - 1) % interval == 0:
                p_prior = p + q
                gain = p_prior / (p_prior + r / len(batch))
                p = (1 - gain) * p_prior
            mu = [m + gain * (bm - m) for m, bm in zip(mu, b_mean)]
            sigma = [s + gain * (bs - s) for s, bs in zip(sigma, b_std)]
        gains.append(gain)
        m_cols = _columns(memory)
        m_mean = [statistics.mean(c) for c in m_cols]
        m_std = [statistics.stdev(c) for c in m_cols]
        expected = [
            [(z - m_mean[d]) * sigma[d] / (m_std[d] + eps) + mu[d] for d, z in enumerate(row)]
            for row in memory.tolist()
        ]
        outputs.append(expected)
    return outputs, gains


@pytest.mark.parametrize("interval", [1, 3])
@pytest.mark.parametrize("q,p0,r", [(1.0, 1.0, 0.01), (0.01, 0.5, 2.0)])
def test_kalman_matches_scalar_recursion(interval, q, p0, r):
    pairs = _sequence(interval, 10)
    expected, gains = _hand_kalman(pairs, q, p0, r, interval, eps=1e-5)
    adapter = KalmanMomentMatching(q=q, p0=p0, r=r, interval=interval)
    for (memory, batch), want, gain in zip(pairs, expected, gains):
        out = adapter(memory, batch)
        np.testing.assert_allclose(out.numpy(), np.array(want), rtol=1e-10, atol=1e-10)
        if gain is None:
            assert adapter.gain is None
        else:
            assert adapter.gain == pytest.approx(gain, rel=1e-12)
    if r > 1:  # a gain well below 1: the filter really smooths, unlike XBN
        assert max(g for g in gains if g is not None) < 0.6


def test_kalman_interval_keeps_gain_between_refreshes():
    adapter = KalmanMomentMatching(q=0.1, p0=1.0, r=1.0, interval=3)
    seen = []
    for memory, batch in _sequence(5, 8):
        adapter(memory, batch)
        seen.append(adapter.gain)
    assert seen[0] is None
    assert seen[1] == seen[2] == seen[3] != seen[4] == seen[5] == seen[6] != seen[7]


def _xbn_outputs(pairs, **kwargs):
    xbn = MomentMatching(**kwargs)
    return [xbn(m, b) for m, b in pairs]


def test_kalman_r0_equals_xbn_exactly():
    pairs = _sequence(7, 6, dim=5, dtype=torch.float32)
    adapter = KalmanMomentMatching(q=1.0, p0=1.0, r=0.0, interval=2)
    for (memory, batch), want in zip(pairs, _xbn_outputs(pairs)):
        assert torch.equal(adapter(memory, batch), want)


def test_ema_momentum0_equals_xbn_exactly():
    pairs = _sequence(8, 6, dim=5, dtype=torch.float32)
    adapter = EMAMomentMatching(momentum=0.0)
    for (memory, batch), want in zip(pairs, _xbn_outputs(pairs)):
        assert torch.equal(adapter(memory, batch), want)


def test_ema_matches_constant_gain_recursion():
    pairs = _sequence(9, 7)
    momentum = 0.3
    adapter = EMAMomentMatching(momentum=momentum)
    mu = sigma = None
    for memory, batch in pairs:
        b_cols = _columns(batch)
        b_mean = [statistics.mean(c) for c in b_cols]
        b_std = [statistics.stdev(c) for c in b_cols]
        if mu is None:
            mu, sigma = b_mean, b_std
        else:
            mu = [momentum * m + (1 - momentum) * bm for m, bm in zip(mu, b_mean)]
            sigma = [momentum * s + (1 - momentum) * bs for s, bs in zip(sigma, b_std)]
        out = adapter(memory, batch)
        assert out.mean(0).tolist() == pytest.approx(mu, rel=1e-9, abs=1e-9)
        # the adapted std is sigma * std(memory) / (std(memory) + eps)
        m_std = [statistics.stdev(c) for c in _columns(memory)]
        want_std = [s * ms / (ms + 1e-5) for s, ms in zip(sigma, m_std)]
        assert out.std(0).tolist() == pytest.approx(want_std, rel=1e-9)


@pytest.mark.parametrize(
    "make",
    [
        lambda: KalmanMomentMatching(q=0.05, p0=1.0, r=1.0, interval=2),
        lambda: EMAMomentMatching(momentum=0.4),
        lambda: MomentMatching(),
    ],
)
def test_state_dict_round_trip_mid_sequence(make):
    pairs = _sequence(11, 10, dtype=torch.float32)
    original = make()
    for memory, batch in pairs[:5]:
        original(memory, batch)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    fresh = make()
    diverged = False
    for memory, batch in pairs[5:]:
        a, b = original(memory, batch), resumed(memory, batch)
        assert torch.equal(a, b)
        diverged |= not torch.equal(a, fresh(memory, batch))
    # a fresh filter differs, so the state really carried information (XBN is stateless)
    assert diverged == (not isinstance(original, MomentMatching))


def test_load_state_dict_missing_keys():
    with pytest.raises(ValueError, match="missing keys"):
        KalmanMomentMatching().load_state_dict({"calls": 1})


def test_reset_restarts_filter():
    pairs = _sequence(12, 6, dtype=torch.float32)
    adapter = KalmanMomentMatching(q=0.05, r=1.0)
    for memory, batch in pairs:
        adapter(memory, batch)
    adapter.reset()
    fresh = KalmanMomentMatching(q=0.05, r=1.0)
    for memory, batch in pairs[:3]:
        assert torch.equal(adapter(memory, batch), fresh(memory, batch))


@pytest.mark.parametrize("make", [MomentMatching, KalmanMomentMatching, EMAMomentMatching])
def test_apply_in_place_equals_call(make):
    pairs = _sequence(13, 4, dim=6, dtype=torch.float32)
    out_of_place, in_place = make(), make()
    for memory, batch in pairs:
        want = out_of_place(memory, batch)
        target = memory.clone()
        returned = in_place.apply_(target, batch)
        assert returned.data_ptr() == target.data_ptr()
        assert torch.allclose(target, want, atol=1e-6)


def test_renormalize_gives_unit_rows():
    memory, batch = _sequence(14, 1, dim=8, dtype=torch.float32)[0]
    plain = MomentMatching()(memory, batch)
    unit = MomentMatching(renormalize=True)(memory, batch)
    assert torch.allclose(unit.norm(dim=1), torch.ones(len(unit)), atol=1e-6)
    assert torch.allclose(unit, plain / plain.norm(dim=1, keepdim=True), atol=1e-6)
    target = memory.clone()
    KalmanMomentMatching(renormalize=True).apply_(target, batch)
    assert torch.allclose(target.norm(dim=1), torch.ones(len(target)), atol=1e-6)
    half = memory.half()
    MomentMatching(renormalize=True).apply_(half, batch)
    assert half.dtype == torch.float16
    assert torch.allclose(half.float().norm(dim=1), torch.ones(len(half)), atol=2e-3)


def test_low_precision_memory_statistics_in_float32():
    gen = torch.Generator().manual_seed(15)
    memory = torch.randn(30, 4, generator=gen).half()
    batch = torch.randn(6, 4, generator=gen)
    adapter = KalmanMomentMatching()
    out = adapter(memory, batch)
    assert out.dtype == torch.float16
    assert adapter.mu.dtype == torch.float32 and adapter.sigma.dtype == torch.float32
    assert torch.equal(out, KalmanMomentMatching()(memory.float(), batch).half())


def test_adapter_argument_errors():
    with pytest.raises(ValueError, match="q must be >= 0"):
        KalmanMomentMatching(q=-1)
    with pytest.raises(ValueError, match="interval"):
        KalmanMomentMatching(interval=0)
    with pytest.raises(ValueError, match="both be 0"):
        KalmanMomentMatching(q=0, r=0)
    with pytest.raises(ValueError, match="momentum"):
        EMAMomentMatching(momentum=1.5)
    with pytest.raises(ValueError, match="eps"):
        MomentMatching(eps=-1)


def _adapt_cfg(name, **overrides):
    values = {
        "NAME": name,
        "EPS": 1e-5,
        "RENORMALIZE": False,
        "KALMAN_Q": 1.0,
        "KALMAN_P0": 1.0,
        "KALMAN_R": 0.01,
        "KALMAN_INTERVAL": 1,
        "EMA_MOMENTUM": 0.1,
    }
    values.update(overrides)
    cfg = CfgNode()
    cfg.XBM = CfgNode({"ADAPT": CfgNode(values)})
    return cfg


def test_build_adapter():
    assert build_adapter(_adapt_cfg("none")) is None
    xbn = build_adapter(_adapt_cfg("XBN", EPS=0.1, RENORMALIZE=True))
    assert isinstance(xbn, MomentMatching) and xbn.eps == 0.1 and xbn.renormalize
    axbn = build_adapter(_adapt_cfg("axbn", KALMAN_Q=0.5, KALMAN_P0=2.0, KALMAN_R=0.3, KALMAN_INTERVAL=100))
    assert isinstance(axbn, KalmanMomentMatching)
    assert (axbn.q, axbn.p0, axbn.r, axbn.interval) == (0.5, 2.0, 0.3, 100)
    ema = build_adapter(_adapt_cfg("ema", EMA_MOMENTUM=0.25))
    assert isinstance(ema, EMAMomentMatching) and ema.momentum == 0.25
    with pytest.raises(ValueError, match=r"\['none', 'xbn', 'axbn', 'ema', 'xbn_age', 'xbn_full'\]"):
        build_adapter(_adapt_cfg("batchnorm"))


def test_adapted_moments_match_target():
    # XBN's defining property, checked on a large random memory: the adapted
    # memory has the batch's per-dimension mean and (up to eps) std.
    gen = torch.Generator().manual_seed(16)
    memory = torch.randn(2000, 16, generator=gen, dtype=torch.float64) * 4 + 3
    batch = torch.randn(64, 16, generator=gen, dtype=torch.float64) * 0.1 - 0.02
    out = moment_match(memory, batch)
    assert torch.allclose(out.mean(0), batch.mean(0), atol=1e-12)
    ratio = memory.std(0) / (memory.std(0) + 1e-5)
    assert torch.allclose(out.std(0), batch.std(0) * ratio, rtol=1e-10)
    assert not math.isnan(float(out.sum()))


@pytest.mark.parametrize("interval", [1, 3])
@pytest.mark.parametrize("target", [0.99, 0.9, 0.5, 0.1])
def test_kalman_gain_settles_where_the_closed_form_says(target, interval):
    """kalman_r_for_gain's r, run through the filter itself: its gain converges to the target."""
    from xbm.memory import kalman_r_for_gain, kalman_steady_gain

    r = kalman_r_for_gain(target, q=1.0, batch_size=16)
    assert kalman_steady_gain(1.0, r, 16) == pytest.approx(target, rel=1e-12)
    adapter = KalmanMomentMatching(q=1.0, p0=1.0, r=r, interval=interval)
    memory, batch = torch.randn(32, 4), torch.randn(16, 4)
    gains = []
    for _ in range(300):
        adapter(memory, batch)
        gains.append(adapter.gain)
    assert gains[-1] == pytest.approx(target, rel=1e-6)
    assert gains[1] == pytest.approx(2.0 / (2.0 + r / 16))  # the first update: p- = p0 + q = 2
    with pytest.raises(ValueError, match="gain"):
        kalman_r_for_gain(0.0, 1.0, 16)
