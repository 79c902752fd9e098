import math

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
