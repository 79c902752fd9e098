"""Merging a YAML file and command-line overrides into the defaults, with readable errors."""
from __future__ import annotations

import os

from yacs.config import CfgNode

from .checks import check_cfg
from .defaults import get_cfg


class ConfigError(ValueError):
    """A config file or override that cannot be applied."""


def load_cfg(
    cfg_file: str | None = None, opts: list[str] | None = None, check: bool = True, base_yaml: str | None = None
) -> CfgNode:
    """Defaults <- base_yaml (a saved config.yaml text) <- cfg_file <- opts (KEY VALUE pairs), checked and frozen."""
    cfg = get_cfg()
    if base_yaml is not None:
        _merge(lambda text: cfg.merge_from_other_cfg(CfgNode.load_cfg(text)), base_yaml, "in the saved config")
    if cfg_file:
        if not os.path.isfile(cfg_file):
            raise ConfigError(f"config file {cfg_file!r} does not exist")
        _merge(cfg.merge_from_file, cfg_file, f"in {cfg_file}")
    if opts:
        if len(opts) % 2:
            raise ConfigError(f"overrides come in KEY VALUE pairs; {opts[-1]!r} has no value")
        _merge(cfg.merge_from_list, list(opts), "on the command line")
    if check:
        check_cfg(cfg)
    cfg.freeze()
    return cfg


def _merge(merge, source, where: str) -> None:
    try:
        merge(source)
    except (KeyError, ValueError, AssertionError) as err:
        message = str(err.args[0]) if err.args else str(err)
        # yacs says "Non-existent (config) key: X" (KeyError from files, AssertionError from lists).
        if "Non-existent" in message:
            key = message.rsplit(":", 1)[-1].strip()
            raise ConfigError(
                f"unknown config key {key!r} {where}; every key is listed with its meaning "
                "in xbm/config/defaults.py"
            ) from None
        raise ConfigError(f"bad config value {where}: {message}") from None
