"""Merging a YAML file and command-line overrides into the defaults, with readable errors."""
from __future__ import annotations

import logging
import os
from ast import literal_eval

import yaml
from yacs.config import CfgNode

from .checks import check_cfg
from .defaults import get_cfg
from .rules import RENAMED_SECTIONS, rename_old_sections, renamed_key

# A config file may name another one to start from (detectron2's convention): `_BASE_: other.yaml`,
# a path relative to the file that says it; the base may have a base of its own.
BASE_KEY = "_BASE_"

logger = logging.getLogger("xbm")


class ConfigError(ValueError):
    """A config file or override that cannot be applied."""


def load_cfg(
    cfg_file: str | None = None, opts: list[str] | None = None, check: bool = True, base_yaml: str | None = None
) -> CfgNode:
    """Defaults <- base_yaml (a saved config.yaml text) <- cfg_file (after its _BASE_ files) <- opts
    (KEY VALUE pairs), checked and frozen."""
    cfg = get_cfg()
    if base_yaml is not None:
        # A checkpoint of an earlier version: its renamed sections are read quietly.
        data = _parse_yaml(base_yaml, "the saved config")
        rename_old_sections(data)
        _merge(lambda d: _merge_dict(cfg, d), data, "in the saved config")
    if cfg_file:
        if not os.path.isfile(cfg_file):
            raise ConfigError(f"config file {cfg_file!r} does not exist")
        _merge_file(cfg, cfg_file, ())
    if opts:
        if len(opts) % 2:
            raise ConfigError(f"overrides come in KEY VALUE pairs; {opts[-1]!r} has no value")
        _merge(cfg.merge_from_list, _coerce_overrides(cfg, _renamed_overrides(list(opts))), "on the command line")
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


def _merge_file(cfg: CfgNode, path: str, inheriting: tuple[str, ...]) -> None:
    """Merge the file's _BASE_ chain (the base first), then the file; `inheriting` is the chain of
    files that led here, to name a cycle."""
    data = _parse_yaml(_read_text(path), path)
    base = data.pop(BASE_KEY, None)
    if base is not None:
        _merge_file(cfg, _base_path(path, base, inheriting), (*inheriting, path))
    try:
        renamed = rename_old_sections(data)
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from None
    for old in renamed:
        logger.warning(f"{path}: {old} is now {RENAMED_SECTIONS[old]} (read as such; rename it in the file)")
    _merge(lambda d: _merge_dict(cfg, d), data, f"in {path}")


def _base_path(path: str, base, inheriting: tuple[str, ...]) -> str:
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: {BASE_KEY} must name a config file (a path relative to {path}), not {base!r}")
    base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
    chain = [os.path.abspath(p) for p in (*inheriting, path)]
    if os.path.abspath(base_path) in chain:
        cycle = " -> ".join([*inheriting, path, base_path])
        raise ConfigError(f"{path}: {BASE_KEY} {base} makes a cycle of config files ({cycle})")
    if not os.path.isfile(base_path):
        raise ConfigError(f"{path}: {BASE_KEY} {base} does not exist ({base_path})")
    return base_path


def _parse_yaml(text: str, source: str) -> dict:
    """The YAML mapping of `text` ({} for an empty file), with syntax errors naming the file and line."""
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
        return {}  # an empty file changes nothing
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a YAML mapping of config keys (KEY: value), not a {type(data).__name__}")
    return data


def _merge_dict(cfg: CfgNode, data: dict) -> None:
    """yacs' merge_from_other_cfg with lenient types (coerce_value)."""
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


def _renamed_overrides(opts: list) -> list:
    """KEY VALUE pairs with the keys of renamed sections (XBM.DRIFT.ENABLE) under their new names."""
    for i in range(0, len(opts) - 1, 2):
        new = renamed_key(str(opts[i]))
        if new is not None:
            logger.warning(f"{opts[i]} is now {new} (read as such)")
            opts[i] = new
    return opts


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
