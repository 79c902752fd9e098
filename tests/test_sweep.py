"""scripts/sweep.py: grid expansion and typing, folder names, skip-if-finished, the CSVs and the plot."""
import csv
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from xbm.config import load_cfg
from scripts_loader import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = "configs/glyphs_xbn.yaml"


sweep = load_script("sweep")


def fake_r1(cfg) -> float:
    """The R@1 the fake trainer reports for a config (a plain formula the test can recompute)."""
    value = 0.5 + 0.01 * cfg.SOLVER.SEED
    if cfg.XBM.ENABLE:
        value += cfg.XBM.SIZE / 100_000 + (0.05 if cfg.XBM.ADAPT.NAME == "xbn" else 0.0)
    return value


def write_run(folder, cfg, iterations):
    """What a training run leaves behind: config.yaml and metrics.jsonl lines at `iterations`."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write(cfg.dump())
    with open(os.path.join(folder, "metrics.jsonl"), "a") as f:
        for it in iterations:
            r1 = fake_r1(cfg)
            f.write(json.dumps({"iteration": it, "split": "test", "R@1": r1, "R@10": min(1.0, r1 + 0.2),
                                "num_queries": 100}) + "\n")


class FakeLauncher:
    """Stands in for launch_training: records calls and writes a finished run (or fails on request)."""

    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def __call__(self, run, command, env):
        self.calls.append((run.name, command, env))
        if run.name in self.fail:
            return 3
        cfg = load_cfg(command[command.index("--cfg") + 1], command[command.index("auto") + 1:])
        write_run(run.folder, cfg, [cfg.SOLVER.MAX_ITERS // 2, cfg.SOLVER.MAX_ITERS])
        return 0


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_grid_options_split_outside_brackets():
    assert sweep.parse_grid_option("XBM.SIZE=0,1024, 4096") == ("XBM.SIZE", ["0", "1024", "4096"])
    assert sweep.parse_grid_option("MODEL.BACKBONE.CONVNET_WIDTHS=(8, 16),(4,4)") == (
        "MODEL.BACKBONE.CONVNET_WIDTHS", ["(8, 16)", "(4,4)"])
    for bad in ("XBM.SIZE", "XBM.SIZE=", "=1,2", "XBM.SIZE=1,,2", "XBM.SIZE=1,1"):
        with pytest.raises(sweep.SweepError, match="--grid"):
            sweep.parse_grid_option(bad)


def test_plan_types_values_and_translates_size_zero(tmp_path):
    grids = [("XBM.SIZE", ["0", "1024"]), ("XBM.ADAPT.NAME", ["none", "xbn"]), ("SOLVER.BASE_LR", ["1e-4"])]
    plan = sweep.plan_sweep(CFG, grids, seeds=2, opts=["SOLVER.MAX_ITERS", "10"], output=str(tmp_path))
    sizes, names, lrs = (axis.values for axis in plan.axes)
    assert sizes == (0, 1024) and all(type(v) is int for v in sizes)
    assert names == ("none", "xbn")
    assert lrs == (1e-4,) and type(lrs[0]) is float
    assert [a.numeric for a in plan.axes] == [True, False, True]

    assert len(plan.rows) == 2 * 2 * 1 * 2
    # No memory: the adaptation changes nothing, so both ADAPT values share one run per seed.
    assert sorted(plan.runs) == sorted([
        "XBM.SIZE=0__SOLVER.BASE_LR=1e-4__seed=0", "XBM.SIZE=0__SOLVER.BASE_LR=1e-4__seed=1",
        *(f"XBM.SIZE=1024__XBM.ADAPT.NAME={a}__SOLVER.BASE_LR=1e-4__seed={s}" for a in ("none", "xbn") for s in (0, 1)),
    ])
    off = plan.runs["XBM.SIZE=0__SOLVER.BASE_LR=1e-4__seed=1"]
    assert off.cfg.XBM.ENABLE is False and off.cfg.XBM.SIZE == 4096  # the config file's size, untouched
    assert off.cfg.SOLVER.SEED == 1 and off.max_iters == 10
    assert "XBM.ADAPT.NAME" not in off.opts and off.cfg.XBM.ADAPT.NAME == "xbn"  # the file's value, whatever the grid
    assert off.folder == os.path.join(str(tmp_path), off.name)
    on = plan.runs["XBM.SIZE=1024__XBM.ADAPT.NAME=xbn__SOLVER.BASE_LR=1e-4__seed=0"]
    assert on.cfg.XBM.ENABLE is True and on.cfg.XBM.SIZE == 1024 and on.cfg.XBM.ADAPT.NAME == "xbn"
    assert on.cfg.SOLVER.BASE_LR == 1e-4
    shared = [r for r in plan.rows if r.values["XBM.SIZE"] == 0 and r.seed == 0]
    assert [r.values["XBM.ADAPT.NAME"] for r in shared] == ["none", "xbn"]
    assert shared[0].run is shared[1].run


def test_a_nonzero_size_turns_the_memory_on_from_a_config_without_it(tmp_path):
    plan = sweep.plan_sweep("configs/glyphs_baseline.yaml", [("XBM.SIZE", ["0", "512"])], 1, [], str(tmp_path))
    assert [r.run.cfg.XBM.ENABLE for r in plan.rows] == [False, True]
    assert plan.rows[1].run.cfg.XBM.SIZE == 512


def test_folder_names_are_path_safe():
    assert sweep.folder_name([("XBM.SIZE", "1024"), ("XBM.ADAPT.NAME", "xbn")], 0) == (
        "XBM.SIZE=1024__XBM.ADAPT.NAME=xbn__seed=0")
    assert sweep.folder_name([("MODEL.BACKBONE.CONVNET_WIDTHS", "(8, 16, 16, 32)")], 2) == (
        "MODEL.BACKBONE.CONVNET_WIDTHS=8,16,16,32__seed=2")
    assert sweep.folder_name([("DATA.ROOT", "a/b c")], 0) == "DATA.ROOT=a_bc__seed=0"


@pytest.mark.parametrize("grid, extra, message", [
    ("XBM.SIZEE=0,1", [], "--grid XBM.SIZEE=0: unknown config key 'XBM.SIZEE'"),
    ("XBM.SIZE=0,big", [], "--grid XBM.SIZE=big: bad config value"),
    ("XBM.SIZE=0,8", [], "combination XBM.SIZE=8, seed 0: XBM.SIZE \\(8\\) is smaller than DATA.BATCH_SIZE"),
    ("SOLVER.SEED=1,2", [], "use --seeds"),
    ("XBM.SIZE=0,64", ["XBM.ENABLE", "True"], "XBM.ENABLE is set by the XBM.SIZE grid"),
    ("XBM.SIZE=0,64", ["XBM.SIZE", "64"], "both a --grid key and a fixed override"),
])
def test_bad_sweeps_stop_before_anything_is_launched(tmp_path, capsys, grid, extra, message):
    launcher = FakeLauncher()
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--cfg", CFG, "--grid", grid, "--output", str(tmp_path / "s"), *extra], launcher=launcher)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert launcher.calls == [] and not (tmp_path / "s").exists()


def test_finished_runs_are_skipped_and_unfinished_ones_relaunched(tmp_path):
    out = tmp_path / "sweep"
    opts = ["SOLVER.MAX_ITERS", "10"]
    plan = sweep.plan_sweep(CFG, [("XBM.SIZE", ["64", "128", "256"])], 1, opts, str(out))
    done, partial, new = plan.runs.values()
    write_run(done.folder, done.cfg, [5, 10])
    write_run(partial.folder, partial.cfg, [5])  # interrupted after its first evaluation

    launcher = FakeLauncher()
    argv = ["--cfg", CFG, "--grid", "XBM.SIZE=64,128,256", "--output", str(out), *opts]
    assert sweep.main(argv, launcher=launcher) == 0
    assert [name for name, _, _ in launcher.calls] == [partial.name, new.name]
    command = launcher.calls[0][1]
    assert command[-2:] == ["OUTPUT_DIR", partial.folder]
    assert command[command.index("--resume") + 1] == "auto"  # continues from its last checkpoint
    rows = read_csv(out / "results.csv")
    assert [r["status"] for r in rows] == ["skipped", "ran", "ran"]

    again = FakeLauncher()
    assert sweep.main(argv, launcher=again) == 0
    assert again.calls == []
    assert [r["status"] for r in read_csv(out / "results.csv")] == ["skipped"] * 3


def test_a_folder_trained_with_another_config_is_refused(tmp_path, capsys):
    out = tmp_path / "sweep"
    plan = sweep.plan_sweep(CFG, [("XBM.SIZE", ["64"])], 1, ["SOLVER.MAX_ITERS", "10"], str(out))
    run = plan.runs["XBM.SIZE=64__seed=0"]
    other = load_cfg(CFG, [*run.opts, "SOLVER.BASE_LR", "0.1"])
    write_run(run.folder, other, [10])
    launcher = FakeLauncher()
    with pytest.raises(SystemExit):
        sweep.main(["--cfg", CFG, "--grid", "XBM.SIZE=64", "--output", str(out), "SOLVER.MAX_ITERS", "10"],
                   launcher=launcher)
    assert "(its value -> the sweep's): SOLVER.BASE_LR: 0.1 -> 0.0003" in capsys.readouterr().err
    assert launcher.calls == []


def test_results_summary_and_plot(tmp_path):
    out = tmp_path / "sweep"
    grid = ["--grid", "XBM.SIZE=0,1024,16384", "--grid", "XBM.ADAPT.NAME=none,xbn"]
    failing = "XBM.SIZE=16384__XBM.ADAPT.NAME=xbn__seed=2"
    launcher = FakeLauncher(fail={failing})
    code = sweep.main(["--cfg", CFG, *grid, "--seeds", "3", "--output", str(out), "SOLVER.MAX_ITERS", "20"],
                      launcher=launcher)
    assert code == 1  # one child failed; the others ran
    assert len(launcher.calls) == 3 + 2 * 2 * 3  # no-memory runs shared by both ADAPT values

    rows = read_csv(out / "results.csv")
    assert list(rows[0])[:5] == ["XBM.SIZE", "XBM.ADAPT.NAME", "seed", "status", "test/R@1"]
    assert len(rows) == 3 * 2 * 3
    for row in rows:
        size, adapt, seed = int(row["XBM.SIZE"]), row["XBM.ADAPT.NAME"], int(row["seed"])
        if row["run_dir"].endswith(failing):
            assert row["status"] == "failed" and row["test/R@1"] == ""
            assert row["log"] == os.path.join(str(out), failing, "console.log")
            assert "exit status 3" in row["detail"]
            continue
        expected = 0.5 + 0.01 * seed + (size / 100_000 + (0.05 if adapt == "xbn" else 0.0) if size else 0.0)
        assert row["status"] == "ran"
        assert float(row["test/R@1"]) == pytest.approx(expected, abs=1e-12)
    no_memory = [r for r in rows if r["XBM.SIZE"] == "0" and r["seed"] == "1"]
    assert no_memory[0]["run_dir"] == no_memory[1]["run_dir"] == os.path.join(str(out), "XBM.SIZE=0__seed=1")

    summary = read_csv(out / "summary.csv")
    assert len(summary) == 6
    for entry in summary:
        members = [r for r in rows if r["XBM.SIZE"] == entry["XBM.SIZE"]
                   and r["XBM.ADAPT.NAME"] == entry["XBM.ADAPT.NAME"] and r["status"] != "failed"]
        values = np.array([float(r["test/R@1"]) for r in members])
        lost_one = entry["XBM.SIZE"] == "16384" and entry["XBM.ADAPT.NAME"] == "xbn"
        assert int(entry["seeds"]) == len(values) == (2 if lost_one else 3)
        assert float(entry["test/R@1 mean"]) == pytest.approx(np.mean(values), abs=1e-12)
        assert float(entry["test/R@1 std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        assert float(entry["test/R@10 mean"]) == pytest.approx(np.mean(np.minimum(1.0, values + 0.2)), abs=1e-12)
    assert "num_queries mean" not in summary[0]  # counts are not metrics

    table = (out / "summary.md").read_text().splitlines()
    assert table[0] == ("| XBM.SIZE | XBM.ADAPT.NAME | seeds | test/R@1 | test/R@10 |")
    assert len(table) == 2 + 6
    # XBM.SIZE 1024 with xbn: R@1 = 0.5 + 0.01 * seed + 0.01024 + 0.05 over seeds 0-2
    values = 100 * (0.5 + 0.01 * np.arange(3) + 0.01024 + 0.05)
    expected = f"{values.mean():.1f} +- {values.std(ddof=1):.1f}"
    assert f"| 1024 | xbn | 3 | {expected} |" in "\n".join(table)

    with Image.open(out / "recall_vs_size.png") as image:
        assert image.size == (700, 450)


def test_children_share_the_cores_when_several_run_at_once(tmp_path):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert sweep.child_environment(2)["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    assert sweep.child_environment(1).get("OMP_NUM_THREADS") == os.environ.get("OMP_NUM_THREADS")
    launcher = FakeLauncher()
    assert sweep.main(["--cfg", CFG, "--grid", "XBM.SIZE=64,128,256", "--jobs", "2", "--output", str(tmp_path),
                       "SOLVER.MAX_ITERS", "4"], launcher=launcher) == 0
    assert len(launcher.calls) == 3
    assert all(env["OMP_NUM_THREADS"] == str(max(1, cores // 2)) for _, _, env in launcher.calls)
    assert [r["status"] for r in read_csv(tmp_path / "results.csv")] == ["ran"] * 3


@pytest.mark.slow
def test_a_real_tiny_sweep_trains_each_run_once(tmp_path, glyph_root):
    root = glyph_root
    out = tmp_path / "sweep"
    argv = [
        "--cfg", CFG, "--grid", "XBM.SIZE=0,32", "--jobs", "2", "--output", str(out),
        "DATA.ROOT", str(root), "DATA.GLYPHS.MIN_FONTS", "4", "MODEL.DEVICE", "cpu",
        "MODEL.BACKBONE.CONVNET_WIDTHS", "(8, 16, 16, 32)", "MODEL.HEAD.DIM", "32", "DATA.BATCH_SIZE", "8",
        "XBM.START_ITERATION", "5", "SOLVER.MAX_ITERS", "10", "TEST.EVAL_PERIOD", "0",
    ]
    assert sweep.main(argv) == 0
    rows = read_csv(out / "results.csv")
    assert [(r["XBM.SIZE"], r["status"]) for r in rows] == [("0", "ran"), ("32", "ran")]
    for row in rows:
        assert 0.0 <= float(row["test/R@1"]) <= float(row["test/R@10"]) <= 1.0
        logged = json.loads(open(os.path.join(row["run_dir"], "metrics.jsonl")).read().splitlines()[-1])
        assert float(row["test/R@1"]) == pytest.approx(logged["R@1"])
    assert "cross-batch memory: 32 x 32" in (out / "XBM.SIZE=32__seed=0" / "log.txt").read_text()
    assert "cross-batch memory off" in (out / "XBM.SIZE=0__seed=0" / "log.txt").read_text()

    def must_not_run(run, command, env):
        raise AssertionError(f"{run.name} was finished and must not be trained again")

    assert sweep.main(argv, launcher=must_not_run) == 0
    assert [r["status"] for r in read_csv(out / "results.csv")] == ["skipped", "skipped"]


def test_gpus_are_spread_over_the_slots_and_never_shared_at_once(tmp_path):
    # 4 runs, 2 at a time over GPUs 3 and 5: every child sees one GPU, and two children running
    # at the same moment never see the same one.
    import threading

    in_use, seen, lock = set(), [], threading.Lock()
    both_running = threading.Barrier(2, timeout=30)  # the first two runs overlap for sure
    inner = FakeLauncher()

    def launcher(run, command, env):
        gpu = env["CUDA_VISIBLE_DEVICES"]
        with lock:
            assert gpu not in in_use, f"GPU {gpu} given to two runs at once"
            in_use.add(gpu)
            seen.append(gpu)
            first_two = len(seen) <= 2
        if first_two:
            both_running.wait()
        with lock:
            in_use.discard(gpu)
        return inner(run, command, env)

    argv = ["--cfg", CFG, "--grid", "XBM.SIZE=64,128,256,512", "--jobs", "2", "--gpus", "3,5",
            "--output", str(tmp_path), "SOLVER.MAX_ITERS", "4"]
    assert sweep.main(argv, launcher=launcher) == 0
    assert sorted(seen[:2]) == ["3", "5"] and set(seen) == {"3", "5"} and len(seen) == 4
    assert [r["status"] for r in read_csv(tmp_path / "results.csv")] == ["ran"] * 4
    with pytest.raises(SystemExit):
        sweep.main(["--cfg", CFG, "--grid", "XBM.SIZE=64", "--gpus", "0,,1", "--output", str(tmp_path / "x")],
                   launcher=launcher)


def test_a_categorical_axis_gets_dodged_error_bars_not_lines(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(sweep, "save_figure", lambda figure, path: figures.append(figure))
    argv = ["--cfg", CFG, "--grid", "XBM.ADAPT.NAME=none,xbn", "--grid", "XBM.DTYPE=float32,float16",
            "--seeds", "2", "--output", str(tmp_path), "SOLVER.MAX_ITERS", "4"]
    assert sweep.main(argv, launcher=FakeLauncher()) == 0
    (ax,) = figures[0].axes
    assert len(ax.containers) == 2  # one error-bar series per XBM.DTYPE
    xs = [list(container.lines[0].get_xdata()) for container in ax.containers]
    assert xs == [pytest.approx([-0.05, 0.95]), pytest.approx([0.05, 1.05])]
    assert all(line.get_linestyle() == "None" for line in ax.lines)  # points only: no line joins categories
    means = [list(container.lines[0].get_ydata()) for container in ax.containers]
    cfg = load_cfg(CFG)
    expected = [0.505 + cfg.XBM.SIZE / 100_000 + bonus for bonus in (0.0, 0.05)]  # seeds 0 and 1
    assert means[0] == pytest.approx(expected) and means[1] == pytest.approx(expected)


def test_no_memory_is_a_reference_line_and_a_lone_size_an_error_bar(tmp_path, monkeypatch):
    # XBM.SIZE=0,4096 on a linear axis: no line from "no memory" to 4096 (0 is another method,
    # not a smaller memory), but a dashed line at the no-memory mean and one error bar per method.
    figures = []
    monkeypatch.setattr(sweep, "save_figure", lambda figure, path: figures.append(figure))
    argv = ["--cfg", CFG, "--grid", "XBM.SIZE=0,4096", "--grid", "XBM.ADAPT.NAME=none,xbn", "--seeds", "2",
            "--output", str(tmp_path), "SOLVER.MAX_ITERS", "4"]
    assert sweep.main(argv, launcher=FakeLauncher()) == 0
    (ax,) = figures[0].axes
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_ydata()) == pytest.approx([0.505, 0.505])  # seeds 0, 1
    assert len(ax.containers) == 2
    means = [container.lines[0].get_ydata()[0] for container in ax.containers]
    assert means == pytest.approx([0.505 + 0.04096, 0.505 + 0.04096 + 0.05])
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["4096"]
    # a single size left: a category, with the two methods' error bars side by side
    assert [list(container.lines[0].get_xdata()) for container in ax.containers] == [
        pytest.approx([-0.05]), pytest.approx([0.05])]
