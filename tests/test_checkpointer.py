"""The Checkpointer (xbm/engine/checkpointer.py): named checkpointables and hooks in one layout, and the flat
layout of before read as it. The references are dicts written out by hand in each layout."""
from __future__ import annotations

import pytest
import torch

from xbm.checkpoint.io import CheckpointError, rng_states, save_checkpoint
from xbm.engine.checkpointer import FLAT_HOOK_STATE, LAYOUT, Checkpointer, upgrade_layout
from xbm.engine.hooks import HookBase


class Box:
    """A checkpointable: state_dict / load_state_dict of one value."""

    def __init__(self, value=None):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


class Counter(HookBase):
    def __init__(self, count=0):
        self.count = count

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


class Stateless(HookBase):
    pass


def test_save_then_restore_every_checkpointable_and_hook(tmp_path):
    folder = tmp_path / "checkpoints"
    hooks = [Counter(7), Stateless()]
    Checkpointer(str(folder), {"model": Box(torch.ones(2)), "guard": Box(3)}, hooks).save(
        "last.pth", iteration=5, config="a: 1\n")
    state = torch.load(folder / "last.pth", weights_only=True)
    assert state["layout"] == LAYOUT and state["iteration"] == 5 and state["world_size"] == 1
    assert state["hooks"] == {"Counter": {"count": 7}}  # a hook without state saves nothing
    assert torch.equal(state["model"]["value"], torch.ones(2)) and state["guard"] == {"value": 3}
    model, guard, counter = Box(), Box(), Counter()
    again = Checkpointer(str(folder), {"model": model, "guard": guard}, [counter])
    notes = again.restore(again.load(str(folder / "last.pth")))
    assert notes == [] and torch.equal(model.value, torch.ones(2)) and guard.value == 3 and counter.count == 7


def test_keep_leaves_the_newest_numbered_checkpoints(tmp_path):
    checkpointer = Checkpointer(str(tmp_path), {"model": Box(1)})
    for iteration in (2, 4, 6):
        checkpointer.save("last.pth", keep=2, iteration=iteration, config="")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000004.pth", "iter_0000006.pth", "last.pth"]


def test_two_hooks_of_one_name_are_refused_unless_one_is_renamed(tmp_path):
    twins = [Counter(1), Counter(2)]
    with pytest.raises(ValueError, match="two hooks save their state as 'Counter'"):
        Checkpointer(str(tmp_path), {}, twins).state(iteration=0, config="")
    twins[1].checkpoint_name = "second_counter"
    assert Checkpointer(str(tmp_path), {}, twins).state(iteration=0, config="")["hooks"] == {
        "Counter": {"count": 1}, "second_counter": {"count": 2}}


FLAT = {  # what DefaultTrainer wrote before the Checkpointer (and xbm 0.1, without skipped_steps)
    "iteration": 6, "config": "x: 1\n", "model": {"w": torch.ones(1)}, "optimizer": {"state": {}},
    "scheduler": {"last_epoch": 6}, "scaler": {}, "skipped_steps": 2, "plateau": {"scale": 0.5},
    "memory": {"feats": torch.zeros(3, 2), "labels": torch.arange(3), "_extra_state": torch.tensor([1, 3])},
    "adapter": {"calls": 5}, "drift": {"iteration": 6}, "best_metric": 0.8, "best_on_test": {"score": 0.4},
    "rng": rng_states(), "world_size": 1, "counting": torch.tensor(4),
}


def test_the_flat_layout_is_read_as_layout_2():
    upgraded = upgrade_layout(FLAT)
    assert upgraded["layout"] == LAYOUT and "layout" not in FLAT  # a new dict
    for key in ("iteration", "config", "model", "optimizer", "scheduler", "scaler", "rng", "world_size", "plateau"):
        assert upgraded[key] is FLAT[key], key
    assert upgraded["objective"] == {"memory.feats": FLAT["memory"]["feats"], "memory.labels": FLAT["memory"]["labels"],
                                     "memory._extra_state": FLAT["memory"]["_extra_state"],
                                     "_extra_state": {"adapter": {"calls": 5}}}
    assert upgraded["guard"] == {"skipped_steps": 2}
    assert upgraded["hooks"] == {"BestCheckpointer": {"best_metric": 0.8}, "DriftProbe": {"iteration": 6},
                                 "BestOnTestReport": {"best_on_test": {"score": 0.4}}}
    assert upgraded[FLAT_HOOK_STATE] == {"counting": FLAT["counting"]}  # a user's hook's entry
    assert upgrade_layout(upgraded) is upgraded
    no_memory = upgrade_layout({**FLAT, "memory": None, "adapter": None, "plateau": None})
    assert no_memory["objective"] == {"_extra_state": {"adapter": None}} and "plateau" not in no_memory
    old = {k: v for k, v in FLAT.items() if k != "skipped_steps"}  # xbm 0.1
    assert upgrade_layout(old)["guard"] == {"skipped_steps": 0}


def test_a_user_hook_of_the_flat_layout_gets_its_top_level_entries(tmp_path):
    class OldStyle(HookBase):  # reads its entries from the whole checkpoint, as hooks did then
        def load_state_dict(self, checkpoint):
            self.count = int(checkpoint["counting"])

    path = tmp_path / "flat.pth"
    save_checkpoint(FLAT, str(path))
    hook, guard = OldStyle(), Box()
    guard.load_state_dict = lambda state: setattr(guard, "value", state["skipped_steps"])
    checkpointer = Checkpointer(str(tmp_path), {"guard": guard}, [hook])
    checkpointer.restore(checkpointer.load(str(path)))
    assert hook.count == 4 and guard.value == 2


def test_a_newer_layout_is_refused_naming_the_file():
    with pytest.raises(CheckpointError, match="run.pth has checkpoint layout 3.*newer xbm"):
        upgrade_layout({**FLAT, "layout": 3}, "run.pth")
