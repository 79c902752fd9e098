"""The momentum key encoder (XBM.KEY_MOMENTUM): its update against the formula, the loop enqueueing its
embeddings against the same steps written out, and the config wiring (built, saved, refused)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from xbm.config import load_cfg
from xbm.engine.defaults import DefaultTrainer
from xbm.engine.trainer import Trainer
from xbm.memory.key_encoder import MomentumKeyEncoder

from test_trainer_loop import STEPS, TinyEmbedder, _parts


def test_the_update_is_the_moving_average_of_the_parameters_and_copies_the_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    keys = MomentumKeyEncoder(model, 0.9)
    start = {k: v.clone() for k, v in keys.encoder.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model(torch.randn(8, 4))  # train mode: new running statistics
    keys.update(model)
    for name, value in model.state_dict().items():
        if name in dict(model.named_parameters()):
            expected = 0.9 * start[name] + 0.1 * value
            torch.testing.assert_close(keys.encoder.state_dict()[name], expected, rtol=0, atol=1e-7)
        else:
            assert torch.equal(keys.encoder.state_dict()[name], value), name
    assert not any(p.requires_grad for p in keys.parameters())
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        MomentumKeyEncoder(model, 1.0)


def test_the_loop_enqueues_the_key_encoders_embeddings_as_the_steps_written_out():
    model, objective, optimizer, scheduler, batches = _parts()
    keys = MomentumKeyEncoder(model, 0.8)
    trainer = Trainer(model, objective, batches, optimizer, scheduler, max_iters=STEPS, key_encoder=keys)
    trainer.train()

    ref_model, ref_objective, ref_optimizer, ref_scheduler, ref_batches = _parts()
    ref_keys = TinyEmbedder()
    ref_keys.load_state_dict(ref_model.state_dict())
    for iteration, (images, labels) in enumerate(ref_batches):
        with torch.no_grad():
            rows = ref_keys(images)
        total, _ = ref_objective(ref_model(images), labels, iteration, memory_rows=rows)
        ref_optimizer.zero_grad()
        total.backward()
        ref_optimizer.step()
        ref_scheduler.step()
        with torch.no_grad():
            for k, q in zip(ref_keys.parameters(), ref_model.parameters()):
                k.mul_(0.8).add_(0.2 * q)
        # the newest rows in the memory are the key encoder's, not the model's
        newest = ref_objective.memory.newest_slots(len(labels))
        assert torch.equal(ref_objective.memory.labels[newest], labels)
    for (name, ours), theirs in zip(model.state_dict().items(), ref_model.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=name)
    for (name, ours), theirs in zip(keys.encoder.state_dict().items(), ref_keys.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(objective.memory.feats, ref_objective.memory.feats, rtol=0, atol=1e-6)
    # and they differ from what the model itself would have stored
    with torch.no_grad():
        assert not torch.allclose(model(batches[-1][0]), keys(batches[-1][0]), atol=1e-4)


class NormedEmbedder(TinyEmbedder):
    """With BatchNorm: statistics that a train-mode forward moves, in the model and in its key encoder."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.BatchNorm1d(32), nn.ReLU())


def test_a_skipped_step_leaves_the_key_encoder_alone():
    model, objective, optimizer, scheduler, batches = _parts()
    model = NormedEmbedder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    keys = MomentumKeyEncoder(model, 0.5)
    images, labels = batches[0]
    trainer = Trainer(model, objective, batches, optimizer, scheduler, max_iters=STEPS, key_encoder=keys)
    trainer.train_step(images, labels)  # one good step: buffers and weights move
    before = {k: v.clone() for k, v in keys.state_dict().items()}
    trainer.train_step(torch.full_like(images, float("nan")), labels)
    assert trainer.guard.skipped_steps == 1
    for name, value in keys.state_dict().items():  # the BatchNorm statistics its forward saw are undone too
        assert torch.equal(value, before[name]), name
    assert keys.state_dict()["encoder.backbone.2.num_batches_tracked"] == 1


def _cfg(glyph_root, tmp_path, *extra):
    return load_cfg("configs/glyphs_xbn.yaml", [
        "OUTPUT_DIR", str(tmp_path), "DATA.ROOT", str(glyph_root), "DATA.GLYPHS.MIN_FONTS", "4", "MODEL.DEVICE", "cpu",
        "MODEL.BACKBONE.CONVNET_WIDTHS", "(8, 16, 16, 32)", "MODEL.HEAD.DIM", "32", "DATA.BATCH_SIZE", "8",
        "XBM.SIZE", "40", "TEST.EVAL_PERIOD", "0", *extra])


def test_the_config_builds_saves_and_restores_the_key_encoder(glyph_root, tmp_path):
    trainer = DefaultTrainer(_cfg(glyph_root, tmp_path / "a", "XBM.KEY_MOMENTUM", "0.99"))
    assert trainer.key_encoder.momentum == 0.99
    batches = iter(trainer.train_loader())
    for _ in range(2):
        trainer.train_step(*next(batches)[:2])
        trainer.iteration += 1
    state = trainer.checkpoint_state()
    assert state["key_encoder"].keys() == {f"encoder.{k}" for k in trainer.model.state_dict()}
    again = DefaultTrainer(_cfg(glyph_root, tmp_path / "b", "XBM.KEY_MOMENTUM", "0.99"))
    again.checkpointer.restore(state)
    for name, value in trainer.key_encoder.state_dict().items():
        assert torch.equal(again.key_encoder.state_dict()[name], value), name
    assert DefaultTrainer(_cfg(glyph_root, tmp_path / "c")).key_encoder is None


@pytest.mark.parametrize("key, value, message", [
    ("XBM.KEY_MOMENTUM", "1.0", r"XBM.KEY_MOMENTUM must be in \[0, 1\)"),
    ("XBM.REFRESH_PER_STEP", "41", r"XBM.REFRESH_PER_STEP \(41\) is more than the memory holds"),
    ("XBM.AGE_WEIGHT_SCALE", "-1.0", "XBM.AGE_WEIGHT_SCALE must be >= 0"),
])
def test_bad_values_of_the_correction_keys_are_refused_by_name(glyph_root, tmp_path, key, value, message):
    with pytest.raises(ValueError, match=message):
        DefaultTrainer(_cfg(glyph_root, tmp_path, key, value))


def test_age_weighting_refuses_a_loss_that_cannot_weight_pairs_and_a_refresh(glyph_root, tmp_path):
    with pytest.raises(ValueError, match="LOSS.NAME multi_similarity does not support"):
        DefaultTrainer(_cfg(glyph_root, tmp_path, "XBM.AGE_WEIGHT_SCALE", "10.0", "LOSS.NAME", "multi_similarity"))
    with pytest.raises(ValueError, match="which a refresh .XBM.REFRESH_PER_STEP. does not reset"):
        DefaultTrainer(_cfg(glyph_root, tmp_path, "XBM.AGE_WEIGHT_SCALE", "10.0", "XBM.REFRESH_PER_STEP", "4"))


def test_a_refresh_larger_than_a_memory_of_the_whole_training_set_is_refused(glyph_root, tmp_path):
    with pytest.raises(ValueError, match=r"XBM.REFRESH_PER_STEP \(1000\) is more than the memory holds"):
        DefaultTrainer(_cfg(glyph_root, tmp_path, "XBM.SIZE", "-1", "XBM.REFRESH_PER_STEP", "1000"))
