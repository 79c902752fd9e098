"""benchmarks/bench_index.py runs and measures what it says (no timing is asserted)."""
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_index  # noqa: E402


def test_recall_at_k_counts_shared_neighbours_per_query():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, 1], [0, 0, 0, 5]])  # 3 of 4, then 1 of 4, in any order
    assert bench_index.recall_at_k(found, exact) == pytest.approx((3 / 4 + 1 / 4) / 2)


def test_clustered_vectors_are_unit_length_and_clustered():
    gallery, queries = bench_index.clustered_vectors(2000, 16, num_clusters=10, seed=0)
    assert gallery.shape == (2000, 16) and queries.shape == (100, 16) and gallery.dtype == np.float32
    assert np.allclose(np.linalg.norm(gallery, axis=1), 1.0, atol=1e-5)
    # Nearest neighbours are far closer than random pairs: the data has cluster structure.
    sims = queries @ gallery.T
    assert np.sort(sims, axis=1)[:, -10:].mean() > sims.mean() + 0.3


def test_exact_rows_have_full_recall_and_the_script_prints_its_table():
    rows = bench_index.bench_gallery(3000, 16, ["flat", "ivf-flat"], repeats=1, train_size=3000, seed=0)
    assert [r["type"] for r in rows] == ["exact", "flat"] + ["ivf-flat"] * 4
    assert rows[0]["recall"] == rows[1]["recall"] == 1.0
    ivf = [r["recall"] for r in rows if r["type"] == "ivf-flat"]
    assert all(0 < r <= 1 for r in ivf) and ivf == sorted(ivf)  # more lists probed, no fewer found
    assert bench_index.goal_met([{**rows[0], "speedup": 10.0}])  # the exact row meets any recall bar
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_index.py"), "--galleries",
                           "2000x8", "--types", "flat", "hnsw", "--repeats", "1"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "| 2,000 x 8 | hnsw | `HNSW32` | efSearch=32 |" in done.stdout and "load average" in done.stdout
