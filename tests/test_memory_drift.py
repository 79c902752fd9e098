"""The memory's adaptation error (DRIFT.MEMORY_PROBE): the memory's item tracking against a plain
list of what was enqueued, the probe's cosines against numpy on embeddings the test sets by hand,
and a short Glyphs run that it must leave bit-identical."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from xbm.config import load_cfg
from xbm.diagnostics.memory_drift import AGE_KEY, ENQUEUED_KEY, NEWEST_KEY, SAMPLED_KEY, STORED_KEY, MemoryProbe
from xbm.memory import CrossBatchMemory, MomentMatching

DIM = 3


def _tracked_memory(size=10):
    return CrossBatchMemory(size, DIM, track_items=True)


def test_item_tracking_follows_the_ring_and_ignores_adaptation():
    memory, enqueued = _tracked_memory(), []  # the reference: a plain list of (id, row), oldest first
    rng = torch.Generator().manual_seed(0)
    for step in range(5):  # 5 batches of 3 into 10 slots: wraps around
        rows = torch.randn(3, DIM, generator=rng)
        ids = torch.arange(3) + 100 * step
        if len(memory) >= 2:
            memory.adapt_(MomentMatching(), torch.randn(4, DIM, generator=rng))
        memory.enqueue(rows, torch.zeros(3, dtype=torch.int64), ids)
        enqueued = (enqueued + list(zip(ids.tolist(), rows)))[-10:]
    newest_first = list(reversed(enqueued))
    ages = memory.slot_ages()
    for slot in range(10):
        item, row = newest_first[int(ages[slot])]
        assert int(memory.items.item_ids[slot]) == item
        assert torch.equal(memory.items.enqueued_feats[slot], row)  # adaptation rewrote feats, not this copy
    assert not torch.equal(memory.feats, memory.items.enqueued_feats)
    assert memory.items.item_ids[memory.newest_slots(3)].tolist() == [400, 401, 402]
    assert memory.nbytes == 2 * (10 * DIM * 4 + 10 * 8)


def test_unknown_items_and_bad_ids():
    memory = _tracked_memory()
    memory.enqueue(torch.ones(2, DIM), torch.zeros(2, dtype=torch.int64))  # no ids: unknown
    assert memory.items.item_ids[:2].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="one id per row"):
        memory.enqueue(torch.ones(2, DIM), torch.zeros(2, dtype=torch.int64), torch.arange(3))
    memory.reset()
    assert (memory.items.item_ids == -1).all() and len(memory) == 0


def test_undo_restores_the_item_rows():
    memory = _tracked_memory(4)
    memory.enqueue(torch.ones(3, DIM), torch.zeros(3, dtype=torch.int64), torch.tensor([1, 2, 3]))
    before = {k: v.clone() for k, v in memory.state_dict().items()}
    point = memory.undo_point(2, adapting=True)
    memory.adapt_(MomentMatching(), torch.randn(3, DIM))
    memory.enqueue(torch.zeros(2, DIM), torch.ones(2, dtype=torch.int64), torch.tensor([7, 8]))
    memory.restore_(point)
    for key, value in memory.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_tracked_and_untracked_states_load_into_each_other():
    tracked = _tracked_memory()
    tracked.enqueue(torch.randn(4, DIM), torch.arange(4), torch.tensor([5, 6, 7, 8]))
    plain = CrossBatchMemory(10, DIM)
    plain.load_state_dict(tracked.state_dict())  # DRIFT.MEMORY_PROBE switched off at a resume
    assert torch.equal(plain.feats, tracked.feats) and len(plain) == 4
    again = _tracked_memory()
    again.load_state_dict(plain.state_dict())  # ...and on: the loaded entries are of unknown items
    assert (again.items.item_ids == -1).all() and torch.equal(again.items.enqueued_feats, plain.feats)
    roundtrip = _tracked_memory()
    roundtrip.load_state_dict(tracked.state_dict())
    assert torch.equal(roundtrip.items.item_ids, tracked.items.item_ids)


class IndexImages(torch.utils.data.Dataset):
    """Item i is the 'image' tensor([i])."""

    def __len__(self):
        return 20

    def __getitem__(self, index):
        return torch.tensor([float(index)]), 0


class TableModel(nn.Module):
    """Row i of a table for image tensor([i]), plus a BatchNorm whose running mean must stay put."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table.clone())
        self.norm = nn.BatchNorm1d(1)
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        self.norm(x)
        return self.table[x[:, 0].long()]


