"""Partial refresh (XBM.REFRESH_PER_STEP): the sweep's slots against a plain simulation, the rows written,
and the hook re-embedding the stored items with the current model as the probe would."""
from __future__ import annotations

import pytest
import torch

from xbm.config import load_cfg
from xbm.data.datasets import build_dataset
from xbm.data.transforms import build_transforms
from xbm.engine.defaults import DefaultTrainer
from xbm.engine.hooks import DriftProbe, MemoryDriftProbe, RefreshMemory
from xbm.memory import CrossBatchMemory
from xbm.memory.refresh import MemoryRefresh


def _filled(size=10, batch=3, steps=5):
    memory = CrossBatchMemory(size, 2, track_items=True)
    for step in range(steps):
        memory.enqueue(torch.randn(batch, 2), torch.zeros(batch, dtype=torch.long),
                       torch.arange(step * batch, (step + 1) * batch))
    return memory


def test_the_sweep_visits_every_slot_once_per_round_against_the_write_pointer():
    memory = _filled()  # full: 15 rows in 10 slots
    refresh = MemoryRefresh(4)
    seen = [refresh.next_slots(memory).tolist() for _ in range(5)]
    # a cursor from slot 0 downwards, 4 per step, modulo 10
    cursor, expected = 0, []
    for _ in range(5):
        expected.append([(cursor - k) % 10 for k in range(4)])
        cursor = (cursor - 4) % 10
    assert seen == expected
    assert sorted(sum(seen, [])[:10]) == list(range(10))  # the first 10 visits cover the ring


def test_slots_not_yet_filled_or_of_unknown_items_are_skipped():
    memory = CrossBatchMemory(10, 2, track_items=True)
    memory.enqueue(torch.randn(4, 2), torch.zeros(4, dtype=torch.long), torch.tensor([5, -1, 7, 8]))
    refresh = MemoryRefresh(3)
    assert refresh.next_slots(memory).tolist() == [0]  # slots 0, 9, 8: only 0 holds an entry
    assert refresh.next_slots(memory).tolist() == []  # 7, 6, 5
    refresh.cursor = 3
    assert refresh.next_slots(memory).tolist() == [3, 2]  # 3, 2, 1: slot 1 holds an unknown item
    with pytest.raises(ValueError, match="track_items=True"):
        MemoryRefresh(2).next_slots(CrossBatchMemory(10, 2))


def test_a_refresh_writes_the_embedding_of_each_slots_item_as_stored_and_as_enqueued():
    memory = _filled()
    before = memory.feats.clone()
    refresh = MemoryRefresh(4)
    count = refresh.refresh(memory, lambda ids: torch.stack([ids.double(), -ids.double()], 1))
    assert count == 4
    slots = [0, 9, 8, 7]
    for slot in range(10):
        item = int(memory.items.item_ids[slot])
        if slot in slots:
            assert memory.feats[slot].tolist() == [item, -item]
            assert memory.items.enqueued_feats[slot].tolist() == [item, -item]
        else:
            assert torch.equal(memory.feats[slot], before[slot])
    assert refresh.state_dict() == {"cursor": 6}
    other = MemoryRefresh(4)
    other.load_state_dict(refresh.state_dict())
    assert other.next_slots(memory).tolist() == [6, 5, 4, 3]


def _cfg(glyph_root, tmp_path, *extra):
    return load_cfg("configs/glyphs_xbn.yaml", [
        "OUTPUT_DIR", str(tmp_path), "DATA.ROOT", str(glyph_root), "DATA.GLYPHS.MIN_FONTS", "4", "MODEL.DEVICE", "cpu",
        "MODEL.BACKBONE.CONVNET_WIDTHS", "(8, 16, 16, 32)", "MODEL.HEAD.DIM", "32", "DATA.BATCH_SIZE", "8",
        "XBM.SIZE", "40", "TEST.EVAL_PERIOD", "0", "DATA.VAL_FRACTION", "0.25", *extra])


def test_the_hook_re_embeds_stored_items_with_the_current_model_in_eval_mode(glyph_root, tmp_path):
    trainer = DefaultTrainer(_cfg(glyph_root, tmp_path, "XBM.REFRESH_PER_STEP", "6"))
    hook = next(h for h in trainer.hooks if isinstance(h, RefreshMemory))
    memory = trainer.objective.memory
    assert memory.track_items
    batches = iter(trainer.train_loader())
    for _ in range(6):  # 48 rows: the memory of 40 is full
        images, labels, ids = next(batches)
        trainer.train_step(images, labels, ids)
        trainer.iteration += 1
    before = memory.feats.clone()
    cursor = hook.refresh.cursor
    hook.after_step()
    slots = [(cursor - k) % 40 for k in range(6)]
    # the reference: each item's image through the test-time transform (its index in the whole training
    # split: the validation split removed classes), one by one through the model in eval mode
    split = build_dataset(trainer.cfg, "train", build_transforms(trainer.cfg, train=False))
    trainer.model.eval()
    with torch.no_grad():
        expected = torch.cat([trainer.model(split[trainer.train_set.indices[int(i)]][0][None])
                              for i in memory.items.item_ids[slots]])
    trainer.model.train()
    torch.testing.assert_close(memory.feats[slots], expected, rtol=0, atol=1e-6)
    assert trainer.model.training  # the mode is given back
    untouched = [s for s in range(40) if s not in slots]
    assert torch.equal(memory.feats[untouched], before[untouched])
    assert trainer.checkpoint_state()["hooks"]["RefreshMemory"] == {"cursor": (cursor - 6) % 40}


def test_the_training_splits_test_time_view_is_built_once_for_the_validation_split_probes_and_refresh(
        glyph_root, tmp_path, monkeypatch):
    # Glyphs decodes its split when built: the run reads the training split twice (augmented for the
    # batches, test-time for the rest), not once per reader of the test-time view.
    import xbm.data.build as data_build

    built = []

    def counting(cfg, split, transform):
        built.append(split)
        return build_dataset(cfg, split, transform)

    monkeypatch.setattr(data_build, "build_dataset", counting)
    trainer = DefaultTrainer(_cfg(glyph_root, tmp_path, "XBM.REFRESH_PER_STEP", "6", "DRIFT.MEMORY_PROBE", "True",
                                  "DRIFT.ENABLE", "True"))
    assert built == ["train", "train"]
    whole = trainer.training_split_test_view.whole()
    probe = next(h for h in trainer.hooks if isinstance(h, MemoryDriftProbe)).probe
    monitor = next(h for h in trainer.hooks if isinstance(h, DriftProbe)).monitor
    val_set, _ = trainer.evaluator.tasks["val"]
    assert probe.dataset.dataset is whole and monitor.dataset is whole and val_set.dataset is whole
    # the refresh and the probe re-embed from one view of the training items
    assert trainer.training_split_test_view.items_of(trainer.train_set) is probe.dataset
    assert probe.dataset.indices.tolist() == trainer.train_set.indices.tolist()
