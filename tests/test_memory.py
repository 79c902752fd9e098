"""CrossBatchMemory against a collections.deque reference, plus persistence and errors."""

import collections
import io
import random

import pytest
import torch
from yacs.config import CfgNode

from xbm.memory import CrossBatchMemory, MomentMatching, build_memory, moment_match


def _ordered_contents(mem: CrossBatchMemory) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid entries oldest first: slot order rotated so the oldest slot comes first."""
    feats, labels = mem.get()
    if mem.is_full:
        order = [(mem.pointer + k) % mem.size for k in range(mem.size)]
        return feats[order], labels[order]
    return feats, labels


@pytest.mark.parametrize("size", [1, 5, 64, 100, 257])
def test_matches_deque_reference(size):
    rng = random.Random(size)
    dim = 3
    steps = 600
    max_batch = size
    total = steps * max_batch
    all_feats = torch.randn(total, dim, generator=torch.Generator().manual_seed(size))
    all_labels = torch.randint(0, 1000, (total,), generator=torch.Generator().manual_seed(size + 1))
    reference = collections.deque(maxlen=size)  # ids of stored items, oldest first
    mem = CrossBatchMemory(size, dim)
    next_id = 0
    wrapped = False
    for _ in range(steps):
        batch = rng.randint(1, max_batch)
        ids = list(range(next_id, next_id + batch))
        next_id += batch
        old_pointer = mem.pointer
        slots = mem.enqueue(all_feats[ids], all_labels[ids])
        reference.extend(ids)
        wrapped |= old_pointer + batch > size

        assert slots.dtype == torch.int64 and slots.tolist() == [(old_pointer + k) % size for k in range(batch)]
        assert torch.equal(mem.feats[slots], all_feats[ids])
        assert torch.equal(mem.labels[slots], all_labels[ids])
        assert len(mem) == len(reference)
        assert mem.is_full == (len(reference) == size)
        feats, labels = _ordered_contents(mem)
        assert torch.equal(feats, all_feats[list(reference)])
        assert torch.equal(labels, all_labels[list(reference)])
    if size > 1:
        assert wrapped  # the sequence exercised batches straddling the end of the ring


def test_get_returns_views_in_slot_order():
    mem = CrossBatchMemory(10, 2)
    mem.enqueue(torch.ones(4, 2), torch.arange(4))
    feats, labels = mem.get()
    assert feats.shape == (4, 2) and labels.tolist() == [0, 1, 2, 3]
    assert feats.data_ptr() == mem.feats.data_ptr() and labels.data_ptr() == mem.labels.data_ptr()
    mem.enqueue(torch.full((8, 2), 2.0), torch.arange(10, 18))
    feats, labels = mem.get()
    assert feats.shape == (10, 2)
    # slots 0,1 were overwritten by the tail of the second batch
    assert labels.tolist() == [16, 17, 2, 3, 10, 11, 12, 13, 14, 15]


def test_stores_detached_copy():
    source = torch.randn(6, 4, requires_grad=True)
    emb = source * 2  # non-leaf with a graph
    mem = CrossBatchMemory(8, 4)
    mem.enqueue(emb, torch.arange(6))
    expected = emb.detach().clone()
    with torch.no_grad():
        emb.add_(100.0)
        source.zero_()
    feats, _ = mem.get()
    assert torch.equal(feats, expected)
    assert not feats.requires_grad and feats.grad_fn is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_storage(dtype):
    emb = torch.randn(5, 3)
    mem = CrossBatchMemory(7, 3, dtype=dtype)
    mem.enqueue(emb, torch.tensor([1, 2, 3, 4, 5], dtype=torch.int32))
    feats, labels = mem.get()
    assert feats.dtype == dtype and labels.dtype == torch.int64
    assert torch.equal(feats, emb.to(dtype))
    assert labels.tolist() == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("dtype,itemsize", [(torch.float32, 4), (torch.float16, 2), (torch.bfloat16, 2)])
def test_nbytes_exact(dtype, itemsize):
    mem = CrossBatchMemory(55000, 512, dtype=dtype)
    assert mem.nbytes == 55000 * 512 * itemsize + 55000 * 8
    held = sum(b.untyped_storage().nbytes() for b in mem.buffers())
    assert held == mem.nbytes


def _random_batches(seed, count, max_batch, dim):
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    for _ in range(count):
        batch = rng.randint(1, max_batch)
        yield torch.randn(batch, dim, generator=gen), torch.randint(0, 50, (batch,), generator=gen)


def test_state_dict_round_trip_mid_sequence():
    batches = list(_random_batches(3, 40, 9, 4))
    original = CrossBatchMemory(23, 4)
    for emb, lab in batches[:17]:
        original.enqueue(emb, lab)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["_extra_state"].tolist() == [original.pointer, len(original)]

    resumed = CrossBatchMemory(23, 4)
    resumed.load_state_dict(state)
    assert resumed.pointer == original.pointer and len(resumed) == len(original)
    for emb, lab in batches[17:]:
        slots_a = original.enqueue(emb, lab)
        slots_b = resumed.enqueue(emb, lab)
        assert torch.equal(slots_a, slots_b)
        for a, b in zip(original.get(), resumed.get()):
            assert torch.equal(a, b)


def test_state_dict_round_trip_before_full():
    mem = CrossBatchMemory(50, 2)
    mem.enqueue(torch.randn(7, 2), torch.arange(7))
    other = CrossBatchMemory(50, 2)
    other.load_state_dict(mem.state_dict())
    assert len(other) == 7 and other.pointer == 7 and not other.is_full
    assert torch.equal(other.get()[0], mem.get()[0])


def test_load_state_dict_mismatch_errors():
    state = CrossBatchMemory(10, 4).state_dict()
    with pytest.raises(ValueError, match="size 10 vs 12"):
        CrossBatchMemory(12, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="dim 4 vs 8"):
        CrossBatchMemory(10, 8).load_state_dict(state)
    with pytest.raises(ValueError, match="dtype torch.float32 vs torch.float16"):
        CrossBatchMemory(10, 4, dtype=torch.float16).load_state_dict(state)
    bad = dict(state, _extra_state=torch.tensor([3, 5]))
    with pytest.raises(ValueError, match="inconsistent"):
        CrossBatchMemory(10, 4).load_state_dict(bad)
    bad = dict(state, _extra_state=torch.tensor([10, 10]))
    with pytest.raises(ValueError, match="outside"):
        CrossBatchMemory(10, 4).load_state_dict(bad)
    missing = {k: v for k, v in state.items() if k != "_extra_state"}
    with pytest.raises(RuntimeError, match="_extra_state"):
        CrossBatchMemory(10, 4).load_state_dict(missing)


def test_state_dict_nested_in_a_module():
    holder = torch.nn.Module()
    holder.memory = CrossBatchMemory(6, 2)
    holder.memory.enqueue(torch.randn(4, 2), torch.arange(4))
    holder.memory.enqueue(torch.randn(4, 2), torch.arange(4))
    state = holder.state_dict()
    assert set(state) == {"memory.feats", "memory.labels", "memory._extra_state"}
    fresh = torch.nn.Module()
    fresh.memory = CrossBatchMemory(6, 2)
    fresh.load_state_dict(state)
    assert fresh.memory.pointer == 2 and fresh.memory.is_full


def _old_layout(prefix, feats, labels, pointer, filled):
    """A state dict as the memory wrote it before its counters became extra state: the two buffers
    and two 0-d int64 tensors, `pointer` and `filled`, beside them."""
    return {prefix + "feats": feats, prefix + "labels": labels,
            prefix + "pointer": torch.tensor(pointer, dtype=torch.int64),
            prefix + "filled": torch.tensor(filled, dtype=torch.int64)}


def test_old_layout_checkpoint_loads_and_continues_like_the_new_one():
    feats = torch.randn(6, 2)
    labels = torch.arange(10, 16)
    buffer = io.BytesIO()
    torch.save({"memory": _old_layout("memory.", feats, labels, 2, 6)}, buffer)  # full, oldest entry in slot 2
    buffer.seek(0)
    old = torch.load(buffer, weights_only=True)["memory"]
    holder = torch.nn.Module()
    holder.memory = CrossBatchMemory(6, 2)
    assert not holder.load_state_dict(old).missing_keys  # strict, nothing unexpected either
    assert holder.memory.pointer == 2 and len(holder.memory) == 6 and holder.memory.is_full
    assert torch.equal(holder.memory.feats, feats) and torch.equal(holder.memory.labels, labels)
    assert holder.state_dict()["memory._extra_state"].tolist() == [2, 6]
    assert set(old) == {"memory.feats", "memory.labels", "memory.pointer", "memory.filled"}  # caller's dict untouched
    slots = holder.memory.enqueue(torch.randn(3, 2), torch.arange(3))
    assert slots.tolist() == [2, 3, 4] and holder.memory.pointer == 5


def test_old_layout_before_full_and_its_errors():
    mem = CrossBatchMemory(10, 4)
    mem.load_state_dict(_old_layout("", torch.ones(10, 4), torch.zeros(10, dtype=torch.int64), 7, 7))
    assert len(mem) == 7 and mem.pointer == 7 and not mem.is_full
    with pytest.raises(ValueError, match="inconsistent"):
        mem.load_state_dict(_old_layout("", torch.ones(10, 4), torch.zeros(10, dtype=torch.int64), 3, 5))
    with pytest.raises(ValueError, match="size 10 vs 12"):
        CrossBatchMemory(12, 4).load_state_dict(_old_layout("", torch.ones(10, 4), torch.zeros(10), 0, 0))
    partial = _old_layout("", torch.ones(10, 4), torch.zeros(10, dtype=torch.int64), 7, 7)
    del partial["filled"]
    with pytest.raises(RuntimeError, match="filled"):
        mem.load_state_dict(partial)


def test_new_layout_round_trips_through_a_file(tmp_path):
    holder = torch.nn.Module()
    holder.memory = CrossBatchMemory(5, 3, dtype=torch.float16)
    for step in range(3):
        holder.memory.enqueue(torch.randn(2, 3), torch.arange(2) + step)
    torch.save(holder.state_dict(), tmp_path / "memory.pth")
    state = torch.load(tmp_path / "memory.pth", weights_only=True)
    fresh = torch.nn.Module()
    fresh.memory = CrossBatchMemory(5, 3, dtype=torch.float16)
    fresh.load_state_dict(state)
    assert (fresh.memory.pointer, len(fresh.memory)) == (1, 5)
    assert isinstance(fresh.memory.pointer, int) and isinstance(len(fresh.memory), int)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, holder.state_dict()[key]), key


def test_reset():
    mem = CrossBatchMemory(5, 2)
    mem.enqueue(torch.randn(4, 2), torch.arange(4))
    mem.enqueue(torch.randn(4, 2), torch.arange(4))
    mem.reset()
    assert len(mem) == 0 and mem.pointer == 0 and not mem.is_full
    assert mem.get()[0].shape == (0, 2)
    slots = mem.enqueue(torch.randn(3, 2), torch.arange(3))
    assert slots.tolist() == [0, 1, 2]


def test_empty_batch_is_a_no_op():
    mem = CrossBatchMemory(5, 2)
    slots = mem.enqueue(torch.empty(0, 2), torch.empty(0, dtype=torch.int64))
    assert slots.numel() == 0 and len(mem) == 0


def test_enqueue_errors():
    mem = CrossBatchMemory(4, 3)
    with pytest.raises(ValueError, match="2-D"):
        mem.enqueue(torch.randn(3), torch.arange(3))
    with pytest.raises(ValueError, match="width 5 != memory dim 3"):
        mem.enqueue(torch.randn(2, 5), torch.arange(2))
    with pytest.raises(ValueError, match="labels length 3 != embeddings batch size 2"):
        mem.enqueue(torch.randn(2, 3), torch.arange(3))
    with pytest.raises(ValueError, match="labels must be a 1-D"):
        mem.enqueue(torch.randn(2, 3), torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels must be an integer"):
        mem.enqueue(torch.randn(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="XBM.SIZE must be >= batch size"):
        mem.enqueue(torch.randn(5, 3), torch.arange(5))
    for bad in (float("nan"), float("inf")):
        emb = torch.randn(2, 3)
        emb[1, 2] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            mem.enqueue(emb, torch.arange(2))
    assert len(mem) == 0  # nothing was written by the rejected calls


def test_constructor_errors():
    with pytest.raises(ValueError, match="size"):
        CrossBatchMemory(0, 4)
    with pytest.raises(ValueError, match="dim"):
        CrossBatchMemory(4, -1)
    with pytest.raises(ValueError, match="dtype"):
        CrossBatchMemory(4, 4, dtype=torch.int32)


def test_adapt_writes_back_in_place():
    gen = torch.Generator().manual_seed(0)
    mem = CrossBatchMemory(30, 5)
    mem.enqueue(torch.randn(20, 5, generator=gen) * 3 + 1, torch.arange(20))
    batch = torch.randn(8, 5, generator=gen, requires_grad=True)
    before = mem.get()[0].clone()
    pointer_before = mem.feats.data_ptr()
    mem.adapt_(MomentMatching(), batch)
    after = mem.get()[0]
    assert mem.feats.data_ptr() == pointer_before
    assert torch.allclose(after, moment_match(before, batch.detach()), atol=1e-6)
    assert torch.equal(mem.feats[20:], torch.zeros(10, 5))  # unused slots untouched
    # adapted memory has the batch's moments
    assert torch.allclose(after.mean(0), batch.detach().mean(0), atol=1e-5)
    assert torch.allclose(after.std(0), batch.detach().std(0), atol=1e-4)


def test_adapt_with_plain_callable_and_no_op_cases():
    mem = CrossBatchMemory(6, 2)
    calls = []

    def double(memory, batch):
        calls.append(memory.shape[0])
        return memory * 2

    mem.adapt_(double, torch.randn(4, 2))
    mem.enqueue(torch.ones(1, 2), torch.zeros(1, dtype=torch.int64))
    mem.adapt_(double, torch.randn(4, 2))  # one entry: std undefined, skipped
    assert calls == []
    mem.enqueue(torch.ones(2, 2), torch.zeros(2, dtype=torch.int64))
    mem.adapt_(double, torch.randn(4, 2))
    assert calls == [3]
    assert torch.equal(mem.get()[0], torch.full((3, 2), 2.0))


def test_adapt_low_precision_memory():
    gen = torch.Generator().manual_seed(1)
    mem = CrossBatchMemory(16, 4, dtype=torch.bfloat16)
    mem.enqueue(torch.randn(16, 4, generator=gen), torch.arange(16))
    batch = torch.randn(8, 4, generator=gen)
    expected = moment_match(mem.get()[0].clone(), batch)
    mem.adapt_(MomentMatching(), batch)
    assert mem.feats.dtype == torch.bfloat16
    assert torch.equal(mem.get()[0], expected)


def test_repr():
    mem = CrossBatchMemory(8, 3, dtype=torch.float16)
    mem.enqueue(torch.randn(2, 3), torch.arange(2))
    text = repr(mem)
    assert "size=8" in text and "dim=3" in text and "float16" in text and "filled=2" in text


def _cfg(enable=True, size=100, dim=16, dtype="float32"):
    cfg = CfgNode()
    cfg.XBM = CfgNode({"ENABLE": enable, "SIZE": size, "DTYPE": dtype})
    cfg.MODEL = CfgNode({"HEAD": CfgNode({"DIM": dim})})
    return cfg


def test_build_memory():
    assert build_memory(_cfg(enable=False), "cpu") is None
    mem = build_memory(_cfg(size=100, dim=16, dtype="bfloat16"), "cpu")
    assert isinstance(mem, CrossBatchMemory)
    assert mem.size == 100 and mem.dim == 16 and mem.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="XBM.DTYPE must be one of"):
        build_memory(_cfg(dtype="int8"), "cpu")
