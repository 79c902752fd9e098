"""What xbm-eval does: evaluate saved checkpoints, optionally exporting embeddings."""
from __future__ import annotations

import os

import numpy as np
from yacs.config import CfgNode

from ..config import load_cfg
from ..data.datasets import build_dataset
from ..data.transforms import build_transforms
from ..modeling import build_model
from ..utils.env import resolve_device
from .checkpoint import load_checkpoint
from .evaluator import compute_embeddings
from .performance import check_knn_backend
from .trainer import build_evaluator


def config_of_checkpoint(path: str, opts: list[str] | None = None, cfg_file: str | None = None) -> CfgNode:
    """The config of the tools that read checkpoints: `cfg_file` if given, else the config the
    checkpoint was trained with; plus command-line overrides."""
    if cfg_file:
        return load_cfg(cfg_file, opts, check=False)
    return load_cfg(opts=opts, check=False, base_yaml=load_checkpoint(path)["config"])


def evaluate_checkpoints(cfg, paths: list[str], export_splits=None, export_dir: str | None = None) -> list[dict]:
    """One row per (checkpoint, evaluation task): the checkpoint, its iteration and every metric."""
    device = resolve_device(cfg.MODEL.DEVICE)
    check_knn_backend(cfg)
    evaluator = build_evaluator(cfg, device)
    model = build_model(cfg).to(device)
    rows = []
    for path in paths:
        state = load_checkpoint(path, map_location=device)
        model.load_state_dict(state["model"])
        for task, metrics in evaluator(model).items():
            rows.append({"checkpoint": path, "iteration": state.get("iteration"), "task": task, **metrics})
        for split in export_splits or ():
            _export(cfg, model, device, split, path, export_dir)
    return rows


def _export(cfg, model, device, split: str, ckpt_path: str, export_dir: str | None) -> None:
    dataset = build_dataset(cfg, split, build_transforms(cfg, train=False))
    feats, labels = compute_embeddings(model, dataset, device, cfg.TEST.BATCH_SIZE, cfg.DATA.NUM_WORKERS)
    folder = export_dir or os.path.dirname(os.path.abspath(ckpt_path))
    os.makedirs(folder, exist_ok=True)
    stem = os.path.splitext(os.path.basename(ckpt_path))[0]
    np.save(os.path.join(folder, f"{stem}_{split}_embeddings.npy"), feats.cpu().numpy())
    np.save(os.path.join(folder, f"{stem}_{split}_labels.npy"), labels.numpy())
