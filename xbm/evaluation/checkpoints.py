"""What xbm-eval does: evaluate saved checkpoints, optionally exporting embeddings (the checkpoint's config:
xbm/checkpoint/config.py)."""
from __future__ import annotations

import os
import sys

import numpy as np
from yacs.config import CfgNode

from ..checkpoint.io import CHECKPOINT_KEYS, load_checkpoint
from ..data.datasets import build_dataset, dataset_class
from ..data.transforms import build_transforms
from ..modeling import build_model
from ..runtime import check_knn_backend
from ..utils.env import resolve_device
from .build import build_evaluator
from .evaluator import compute_embeddings


def check_export_splits(cfg: CfgNode, splits) -> None:
    """Every --export split name must be one of the dataset's, before any evaluation runs."""
    known = dataset_class(cfg).SPLITS
    unknown = [s for s in splits or () if s not in known]
    if unknown:
        raise ValueError(f"--export {' '.join(unknown)}: DATA.NAME {cfg.DATA.NAME} has the splits {', '.join(known)}")


def evaluate_checkpoints(cfg, paths: list[str], export_splits=None, export_dir: str | None = None) -> list[dict]:
    """One row per (checkpoint, evaluation task): the checkpoint, its iteration and every metric."""
    device = resolve_device(cfg.MODEL.DEVICE)
    check_knn_backend(cfg)
    evaluator = build_evaluator(cfg, device)
    model = build_model(cfg).to(device)
    rows = []
    for path in paths:
        state = load_checkpoint(path, map_location=device, required=CHECKPOINT_KEYS)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as err:  # torch lists every mismatching tensor; the first says enough
            detail = " ".join(str(err).split("\n\t")[1:2]) or str(err).splitlines()[0]
            raise ValueError(f"{path} does not fit the model of this config ({detail.strip()}); "
                             "evaluate it without --cfg to use its own config") from err
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
    written = [os.path.join(folder, f"{stem}_{split}_{kind}.npy") for kind in ("embeddings", "labels")]
    np.save(written[0], feats.cpu().numpy())
    np.save(written[1], labels.numpy())
    print(f"wrote {written[0]} and {written[1]}", file=sys.stderr)
