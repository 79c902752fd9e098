"""The undo of a skipped step (xbm/memory/undo.py) and the adapter interface (xbm/memory/adapter.py).

The reference for every check is a second memory that is simply never given the step that is undone
(or never takes an undo point): the two must agree bit for bit, buffers and counters, rows past the
fill included (they are zeros in a memory that never swapped)."""
from __future__ import annotations

import pytest
import torch

from xbm.memory import (CallableAdapter, CohortMomentMatching, CovarianceMatching, CrossBatchMemory,
                        KalmanMomentMatching, MemoryAdapter, MomentMatching, as_memory_adapter)
from xbm.objective import CrossBatchObjective
from xbm.losses import ContrastiveLoss

DIM = 6


def _batch(seed: int, rows: int = 4):
    generator = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(rows, DIM, generator=generator), dim=1)
    return feats, torch.randint(0, 3, (rows,), generator=generator)


def _state(memory: CrossBatchMemory) -> dict:
    return {k: v.clone() for k, v in memory.state_dict().items()}


def _assert_same(a: CrossBatchMemory, b: CrossBatchMemory) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _step(memory: CrossBatchMemory, adapter, seed: int, undo: bool, rows: int = 4):
    feats, labels = _batch(seed, rows)
    point = memory.undo_point(rows, adapting=adapter is not None) if undo else None
    if adapter is not None and len(memory) > 0:
        memory.adapt_(adapter, feats)
    memory.enqueue(feats, labels, torch.arange(rows) + 100 * seed if memory.track_items else None)
    return point


ADAPTERS = {
    "xbn": MomentMatching,
    "xbn_renormalize": lambda: MomentMatching(renormalize=True),
    "axbn": lambda: KalmanMomentMatching(r=0.1),
    "xbn_full": lambda: CovarianceMatching(momentum=0.5),
    "xbn_age": lambda: CohortMomentMatching(groups=3),
}


@pytest.mark.parametrize("track_items", [False, True])
@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_out_of_place_adaptation_is_bit_identical_to_in_place(name, track_items):
    """Steps taken with an undo point (the adaptation written into the spare buffer, then swapped in) leave
    the memory exactly as steps without one (adapted in place), through the fill and the wrap-around."""
    undone, plain = (CrossBatchMemory(10, DIM, track_items=track_items) for _ in range(2))
    adapter_a, adapter_b = ADAPTERS[name](), ADAPTERS[name]()
    for seed in range(7):
        _step(undone, adapter_a, seed, undo=True)
        _step(plain, adapter_b, seed, undo=False)
        _assert_same(undone, plain)
        assert adapter_a.state_dict().keys() == adapter_b.state_dict().keys()


@pytest.mark.parametrize("bad_step", [1, 2, 4])
@pytest.mark.parametrize("name", ["xbn", "xbn_age"])
def test_a_restored_step_leaves_no_trace(name, bad_step):
    """A memory that takes a step and undoes it goes on exactly as one that never took it, whether the step
    was before the fill (rows past it must be zeros again), at the wrap-around or once full."""
    undone, reference = CrossBatchMemory(10, DIM, track_items=True), CrossBatchMemory(10, DIM, track_items=True)
    adapter, reference_adapter = ADAPTERS[name](), ADAPTERS[name]()
    for seed in range(6):
        if seed == bad_step:
            saved = adapter.state_dict()
            point = _step(undone, adapter, 50 + seed, undo=True)
            undone.restore_(point)
            adapter.load_state_dict(saved)
            _assert_same(undone, reference)
        rows = 2 if seed == bad_step else 4  # fewer rows than the undone step wrote: its rows must be gone
        _step(undone, adapter, seed, undo=True, rows=rows)
        _step(reference, reference_adapter, seed, undo=False, rows=rows)
        _assert_same(undone, reference)


def test_the_undo_copies_no_memory():
    """An adapting undo point holds the buffer itself (no copy) and copies of the batch's rows only."""
    memory = CrossBatchMemory(1000, DIM)
    for seed in range(3):
        _step(memory, MomentMatching(), seed, undo=False)
    buffer = memory.feats
    point = memory.undo_point(4, adapting=True)
    assert point.previous is buffer and point.feats.shape == (4, DIM)
    before = buffer.clone()
    memory.adapt_(MomentMatching(), _batch(9)[0])
    assert memory.feats is not buffer and torch.equal(buffer, before)  # written into the spare
    memory.restore_(point)
    assert memory.feats is buffer and torch.equal(memory.feats, before)


