"""Benchmark: the gallery index types of xbm-index against exact search.

Data: clustered synthetic unit vectors (a centre per cluster plus isotropic noise of a
per-cluster scale, normalised), 1,000,000 x 128 and 100,000 x 512, and 1,000 held-out
queries drawn the same way. For each index type (built by xbm.serving.index.build_faiss_index,
the code xbm-index runs, trained on a sample of at most --train-size vectors) and each search
parameter it reports:

  build s     training + adding every vector, seconds
  MB          the index's size in memory, measured as its serialized size (faiss.serialize_index)
  QPS         queries per second, the best of --repeats searches of all queries for k = 10
  speed-up    QPS / the exact search's QPS, both measured in this run
  recall@10   |approximate top 10 & exact top 10| / 10, averaged over the queries

The exact top 10 and the exact QPS come from xbm.evaluation.search.knn (faiss' brute-force
inner-product kernel, the search the evaluation uses). Threads: --threads (default 2). The
load average of the machine is printed before and after: other processes slow every row
alike, but a loaded machine makes all the QPS figures noisier.

    python benchmarks/bench_index.py [--quick] [--threads 2] [--repeats 3] [--types flat ivf-flat ivf-pq hnsw]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import faiss  # noqa: E402

from xbm.evaluation.search import knn  # noqa: E402
from xbm.serving.index import (  # noqa: E402
    build_faiss_index,
    default_nlist,
    factory_string,
    set_search_params,
)

K = 10
FULL_GALLERIES = ((1_000_000, 128), (100_000, 512))
QUICK_GALLERIES = ((20_000, 32), (5_000, 64))


def clustered_vectors(num: int, dim: int, num_clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(gallery, queries): unit vectors around `num_clusters` random centres; 1,000 queries (fewer if quick)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = rng.uniform(0.4, 0.8, num_clusters).astype(np.float32)

    def draw(count: int) -> np.ndarray:
        owner = rng.integers(0, num_clusters, count)
        noise = rng.standard_normal((count, dim), dtype=np.float32) / np.sqrt(dim, dtype=np.float32)
        points = centres[owner] + spread[owner, None] * noise
        points /= np.linalg.norm(points, axis=1, keepdims=True)
        return points

    return draw(num), draw(min(1000, max(100, num // 50)))


def sweeps(num: int, dim: int) -> list[tuple[str, str, list[str]]]:
    """(type name, factory string, search-parameter strings) of every index type measured."""
    nlist = default_nlist(num)
    probes = [f"nprobe={max(1, nlist // d)}" for d in (128, 64, 32, 16)]
    return [
        ("flat", factory_string("flat", num, dim), [""]),
        ("ivf-flat", factory_string("ivf-flat", num, dim), probes),
        ("ivf-pq", factory_string("ivf-pq", num, dim), probes[1:]),
        ("hnsw", factory_string("hnsw", num, dim), [f"efSearch={e}" for e in (32, 64, 128, 256)]),
    ]


def best_time(function, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact top k that the approximate top k contains."""
    return float(np.mean([len(set(f) & set(e)) / exact.shape[1] for f, e in zip(found.tolist(), exact.tolist())]))


