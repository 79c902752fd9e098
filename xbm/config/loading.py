"""Merging a YAML file and command-line overrides into the defaults, with readable errors."""
from __future__ import annotations

import os
from ast import literal_eval

import yaml
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
        _merge(lambda text: _merge_yaml(cfg, text, "the saved config"), base_yaml, "in the saved config")
    if cfg_file:
        if not os.path.isfile(cfg_file):
            raise ConfigError(f"config file {cfg_file!r} does not exist")
        _merge(lambda path: _merge_yaml(cfg, _read_text(path), path), cfg_file, f"in {cfg_file}")
    if opts:
        if len(opts) % 2:
            raise ConfigError(f"overrides come in KEY VALUE pairs; {opts[-1]!r} has no value")
        _merge(cfg.merge_from_list, _coerce_overrides(cfg, list(opts)), "on the command line")
    if check:
        check_cfg(cfg)
    cfg.freeze()
    return cfg


def _merge(merge, source, where: str) -> None:
    try:
        merge(source)
    except ConfigError:
        raise  # already one sentence naming the file
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


# ------------------------------------------------------------------------------ YAML and types
def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text (YAML) file") from None


def _merge_yaml(cfg: CfgNode, text: str, source: str) -> None:
    """yacs' merge_from_file, with syntax errors naming the file and line, and lenient types."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else source
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and start is not None and mark is not None and start.line != mark.line:
            problem += f", {context} that starts on line {start.line + 1}"
        raise ConfigError(f"{where}: YAML syntax error ({problem})") from None
    if data is None:
        return  # an empty file changes nothing
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a YAML mapping of config keys (KEY: value), not a {type(data).__name__}")
    cfg.merge_from_other_cfg(CfgNode(_coerce_tree(cfg, data)))


def _coerce_tree(node: CfgNode, data: dict) -> dict:
    coerced = {}
    for key, value in data.items():
        original = node.get(key) if isinstance(node, CfgNode) else None
        if isinstance(original, CfgNode) and isinstance(value, dict):
            coerced[key] = _coerce_tree(original, value)
        elif isinstance(node, CfgNode) and key in node:
            coerced[key] = coerce_value(value, original)
        else:
            coerced[key] = value  # an unknown key: yacs names it
    return coerced


def _coerce_overrides(cfg: CfgNode, opts: list) -> list:
    """KEY VALUE pairs with each VALUE coerced to its key's type (unknown keys left for yacs)."""
    out = list(opts)
    for i in range(0, len(out) - 1, 2):
        node = cfg
        for part in str(out[i]).split("."):
            node = node.get(part) if isinstance(node, CfgNode) else None
        if node is not None and not isinstance(node, CfgNode):
            out[i + 1] = coerce_value(out[i + 1], node)
    return out


_BOOLEANS = {"true": True, "false": False}


def coerce_value(value, original):
    """`value` (a YAML value or a command-line string) in the type of the default `original`, where
    the meaning is unambiguous: an int for a float key (XBM.WEIGHT 1), an integral float for an int
    key (SOLVER.MAX_ITERS 2e4), true/false in any case for a bool key. yacs itself refuses these."""
    if isinstance(value, str):
        try:
            value = literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a plain string, as yacs reads it
    if type(original) is bool and isinstance(value, str) and value.lower() in _BOOLEANS:
        return _BOOLEANS[value.lower()]
    if type(original) is float and type(value) is int:
        return float(value)
    if type(original) is int and type(value) is float and value.is_integer():
        return int(value)
    return value
