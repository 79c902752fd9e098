"""The trainer is a loop plus hooks: a hook added from outside sees every step in order, its state
rides in the checkpoint, and close() runs even when training fails."""
from __future__ import annotations

import pytest
import torch

from xbm.config import load_cfg
from xbm.engine import hooks
from xbm.checkpoint.io import load_checkpoint
from xbm.engine.defaults import DefaultTrainer


class CountingHook(hooks.HookBase):
    def __init__(self):
        self.calls, self.losses, self.closed = [], 0, False

    def before_train(self):
        self.calls.append(("before_train", self.trainer.iteration))

    def before_step(self):
        self.calls.append(("before_step", self.trainer.iteration))

    def after_step(self):
        self.calls.append(("after_step", self.trainer.iteration))
        self.losses += "loss/total" in self.trainer.step_outputs

    def after_train(self):
        self.calls.append(("after_train", self.trainer.iteration))

    def close(self):
        self.closed = True

    def state_dict(self):
        return {"counting": torch.tensor(self.losses)}

    def load_state_dict(self, checkpoint):
        self.losses = int(checkpoint["counting"])


def _cfg(glyph_root, out, iters):
    return load_cfg("configs/glyphs_xbm.yaml", [
        "DATA.ROOT", str(glyph_root), "DATA.GLYPHS.MIN_FONTS", "4", "OUTPUT_DIR", str(out), "XBM.SIZE", "64",
        "SOLVER.MAX_ITERS", str(iters), "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0"])


def test_a_hook_from_outside_sees_every_step_and_its_state_is_resumed(glyph_root, tmp_path):
    trainer = DefaultTrainer(_cfg(glyph_root, tmp_path / "run", 3))
    hook = CountingHook()
    trainer.register_hooks([hook])
    trainer.train()
    steps = [("before_step", i) for i in range(3)]
    assert hook.calls == [("before_train", 0)] + [c for i in range(3) for c in
                                                  (("before_step", i), ("after_step", i + 1))] + [("after_train", 3)]
    assert [c for c in hook.calls if c[0] == "before_step"] == steps
    assert hook.losses == 3 and hook.closed
    # the default hooks ran too: last.pth at the end (with this hook's state) and the final evaluation
    saved = load_checkpoint(str(tmp_path / "run" / "checkpoints" / "last.pth"))
    assert saved["iteration"] == 3 and int(saved["hooks"]["CountingHook"]["counting"]) == 3  # under its name
    again = CountingHook()
    DefaultTrainer(_cfg(glyph_root, tmp_path / "run", 5), resume="auto", extra_hooks=[again]).train()
    assert again.losses == 5 and again.calls[0] == ("before_train", 3)


def test_close_runs_when_a_step_fails(glyph_root, tmp_path):
    trainer = DefaultTrainer(_cfg(glyph_root, tmp_path / "run", 4))
    hook = CountingHook()
    trainer.register_hooks([hook])

    def failing_step():
        raise RuntimeError("boom")

    trainer.run_step = failing_step
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert hook.closed and ("after_train", 0) not in hook.calls
