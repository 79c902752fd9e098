"""scripts/demo.py: four runs, two at a time, one table; a bad override is one sentence."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _demo(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_the_demo_trains_its_four_runs_and_prints_their_table(glyph_root, tmp_path):
    done = _demo("--iters", "3", "--output", str(tmp_path / "demo"), "DATA.ROOT", str(glyph_root),
                 "DATA.GLYPHS.MIN_FONTS", "4")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = dict(re.findall(r"^(no memory|XBM, summed|XBM, averaged|XBN, averaged)\s+([0-9.]+)", done.stdout, re.M))
    assert list(rows) == ["no memory", "XBM, summed", "XBM, averaged", "XBN, averaged"]
    for name, folder, reduction, adapt in (("no memory", "no_memory", "pairs", None),
                                           ("XBM, summed", "xbm_summed", "batch", "none"),
                                           ("XBM, averaged", "xbm_averaged", "pairs", "none"),
                                           ("XBN, averaged", "xbn_averaged", "pairs", "xbn")):
        run = tmp_path / "demo" / folder
        final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        assert final["iteration"] == 3 and f"{100 * final['R@1']:.2f}" == rows[name]
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["LOSS"]["CONTRASTIVE"]["REDUCTION"] == reduction
        assert config["XBM"]["ENABLE"] == (adapt is not None)
        if adapt:
            assert config["XBM"]["ADAPT"]["NAME"] == adapt
    assert re.search(r"4 runs of 3 iterations, 2 at a time with \d+ thread", done.stdout)


def test_a_bad_override_stops_the_demo_in_one_sentence(tmp_path):
    done = _demo("--output", str(tmp_path / "demo"), "SOLVER.NOPE", "1")
    assert done.returncode == 2 and done.stderr.strip() == (
        "error: unknown config key 'SOLVER.NOPE' on the command line; every key is listed with its meaning in "
        "xbm/config/defaults.py")
