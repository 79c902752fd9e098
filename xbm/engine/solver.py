"""Optimizer and learning-rate schedule from SOLVER.*."""
from __future__ import annotations

import math

import torch

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "step", "cosine", "plateau")


def build_optimizer(cfg, params) -> torch.optim.Optimizer:
    """SOLVER.OPTIMIZER over `params`: a list of parameters, or the groups of `parameter_groups`."""
    name = cfg.SOLVER.OPTIMIZER.lower()
    lr, wd = cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.SOLVER.MOMENTUM, weight_decay=wd)
    raise ValueError(f"SOLVER.OPTIMIZER {cfg.SOLVER.OPTIMIZER!r} is not one of {OPTIMIZERS}")


def parameter_groups(cfg, model) -> list:
    """The trainable parameters of an EmbeddingModel as the optimizer takes them (SOLVER.NO_DECAY_NORM_BIAS,
    BACKBONE_LR_FACTOR, LAYER_DECAY).

    With all three at their defaults: one plain list, exactly what the optimizer got before these keys
    existed (the same bits). Otherwise one group per (learning rate, weight decay): the head at BASE_LR,
    the backbone at BASE_LR x BACKBONE_LR_FACTOR x its layer's scale (timm's layer grouping, decay^(L - l)),
    and no decay on 1-d parameters (biases, norms) and the backbone's no_weight_decay() names. Each group's
    "lr" is its own base: the schedule (a LambdaLR) multiplies every group's by the same factor.
    """
    solver = cfg.SOLVER
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not solver.NO_DECAY_NORM_BIAS and solver.BACKBONE_LR_FACTOR == 1.0 and solver.LAYER_DECAY == 1.0:
        return [p for _, p in named]
    layer_scales = _layer_scales(model.backbone, solver.LAYER_DECAY)
    spared = {f"backbone.{n}" for n in model.backbone.no_weight_decay()} if hasattr(model.backbone, "no_weight_decay") \
        else set()
    groups: dict[tuple[float, float], dict] = {}
    for name, param in named:
        scale = 1.0
        if name.startswith("backbone."):
            scale = solver.BACKBONE_LR_FACTOR * layer_scales.get(id(param), 1.0)
        no_decay = solver.NO_DECAY_NORM_BIAS and (param.ndim <= 1 or name.endswith(".bias") or name in spared)
        decay = 0.0 if no_decay else solver.WEIGHT_DECAY
        key = (solver.BASE_LR * scale, decay)
        groups.setdefault(key, {"params": [], "lr": key[0], "weight_decay": decay})["params"].append(param)
    return list(groups.values())


def _layer_scales(backbone, decay: float) -> dict[int, float]:
    """id(parameter) -> decay^(L - layer) with timm's grouping of a timm backbone's layers; {} for decay 1."""
    if decay == 1.0:
        return {}
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(backbone.model, weight_decay=0.0, layer_decay=decay)
    return {id(p): float(group["lr_scale"]) for group in groups for p in group["params"]}


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
    elif name not in ("none", "plateau"):  # plateau: a factor set by evaluations (PlateauFactor), not by the iteration
        raise ValueError(f"SOLVER.SCHEDULER {cfg.SOLVER.SCHEDULER!r} is not one of {SCHEDULERS}")
    return factor


def build_scheduler(cfg, optimizer, plateau: PlateauFactor | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-iteration schedule; with `plateau`, its current factor multiplies it."""
    lr_factor(cfg, 0)  # fail on a bad scheduler name now, not at the first step
    if plateau is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it) * plateau.scale)


class PlateauFactor:
    """Reduce-on-plateau as a factor of SOLVER.BASE_LR, stepped with one evaluation score at a time.

    The rule of torch.optim.lr_scheduler.ReduceLROnPlateau in mode "max" with a relative threshold,
    which the official XBM code uses (research-xbm ret_benchmark/solver/build.py:15-23@223ecdc:
    patience 4, threshold 1e-3, cooldown 2, factor 0.1, min_lr BASE_LR / 20): a score is an
    improvement when it exceeds best x (1 + threshold); after more than `patience` evaluations without
    one the factor is multiplied by `factor` (never below `min_factor`), and the next `cooldown`
    evaluations count no bad ones. Kept as a factor rather than a second torch scheduler so that it
    composes with the per-iteration LambdaLR (warm-up) instead of both writing the learning rate.
    """

    def __init__(self, factor: float = 0.1, patience: int = 4, threshold: float = 1e-3, cooldown: int = 2,
                 min_factor: float = 0.0, base_lr: float = 1.0):
        if not 0.0 < factor < 1.0:
            raise ValueError(f"SOLVER.PLATEAU.FACTOR must be in (0, 1), got {factor}")
        if patience < 0 or cooldown < 0 or threshold < 0 or min_factor < 0:
            raise ValueError("SOLVER.PLATEAU.PATIENCE, COOLDOWN, THRESHOLD and MIN_FACTOR must be >= 0")
        self.factor, self.patience, self.threshold = factor, patience, threshold
        self.cooldown, self.min_factor, self.base_lr = cooldown, min_factor, base_lr
        self.scale = 1.0
        self.best = -math.inf
        self.num_bad = 0
        self.cooldown_left = 0

    def step(self, score: float) -> bool:
        """Record one evaluation's score; True when the factor was reduced."""
        if score > self.best * (1.0 + self.threshold):
            self.best, self.num_bad = score, 0
        else:
            self.num_bad += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.num_bad = 0
        if self.num_bad <= self.patience:
            return False
        self.cooldown_left, self.num_bad = self.cooldown, 0
        new_scale = max(self.scale * self.factor, self.min_factor)
        # torch skips reductions smaller than 1e-8 in learning-rate units
        if (self.scale - new_scale) * self.base_lr <= 1e-8:
            return False
        self.scale = new_scale
        return True

    def state_dict(self) -> dict:
        return {"scale": self.scale, "best": self.best, "num_bad": self.num_bad, "cooldown_left": self.cooldown_left}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.best = float(state["scale"]), float(state["best"])
        self.num_bad, self.cooldown_left = int(state["num_bad"]), int(state["cooldown_left"])


def apply_scheduled_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Every group's rate set to what `scheduler` gives at its current step: a plateau factor lowered by an
    evaluation applies from the next iteration on, not from the scheduler's next step."""
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base_lr * factor


def build_plateau(cfg) -> PlateauFactor | None:
    """The reduce-on-plateau factor of SOLVER.SCHEDULER plateau; None for the other schedules."""
    if cfg.SOLVER.SCHEDULER.lower() != "plateau":
        return None
    p = cfg.SOLVER.PLATEAU
    return PlateauFactor(factor=p.FACTOR, patience=p.PATIENCE, threshold=p.THRESHOLD, cooldown=p.COOLDOWN,
                         min_factor=p.MIN_FACTOR, base_lr=cfg.SOLVER.BASE_LR)
