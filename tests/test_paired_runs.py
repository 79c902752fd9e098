"""scripts/paired_runs.py on run folders the test writes: the paired table against numpy, the figure."""
import json

import numpy as np
import pytest

from scripts_loader import load_script

paired_runs = load_script("paired_runs")


def _run(folder, val, test, cosines, seconds):
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"iteration": 100, "split": "test", "R@1": 0.01}) + "\n")  # an earlier evaluation
        for split, r1 in (("val", val), ("test", test)):
            f.write(json.dumps({"iteration": 200, "split": split, "R@1": r1, "num_queries": 9}) + "\n")
    with open(folder / "drift.jsonl", "w") as f:
        for iteration, cos in zip((50, 100, 150, 200), cosines):
            f.write(json.dumps({"iteration": iteration, "memory_drift/cosine_stored": cos,
                                "memory_drift/cosine_enqueued": cos / 2}) + "\n")
    (folder / "log.txt").write_text(f"2026-12-07 10:00:00 INFO start\nnot a stamp\n"
                                    f"2026-12-07 10:{seconds // 60:02d}:{seconds % 60:02d} INFO end\n")


def test_the_table_pairs_each_seed_with_the_reference_of_that_seed(tmp_path, capsys):
    ref_test, run_test = [0.70, 0.74, 0.72], [0.73, 0.75, 0.76]
    for seed in range(3):
        _run(tmp_path / "ref" / f"A=1__seed={seed}", 0.9, ref_test[seed], [0.1, 0.2, 0.3, 0.4], 100 + seed)
        _run(tmp_path / "new" / f"A=2__seed={seed}", 0.8 + seed / 100, run_test[seed], [0.5, 0.5, 0.6, 0.8], 200)
    assert paired_runs.main(["--iteration", "200", "--cosines-from", "100",
                             "--reference", "ref", str(tmp_path / "ref" / "*"),
                             "--run", "new", str(tmp_path / "new" / "*"),
                             "--figure", str(tmp_path / "fig.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    diff = 100 * (np.array(run_test) - np.array(ref_test))
    assert cells[0] == "new" and cells[1] == "3"
    val = 100 * np.array([0.80, 0.81, 0.82])
    assert cells[2] == f"{val.mean():.1f} +- {val.std(ddof=1):.1f}"
    assert cells[4] == f"{diff.mean():+.1f} +- {diff.std(ddof=1):.1f}"
    assert cells[5] == " / ".join(f"{d:+.2f}" for d in diff)
    assert cells[6] == f"{diff.mean() / diff.std(ddof=1):+.1f}"
    assert cells[7] == f"{np.mean([0.5, 0.6, 0.8]):.3f} +- 0.000"  # iterations 100-200, the same in each seed
    assert cells[9] == "-"  # no cosine_newest measured
    assert cells[10] == "200 +- 0"
    ref_cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert ref_cells[4] == "-" and ref_cells[10] == "101 +- 1"
    assert (tmp_path / "fig.png").stat().st_size > 0


def test_a_setting_without_runs_is_a_row_of_none_and_a_reference_without_runs_one_sentence(tmp_path, capsys):
    assert paired_runs.main(["--iteration", "1", "--run", "x", str(tmp_path / "none*")]) == 0
    out = capsys.readouterr()
    assert "| x | 0 | - | - |" in out.out and "matches no run folder ending in seed=<s>" in out.err
    assert paired_runs.main(["--iteration", "1", "--reference", "r", str(tmp_path / "none*"),
                             "--run", "x", str(tmp_path / "none*")]) == 2
    assert "matches no run folder ending in seed=<s>" in capsys.readouterr().err


def test_references_trained_longer_are_read_at_their_own_iteration(tmp_path, capsys):
    for seed in range(2):
        _run(tmp_path / "ref" / f"seed={seed}", 0.9, 0.70, [0.1] * 4, 60)
        _run(tmp_path / "new" / f"seed={seed}", 0.9, 0.75 + seed / 100, [0.1] * 4, 60)
    with open(tmp_path / "ref" / "seed=0" / "metrics.jsonl", "a") as f:  # seed 0's reference also at 300
        f.write(json.dumps({"iteration": 300, "split": "test", "R@1": 0.74}) + "\n")
    with open(tmp_path / "ref" / "seed=1" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iteration": 300, "split": "test", "R@1": 0.77}) + "\n")
    assert paired_runs.main(["--iteration", "200", "--reference-iteration", "300",
                             "--reference", "ref", str(tmp_path / "ref" / "*"),
                             "--run", "new", str(tmp_path / "new" / "*")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [c.strip() for c in lines[2].strip("|").split("|")][3] == "75.5 +- 2.1"  # 74 and 77
    assert [c.strip() for c in lines[3].strip("|").split("|")][5] == "+1.00 / -1.00"  # 75 - 74, 76 - 77
