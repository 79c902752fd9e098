"""xbm.CrossBatchObjective: the papers' step against a reference written with the parts by hand,
and the README's own training loop run as written on Glyphs (the loss goes down; stopping, saving,
loading and continuing gives the bits of not stopping)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xbm import CrossBatchObjective, build_objective
from xbm.config import load_cfg
from xbm.data.datasets.glyphs import Glyphs
from xbm.data.sampler import MPerClassBatchSampler
from xbm.data.transforms import build_transforms
from xbm.losses import ContrastiveLoss
from xbm.memory import CrossBatchMemory, KalmanMomentMatching, MomentMatching, moment_match

README = Path(__file__).resolve().parents[1] / "README.md"


def _batches(generator, steps, batch=8, dim=16, classes=5):
    out = []
    for _ in range(steps):
        labels = torch.randint(0, classes, (batch,), generator=generator)
        out.append((F.normalize(torch.randn(batch, dim, generator=generator)), labels))
    return out


# ------------------------------------------------------------------ the step, against a hand-written one
@pytest.mark.parametrize("fill_from", ["iteration_0", "start_iteration"])
def test_the_objective_is_the_papers_step_written_out(fill_from):
    batches = _batches(torch.Generator().manual_seed(0), 7)
    loss = ContrastiveLoss(margin=0.5)
    objective = CrossBatchObjective(loss, CrossBatchMemory(20, 16), MomentMatching(), inbatch_weight=0.5,
                                    memory_weight=2.0, start_iteration=3, fill_from=fill_from)
    # The reference: a plain list of (embedding, label) rows, adapted by the functional XBN,
    # the newest 20 kept, each anchor's own copy found by position.
    stored, stored_labels = torch.empty(0, 16), torch.empty(0, dtype=torch.int64)
    for step, (emb, labels) in enumerate(batches):
        emb = emb.clone().requires_grad_()
        total, stats = objective(emb, labels, step)
        expected = 0.5 * loss(emb, labels)
        fills = fill_from == "iteration_0" or step >= 3
        if fills:
            if len(stored) >= 2:
                stored = moment_match(stored, emb.detach())
            stored = torch.cat([stored, emb.detach()])[-20:]
            stored_labels = torch.cat([stored_labels, labels])[-20:]
        if step >= 3:
            own = torch.arange(len(stored) - 8, len(stored))
            # the memory is a ring: compare with its rows in age order, own copies re-indexed alike
            feats, mem_labels = objective.memory.get()
            order = (torch.arange(len(feats)) + (objective.memory.pointer if len(feats) == 20 else 0)) % len(feats)
            torch.testing.assert_close(feats[order], stored, rtol=0, atol=1e-6)
            assert torch.equal(mem_labels[order], stored_labels)
            expected = expected + 2.0 * loss(emb, labels, stored, stored_labels, ref_self_index=own)
            assert set(stats) >= {"loss/inbatch", "loss/memory", "pairs/memory_pos_pairs"}
        else:
            assert "loss/memory" not in stats
        torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-6)
        assert len(objective.memory) == min(20, len(stored))


def test_has_loss_and_none_before_the_memory_starts_without_an_in_batch_loss():
    objective = CrossBatchObjective(ContrastiveLoss(), CrossBatchMemory(32, 16), inbatch_weight=0.0,
                                    start_iteration=2)
    (emb, labels), = _batches(torch.Generator().manual_seed(1), 1)
    assert [objective.has_loss(i) for i in range(4)] == [False, False, True, True]
    total, stats = objective(emb, labels, 0)
    assert total is None and stats == {} and len(objective.memory) == 8  # filled from iteration 0 all the same
    total, stats = objective(emb, labels, 2)
    assert total is not None and float(total) == float(stats["loss/memory"])


def test_the_state_dict_round_trips_the_memory_and_the_filters_exactly(tmp_path):
    def make():
        return CrossBatchObjective(ContrastiveLoss(), CrossBatchMemory(20, 16), KalmanMomentMatching(r=0.5))

    first, batches = make(), _batches(torch.Generator().manual_seed(2), 9)
    for step, (emb, labels) in enumerate(batches[:5]):
        first(emb, labels, step)
    torch.save(first.state_dict(), tmp_path / "objective.pth")
    second = make()
    second.load_state_dict(torch.load(tmp_path / "objective.pth", weights_only=True))
    assert (second.memory.pointer, len(second.memory)) == (first.memory.pointer, len(first.memory)) == (0, 20)
    assert second.adapter.state_dict()["calls"] == 4 and second.adapter.gain == first.adapter.gain
    for step, (emb, labels) in enumerate(batches[5:], start=5):
        a, b = first(emb, labels, step)[0], second(emb, labels, step)[0]
        assert torch.equal(a, b)
    assert torch.equal(first.memory.feats, second.memory.feats)


def test_an_adapter_state_without_an_adapter_is_one_sentence():
    with_adapter = CrossBatchObjective(ContrastiveLoss(), CrossBatchMemory(20, 16), MomentMatching())
    plain = CrossBatchObjective(ContrastiveLoss(), CrossBatchMemory(20, 16))
    with pytest.raises(ValueError, match="XBM.ADAPT.NAME differs"):
        plain.load_state_dict(with_adapter.state_dict())
    with pytest.raises(ValueError, match="an adapter needs a memory"):
        CrossBatchObjective(ContrastiveLoss(), None, MomentMatching())


def test_build_objective_reads_the_config():
    cfg = load_cfg("configs/glyphs_axbn.yaml", ["XBM.SIZE", "64", "XBM.WEIGHT", "0.5", "LOSS.INBATCH_WEIGHT", "0.25"])
    objective = build_objective(cfg)
    assert (objective.memory.size, objective.memory.dim) == (64, cfg.MODEL.HEAD.DIM)
    assert isinstance(objective.adapter, KalmanMomentMatching) and objective.adapter.r == cfg.XBM.ADAPT.KALMAN_R
    assert (objective.inbatch_weight, objective.memory_weight) == (0.25, 0.5)
    assert objective.start_iteration == cfg.XBM.START_ITERATION and objective.check_values is False
    baseline = build_objective(load_cfg("configs/glyphs_baseline.yaml"))
    assert baseline.memory is None and baseline.adapter is None


# ------------------------------------------------------------------ the README's loop
def _readme_loop() -> str:
    section = README.read_text().split("### XBM / XBN in your own training loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_loop_is_at_most_20_lines():
    assert len(_readme_loop().strip().splitlines()) <= 20


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                      nn.Flatten(), nn.Linear(128, 128))

    def forward(self, x):
        return self.features(x)


@pytest.fixture(scope="module")
def glyph_batches(glyph_root):
    """Batches of 4 classes x 4 images of the tiny Glyphs set, as the trainer's sampler draws them."""
    cfg = load_cfg("configs/glyphs_baseline.yaml", ["DATA.ROOT", str(glyph_root), "DATA.GLYPHS.MIN_FONTS", "4"])
    transform = build_transforms(cfg, train=False)

    def batches(split, count, seed):
        data = Glyphs(glyph_root, split, transform=transform, min_fonts=4)
        sampler = MPerClassBatchSampler(data.labels, 16, 4, seed=seed)
        out = []
        for number in range(count):
            items = [data[i] for i in sampler.batch(number)]
            out.append((torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])))
        return out

    return batches("train", 60, seed=0), batches("test", 6, seed=1)


