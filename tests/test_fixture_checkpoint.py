"""Checkpoints written by an older xbm (tests/fixtures/old_checkpoint, commit 71e469d, key XBM.DRIFT)
still load, resume to where that old code went, and evaluate to the numbers it measured.

The fixture's run: config.yaml there, 10 iterations, checkpoints at 6 and 10, evaluation at 10
(make_old_checkpoint.py). The reference of every comparison is the old code's own output."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from xbm.cli import eval_main
from xbm.config import load_cfg
from xbm.checkpoint.io import CHECKPOINT_KEYS, load_checkpoint
from xbm.engine.defaults import DefaultTrainer

from conftest import checkpoint_adapter, checkpoint_memory

FIXTURE = Path(__file__).parent / "fixtures" / "old_checkpoint"
AT_6, AT_10 = FIXTURE / "iter_0000006.pth", FIXTURE / "iter_0000010.pth"
# The continuation is compared across code versions, thread counts and CPUs, so not bit for bit:
# 4 Adam steps at 1e-3 move the weights by ~1e-3 (checked below), and a resume that lost any state
# (Adam's moments, the memory, the adapter's filter, the random states and so the batches) lands
# that far off, while rounding differences stay below 1e-6.
ATOL = 1e-5


@pytest.fixture
def run_folder(glyph_root, tmp_path, monkeypatch):
    """A folder where the fixture's relative DATA.ROOT (glyphs) is the tiny Glyphs set it was trained on."""
    (tmp_path / "glyphs").symlink_to(glyph_root)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _old_metrics() -> dict:
    return json.loads((FIXTURE / "metrics.jsonl").read_text().splitlines()[-1])


def _assert_metrics_match_the_old_run(metrics: dict) -> None:
    old = _old_metrics()
    assert metrics["num_queries"] == old["num_queries"] == 189
    # R@K counts queries: the same evaluation up to rounding differs by at most one query.
    for key in ("R@1", "R@10", "R@100", "MAP@R", "RP"):
        assert 0.0 <= metrics[key] <= 1.0
        assert metrics[key] == pytest.approx(old[key], abs=1.0 / old["num_queries"]), key
    assert metrics["R@1"] <= metrics["R@10"] <= metrics["R@100"]


def _resume(fixture_checkpoint: Path, output: str, *opts: str) -> DefaultTrainer:
    cfg = load_cfg(str(FIXTURE / "config.yaml"), ["OUTPUT_DIR", output, *opts])
    trainer = DefaultTrainer(cfg, resume=str(fixture_checkpoint))
    trainer.train()
    return trainer


def test_the_old_checkpoint_loads_with_weights_only_and_holds_every_state():
    state = torch.load(AT_6, map_location="cpu", weights_only=True)
    assert set(CHECKPOINT_KEYS) <= set(state) and state["iteration"] == 6
    # 6 steps x 8 images into 36 slots: full, and the write position wrapped to 48 - 36 = 12
    assert int(state["memory"]["filled"]) == 36 and int(state["memory"]["pointer"]) == 12
    # the memory holds the last 36 images' labels: slots 12..35 got steps 2-4, 0..11 steps 5-6
    assert state["memory"]["labels"].shape == (36,) and state["memory"]["labels"].max() < 22
    assert state["adapter"]["calls"] == 5  # AXBN adapts before every step but the first (empty memory)
    assert state["optimizer"]["state"][0]["step"] == 6
    assert state["drift"]["iteration"] == 6  # the probe set's snapshot, taken every 3 iterations
    saved = yaml.safe_load(state["config"])
    assert saved["XBM"]["DRIFT"]["ENABLE"] is True and "DRIFT" not in saved  # the layout of that version


@pytest.mark.slow
def test_the_old_checkpoint_resumes_to_where_the_old_code_went(run_folder, xbm_log):
    trainer = _resume(AT_6, "resumed")
    assert "XBM.DRIFT is now DRIFT" in xbm_log.text  # the fixture's config file uses the old name
    assert f"resumed from {AT_6} at iteration 6" in Path("resumed/log.txt").read_text() and trainer.iteration == 10
    new, old, start = (load_checkpoint(str(p)) for p in ("resumed/checkpoints/last.pth", AT_10, AT_6))
    assert new["iteration"] == old["iteration"] == 10
    moved = max((old["model"][n] - start["model"][n]).abs().max().item() for n in start["model"])
    assert moved > 100 * ATOL
    for name, tensor in old["model"].items():
        torch.testing.assert_close(new["model"][name], tensor, rtol=0, atol=ATOL, msg=name)
    # 4 more steps x 8 images: the write position moved from 12 to 12 + 32 - 36 = 8
    assert trainer.objective.memory.pointer == int(old["memory"]["pointer"]) == 8  # today's layout: _extra_state
    # the resumed run writes layout 2: the memory inside the objective, hook state under the hook's name
    assert new["layout"] == 2 and "memory" not in new
    new_memory, new_adapter = checkpoint_memory(new), checkpoint_adapter(new)
    assert torch.equal(new_memory["labels"], old["memory"]["labels"])  # the same batches were drawn
    torch.testing.assert_close(new_memory["feats"], old["memory"]["feats"], rtol=0, atol=ATOL)
    assert new_adapter["calls"] == old["adapter"]["calls"] == 9
    for key in ("mu", "sigma"):
        torch.testing.assert_close(new_adapter[key], old["adapter"][key], rtol=0, atol=ATOL)
    drift = new["hooks"]["DriftProbe"]
    assert drift["iteration"] == 9 and torch.equal(drift["indices"], old["drift"]["indices"])
    assert new["scheduler"]["last_epoch"] == old["scheduler"]["last_epoch"] == 10
    # the run records the config under today's names
    saved = yaml.safe_load(Path("resumed/config.yaml").read_text())
    assert {k: saved["DRIFT"][k] for k in ("ENABLE", "INTERVAL", "NUM_SAMPLES")} == {
        "ENABLE": True, "INTERVAL": 3, "NUM_SAMPLES": 16} and "DRIFT" not in saved["XBM"]
    _assert_metrics_match_the_old_run(json.loads(Path("resumed/metrics.jsonl").read_text().splitlines()[-1]))


