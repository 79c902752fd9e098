"""Optimizer and learning-rate schedule from SOLVER.*."""
from __future__ import annotations

import math

import torch

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "step", "cosine")


def build_optimizer(cfg, params) -> torch.optim.Optimizer:
    name = cfg.SOLVER.OPTIMIZER.lower()
    lr, wd = cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.SOLVER.MOMENTUM, weight_decay=wd)
    raise ValueError(f"SOLVER.OPTIMIZER {cfg.SOLVER.OPTIMIZER!r} is not one of {OPTIMIZERS}")


def lr_factor(cfg, iteration: int) -> float:
    """Multiplier of SOLVER.BASE_LR at `iteration` (0-based): warm-up, then the schedule."""
    warmup = cfg.SOLVER.WARMUP_ITERS
    factor = 1.0
    if iteration < warmup:
        factor = (iteration + 1) / warmup
    name = cfg.SOLVER.SCHEDULER.lower()
    if name == "step":
        factor *= cfg.SOLVER.GAMMA ** sum(iteration >= step for step in cfg.SOLVER.STEPS)
    elif name == "cosine":
        span = max(1, cfg.SOLVER.MAX_ITERS - warmup)
        progress = min(1.0, max(0, iteration - warmup) / span)
        factor *= 0.5 * (1.0 + math.cos(math.pi * progress))
    elif name != "none":
        raise ValueError(f"SOLVER.SCHEDULER {cfg.SOLVER.SCHEDULER!r} is not one of {SCHEDULERS}")
    return factor


def build_scheduler(cfg, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(cfg, 0)  # fail on a bad scheduler name now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it))
