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

    files = sorted(glob.glob("configs/*.yaml"))
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

    sources = "\n".join(p.read_text() for p in pathlib.Path("xbm").rglob("*.py") if p.name != "defaults.py")

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
