import pytest
import yaml

from xbm.config import ConfigError, check_cfg, get_cfg, load_cfg

REQUIRED_KEYS = [
    "MODEL.DEVICE", "DATA.NAME", "DATA.ROOT", "DATA.BATCH_SIZE", "DATA.NUM_INSTANCES", "DATA.NUM_WORKERS",
    "XBM.ENABLE", "XBM.SIZE", "XBM.START_ITERATION", "XBM.WEIGHT", "SOLVER.MAX_ITERS", "SOLVER.BASE_LR",
    "SOLVER.CHECKPOINT_PERIOD", "SOLVER.SEED", "TEST.EVAL_PERIOD", "OUTPUT_DIR",
]


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def test_required_keys_exist():
    cfg = get_cfg()
    for key in REQUIRED_KEYS:
        _get(cfg, key)


def test_get_cfg_returns_independent_copies():
    a, b = get_cfg(), get_cfg()
    a.XBM.SIZE = 7
    assert b.XBM.SIZE != 7


def test_file_then_command_line_override(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"XBM": {"ENABLE": True, "SIZE": 1024}, "SOLVER": {"BASE_LR": 0.001}}))
    cfg = load_cfg(str(path), ["XBM.SIZE", "16384", "DATA.NAME", "sop"])
    assert cfg.XBM.ENABLE is True
    assert cfg.XBM.SIZE == 16384  # the command line wins over the file
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.001)
    assert cfg.DATA.NAME == "sop"
    assert cfg.is_frozen()


def test_unknown_key_in_file_names_the_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("XBM:\n  SIZEE: 3\n")
    with pytest.raises(ConfigError, match=r"XBM\.SIZEE.*typo\.yaml"):
        load_cfg(str(path))


def test_unknown_key_on_command_line_names_the_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'SOLVER\.LR'"):
        load_cfg(None, ["SOLVER.LR", "0.1"])


