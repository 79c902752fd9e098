"""Feature drift: the pure formula on hand-computed numbers, the monitor on a model whose output we set,
and scripts/drift.py on checkpoints of a tiny Glyphs model."""
import csv
import os

import numpy as np
import pytest
import torch
from torch import nn

from xbm.diagnostics.drift import DriftMonitor, feature_drift, probe_indices
from scripts_loader import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_feature_drift_on_a_hand_computed_example():
    old = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    new = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.8, 0.6]])
    # distances: sqrt(2) = 1.41421356, 0, sqrt(0.2^2 + 0.2^2) = 0.28284271 -> mean 0.56568542
    # cosines:   0, 1, 0.48 + 0.48 = 0.96 -> mean 0.65333333
    drift = feature_drift(old, new)
    assert drift["drift/mean_distance"] == pytest.approx(0.56568542, abs=1e-8)
    assert drift["drift/mean_cosine"] == pytest.approx(0.65333333, abs=1e-8)
    # Not unit vectors: (3, 4) -> (6, 8) moves by 5 in the same direction.
    scaled = feature_drift(np.array([[3.0, 4.0]]), np.array([[6.0, 8.0]]))
    assert scaled == {"drift/mean_distance": pytest.approx(5.0), "drift/mean_cosine": pytest.approx(1.0)}


def test_feature_drift_refuses_mismatched_input():
    with pytest.raises(ValueError, match="same shape"):
        feature_drift(torch.zeros(3, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="non-empty"):
        feature_drift(torch.zeros(3), torch.zeros(3))
    with pytest.raises(TypeError, match="old"):
        feature_drift([[1.0]], torch.zeros(1, 1))


class IndexImages(torch.utils.data.Dataset):
    """Item i is the 'image' tensor([i]) with label 0."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        return torch.tensor([float(index)]), 0


class TableModel(nn.Module):
    """Returns row i of a table for image tensor([i]): the test sets every embedding by hand."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.tensor([[1.0, 0.0]]).repeat(10, 1))
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.table[x[:, 0].long()]


def test_monitor_reports_none_first_then_the_drift_it_was_given():
    model = TableModel().train()
    monitor = DriftMonitor(IndexImages(), num_samples=4, interval=5, seed=0, batch_size=3)
    probe = monitor.indices
    assert len(probe) == 4 and len(set(probe.tolist())) == 4 and list(probe) == sorted(probe)
    assert np.array_equal(probe, probe_indices(10, 4, seed=0))

    rng_before = torch.get_rng_state()
    assert monitor.step(model, 0) is None  # first snapshot
    assert model.modes == [False, False]  # 4 probe images in batches of 3, in eval mode
    assert model.training  # mode restored
    assert monitor.step(model, 3) is None and len(model.modes) == 2  # not due: nothing computed

    with torch.no_grad():
        model.table[probe[0]] = torch.tensor([0.0, 1.0])  # moves by sqrt(2), cosine 0
        model.table[probe[1]] = torch.tensor([-1.0, 0.0])  # moves by 2, cosine -1
        unused = [i for i in range(10) if i not in probe][0]
        model.table[unused] = torch.tensor([5.0, 5.0])  # outside the probe set: not seen
    drift = monitor.step(model, 5)
    # distances sqrt(2), 2, 0, 0 -> mean (1.41421356 + 2) / 4 = 0.85355339; cosines 0, -1, 1, 1 -> 0.25
    assert drift["drift/mean_distance"] == pytest.approx(0.85355339, abs=1e-8)
    assert drift["drift/mean_cosine"] == pytest.approx(0.25, abs=1e-12)
    assert torch.equal(torch.get_rng_state(), rng_before)  # training's random stream untouched
    assert model.training

    resumed = DriftMonitor(IndexImages(), num_samples=4, interval=5, seed=0)
    resumed.load_state_dict(monitor.state_dict())
    assert resumed.step(model, 5) is None  # that snapshot is already taken
    assert resumed.step(model, 10) == {"drift/mean_distance": 0.0, "drift/mean_cosine": pytest.approx(1.0)}
    other = DriftMonitor(IndexImages(), num_samples=3, interval=5, seed=0)
    with pytest.raises(ValueError, match="another probe set"):
        other.load_state_dict(monitor.state_dict())


def test_monitor_arguments_are_checked():
    with pytest.raises(ValueError, match="interval"):
        DriftMonitor(IndexImages(), interval=0)
    with pytest.raises(ValueError, match="num_samples"):
        DriftMonitor(IndexImages(), num_samples=0)
    assert len(DriftMonitor(IndexImages(), num_samples=256)) == 10  # all of a small dataset


CODEPOINTS = [ord(c) for c in "ABCDEFGHJKLMNPQRSTUVWXYZ"]


def test_drift_script_orders_checkpoints_by_iteration(tmp_path, capsys):
    from xbm.config import load_cfg
    from xbm.data.datasets import build_dataset
    from xbm.data.glyphs import bundled_fonts, generate_glyphs
    from xbm.data.transforms import build_transforms
    from xbm.checkpoint.io import save_checkpoint
    from xbm.modeling import build_model

    root = tmp_path / "glyphs"
    fonts = [f for f in bundled_fonts() if f.startswith("DejaVu")][:6]
    generate_glyphs(root, min_fonts=4, fonts=fonts, codepoints=CODEPOINTS, progress=False)
    cfg = load_cfg("configs/glyphs_baseline.yaml", [
        "DATA.ROOT", str(root), "DATA.GLYPHS.MIN_FONTS", "4", "MODEL.DEVICE", "cpu",
        "MODEL.BACKBONE.CONVNET_WIDTHS", "(4, 8, 8, 8)", "MODEL.HEAD.DIM", "8", "DATA.BATCH_SIZE", "8",
    ])
    torch.manual_seed(0)
    models = {}
    for iteration, name in ((20, "a.pth"), (10, "b.pth"), (30, "c.pth")):  # file order != iteration order
        model = build_model(cfg)
        models[iteration] = model
        save_checkpoint({"iteration": iteration, "config": cfg.dump(), "model": model.state_dict()},
                        str(tmp_path / "ck" / name))

    drift = load_script("drift")
    out = tmp_path / "drift"
    assert drift.main(["--ckpts", str(tmp_path / "ck" / "*.pth"), "--num-samples", "16", "--out", str(out)]) == 0
    with open(out / "drift.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == [10, 20, 30]
    assert rows[0]["previous_iteration"] == "" and rows[1]["previous_iteration"] == "10"

    probe = DriftMonitor(build_dataset(cfg, "train", build_transforms(cfg, train=False)), num_samples=16)
    emb = {it: probe.embed(m) for it, m in models.items()}
    expected = feature_drift(emb[20], emb[30])
    assert float(rows[2]["distance_from_previous"]) == pytest.approx(expected["drift/mean_distance"], rel=1e-5)
    assert float(rows[2]["cosine_from_previous"]) == pytest.approx(expected["drift/mean_cosine"], rel=1e-5)
    to_last = feature_drift(emb[10], emb[30])["drift/mean_distance"]
    assert float(rows[0]["distance_to_last"]) == pytest.approx(to_last, rel=1e-5)
    assert float(rows[2]["distance_to_last"]) == pytest.approx(0.0, abs=1e-6)
    assert (out / "drift.png").is_file()

    with pytest.raises(SystemExit) as exit_info:
        drift.main(["--ckpts", str(tmp_path / "ck" / "a.pth"), "--out", str(out)])
    assert exit_info.value.code == 2 and "needs at least two" in capsys.readouterr().err