def _run_readme_loop(folder, loader, torch_seed=0):
    torch.manual_seed(torch_seed)
    model = SmallNet()
    namespace = {"model": model, "loader": loader}
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        exec(compile(_readme_loop(), "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace


def _probe_loss(model, probe):
    loss = ContrastiveLoss(margin=0.5, reduction="pairs")
    with torch.no_grad():
        return sum(float(loss(F.normalize(model(x)), y)) for x, y in probe) / len(probe)


def test_the_readme_loop_trains_and_continues_exactly(glyph_batches, tmp_path):
    train, probe = glyph_batches
    torch.manual_seed(0)
    before = _probe_loss(SmallNet(), probe)
    (tmp_path / "whole").mkdir()
    whole = _run_readme_loop(tmp_path / "whole", train)
    after = _probe_loss(whole["model"], probe)
    assert after < 0.8 * before, (before, after)  # on classes it never saw
    objective = whole["objective"]
    assert len(objective.memory) == min(1024, 16 * (60 - 0)) and "loss/memory" in whole["stats"]
    # stopped after 35 steps, saved, and continued by a new process (new objects, other weights)
    (tmp_path / "halves").mkdir()
    _run_readme_loop(tmp_path / "halves", train[:35])
    halves = _run_readme_loop(tmp_path / "halves", train[35:], torch_seed=123)
    assert halves["step"] == whole["step"] == 59
    for name, tensor in whole["model"].state_dict().items():
        assert torch.equal(halves["model"].state_dict()[name], tensor), name
    for name, tensor in objective.state_dict().items():
        other = halves["objective"].state_dict()[name]
        assert torch.equal(other, tensor) if isinstance(tensor, torch.Tensor) else other == tensor, name


# ------------------------------------------------------------------ the terms' gradient norms
def test_gradient_norms_are_each_terms_gradient_and_change_nothing():
    batches = _batches(torch.Generator().manual_seed(3), 4)
    measured = CrossBatchObjective(ContrastiveLoss(), CrossBatchMemory(40, 16), inbatch_weight=0.5, memory_weight=3.0)
    plain = CrossBatchObjective(ContrastiveLoss(), CrossBatchMemory(40, 16), inbatch_weight=0.5, memory_weight=3.0)
    for step, (emb, labels) in enumerate(batches):
        memory_before = measured.memory.get()[0].clone(), measured.memory.get()[1].clone()
        a, b = emb.clone().requires_grad_(), emb.clone().requires_grad_()
        total, stats = measured(a, labels, step, gradient_norms=True)
        reference, _ = plain(b, labels, step)
        total.backward(), reference.backward()
        assert torch.equal(total, reference) and torch.equal(a.grad, b.grad)
        # the reference: each term on its own, by autograd's .grad of a fresh leaf
        inbatch_leaf = emb.clone().requires_grad_()
        (0.5 * ContrastiveLoss()(inbatch_leaf, labels)).backward()
        torch.testing.assert_close(stats["grad/inbatch_norm"], inbatch_leaf.grad.norm())
        if step > 0:
            feats, mem_labels = memory_before
            stored = torch.cat([feats, emb]), torch.cat([mem_labels, labels])
            memory_leaf = emb.clone().requires_grad_()
            own = torch.arange(len(feats), len(feats) + len(emb))
            (3.0 * ContrastiveLoss()(memory_leaf, labels, *stored, ref_self_index=own)).backward()
            torch.testing.assert_close(stats["grad/memory_norm"], memory_leaf.grad.norm())
            torch.testing.assert_close(stats["grad/memory_over_inbatch"],
                                       memory_leaf.grad.norm() / inbatch_leaf.grad.norm())


def test_logged_gradient_norms_leave_the_training_bit_identical(glyph_root, tmp_path):
    from xbm.engine.defaults import DefaultTrainer

    def train(name, log_norms):
        cfg = load_cfg("configs/glyphs_xbm.yaml", [
            "DATA.ROOT", str(glyph_root), "DATA.GLYPHS.MIN_FONTS", "4", "OUTPUT_DIR", str(tmp_path / name),
            "SOLVER.MAX_ITERS", "6", "SOLVER.LOG_PERIOD", "3", "XBM.START_ITERATION", "1", "XBM.SIZE", "64",
            "TEST.EVAL_PERIOD", "0", "SOLVER.LOG_GRAD_NORMS", str(log_norms)])
        trainer = DefaultTrainer(cfg)
        trainer.train()
        return trainer, (tmp_path / name / "log.txt").read_text()

    measured, log = train("measured", True)
    plain, plain_log = train("plain", False)
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(measured.model.state_dict()[name], tensor), name
    assert torch.equal(measured.objective.memory.feats, plain.objective.memory.feats)
    ratios = re.findall(r"iter (\d+): .*grad/memory_over_inbatch=([0-9.e+-]+)", log)
    assert [int(i) for i, _ in ratios] == [3, 6] and all(float(r) > 0 for _, r in ratios)
    assert "grad/" not in plain_log
