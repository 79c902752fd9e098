"""The config a checkpoint is read with by the tools that load one (xbm-eval, xbm-serve, the scripts):
the one it was trained with, or a --cfg of the same dataset; never its initial weights."""
from __future__ import annotations

from yacs.config import CfgNode

from ..config import load_cfg
from .io import CHECKPOINT_KEYS, load_checkpoint


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
