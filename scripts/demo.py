#!/usr/bin/env python
"""The `make demo` run: the same Glyphs training without a memory, with plain XBM, and with XBN.

Each run trains 1,200 iterations (the configs' 2,000 would push `make demo` past 10 minutes on a
2-core CPU) and takes under two minutes there, evaluation included. Trained from scratch, plain XBM
collapses (its memory term dwarfs the in-batch term while the embedding still drifts fast) and
XBN's moment matching repairs it (BENCHMARKS.md has the seeded measurement), and the table printed
at the end lets you see it on your machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xbm.config import load_cfg  # noqa: E402
from xbm.engine.trainer import Trainer  # noqa: E402

RUNS = {
    "no memory": "configs/glyphs_baseline.yaml",
    "XBM": "configs/glyphs_xbm.yaml",
    "XBN": "configs/glyphs_xbn.yaml",
    "AXBN": "configs/glyphs_axbn.yaml",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["no memory", "XBM", "XBN"], choices=list(RUNS))
    parser.add_argument("--output", default="output/demo", help="one sub-folder per run")
    parser.add_argument("--iters", type=int, default=1200, help="SOLVER.MAX_ITERS of every run")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="overrides for every run, e.g. SOLVER.MAX_ITERS 500")
    args = parser.parse_args()

    rows = []
    for name in args.runs:
        folder = os.path.join(args.output, name.replace(" ", "_").lower())
        opts = ["OUTPUT_DIR", folder, "SOLVER.MAX_ITERS", str(args.iters), "TEST.EVAL_PERIOD", "0", *args.opts]
        cfg = load_cfg(RUNS[name], opts)
        print(f"\n=== {name}: {RUNS[name]} -> {folder}", flush=True)
        start = time.time()
        results = Trainer(cfg).train()
        rows.append((name, results["test"], time.time() - start))

    metrics = [k for k, v in rows[0][1].items() if isinstance(v, float)]
    print(f"\nGlyphs test split (class-disjoint), leave-one-out retrieval after {args.iters} iterations, in %:")
    print(f"{'method':<10}" + "".join(f"{m:>9}" for m in metrics) + f"{'time':>9}")
    for name, result, seconds in rows:
        print(f"{name:<10}" + "".join(f"{100 * result[m]:>9.2f}" for m in metrics) + f"{seconds:>8.0f}s")
    print("\nEach run's config.yaml, metrics.jsonl, log.txt, checkpoint and tensorboard events are in "
          f"{args.output}/.\nEvaluate a checkpoint again with: python tools/eval.py --ckpt "
          f"{args.output}/xbn/checkpoints/last.pth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
