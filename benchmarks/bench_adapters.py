"""What each memory adapter adds to a training step, at the SOP size, against the XBM step itself.

For each (B, M, D): one XBM step (enqueue + contrastive loss forward and backward against the whole
memory, no adaptation; bench_memory_loss.py's `xbm` column) and each adapter's `adapt_` alone on
the same memory, timed round-robin in one run so that machine load hits all alike. Columns are ms per
step (median over the repeats) and the adapter's time over the XBM step's.

  xbn       MomentMatching (XBN)
  axbn      KalmanMomentMatching (AXBN)
  xbn_full  CovarianceMatching: mean and full covariance (two D x D eigendecompositions, an M x D x D product)
  xbn_age   CohortMomentMatching with 4 age cohorts

Usage: python benchmarks/bench_adapters.py [--threads 2] [--repeats 7] [--quick] [--device cuda]
"""
from __future__ import annotations

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_memory_loss import (Workload, load_average, make_loss, ours_memory, parse_timing_args,  # noqa: E402
                               step_adapt_only, step_ours, time_round_robin)
from xbm.memory import CohortMomentMatching, CovarianceMatching, KalmanMomentMatching, MomentMatching  # noqa: E402

# SOP: 59,551 training images, the XBN paper's 512-d embeddings and our 128-d heads.
FULL_CONFIGS = [(64, 55_000, 512), (64, 55_000, 128)]
QUICK_CONFIGS = [(64, 8_192, 128)]
ADAPTERS = {"xbn": MomentMatching, "axbn": KalmanMomentMatching, "xbn_full": CovarianceMatching,
            "xbn_age": lambda: CohortMomentMatching(groups=4)}


def run_config(batch: int, size: int, dim: int, repeats: int, device: torch.device) -> dict:
    work = Workload(batch, size, dim, device)
    _, _, emb, labels = work.on_device()
    pointer = size - batch // 2
    steps = {"xbm step": step_ours(ours_memory(work, pointer), make_loss("contrastive"))}
    for name, make in ADAPTERS.items():
        steps[name] = step_adapt_only(ours_memory(work, pointer), make())
    return time_round_robin(steps, emb, labels, repeats, device)


def main() -> None:
    args, device, repeats = parse_timing_args(__doc__, repeats=7)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, repeats {repeats}, "
          f"load average at start: {load_average()}")
    names = ["xbm step", *ADAPTERS]
    print("| B | M | D | " + " | ".join(f"{n} ms" for n in names) + " | "
          + " | ".join(f"{n} / xbm step" for n in ADAPTERS) + " |")
    print("|" + "---|" * (3 + len(names) + len(ADAPTERS)))
    for batch, size, dim in QUICK_CONFIGS if args.quick else FULL_CONFIGS:
        times = {k: statistics.median(v) for k, v in run_config(batch, size, dim, repeats, device).items()}
        cells = [f"{times[n] * 1e3:.1f}" for n in names]
        ratios = [f"{times[n] / times['xbm step']:.2f}" for n in ADAPTERS]
        print(f"| {batch} | {size:,} | {dim} | " + " | ".join(cells + ratios) + " |", flush=True)
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
