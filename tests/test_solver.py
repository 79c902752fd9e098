import math
import warnings

import pytest
import torch

from xbm.config import get_cfg
from xbm.engine.solver import build_optimizer, build_scheduler, lr_factor


def _cfg(**solver):
    cfg = get_cfg()
    for key, value in solver.items():
        setattr(cfg.SOLVER, key, value)
    return cfg


def test_warmup_then_steps():
    cfg = _cfg(SCHEDULER="step", STEPS=(10, 20), GAMMA=0.5, WARMUP_ITERS=4)
    assert [lr_factor(cfg, i) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_factor(cfg, 9) == 1.0 and lr_factor(cfg, 10) == 0.5 and lr_factor(cfg, 25) == 0.25


def test_cosine_reaches_zero_at_the_end():
    cfg = _cfg(SCHEDULER="cosine", MAX_ITERS=100)
    assert lr_factor(cfg, 0) == 1.0
    assert lr_factor(cfg, 50) == pytest.approx(0.5)
    assert lr_factor(cfg, 100) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(cfg, 25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_scheduler_drives_the_optimizer():
    cfg = _cfg(SCHEDULER="step", STEPS=(2,), GAMMA=0.1, BASE_LR=1.0)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer(cfg, [param])
    sched = build_scheduler(cfg, opt)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.0, 1.0, 0.1, 0.1])


def test_sgd_momentum_is_used():
    cfg = _cfg(OPTIMIZER="sgd", MOMENTUM=0.7)
    opt = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))])
    assert opt.param_groups[0]["momentum"] == 0.7


def test_unknown_names():
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_optimizer(_cfg(OPTIMIZER="lion"), [torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="SOLVER.SCHEDULER"):
        lr_factor(_cfg(SCHEDULER="poly"), 0)


def test_loss_free_steps_advance_the_schedule_without_a_warning(glyph_root, tmp_path):
    # Memory loss only, from iteration 3: iterations 0-2 have no loss and take no optimizer step,
    # yet the learning rate follows the iteration count, and PyTorch's scheduler-order warning
    # (meant for code that forgot optimizer.step()) is not shown.
    from xbm.config import load_cfg
    from xbm.engine.defaults import DefaultTrainer

    cfg = load_cfg("configs/glyphs_xbm.yaml", [
        "OUTPUT_DIR", str(tmp_path / "run"), "DATA.ROOT", str(glyph_root), "DATA.GLYPHS.MIN_FONTS", "4",
        "MODEL.DEVICE", "cpu", "MODEL.HEAD.DIM", "16", "DATA.BATCH_SIZE", "8", "XBM.SIZE", "32",
        "XBM.START_ITERATION", "3", "LOSS.INBATCH_WEIGHT", "0.0", "SOLVER.MAX_ITERS", "5",
        "SOLVER.WARMUP_ITERS", "10", "SOLVER.BASE_LR", "0.001", "TEST.EVAL_PERIOD", "0",
        "SOLVER.CHECKPOINT_PERIOD", "0"])
    trainer = DefaultTrainer(cfg)
    start = [p.detach().clone() for p in trainer.model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer.train()
    assert trainer.iteration == 5
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.001 * lr_factor(cfg, 5))
    assert any(not torch.equal(a, b) for a, b in zip(start, trainer.model.parameters()))
