"""scripts/gpu_check.py without a GPU: one sentence and status 2; its bookkeeping on fake checks."""
import json
import os
import subprocess
import sys

import pytest
import torch

from scripts_loader import ROOT, load_script

gpu_check = load_script("gpu_check")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: gpu_check would run")
def test_without_cuda_it_says_so_and_exits_2(tmp_path):
    out = tmp_path / "summary.json"
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device is visible to PyTorch here")
    assert done.stderr == "" and not out.exists()


def test_a_failing_check_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "check_search", lambda ctx: {"detail": "same neighbours"}, raising=True)

    def broken(ctx):
        raise gpu_check.CheckFailed("neighbours differ beyond ties (0.2% of ids)\nlong details")

    def crashing(ctx):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu_check, "check_memory_step", broken)
    monkeypatch.setattr(gpu_check, "check_ddp_nccl", crashing)
    rows = gpu_check.run_checks(["memory_step", "search", "ddp_nccl"], ctx=None)
    assert [(r["check"], r["status"]) for r in rows] == [("memory_step", "FAIL"), ("search", "pass"),
                                                         ("ddp_nccl", "FAIL")]
    assert "illegal memory access" in rows[2]["detail"] and "Traceback" in rows[2]["traceback"]
    table = gpu_check.summary_table(rows).splitlines()
    assert table[0] == "| check | status | seconds | result |"
    assert table[2].startswith("| memory_step | FAIL | ") and table[2].endswith(
        "| neighbours differ beyond ties (0.2% of ids) |")
    json.dumps(rows)  # the summary is JSON-serialisable as written by main


def test_neighbours_equal_up_to_ties():
    query = torch.tensor([[1.0, 0.0]])
    gallery = torch.tensor([[0.6, 0.8], [0.0, 1.0], [0.6, -0.8], [0.9, 0.1]])  # rows 0 and 2 tie
    ref_sims, ref_ids = torch.tensor([[0.9, 0.6, 0.6]]), torch.tensor([[3, 0, 2]])
    swapped_tie = torch.tensor([[3, 2, 0]])
    assert gpu_check._same_up_to_ties(query, gallery, ref_sims, swapped_tie, ref_sims, ref_ids) == (
        True, pytest.approx(2 / 3))
    wrong = torch.tensor([[3, 0, 1]])  # row 1 has similarity 0, not 0.6, whatever the reported value
    assert gpu_check._same_up_to_ties(query, gallery, ref_sims, wrong, ref_sims, ref_ids)[0] is False
    assert gpu_check._same_up_to_ties(query, gallery, ref_sims + 1e-3, ref_ids, ref_sims, ref_ids)[0] is False


def test_every_check_has_a_function():
    assert all(callable(getattr(gpu_check, f"check_{name}")) for name in gpu_check.CHECKS)
    assert os.path.isfile(os.path.join(ROOT, "benchmarks", "bench_train_throughput.py"))
