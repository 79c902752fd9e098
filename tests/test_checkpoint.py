import random

import numpy as np
import pytest
import torch

from xbm.checkpoint.io import load_checkpoint, restore_rng_states, rng_states, save_checkpoint


def test_round_trip_with_weights_only(tmp_path):
    path = tmp_path / "ck" / "last.pth"
    state = {"iteration": 3, "model": {"w": torch.arange(4.0)}, "rng": rng_states()}
    save_checkpoint(state, str(path))
    loaded = load_checkpoint(str(path))
    assert loaded["iteration"] == 3
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_interrupted_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint({"iteration": 1}, str(path))

    def broken_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"iteration": 2}, str(path))
    monkeypatch.undo()
    assert load_checkpoint(str(path))["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_rng_states_restore_every_generator(tmp_path):
    save_checkpoint({"rng": rng_states()}, str(tmp_path / "r.pth"))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_states(load_checkpoint(str(tmp_path / "r.pth"))["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(str(tmp_path / "nope.pth"))