def test_the_old_checkpoint_resumes_with_the_memory_probe_switched_on(run_folder):
    """The old memory has no item ids: its entries are of unknown items, not probed, and replaced as
    the ring turns; the continuation is the old code's (the probe changes nothing)."""
    trainer = _resume(AT_6, "probed", "DRIFT.MEMORY_PROBE", "True", "DRIFT.MEMORY_INTERVAL", "2")
    memory, old = trainer.objective.memory, load_checkpoint(str(AT_10))
    # 4 steps x 8 images into 36 slots: 32 entries of known items, 4 left from the old checkpoint
    assert int((memory.items.item_ids == -1).sum()) == 4 and int((memory.items.item_ids >= 0).sum()) == 32
    torch.testing.assert_close(memory.feats, old["memory"]["feats"], rtol=0, atol=ATOL)
    lines = [json.loads(line) for line in Path("probed/drift.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines if "memory_drift/cosine_stored" in line] == [8, 10]


@pytest.mark.slow
def test_a_resumed_old_checkpoint_resumes_again_to_the_same_bits(run_folder):
    """Today's code on the old checkpoint: 6 -> 8, then 8 -> 10, gives the bits of 6 -> 10 in one go."""
    trainer = _resume(AT_6, "resumed")
    _resume(AT_6, "first_half", "SOLVER.MAX_ITERS", "8")
    halves = _resume(Path("first_half/checkpoints/last.pth"), "second_half")
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(halves.model.state_dict()[name], tensor), name
    assert torch.equal(halves.objective.memory.feats, trainer.objective.memory.feats)


def test_the_old_checkpoint_evaluates_to_the_old_numbers(run_folder):
    shutil.copyfile(AT_10, run_folder / "old.pth")
    # no --cfg: the checkpoint's own saved config, with XBM.DRIFT, is read
    assert eval_main(["--ckpt", "old.pth", "--out", "evaluation"]) == 0
    rows = json.loads((run_folder / "evaluation" / "eval_metrics.json").read_text())
    assert [(row["iteration"], row["task"]) for row in rows] == [(10, "test")]
    _assert_metrics_match_the_old_run(rows[0])


# ------------------------------------------------------------------ the flat layout of before the Checkpointer
MAIN = Path(__file__).parent / "fixtures" / "main_checkpoint"
MAIN_6, MAIN_10 = MAIN / "iter_0000006.pth", MAIN / "iter_0000010.pth"


def test_the_flat_layout_checkpoint_holds_what_the_fixture_says():
    """tests/fixtures/main_checkpoint (commit 3bcfe6f): hook state at the top level, the memory's item
    buffers beside its features."""
    state = torch.load(MAIN_6, map_location="cpu", weights_only=True)
    assert {"memory", "adapter", "drift", "plateau", "best_metric", "best_on_test", "skipped_steps"} <= set(state)
    assert "layout" not in state and {"item_ids", "enqueued_feats"} <= set(state["memory"])
    assert state["best_metric"] == pytest.approx(0.8889, abs=1e-4) and state["best_on_test"]["iteration"] == 5


@pytest.mark.slow
def test_the_flat_layout_checkpoint_resumes_to_where_its_code_went(run_folder):
    cfg = load_cfg(str(MAIN / "config.yaml"), ["OUTPUT_DIR", "resumed"])
    trainer = DefaultTrainer(cfg, resume=str(MAIN_6))
    # every piece of state is back before the first step
    assert trainer.iteration == 6 and trainer.objective.memory.pointer == 12
    assert int((trainer.objective.memory.items.item_ids >= 0).sum()) == 36  # the probe's items, from "item_ids"
    listeners = {type(h).__name__: h for h in trainer.eval_hook.listeners}
    assert listeners["BestCheckpointer"].best_metric == pytest.approx(0.8889, abs=1e-4)
    assert listeners["BestOnTestReport"].best_on_test["iteration"] == 5 and trainer.plateau.best > 0.88
    trainer.train()
    old = load_checkpoint(str(MAIN_10))
    for name, tensor in old["model"].items():
        torch.testing.assert_close(trainer.model.state_dict()[name], tensor, rtol=0, atol=ATOL, msg=name)
    memory = trainer.objective.memory
    assert memory.pointer == 8 and torch.equal(memory.labels, old["memory"]["labels"])
    torch.testing.assert_close(memory.feats, old["memory"]["feats"], rtol=0, atol=ATOL)
    assert torch.equal(memory.items.item_ids, old["memory"]["item_ids"])
    assert trainer.objective.adapter.calls == old["adapter"]["calls"] == 9
    # the evaluations at 10 are the old code's, up to one query of rounding
    lines = [json.loads(line) for line in Path("resumed/metrics.jsonl").read_text().splitlines()]
    old_lines = [json.loads(line) for line in (MAIN / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["split"]) for r in lines] == [(10, "val"), (10, "test")]
    for new, reference in zip(lines, old_lines[2:]):
        for key in ("R@1", "MAP@R"):
            assert new[key] == pytest.approx(reference[key], abs=1.0 / reference["num_queries"]), (new["split"], key)
