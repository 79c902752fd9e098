"""Runs that survive: kill -9 and resume, refusal of another config, NaN stop, validation selection."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from xbm.config import load_cfg
from xbm.checkpoint.io import load_checkpoint
from xbm.engine.defaults import DefaultTrainer

from conftest import checkpoint_adapter, checkpoint_memory
from xbm.engine.trainer import NonFiniteLossError


def _opts(root, out, *extra):
    return [
        "OUTPUT_DIR", str(out), "DATA.ROOT", str(root), "DATA.GLYPHS.MIN_FONTS", "4", "MODEL.DEVICE", "cpu",
        "MODEL.HEAD.DIM", "32", "DATA.BATCH_SIZE", "8", "XBM.SIZE", "36", "XBM.START_ITERATION", "5",
        "SOLVER.BASE_LR", "0.001", "TEST.EVAL_PERIOD", "0", "SOLVER.LOG_PERIOD", "5", *extra,
    ]


def _train_command(root, out, *extra, config="configs/glyphs_axbn.yaml"):
    return [sys.executable, "tools/train_net.py", "--cfg", config, *_opts(root, out, *extra)]


# The conv net with AXBN, a timm ViT (no BatchNorm; AdamW with its decay groups) with XBN, and the conv net
# with XBN and the encoder-side corrections (key encoder and refresh; key encoder and age weighting, heavy:
# age weighting holds no state of its own, its weights follow the memory's pointer, which every case resumes).
@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/glyphs_axbn.yaml", "tests/fixtures/tiny_vit_xbn.yaml",
                                    "tests/fixtures/glyphs_encoder_side.yaml",
                                    pytest.param("tests/fixtures/glyphs_age_weighted.yaml", marks=pytest.mark.heavy)])
def test_killed_run_resumes_to_the_same_weights_memory_and_metrics(glyph_root, tmp_path, config):
    common = ("SOLVER.MAX_ITERS", "60", "SOLVER.CHECKPOINT_PERIOD", "10")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count in every process: same sums
    reference = tmp_path / "reference"
    subprocess.run(_train_command(glyph_root, reference, *common, config=config), check=True, env=env,
                   capture_output=True)

    killed = tmp_path / "killed"
    checkpoint = killed / "checkpoints" / "last.pth"
    proc = subprocess.Popen(_train_command(glyph_root, killed, *common, config=config), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved_at = load_checkpoint(str(checkpoint))["iteration"]
    assert 10 <= saved_at < 60, "the run was not interrupted mid-way"

    subprocess.run([*_train_command(glyph_root, killed, *common, config=config), "--resume", "auto"],
                   check=True, env=env, capture_output=True)
    a = load_checkpoint(str(reference / "checkpoints" / "last.pth"))
    b = load_checkpoint(str(checkpoint))
    assert b["iteration"] == 60
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=1e-6, msg=name)
    for name, tensor in checkpoint_memory(a).items():
        if isinstance(tensor, torch.Tensor):
            torch.testing.assert_close(checkpoint_memory(b)[name], tensor, rtol=0, atol=1e-6, msg=name)
        else:
            assert checkpoint_memory(b)[name] == tensor, name
    for name, value in checkpoint_adapter(a).items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(checkpoint_adapter(b)[name], value, rtol=0, atol=1e-6, msg=name)
    assert a.keys() == b.keys()
    for name, tensor in (a.get("key_encoder") or {}).items():
        torch.testing.assert_close(b["key_encoder"][name], tensor, rtol=0, atol=1e-6, msg=name)
    assert a["hooks"] == b["hooks"]  # the refresh's cursor among them
    last = [json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]) for run in (reference, killed)]
    assert last[0]["iteration"] == last[1]["iteration"] == 60
    for key in ("R@1", "R@10", "MAP@R"):
        assert last[1][key] == pytest.approx(last[0][key], abs=1e-6)


def test_resume_refuses_a_checkpoint_of_another_config(glyph_root, tmp_path):
    out = tmp_path / "run"
    DefaultTrainer(load_cfg("configs/glyphs_xbm.yaml", _opts(glyph_root, out, "SOLVER.MAX_ITERS", "2"))).train()
    other = load_cfg("configs/glyphs_xbm.yaml", _opts(glyph_root, out, "MODEL.HEAD.DIM", "16", "XBM.SIZE", "40"))
    with pytest.raises(ValueError, match=r"MODEL\.HEAD\.DIM: 32 -> 16.*XBM\.SIZE: 36 -> 40"):
        DefaultTrainer(other, resume="auto")
    # a longer schedule or another device is not a different experiment; SOLVER.RESUME works as --resume
    longer = load_cfg("configs/glyphs_xbm.yaml", _opts(glyph_root, out, "SOLVER.MAX_ITERS", "3", "SOLVER.RESUME", "auto"))
    assert DefaultTrainer(longer).iteration == 2
    assert DefaultTrainer(load_cfg("configs/glyphs_xbm.yaml", _opts(glyph_root, out))).iteration == 0


def test_a_non_finite_loss_that_persists_stops_and_keeps_the_last_good_checkpoint(glyph_root, tmp_path):
    out = tmp_path / "run"
    cfg = load_cfg("configs/glyphs_xbm.yaml", _opts(glyph_root, out, "SOLVER.MAX_ITERS", "10",
                                                     "SOLVER.CHECKPOINT_PERIOD", "1", "SOLVER.MAX_NONFINITE_STEPS", "3"))
    trainer = DefaultTrainer(cfg)
    real_loss = trainer.objective.loss.forward

    def loss_that_explodes(*args, **kwargs):
        value = real_loss(*args, **kwargs)
        return value * float("nan") if trainer.iteration >= 4 else value

    trainer.objective.loss.forward = loss_that_explodes
    with pytest.raises(NonFiniteLossError, match="3 steps in a row .iterations 4 to 6.*last good checkpoint"):
        trainer.train()
    assert trainer.iteration == 6 and trainer.guard.skipped_steps == 3
    state = load_checkpoint(str(out / "checkpoints" / "last.pth"))
    assert state["iteration"] == 6 and state["guard"]["skipped_steps"] == 2  # saved after the second skipped step
    for name, param in trainer.model.named_parameters():
        # the skipped steps changed no weight: the checkpoint holds the weights of iteration 4
        assert torch.equal(state["model"][name], param.detach()), name
        assert torch.isfinite(param).all()
    for name, buffer in trainer.model.named_buffers():  # nor BatchNorm's statistics
        assert torch.equal(state["model"][name], buffer), name
    log = (out / "log.txt").read_text()
    assert "iteration 4: non-finite loss or embeddings; step skipped (1 in a row, 1 in all" in log


def test_validation_split_selects_best_checkpoint(glyph_root, tmp_path):
    out = tmp_path / "run"
    cfg = load_cfg("configs/glyphs_baseline.yaml", _opts(glyph_root, out, "SOLVER.MAX_ITERS", "6",
                                                          "TEST.EVAL_PERIOD", "3", "DATA.VAL_FRACTION", "0.3"))
    trainer = DefaultTrainer(cfg)
    assert len(trainer.evaluator.tasks["val"][0]) + len(trainer.train_set) == 198
    trainer.train()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["split"]) for r in records] == [(3, "val"), (3, "test"), (6, "val"), (6, "test")]
    best = max((r for r in records if r["split"] == "val"), key=lambda r: r["R@1"])
    state = load_checkpoint(str(out / "checkpoints" / "best.pth"))
    assert state["hooks"]["BestCheckpointer"]["best_metric"] == pytest.approx(best["R@1"])
    assert state["iteration"] == best["iteration"]


def test_memory_sized_to_the_training_set(glyph_root, tmp_path):
    cfg = load_cfg("configs/glyphs_xbm.yaml", _opts(glyph_root, tmp_path / "run", "XBM.SIZE", "-1"))
    trainer = DefaultTrainer(cfg)
    assert trainer.objective.memory.size == len(trainer.train_set) == 198
    assert "SIZE: 198" in (tmp_path / "run" / "config.yaml").read_text()
