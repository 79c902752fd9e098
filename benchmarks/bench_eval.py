"""Benchmark: full retrieval evaluation at SOP test scale, side by side with peers.

Data: 60,502 x 512 class-clustered random unit vectors in 11,316 classes of
2-12 items (the SOP test split's shape), leave-one-out.  Methods, each in its
own subprocess so their memory is measured separately:

  faiss_bare        IndexFlatIP add + search of k + 1 = 1002 neighbours (search only)
  xbm_faiss         xbm.evaluation.evaluate: R@1/10/100/1000 + MAP@R + RP, faiss backend
  xbm_torch         the same with the torch (matmul + topk) backend
  faiss_bare_small  IndexFlatIP search of max class size + 1 = 13 neighbours
  xbm_faiss_small   evaluate(ks=(1,)): R@1 + MAP@R + RP (k = max R = 11 neighbours)
  pml               pytorch-metric-learning AccuracyCalculator(k="max_bin_count"):
                    precision_at_1 + r_precision + mean_average_precision_at_r

Memory: "peak extra" is the process's peak resident set size during the call
minus its resident size just before it (the kernel's high-water mark is reset
through /proc/self/clear_refs; where that is refused, ru_maxrss is used and
the figure is a lower bound).  It counts everything the call touches:
copies, faiss/BLAS scratch, and the result it returns.

    python benchmarks/bench_eval.py [--quick] [--threads 2] [--repeats 1] [--methods ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KS = (1, 10, 100, 1000)
ALL_METHODS = ("faiss_bare", "xbm_faiss", "xbm_torch",
               "faiss_bare_small", "xbm_faiss_small", "pml")


def class_sizes(rng, num_items: int, num_classes: int, low=2, high=12) -> np.ndarray:
    """Class sizes in [low, high] summing to num_items, one class of size high."""
    mean_extra = num_items / num_classes - low
    sizes = low + np.minimum(rng.poisson(mean_extra, num_classes), high - low)
    sizes[0] = high
    while (diff := num_items - int(sizes.sum())) != 0:
        room = np.flatnonzero(sizes < high) if diff > 0 else np.flatnonzero(sizes > low)
        room = room[room != 0]
        chosen = rng.choice(room, min(abs(diff), len(room)), replace=False)
        sizes[chosen] += 1 if diff > 0 else -1
    return sizes


def make_data(num_items: int, num_classes: int, dim: int, seed: int):
    """Class-clustered unit vectors: centre + isotropic noise of a per-class scale."""
    rng = np.random.default_rng(seed)
    sizes = class_sizes(rng, num_items, num_classes)
    labels = np.repeat(np.arange(num_classes), sizes)
    centres = rng.standard_normal((num_classes, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # Noise norm 1.8-2.6 x the unit centre: R@1 about 0.74 at full scale (SOP-like).
    scale = (rng.uniform(1.8, 2.6, num_classes) / np.sqrt(dim)).astype(np.float32)
    x = rng.standard_normal((num_items, dim), dtype=np.float32) * scale[labels, None]
    x += centres[labels]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert x.dtype == np.float32
    order = rng.permutation(num_items)
    return np.ascontiguousarray(x[order]), labels[order]


def _read_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_method(method: str, x: np.ndarray, labels: np.ndarray) -> dict:
    """Run one method on the loaded data; returns its metrics (if any)."""
    import torch

    max_count = int(np.bincount(labels).max())
    if method.startswith("faiss_bare"):
        import faiss
        k = KS[-1] + 1 if method == "faiss_bare" else max_count + 1
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        sims, ids = index.search(x, k)
        return {"k": k}
    if method.startswith("xbm_"):
        from xbm.evaluation import evaluate
        backend = "torch" if method == "xbm_torch" else "faiss"
        ks = (1,) if method == "xbm_faiss_small" else KS
        return evaluate(torch.from_numpy(x), torch.from_numpy(labels), ks=ks, backend=backend)
    if method == "pml":
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
        calc = AccuracyCalculator(
            include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
            k="max_bin_count", device=torch.device("cpu"))
        res = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(labels))
        return {"R@1": res["precision_at_1"], "RP": res["r_precision"],
                "MAP@R": res["mean_average_precision_at_r"]}
    raise ValueError(f"unknown method {method!r}")


def child(args) -> None:
    """Subprocess body: load data, measure one method, print one JSON line."""
    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    if args.method == "pml":
        try:
            import pytorch_metric_learning  # noqa: F401
        except ImportError:
            print(json.dumps({"method": "pml", "skipped": "pytorch-metric-learning not installed"}))
            return
    else:
        from xbm.evaluation import evaluate  # noqa: F401  (import cost outside the timing)
    x = np.load(os.path.join(args.data, "x.npy"))
    labels = np.load(os.path.join(args.data, "labels.npy"))
    exact_peak = _reset_peak_rss()
    rss_before = _read_status_kb("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = run_method(args.method, x, labels)
    seconds = time.perf_counter() - start
    if exact_peak:
        peak, base = _read_status_kb("VmHWM"), rss_before
    else:
        peak, base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, maxrss_before
    print(json.dumps({"method": args.method, "seconds": seconds,
                      "peak_extra_mb": (peak - base) / 1024, "exact_peak": exact_peak,
                      "result": result}))


def run_child(method: str, data_dir: str, threads: int) -> dict | None:
    """Run one method in a fresh interpreter; its JSON line, or None on failure."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--data", data_dir,
           "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})
    if out.returncode != 0:
        print(f"{method}: failed\n{out.stderr[-2000:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def parent(args) -> None:
    n, classes = (10_000, 1_870) if args.quick else (60_502, 11_316)
    x, labels = make_data(n, classes, args.dim, args.seed)
    max_count = int(np.bincount(labels).max())
    emb_mb = x.nbytes / 2**20
    knn_mb = n * KS[-1] * (4 + 8) / 2**20  # float32 sims + int64 ids for k = 1000
    print(f"data: {n} x {args.dim} float32 ({emb_mb:.0f} MB), {classes} classes, "
          f"max class size {max_count}; threads {args.threads}")
    print(f"memory budget (2 x embeddings + k-NN result at k={KS[-1]}): "
          f"{2 * emb_mb + knn_mb:.0f} MB")
    print("load average at start: %.2f %.2f %.2f" % os.getloadavg())

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        np.save(os.path.join(tmp, "x.npy"), x)
        np.save(os.path.join(tmp, "labels.npy"), labels)
        del x
        # Rounds run every method once, in turn, so that load from other
        # processes on a shared machine hits all methods alike; the fastest
        # round counts for time, the largest peak for memory.
        for round_ in range(args.repeats):
            for method in args.methods:
                row = run_child(method, tmp, args.threads)
                if row is None:
                    continue
                print(f"  round {round_ + 1}: {method} {row.get('seconds', 0):.1f} s", flush=True)
                if method in rows and "seconds" in row:
                    best = rows[method]
                    row["peak_extra_mb"] = max(row["peak_extra_mb"], best["peak_extra_mb"])
                    row["seconds"] = min(row["seconds"], best["seconds"])
                rows[method] = row

    print("load average at end: %.2f %.2f %.2f" % os.getloadavg())
    print()
    print("| method | seconds | vs faiss_bare (same k) | peak extra MB | metrics |")
    print("|---|---|---|---|---|")
    baseline_of = {"xbm_faiss": "faiss_bare", "xbm_torch": "faiss_bare",
                   "xbm_faiss_small": "faiss_bare_small", "pml": "faiss_bare_small"}
    for method, row in rows.items():
        if "skipped" in row:
            print(f"| {method} | skipped: {row['skipped']} | | | |")
            continue
        base = rows.get(baseline_of.get(method, method))
        ratio = f"{row['seconds'] / base['seconds']:.2f}x" if base and "seconds" in base else "-"
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in row["result"].items()
                            if k.startswith(("R@", "MAP", "RP")))
        peak = f"{row['peak_extra_mb']:.0f}" + ("" if row["exact_peak"] else " (lower bound)")
        print(f"| {method} | {row['seconds']:.1f} | {ratio} | {peak} | {metrics} |")
    if "xbm_faiss" in rows and "pml" in rows and "seconds" in rows["pml"]:
        print(f"\nxbm_faiss (k=1000, all metrics) / pml (k={max_count}): "
              f"{rows['xbm_faiss']['seconds'] / rows['pml']['seconds']:.2f}x time")
    if "xbm_faiss_small" in rows and "pml" in rows and "seconds" in rows["pml"]:
        print(f"xbm_faiss_small / pml (same metrics, same k): "
              f"{rows['xbm_faiss_small']['seconds'] / rows['pml']['seconds']:.2f}x time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 items instead of 60,502")
    parser.add_argument("--threads", type=int, default=2, help="torch and faiss threads")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds over all methods; best time and largest peak are reported")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.method = args.child
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
