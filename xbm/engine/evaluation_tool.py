"""What xbm-eval does: evaluate saved checkpoints, optionally exporting embeddings."""
from __future__ import annotations

import os
import sys

import numpy as np
from yacs.config import CfgNode

from ..config import load_cfg
from ..data.datasets import build_dataset, dataset_class
from ..data.transforms import build_transforms
from ..evaluation.evaluator import compute_embeddings
from ..modeling import build_model
from ..utils.env import resolve_device
from .checkpoint import CHECKPOINT_KEYS, load_checkpoint
from .performance import check_knn_backend
from .setup import build_evaluator


def config_of_checkpoint(path: str, opts: list[str] | None = None, cfg_file: str | None = None) -> CfgNode:
    """The config of the tools that read checkpoints: `cfg_file` if given, else the config the
    checkpoint was trained with; plus command-line overrides."""
    saved_config = load_checkpoint(path, required=CHECKPOINT_KEYS)["config"]
    if cfg_file:
        cfg = load_cfg(cfg_file, opts, check=False)
        _check_same_dataset(path, saved_config, cfg, cfg_file, opts)
    else:
        cfg = load_cfg(opts=opts, check=False, base_yaml=saved_config)
    return without_pretrained_weights(cfg)


def without_pretrained_weights(cfg: CfgNode) -> CfgNode:
    """`cfg` with MODEL.BACKBONE.PRETRAINED "": the checkpoint holds every weight, so building its model must
    not read (or, with imagenet, download) the initial weights, which another machine may not have."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.BACKBONE.PRETRAINED = ""
    cfg.freeze()
    return cfg


def _check_same_dataset(path: str, saved_config: str, cfg: CfgNode, cfg_file: str, opts) -> None:
    """A --cfg of another dataset would silently evaluate there; DATA.NAME on the command line says it is meant."""
    import yaml  # yacs depends on PyYAML

    trained_on = (yaml.safe_load(saved_config).get("DATA") or {}).get("NAME")
    if trained_on and trained_on != cfg.DATA.NAME and "DATA.NAME" not in (opts or [])[::2]:
        raise ValueError(
            f"{path} was trained on DATA.NAME {trained_on!r} but --cfg {cfg_file} evaluates on {cfg.DATA.NAME!r}: "
            f"leave out --cfg to use the checkpoint's own config, or add DATA.NAME {cfg.DATA.NAME} to the command "
            "to evaluate on that dataset on purpose")


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
