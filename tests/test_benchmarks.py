"""The benchmark scripts still run, and what they compare agrees (no timing is asserted: these
machines are noisy, and the scripts print ratios for a person to read)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(name: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_bench_data_times_both_loaders():
    out = run_benchmark("bench_data.py", "--images", "4", "--repeats", "1", "--backbones", "resnet50")
    (row,) = re.findall(r"^resnet50\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)$", out, re.M)
    ours, plain, ratio = map(float, row)
    assert ours > 0 and plain > 0 and ratio == pytest.approx(ours / plain, abs=0.01)


def test_bench_memory_loss_quick_checks_gradients_and_prints_both_losses():
    out = run_benchmark("bench_memory_loss.py", "--quick", "--repeats", "1", "--threads", "1")
    for loss in ("contrastive", "multi-sim"):
        assert re.search(rf"^\| 64 \| 8,192 \| 128 \| {loss} \| [0-9.]+ \|", out, re.M), out
    # with pytorch-metric-learning installed (the `bench` extra) the gradients are compared first
    for difference in re.findall(r"max\|grad ours - grad peer\| / max\|grad ours\| = ([0-9.e+-]+)", out):
        assert float(difference) < 1e-5


def test_bench_adapters_quick_times_every_adapter_against_the_xbm_step():
    out = run_benchmark("bench_adapters.py", "--quick", "--repeats", "1", "--threads", "1")
    (row,) = re.findall(r"^\| 64 \| 8,192 \| 128 \| (.*) \|$", out, re.M)
    cells = [float(c) for c in row.split(" | ")]
    times, ratios = cells[:5], cells[5:]  # xbm step, xbn, axbn, xbn_full, xbn_age; then each / xbm step
    assert len(ratios) == 4 and all(t > 0 for t in times)
    # the ratios are of the unrounded times: equal to those of the printed ones up to the rounding
    assert ratios == pytest.approx([t / times[0] for t in times[1:]], rel=0.1, abs=0.02)


@pytest.mark.slow
@pytest.mark.heavy
def test_bench_eval_quick_every_method_gets_the_same_metrics():
    out = run_benchmark("bench_eval.py", "--quick", "--repeats", "1", "--threads", "1")
    r1 = dict(re.findall(r"^\| (\w+) \| [0-9.]+ \| [0-9.]+x \| \d+ \| .*?R@1 ([0-9.]+)", out, re.M))
    assert {"xbm_faiss", "xbm_torch", "xbm_faiss_small"} <= set(r1), out
    assert len(set(r1.values())) == 1, r1  # every exact search finds the same neighbours


# A ResNet-18 at two settings (10 s); make test-all runs it.
@pytest.mark.heavy
def test_bench_train_throughput_times_each_setting_against_fp32():
    out = run_benchmark("bench_train_throughput.py", "--device", "cpu", "--backbones", "resnet18", "--size", "32",
                        "--batch", "8", "--steps", "1", "--warmup", "0", "--settings", "fp32", "amp",
                        "--memory", "16", "--dim", "8")
    rows = re.findall(r"^\| resnet18 \| (\w+) \| (\w+) \| ([0-9.]+) \| ([0-9.]+)x \|$", out, re.M)
    assert [(setting, amp) for setting, amp, _, _ in rows] == [("fp32", "none"), ("amp", "bf16")]
    fp32, amp = (float(rate) for _, _, rate, _ in rows)
    # the printed rates are rounded to 0.1 image/s, the ratio is computed before rounding
    assert float(rows[0][3]) == 1.0 and float(rows[1][3]) == pytest.approx(amp / fp32, rel=0.05, abs=0.01)


def test_bench_undo_quick_times_the_three_undo_versions():
    out = run_benchmark("bench_undo.py", "--quick", "--repeats", "1", "--threads", "1")
    (row,) = re.findall(r"^\| 64 \| 8,192 \| 128 \| (.*) \|$", out, re.M)
    cells = [float(c) for c in row.split(" | ")]
    times, ratios = cells[:3], cells[3:]  # xbn step, + undo, + full copy; then the last two over the first
    assert len(ratios) == 2 and all(t > 0 for t in times)
    assert ratios == pytest.approx([t / times[0] for t in times[1:]], rel=0.1, abs=0.02)
    # where the undo's cost goes: the adaptation's pass in place and into a second buffer, and their difference
    (passes,) = re.findall(r"^\| 8,192 \| 128 \| ([0-9.]+) \| ([0-9.]+) \| ([+-][0-9.]+) \|$", out, re.M)
    inplace, second, difference = (float(c) for c in passes)
    assert difference == pytest.approx(second - inplace, abs=0.011)  # each printed to 0.01 ms


def test_bench_drift_corrections_quick_counts_each_corrections_extra_images(glyph_root):
    out = run_benchmark("bench_drift_corrections.py", "--quick", "--threads", "1", "--root", str(glyph_root),
                        "--min-fonts", "4")
    rows = dict((name.strip(), cells) for name, *cells in
                (line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ")))
    images = {name: (float(cells[2]), float(cells[3])) for name, cells in rows.items() if name != "variant"}
    # batch 16: 16 images with gradient per step; the key encoder forwards the batch again without gradient,
    # a refresh its R stored items, age weighting nothing
    assert images == {"xbn": (16, 0), "+ key encoder": (16, 16), "+ refresh 16": (16, 16), "+ refresh 64": (16, 64),
                      "+ age weighting": (16, 0)}
    assert float(rows["xbn"][1]) == 1.0
