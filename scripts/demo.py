#!/usr/bin/env python
"""The `make demo` run: the papers' story on Glyphs, in four trainings and one table.

  no memory            the in-batch contrastive loss alone (averaged over its active pairs)
  XBM, summed loss     the XBM paper's loss as the official code reduces it (pair losses summed
                       and divided by the batch size): against 4,096 stored embeddings that sum
                       outweighs the in-batch term, and trained from scratch XBM collapses
  XBM, averaged loss   the same loss averaged over active pairs: XBM no longer collapses
  XBN, averaged loss   the memory re-aligned to each batch's moments: ahead of no memory

Each run trains 600 iterations at batch 16 (the configs' 2,000, or the sweeps' 1,200, would keep
`make demo` past 6 minutes on a 2-core CPU), two runs at a time with one thread each, so the four
take about 3.5 minutes on 2 cores, evaluation included (each run spends about 40 s of its ~100
embedding the 15,668 test images). The story holds at this length over 3 seeds (BENCHMARKS.md, "The
demo's length"). A run's numbers depend on its thread count: that section's runs had two threads
each, so its seed 0 differs from this table by a few points, in the same order; rerun with one
thread, two at a time, the demo repeats its own numbers bit for bit on the same machine.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xbm.config import load_cfg  # noqa: E402
from xbm.data.datasets import build_dataset  # noqa: E402
from xbm.utils.env import threads_per_job  # noqa: E402

AVERAGED = ["LOSS.CONTRASTIVE.REDUCTION", "pairs"]
RUNS = {
    "no memory": ("configs/glyphs_baseline.yaml", AVERAGED),
    "XBM, summed": ("configs/glyphs_xbm.yaml", []),
    "XBM, averaged": ("configs/glyphs_xbm.yaml", AVERAGED),
    "XBN, averaged": ("configs/glyphs_xbn.yaml", AVERAGED),
    "AXBN, averaged": ("configs/glyphs_axbn.yaml", AVERAGED),
}
DEFAULT_RUNS = ["no memory", "XBM, summed", "XBM, averaged", "XBN, averaged"]


def train(name: str, cfg_file: str, opts: list[str], folder: str, threads: int):
    """One run in this process, its console output in FOLDER/console.log; (name, test metrics, seconds)."""
    import torch

    from xbm.engine.defaults import DefaultTrainer

    torch.set_num_threads(threads)
    os.makedirs(folder, exist_ok=True)
    start = time.time()
    with open(os.path.join(folder, "console.log"), "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        results = DefaultTrainer(load_cfg(cfg_file, opts)).train()
    return name, results["test"], time.time() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, choices=list(RUNS))
    parser.add_argument("--output", default="output/demo", help="one sub-folder per run")
    parser.add_argument("--iters", type=int, default=600,
                        help="SOLVER.MAX_ITERS of every run (1200: the sweeps of BENCHMARKS.md)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs at a time, each with cores / jobs threads (a run's numbers depend on its threads)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="overrides for every run, e.g. SOLVER.MAX_ITERS 500")
    args = parser.parse_args()
    jobs = max(1, min(args.jobs, len(args.runs)))
    threads = threads_per_job(jobs)
    print(f"{len(args.runs)} runs of {args.iters} iterations, {jobs} at a time with {threads} thread(s) each; "
          f"each run's console output is in {args.output}/<run>/console.log", flush=True)

    plans = []
    for name in args.runs:
        cfg_file, extra = RUNS[name]
        folder = os.path.join(args.output, name.replace(", ", "_").replace(" ", "_").lower())
        opts = ["OUTPUT_DIR", folder, "SOLVER.MAX_ITERS", str(args.iters), "TEST.EVAL_PERIOD", "0", *extra, *args.opts]
        try:
            cfg = load_cfg(cfg_file, opts)  # a bad override is one sentence here, before anything runs
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        plans.append((name, cfg_file, opts, folder))
    build_dataset(cfg, "train")  # Glyphs is generated on first use: once, here, not by two runs at once

    submitted = {}
    # spawn: a fresh interpreter per worker, so torch's thread pools start as set here
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for name, cfg_file, opts, folder in plans:
            submitted[pool.submit(train, name, cfg_file, opts, folder, threads)] = name
        finished = {}
        for future in concurrent.futures.as_completed(submitted):
            name, result, seconds = future.result()
            finished[name] = (result, seconds)
            print(f"  {name}: test R@1 {100 * result['R@1']:.2f} ({seconds:.0f} s)", flush=True)

    rows = [(name, *finished[name]) for name in args.runs]
    metrics = [k for k, v in rows[0][1].items() if isinstance(v, float)]
    print(f"\nGlyphs test split (class-disjoint), leave-one-out retrieval after {args.iters} iterations, in %:")
    print(f"{'method':<16}" + "".join(f"{m:>9}" for m in metrics) + f"{'time':>9}")
    for name, result, seconds in rows:
        print(f"{name:<16}" + "".join(f"{100 * result[m]:>9.2f}" for m in metrics) + f"{seconds:>8.0f}s")
    print("\nEach run's config.yaml, metrics.jsonl, log.txt, checkpoint and tensorboard events are in "
          f"{args.output}/.\nEvaluate a checkpoint again with: python tools/eval.py --ckpt "
          f"{args.output}/xbn_averaged/checkpoints/last.pth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