def test_wrong_type_and_odd_overrides_are_errors():
    with pytest.raises(ConfigError, match="XBM.SIZE"):
        load_cfg(None, ["XBM.SIZE", "large"])
    with pytest.raises(ConfigError, match="KEY VALUE"):
        load_cfg(None, ["XBM.SIZE"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_cfg("no/such/file.yaml")


@pytest.mark.parametrize(
    "opts, message",
    [
        (["DATA.BATCH_SIZE", "18", "DATA.NUM_INSTANCES", "4"], "DATA.BATCH_SIZE .*multiple of DATA.NUM_INSTANCES"),
        (["XBM.ENABLE", "True", "XBM.SIZE", "8", "DATA.BATCH_SIZE", "16"], "XBM.SIZE .*smaller than DATA.BATCH_SIZE"),
        (["LOSS.INBATCH_WEIGHT", "0.0"], "nothing would be trained"),
        (["SOLVER.MAX_ITERS", "0"], "SOLVER.MAX_ITERS"),
        (["SOLVER.SEED", "-1"], "SOLVER.SEED must be >= 0"),
    ],
)
def test_checks_name_the_key(opts, message):
    with pytest.raises(ValueError, match=message):
        load_cfg(None, opts)


def test_memory_smaller_than_batch_is_fine_when_memory_is_off():
    cfg = get_cfg()
    cfg.XBM.ENABLE = False
    cfg.XBM.SIZE = 1
    check_cfg(cfg)


def test_every_shipped_config_loads():
    import glob

    files = sorted(glob.glob("configs/*.yaml") + glob.glob("configs/base/*.yaml"))
    assert files
    for path in files:
        load_cfg(path)


def test_every_default_key_is_read_by_code():
    """No dead keys: each key is read somewhere in the library (not only defined in defaults.py).

    Code reads a key either by its dotted path (cfg.XBM.SIZE) or through its section
    (adapt = cfg.XBM.ADAPT; adapt.KALMAN_Q), so a key counts as read when its section is
    named and `.LEAF` is accessed.
    """
    import pathlib
    import re

    defined = pathlib.Path("xbm/config/defaults.py")  # (xbm/engine/defaults.py, the DefaultTrainer, does read keys)
    sources = "\n".join(p.read_text() for p in pathlib.Path("xbm").rglob("*.py") if p != defined)

    def leaves(node, prefix=""):
        for key, value in node.items():
            if hasattr(value, "items"):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    def is_read(key):
        *sections, leaf = key.split(".")
        if not sections:
            return re.search(rf"\.{leaf}\b", sources) is not None
        return ".".join(sections) in sources and re.search(rf"\.{leaf}\b", sources) is not None

    assert [key for key in leaves(get_cfg()) if not is_read(key)] == []


# ---------------------------------------------------------------- _BASE_ inheritance
def test_base_chain_is_merged_base_first_relative_to_each_file(tmp_path):
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "root.yaml").write_text("XBM:\n  SIZE: 100\n  WEIGHT: 0.5\nSOLVER:\n  BASE_LR: 0.1\n")
    (tmp_path / "bases" / "mid.yaml").write_text("_BASE_: root.yaml\nXBM:\n  SIZE: 200\n")
    (tmp_path / "leaf.yaml").write_text("_BASE_: bases/mid.yaml\nSOLVER:\n  BASE_LR: 0.3\n")
    cfg = load_cfg(str(tmp_path / "leaf.yaml"), ["XBM.WEIGHT", "2"])
    # root <- mid <- leaf <- command line, each level keeping what the later ones do not set
    assert (cfg.XBM.SIZE, cfg.SOLVER.BASE_LR, cfg.XBM.WEIGHT) == (200, 0.3, 2.0)
    assert "_BASE_" not in cfg.dump() and "SIZE: 200" in cfg.dump()


@pytest.mark.parametrize("files, message", [
    ({"a.yaml": "_BASE_: b.yaml\n", "b.yaml": "_BASE_: a.yaml\n"},
     r"b\.yaml: _BASE_ a\.yaml makes a cycle of config files \(.*a\.yaml -> .*b\.yaml -> .*a\.yaml\)"),
    ({"a.yaml": "_BASE_: a.yaml\n"}, r"a\.yaml: _BASE_ a\.yaml makes a cycle"),
    ({"a.yaml": "_BASE_: gone.yaml\nXBM:\n  SIZE: 64\n"}, r"a\.yaml: _BASE_ gone\.yaml does not exist"),
    ({"a.yaml": "_BASE_: [b.yaml]\n"}, r"a\.yaml: _BASE_ must name a config file"),
    ({"a.yaml": "_BASE_: b.yaml\n", "b.yaml": "XBM:\n  SIZEE: 1\n"}, r"unknown config key 'XBM\.SIZEE' in .*b\.yaml"),
])
def test_bad_base_is_one_sentence_naming_the_file(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_cfg(str(tmp_path / "a.yaml"))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- XBM.DRIFT -> DRIFT
def test_old_drift_section_is_read_as_drift_with_one_warning(tmp_path, xbm_log):
    path = tmp_path / "old.yaml"
    path.write_text("XBM:\n  ENABLE: true\n  DRIFT:\n    ENABLE: true\n    NUM_SAMPLES: 32\n")
    cfg = load_cfg(str(path))
    assert cfg.DRIFT.ENABLE is True and cfg.DRIFT.NUM_SAMPLES == 32 and cfg.DRIFT.INTERVAL == 50
    assert cfg.XBM.ENABLE is True and "DRIFT" not in cfg.XBM
    warnings = [r.getMessage() for r in xbm_log.records if r.levelname == "WARNING"]
    assert warnings == [f"{path}: XBM.DRIFT is now DRIFT (read as such; rename it in the file)"]
    assert load_cfg(None, ["XBM.DRIFT.INTERVAL", "7"]).DRIFT.INTERVAL == 7  # old command lines too
    path.write_text("XBM:\n  DRIFT:\n    ENABLE: true\nDRIFT:\n  ENABLE: false\n")
    with pytest.raises(ConfigError, match=r"old\.yaml: XBM\.DRIFT is the old name of DRIFT: give only DRIFT"):
        load_cfg(str(path))


def test_saved_config_of_an_old_checkpoint_is_read_as_today_and_resume_ignores_the_rename():
    from xbm.config.rules import config_differences

    old = get_cfg()
    old.defrost()
    saved = yaml.safe_load(old.dump())
    saved["XBM"]["DRIFT"] = saved.pop("DRIFT")  # the layout of xbm before DRIFT had its own section
    saved["XBM"]["DRIFT"]["NUM_SAMPLES"] = 64
    cfg = load_cfg(base_yaml=yaml.safe_dump(saved), opts=["OUTPUT_DIR", "elsewhere"])
    assert cfg.DRIFT.NUM_SAMPLES == 64
    assert config_differences(saved, yaml.safe_load(cfg.dump())) == []
    changed = load_cfg(base_yaml=yaml.safe_dump(saved), opts=["DRIFT.NUM_SAMPLES", "16", "XBM.SIZE", "8192"])
    assert config_differences(saved, yaml.safe_load(changed.dump())) == [
        "DRIFT.NUM_SAMPLES: 64 -> 16", "XBM.SIZE: 4096 -> 8192"]


def test_a_key_added_since_the_checkpoint_counts_as_its_default_at_resume():
    """An older checkpoint's config lacks the keys added since (here XBM.ADAPT.AGE_GROUPS): resuming it
    with their defaults is no change, with another value the change is reported against the default."""
    from xbm.config.rules import config_differences

    saved = yaml.safe_load(get_cfg().dump())
    del saved["XBM"]["ADAPT"]["AGE_GROUPS"]
    del saved["XBM"]["ADAPT"]["COVARIANCE_MOMENTUM"]
    assert config_differences(saved, yaml.safe_load(get_cfg().dump())) == []
    changed = load_cfg(opts=["XBM.ADAPT.AGE_GROUPS", "8"])
    assert config_differences(saved, yaml.safe_load(changed.dump())) == ["XBM.ADAPT.AGE_GROUPS: 4 -> 8"]