def test_undo_without_the_adaptation_it_announced():
    """An adapting undo point whose step neither adapts (fewer than 2 rows; or the memory does not fill
    yet) restores the enqueued rows in place."""
    memory = CrossBatchMemory(10, DIM)
    _step(memory, None, 0, undo=False, rows=1)
    before = _state(memory)
    point = memory.undo_point(4, adapting=True)  # one row: adapt_ will be a no-op
    _step(memory, MomentMatching(), 1, undo=False)
    memory.restore_(point)
    for key, value in memory.state_dict().items():
        assert torch.equal(value, before[key]), key
    point = memory.undo_point(4, adapting=True)
    memory.restore_(point)  # nothing happened in between
    for key, value in memory.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_objective_restores_memory_and_adapter_filters():
    objective = CrossBatchObjective(ContrastiveLoss(), CrossBatchMemory(16, DIM), KalmanMomentMatching(r=0.5))
    for seed in range(3):
        objective(*_batch(seed), seed)
    memory_before = _state(objective.memory)
    adapter_before = objective.adapter.state_dict()
    point = objective.undo_point(4)
    objective(*_batch(7), 3)
    objective.restore_(point)
    for key, value in objective.memory.state_dict().items():
        assert torch.equal(value, memory_before[key]), key
    after = objective.adapter.state_dict()
    assert after["calls"] == adapter_before["calls"] and after["p"] == adapter_before["p"]
    assert torch.equal(after["mu"], adapter_before["mu"]) and torch.equal(after["sigma"], adapter_before["sigma"])


def test_a_loaded_state_drops_the_spare():
    """After a load the spare is made afresh (zeros): its rows past the new fill must not hold old rows."""
    memory = CrossBatchMemory(12, DIM)
    _step(memory, MomentMatching(), 0, undo=True)
    saved = _state(memory)  # 4 rows
    for seed in range(1, 3):
        _step(memory, MomentMatching(), seed, undo=True)  # 12 rows, in both buffers by now
    memory.load_state_dict(saved)
    reference = CrossBatchMemory(12, DIM)
    reference.load_state_dict(saved)
    for seed in range(6, 8):
        _step(memory, MomentMatching(), seed, undo=True, rows=2)
        _step(reference, MomentMatching(), seed, undo=False, rows=2)
        _assert_same(memory, reference)


def test_a_plain_callable_is_an_adapter():
    """A function or an nn.Module with forward (README, Extending xbm) is wrapped once; its result is written
    back, and a module's buffers are its state."""
    def halve(memory_feats, batch_feats):
        return memory_feats * 0.5

    wrapped = as_memory_adapter(halve)
    assert isinstance(wrapped, CallableAdapter) and as_memory_adapter(wrapped) is wrapped
    assert as_memory_adapter(None) is None
    memory = CrossBatchMemory(10, DIM)
    _step(memory, None, 0, undo=False)
    expected = memory.feats[:4] * 0.5
    point = memory.undo_point(4, adapting=True)
    memory.adapt_(halve, _batch(1)[0])
    assert torch.equal(memory.feats[:4], expected)
    memory.restore_(point)
    assert torch.equal(memory.feats[:4], expected * 2)

    class Shift(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

        def forward(self, memory_feats, batch_feats):
            self.calls += 1
            return memory_feats + 1

    shift = as_memory_adapter(Shift())
    shift.apply_(torch.zeros(3, DIM), torch.zeros(3, DIM))
    assert int(shift.state_dict()["calls"]) == 1 and shift.log_values() == {}
    fresh = as_memory_adapter(Shift())
    fresh.load_state_dict(shift.state_dict())
    assert int(fresh.fn.calls) == 1
    with pytest.raises(ValueError, match="MemoryAdapter or a callable"):
        as_memory_adapter(3)


def test_every_adapter_of_xbm_is_a_memory_adapter_and_logs_what_it_has():
    for make in ADAPTERS.values():
        assert isinstance(make(), MemoryAdapter)
    kalman = KalmanMomentMatching(q=1.0, r=1.0)
    assert kalman.log_values() == {}  # no gain before its first measurement update
    for _ in range(2):
        kalman.apply_(torch.randn(8, DIM), torch.randn(4, DIM))
    assert kalman.log_values() == {"kalman_gain": kalman.gain} and 0 < kalman.gain < 1