def bench_gallery(num: int, dim: int, types: list[str], repeats: int, train_size: int, seed: int) -> list[dict]:
    gallery, queries = clustered_vectors(num, dim, num_clusters=max(10, num // 200), seed=seed)
    _, exact_ids = knn(queries, gallery, k=K, backend="faiss")
    knn_s = best_time(lambda: knn(queries, gallery, k=K, backend="faiss"), repeats)
    flat = build_faiss_index(gallery, "Flat")
    flat_s = best_time(lambda: flat.search(queries, K), repeats)
    flat = None  # free the copy of the gallery before the next index is built
    # The baseline is the faster of the two exact searches, so that no speed-up is flattered.
    exact_s = min(knn_s, flat_s)
    rows = [{"gallery": f"{num:,} x {dim}", "type": "exact", "factory": "xbm knn (faiss.knn)", "params": "",
             "build_s": 0.0, "mb": gallery.nbytes / 2**20, "qps": len(queries) / knn_s, "speedup": exact_s / knn_s,
             "recall": 1.0}]
    print(f"{num:,} x {dim}: exact search {len(queries) / exact_s:,.0f} queries/s", file=sys.stderr, flush=True)
    for name, factory, param_list in sweeps(num, dim):
        if name not in types:
            continue
        start = time.perf_counter()
        index = build_faiss_index(gallery, factory, train_size=train_size, seed=seed)
        build_s = time.perf_counter() - start
        megabytes = faiss.serialize_index(index).nbytes / 2**20
        for params in param_list:
            set_search_params(index, params)
            _, ids = index.search(queries, K)
            seconds = best_time(lambda: index.search(queries, K), repeats)
            row = {"gallery": f"{num:,} x {dim}", "type": name, "factory": factory, "params": params,
                   "build_s": build_s, "mb": megabytes, "qps": len(queries) / seconds,
                   "speedup": exact_s / seconds, "recall": recall_at_k(ids, exact_ids)}
            rows.append(row)
            print(f"  {factory} {params}: {row['qps']:,.0f} q/s ({row['speedup']:.1f}x), "
                  f"recall@10 {row['recall']:.3f}, build {build_s:.1f} s", file=sys.stderr, flush=True)
        index = None
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| gallery | type | factory | search params | build s | MB | QPS | x exact | recall@10 |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['gallery']} | {r['type']} | `{r['factory']}` | {r['params'] or '-'} | "
                     f"{r['build_s']:.1f} | {r['mb']:.0f} | {r['qps']:,.0f} | {r['speedup']:.1f} | "
                     f"{r['recall']:.3f} |")
    return "\n".join(lines)


def goal_met(rows: list[dict], min_recall: float = 0.95, min_speedup: float = 10.0) -> dict[str, list[str]]:
    """Per gallery, the (type, params) that keep >= min_recall recall@10 at >= min_speedup x exact QPS."""
    met: dict[str, list[str]] = {}
    for r in rows:
        if r["recall"] >= min_recall and r["speedup"] >= min_speedup:
            met.setdefault(r["gallery"], []).append(f"{r['factory']} {r['params']}".strip())
    return met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small galleries (seconds), for a smoke test")
    parser.add_argument("--threads", type=int, default=2, help="faiss/OpenMP threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="searches timed per row; the best counts")
    parser.add_argument("--train-size", type=int, default=100_000, help="training sample of IVF/PQ (default 100000)")
    parser.add_argument("--types", nargs="+", default=["flat", "ivf-flat", "ivf-pq", "hnsw"],
                        choices=["flat", "ivf-flat", "ivf-pq", "hnsw"])
    parser.add_argument("--galleries", nargs="+", metavar="NxD",
                        help="gallery sizes to measure, e.g. 100000x512 (default: 1000000x128 100000x512; "
                        "with --quick 20000x32 5000x64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    galleries = QUICK_GALLERIES if args.quick else FULL_GALLERIES
    if args.galleries:
        galleries = [tuple(int(v) for v in g.lower().split("x")) for g in args.galleries]
    for num, dim in galleries:
        rows += bench_gallery(num, dim, args.types, args.repeats, args.train_size, args.seed)
    load_after = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, faiss {faiss.__version__}, "
          f"{args.threads} threads; load average (1/5/15 min) before {load_before[0]:.1f}/{load_before[1]:.1f}/"
          f"{load_before[2]:.1f}, after {load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f}")
    print(markdown(rows))
    met = goal_met(rows)
    for gallery in dict.fromkeys(r["gallery"] for r in rows):
        print(f"{gallery}: >= 0.95 recall@10 at >= 10x exact QPS: {', '.join(met.get(gallery, [])) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