def _cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_probe_cosines_match_numpy_on_embeddings_set_by_hand():
    rng = np.random.default_rng(0)
    old_table = rng.normal(size=(20, DIM))
    now_table = old_table + 0.5 * rng.normal(size=(20, DIM))  # the network moved
    memory = _tracked_memory(10)
    memory.enqueue(torch.ones(2, DIM), torch.zeros(2, dtype=torch.int64))  # unknown items: never probed
    for ids in ([0, 1], [2, 3], [4, 5], [6, 7]):  # global batch 2
        memory.adapt_(MomentMatching(), torch.tensor(now_table[ids[0]:ids[0] + 3]))
        memory.enqueue(torch.tensor(old_table[ids]), torch.zeros(2, dtype=torch.int64), torch.tensor(ids))
    memory.feats[2] = memory.feats[2] * 3  # a scaled stored entry has the same cosine
    model = TableModel(torch.tensor(now_table, dtype=torch.float32)).train()
    running_mean = model.norm.running_mean.clone()
    probe = MemoryProbe(IndexImages(), num_samples=100, interval=5, global_batch=2, batch_size=3)
    measured = probe.step(model, memory, 10)

    stored, enqueued, ages = [], [], []
    newest_ids = [6, 7]
    for slot in range(10):
        item = int(memory.items.item_ids[slot])
        if item < 0:
            continue
        stored.append(_cos(memory.feats[slot].double().numpy(), now_table[item]))
        enqueued.append(_cos(old_table[item], now_table[item]))
        ages.append(3 - item // 2)  # items 6, 7 enqueued last: age 0; 4, 5: one iteration earlier
    assert len(stored) == 8  # 10 slots, 2 of them unknown
    assert measured[STORED_KEY] == pytest.approx(np.mean(stored), abs=1e-6)
    assert measured[ENQUEUED_KEY] == pytest.approx(np.mean(enqueued), abs=1e-6)
    assert measured[NEWEST_KEY] == pytest.approx(np.mean([_cos(old_table[i], now_table[i]) for i in newest_ids]),
                                                 abs=1e-6)
    assert measured[AGE_KEY] == pytest.approx(np.mean(ages)) and measured[SAMPLED_KEY] == 8
    assert measured[STORED_KEY] != pytest.approx(measured[ENQUEUED_KEY], abs=1e-3)  # adaptation moved them
    # eval mode for the measurement, the training mode restored, BatchNorm's statistics untouched
    assert set(model.modes) == {False} and model.training
    assert torch.equal(model.norm.running_mean, running_mean)
    assert probe.step(model, memory, 11) is None  # not a multiple of the interval


def test_probe_sample_is_seeded_by_the_iteration_and_leaves_the_global_rngs_alone():
    memory = _tracked_memory(20)
    memory.enqueue(torch.randn(20, DIM), torch.zeros(20, dtype=torch.int64), torch.arange(20))
    probe = MemoryProbe(IndexImages(), num_samples=5, interval=1, global_batch=4, seed=3)
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    first = probe.sample(memory, 7)
    assert torch.equal(torch.rand(2), expected)
    assert len(first) == 5 == len(set(first.tolist())) and torch.equal(first, probe.sample(memory, 7))
    assert not torch.equal(first, probe.sample(memory, 8))
    with pytest.raises(ValueError, match="track_items"):
        probe.measure(TableModel(torch.zeros(20, DIM)), CrossBatchMemory(20, DIM), 1)


def _train(glyph_root, tmp_path, name, *opts):
    from xbm.engine.defaults import DefaultTrainer

    cfg = load_cfg("configs/glyphs_xbn.yaml", [
        "DATA.ROOT", str(glyph_root), "DATA.GLYPHS.MIN_FONTS", "4", "OUTPUT_DIR", str(tmp_path / name),
        "SOLVER.MAX_ITERS", "12", "XBM.START_ITERATION", "2", "XBM.SIZE", "64", "TEST.EVAL_PERIOD", "0", *opts])
    trainer = DefaultTrainer(cfg)
    trainer.train()
    return trainer


def test_probe_leaves_the_training_bit_identical_and_logs_each_interval(glyph_root, tmp_path):
    """With a validation split, so that the ids index the training subset (not the whole split)."""
    split = ("DATA.VAL_FRACTION", "0.25")
    probed = _train(glyph_root, tmp_path, "probed", "DRIFT.MEMORY_PROBE", "True", "DRIFT.MEMORY_INTERVAL", "5",
                    "DRIFT.MEMORY_SAMPLES", "32", *split)
    plain = _train(glyph_root, tmp_path, "plain", *split)
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(probed.model.state_dict()[name], tensor), name
    assert torch.equal(probed.objective.memory.feats, plain.objective.memory.feats)
    lines = [json.loads(line) for line in (tmp_path / "probed" / "drift.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [5, 10]
    for line in lines:
        assert all(-1 <= line[key] <= 1 for key in (STORED_KEY, ENQUEUED_KEY, NEWEST_KEY))
        assert line[SAMPLED_KEY] == 32 and 0 <= line[AGE_KEY] < 64 / 16
        assert line[STORED_KEY] != line[ENQUEUED_KEY]  # XBN rewrote the stored entries
    memory = probed.objective.memory
    ids = memory.items.item_ids[:len(memory)]
    assert (ids >= 0).all() and int(ids.max()) < len(probed.train_set)
    # every stored label is its item's label in the training subset
    assert memory.labels[:len(memory)].tolist() == [int(probed.train_set.labels[i]) for i in ids.tolist()]
    assert not (tmp_path / "plain" / "drift.jsonl").exists()


def test_plain_xbm_has_nothing_to_remove():
    """Without an adapter the stored entry is the enqueued one: the two cosines are the same number."""
    memory = _tracked_memory(8)
    for ids in ([0, 1], [2, 3], [4, 5]):
        memory.enqueue(torch.randn(2, DIM), torch.zeros(2, dtype=torch.int64), torch.tensor(ids))
    model = TableModel(torch.randn(20, DIM))
    measured = MemoryProbe(IndexImages(), num_samples=4, interval=1, global_batch=2).measure(model, memory, 3)
    assert measured[STORED_KEY] == measured[ENQUEUED_KEY] and not math.isnan(measured[STORED_KEY])


def test_memory_probe_config_is_checked():
    from xbm.config.checks import check_cfg

    cfg = load_cfg("configs/glyphs_xbm.yaml", ["DRIFT.MEMORY_PROBE", "True"])
    cfg.defrost()
    cfg.DRIFT.MEMORY_SAMPLES = 0
    with pytest.raises(ValueError, match="DRIFT.MEMORY_SAMPLES must be at least 1"):
        check_cfg(cfg)


def test_without_a_memory_the_probe_is_off(glyph_root, tmp_path):
    """A sweep over XBM.SIZE with 0 (no memory) and the probe on: the no-memory run trains, unprobed."""
    trainer = _train(glyph_root, tmp_path, "none", "XBM.ENABLE", "False", "DRIFT.MEMORY_PROBE", "True",
                     "SOLVER.MAX_ITERS", "2")
    assert trainer.objective.memory is None and not (tmp_path / "none" / "drift.jsonl").exists()
    assert "DRIFT.MEMORY_PROBE has no memory to probe" in (tmp_path / "none" / "log.txt").read_text()
